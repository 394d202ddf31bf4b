"""The device a job runs on: one rule for ``detkit train``, ``eval``, ``predict``, ``bench`` and the Python API.

``resolve_device("auto")`` is ``cuda:<i>`` when a GPU is usable and ``cpu`` otherwise; a fall-back to the CPU is
logged once per process with its reason (:func:`cuda_unavailable_reason`: no CUDA build of torch, no GPU visible,
or CUDA failing to start, e.g. a driver too old for this torch). ``cuda`` and ``cuda:N`` fail with a
:class:`~detkit.errors.ConfigError` giving the same reason when no GPU is usable.

The GPU index ``i`` (:func:`cuda_index`) follows the launch: a process that sees exactly one GPU uses it, whatever
``LOCAL_RANK`` says (one task per GPU, as SLURM and other schedulers start jobs, ``CUDA_VISIBLE_DEVICES`` holding one
id); a process that sees several uses ``cuda:LOCAL_RANK`` (torchrun with ``--nproc_per_node`` up to the GPU count).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from detkit.errors import ConfigError

log = logging.getLogger("detkit.device")

#: set once the CPU fall-back of ``auto`` has been reported in this process
_fallback_reported = False
#: why the last ``auto`` of this process fell back to the CPU (None: it did not)
_last_fallback: str | None = None


def env_local_rank() -> int:
    """``LOCAL_RANK`` (set by torchrun and by cluster launch scripts), 0 without it."""
    raw = os.environ.get("LOCAL_RANK", "0").strip() or "0"
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"LOCAL_RANK must be an integer, got {raw!r}") from None


def _visible_devices_note() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"


def _torch_cuda_message(caught: list[warnings.WarningMessage]) -> str:
    """What torch itself said about CUDA: a warning raised while it counted devices, else the error of starting it.

    torch warns about a failed CUDA start only on the first query in a process, so when that warning was already
    shown, ``torch.cuda.init()`` (which only runs here when CUDA is known to be unusable) gives the same text.
    """
    for item in caught:
        text = str(item.message).strip()
        if "cuda" in text.lower():
            return text
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - any failure text is the reason we want
        return str(e).strip()
    return ""


def cuda_unavailable_reason() -> str | None:
    """Why no GPU can be used in this process, or None when one can.

    Three cases: torch was built without CUDA (``torch.version.cuda`` is None); no GPU is visible
    (``CUDA_VISIBLE_DEVICES`` empty, or ``torch.cuda.device_count() == 0``); GPUs are there but CUDA does not start
    (``torch.cuda.is_available()`` false on a CUDA build with devices: usually a driver too old for this torch).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"this PyTorch build has no CUDA support (torch {torch.__version__}, torch.version.cuda is None); "
                "install a CUDA build of torch to train on a GPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "no GPU is visible: CUDA_VISIBLE_DEVICES is set and empty"
    said = _torch_cuda_message(caught)
    if torch.cuda.device_count() == 0:
        return f"no GPU is visible{_visible_devices_note()}" + (f": torch says: {said}" if said else "")
    return ("CUDA failed to start although torch counts GPUs (a driver too old for this torch build, or a broken "
            f"CUDA installation){_visible_devices_note()}" + (f": torch says: {said}" if said else ""))


def fallback_reason() -> str | None:
    """Why the last ``resolve_device("auto")`` of this process chose the CPU; None when it chose a GPU (or none ran)."""
    return _last_fallback


def _report_fallback(reason: str) -> None:
    global _fallback_reported
    if _fallback_reported:
        return
    _fallback_reported = True
    level = logging.WARNING if os.environ.get("RANK", "0") == "0" else logging.INFO  # said once per job, by rank 0
    log.log(level, "device auto: running on the CPU because %s", reason)


def cuda_index(local_rank: int) -> int:
    """The GPU this process uses: the only one it sees, else ``local_rank`` (checked against the visible count)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0  # one GPU per task (CUDA_VISIBLE_DEVICES holds one id): it, whatever LOCAL_RANK says
    if 0 <= local_rank < count:
        return local_rank
    raise ConfigError(
        f"LOCAL_RANK={local_rank} but this process sees {count} GPUs{_visible_devices_note()}: start at most {count} "
        "processes per node (torchrun --nproc_per_node), or give each process one GPU with CUDA_VISIBLE_DEVICES")


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or any ``torch.device`` string) -> the device to run on.

    ``auto`` -> ``cuda:<i>`` when a GPU is usable, else ``cpu`` (said once, with the reason); ``cuda`` ->
    ``cuda:<i>``, where ``i`` is :func:`cuda_index` of ``local_rank`` (default: the ``LOCAL_RANK`` variable). A CUDA
    device that cannot be used, or an index beyond the visible GPUs, is a :class:`ConfigError`.
    """
    global _last_fallback
    name = str(device).strip()
    if name == "auto":
        _last_fallback = reason = cuda_unavailable_reason()
        if reason is not None:
            _report_fallback(reason)
            return torch.device("cpu")
        name = "cuda"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N ({e})") from None
    if dev.type != "cuda":
        return dev
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise ConfigError(f"device {name!r} needs a GPU, but {reason} (use device auto or cpu)")
    if dev.index is None:
        return torch.device("cuda", cuda_index(env_local_rank() if local_rank is None else local_rank))
    count = torch.cuda.device_count()
    if dev.index >= count:
        raise ConfigError(f"device {name!r}: this process sees {count} GPU{'s' if count != 1 else ''}"
                          f"{_visible_devices_note()} (cuda:0 to cuda:{count - 1})")
    return dev
