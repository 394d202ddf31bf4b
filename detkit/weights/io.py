"""Weight files: atomic writes, ``weights_only`` reads, and sources (a path, or a URL cached with a hash check).

A detkit checkpoint is a plain dict (``model``, ``optimizer``, ``scheduler``, ``ema``, ``scaler``, ``epoch``,
``step``, ``rng``, ``config``, ``classes``, ``cat_ids``, ``plugins``, ``detkit_version``), saved with ``torch.save``
and always loaded with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused.
``cat_ids[label]`` is the training data set's original category id of each label (e.g. COCO's), used when writing
COCO results; it is None when the data set has none, and absent from checkpoints of older versions.

A URL is downloaded once into ``torch.hub.get_dir()/checkpoints`` (with a progress bar; a ``-<hex>.`` part of the
file name is checked against the file's SHA-256, as ``torch.hub`` does).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import socket
import tempfile
import urllib.error
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from detkit.errors import CheckpointError, ConfigError

__all__ = ["save_checkpoint", "remove_stale_temp_files", "load_checkpoint_file", "read_checkpoint", "resolve_source",
           "is_url", "looks_like_path", "sha256_of"]

log = logging.getLogger("detkit.pretrained")

_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl", ".tar")


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint to {path.parent}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files :func:`save_checkpoint` leaves when the process is killed while writing
    (``.<name>.pth.<random>.tmp``, as large as a checkpoint); returns what was removed. Call it only where no other
    process is writing checkpoints into ``directory`` (the trainer does, on rank 0, before its first step)."""
    removed = []
    for tmp in Path(directory).glob(".*.pth.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def load_checkpoint_file(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; every failure is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects that would run code when unpickled, and "
            "detkit only loads checkpoints with torch.load(weights_only=True).\n"
            "If you trust this file (you made it, or it comes from an official release), convert it once with\n"
            f"  python tools/convert_checkpoint.py {path} --trust-pickle --format auto --out CONVERTED.pth\n"
            f"which re-saves the tensors only. Details: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a torch file ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def is_url(source: str) -> bool:
    """True for an ``http(s)://``, ``ftp://`` or ``file://`` URL."""
    return urllib.parse.urlparse(source).scheme in ("http", "https", "ftp", "file")


def looks_like_path(source: str) -> bool:
    """True when ``source`` reads as a file path (a separator, ``~`` / ``.``, a weights suffix, or an existing file)
    rather than a weights name such as ``IMAGENET1K_V1``."""
    return (os.sep in source or "/" in source or source.startswith(("~", "."))
            or source.lower().endswith(_WEIGHT_SUFFIXES) or Path(source).exists())


def resolve_source(source: str, progress: bool = True) -> Path:
    """A local file for ``source``: the path itself, or a URL's copy in ``torch.hub.get_dir()/checkpoints``.

    A URL is downloaded once (atomically, with a progress bar); when its file name carries a hash (``name-<hex>.ext``)
    the download must match it, as ``torch.hub`` checks. Failures are a :class:`CheckpointError` that says where to
    put the file by hand.
    """
    if not is_url(source):
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise CheckpointError(f"weights file not found: {path}")
        return path
    name = os.path.basename(urllib.parse.urlparse(source).path)
    if not name:
        raise ConfigError(f"{source}: the URL names no file")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    dst = cache / name
    if dst.is_file():
        return dst
    match = torch.hub.HASH_REGEX.search(name)
    hash_prefix = match.group(1) if match and match.group(1) else None
    log.info("downloading %s to %s", source, dst)
    old_timeout = socket.getdefaulttimeout()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        socket.setdefaulttimeout(old_timeout or 60.0)  # never hang forever on an unreachable host
        torch.hub.download_url_to_file(source, str(dst), hash_prefix=hash_prefix, progress=progress)
    except RuntimeError as e:
        if "hash" not in str(e):
            raise
        raise CheckpointError(f"{source}: the downloaded file's SHA-256 does not start with {hash_prefix!r}, the hash "
                              "in its file name; the download is corrupt or the file changed, so nothing was cached "
                              f"({e})") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(f"cannot download {source}: {reason}. Without network access, fetch the file elsewhere "
                              f"and put it at {dst} (or give its local path instead of the URL)") from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    return dst


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` that also accepts the ``argparse.Namespace`` official checkpoints store
    under ``args`` (plain attributes, no code runs); anything else that needs unpickling is refused."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_checkpoint_file(path)


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


