"""ONNX export with post-processing inside, self-checked with onnxruntime (``detkit export``: :mod:`.cli`).

The exported graph::

    images      float32 (B, 3, H, W)  RGB, scaled to [0, 1] then normalised with the ImageNet mean / std
    orig_sizes  int64   (B, 2)        (h, w) of each original image: boxes come back in its pixels
    ->
    scores      float32 (B, K)
    labels      int64   (B, K)        class index (names in the metadata)
    boxes       float32 (B, K, 4)     x1, y1, x2, y2 in original pixels

Batch, height and width are dynamic (LW-DETR: height and width must be multiples of the ViT's 64; DETR: any); the
per-level shapes of LW-DETR's deformable attention are computed in the graph from the input.
``K`` is the number of queries (DETR: best class per query) or ``num_select`` (LW-DETR: top-k of every
query-class pair). The model's ``metadata_props`` hold ``classes`` (JSON list), ``preprocessing`` (JSON: colour
order, resize node of the evaluation transform, mean, std, size divisibility), ``model_type``, ``num_classes``,
``score`` (softmax / sigmoid), ``outputs`` and ``detkit_version``.

After writing, the file is run with onnxruntime against PyTorch at two batch sizes and two resolutions; a maximum
absolute difference above ``tolerance`` (scores, and boxes divided by the image size) is an :class:`ExportError` --
unless it comes from a near-tie. The detectors make discrete choices (LW-DETR's two-stage top-k of proposals, the
post-processing's top-k): where two candidates score equal up to rounding, float32 PyTorch and float32 ONNX Runtime
may pick different ones, and every output downstream of the choice differs. So where the two disagree and chose
differently, PyTorch is run again in float64 with ONNX Runtime's choices (see :class:`TopKChoices`); the input is a
near-tie, and passes, when each of those choices is within rounding of the float64 top-k (``tie``) and the outputs
then agree within ``tolerance``. Any other difference is a real disagreement.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode

from detkit.errors import ConfigError, DetkitError
from detkit.export.session import ort_session, read_metadata  # noqa: F401 - read_metadata: part of this API

log = logging.getLogger("detkit.export")

INPUT_NAMES = ["images", "orig_sizes"]
OUTPUT_NAMES = ["scores", "labels", "boxes"]


class ExportError(DetkitError):
    """The export failed, or the exported model disagrees with PyTorch."""


def batched_postprocess(postprocessor: nn.Module, outputs: Mapping[str, Tensor], orig_sizes: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The detector's post-processing as batched tensors ``scores (B, K)``, ``labels (B, K)``, ``boxes (B, K, 4)``
    (the modules return one dict per image, which a traced graph would unroll to a fixed batch).

    detkit's post-processors (and those of plugins that want a dynamic batch) provide ``forward_batched(outputs,
    orig_sizes)``, the very code their per-image ``forward`` runs, so evaluation, prediction and the exported graph
    give the same (clipped) boxes; others are run as they are and stacked (the batch size is then fixed in the
    graph)."""
    batched = getattr(postprocessor, "forward_batched", None)
    if callable(batched):
        return batched(outputs, orig_sizes)
    results = postprocessor(outputs, orig_sizes)
    return (torch.stack([r["scores"] for r in results]), torch.stack([r["labels"] for r in results]),
            torch.stack([r["boxes"] for r in results]))


class ExportModel(nn.Module):
    """``(images (B, 3, H, W), orig_sizes (B, 2)) -> (scores, labels, boxes)``: a detector with its post-processing,
    for images of one size (no padding mask)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector.eval()

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
        outputs = self.detector(images, mask)
        scores, labels, boxes = batched_postprocess(self.detector.postprocessor, outputs, orig_sizes)
        return scores, labels.to(torch.int64), boxes


def size_divisibility(model: nn.Module) -> int:
    return int(getattr(getattr(model, "backbone", None), "size_divisibility", 1) or 1)


def preprocessing_metadata(val_transforms: Mapping[str, Any] | None, divisibility: int) -> dict[str, Any]:
    from detkit.data.datasets.base import IMAGENET_MEAN, IMAGENET_STD

    return {
        "color": "RGB", "layout": "NCHW", "dtype": "float32", "scale": 1 / 255,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "resize": dict(val_transforms) if val_transforms else None,
        "size_divisibility": divisibility,
        "note": "resize as 'resize' says (a detkit TRANSFORMS node), x/255, (x - mean) / std; pass the original "
                "(h, w) as orig_sizes to get boxes in original pixels",
    }


DYNAMIC_MODES = ("all", "batch", "none")


def export_onnx(model: nn.Module, path: str | os.PathLike[str], height: int, width: int, batch: int = 1,
                opset: int = 17, dynamic: str = "all", metadata: Mapping[str, Any] | None = None) -> Path:
    """Trace ``model`` (a detkit detector) with its post-processing into ONNX at ``path``.

    :param height, width, batch: the example input used for tracing.
    :param dynamic: ``all`` (dynamic batch, height and width), ``batch`` (dynamic batch only) or ``none``.
    :param metadata: written to ``metadata_props`` (values that are not strings as JSON).
    """
    import onnx

    if dynamic not in DYNAMIC_MODES:
        raise ConfigError(f"dynamic must be one of {', '.join(DYNAMIC_MODES)}, got {dynamic!r}")
    if opset < 17:
        raise ConfigError(f"--opset must be >= 17, got {opset}")
    div = size_divisibility(model)
    if height % div or width % div:
        raise ConfigError(f"this model needs image sides that are multiples of {div}; got {height}x{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportModel(model).eval()
    images = torch.randn(batch, 3, height, width)
    sizes = torch.tensor([[height, width]] * batch, dtype=torch.int64)
    dynamic_axes = None
    if dynamic != "none":
        dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"} if dynamic == "all" else {0: "batch"},
                        "orig_sizes": {0: "batch"}, "scores": {0: "batch"}, "labels": {0: "batch"},
                        "boxes": {0: "batch"}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python values are expected and checked below
            torch.onnx.export(wrapper, (images, sizes), str(path), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                              dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                              dynamo=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: {e}") from e
    proto = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def compare_outputs(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], sizes: np.ndarray,
                    tie: float = 1e-4) -> dict[str, float]:
    """Max abs differences of ``scores`` and of ``boxes / image size`` between two ``(scores, labels, boxes)``.

    Rows are compared position by position; where the labels differ the row counts only if its score is not
    within ``tie`` of a neighbour (top-k may order near-equal scores either way) — such rows are reported as
    ``label_mismatch``."""
    s0, l0, b0 = (np.asarray(x) for x in ref)
    s1, l1, b1 = (np.asarray(x) for x in got)
    if s0.shape != s1.shape or b0.shape != b1.shape:
        return {"scores": float("inf"), "boxes": float("inf"), "label_mismatch": float(s0.size)}
    scale = np.concatenate([sizes[:, ::-1], sizes[:, ::-1]], axis=1).astype(np.float64)[:, None, :]
    db = np.abs(b0.astype(np.float64) - b1) / np.maximum(scale, 1)
    same = l0 == l1
    mismatch = 0
    if not same.all():
        near = np.zeros_like(same)
        near[:, 1:] |= np.abs(s0[:, 1:] - s0[:, :-1]) <= tie
        near[:, :-1] |= np.abs(s0[:, 1:] - s0[:, :-1]) <= tie
        mismatch = int((~same & ~near).sum())
    score_diff = float(np.abs(np.sort(s0, 1) - np.sort(s1, 1)).max()) if s0.size else 0.0
    box_diff = float(db[same].max()) if same.any() else 0.0
    return {"scores": score_diff, "boxes": box_diff, "label_mismatch": float(mismatch)}


class TopKChoices(TorchFunctionMode):
    """Records the indices that each ``topk`` call selects, in call order (``indices``).

    Given ``pinned`` (one index array per call, as ONNX Runtime's TopK nodes chose them), each call returns those
    indices instead, with the values gathered from its own input, and measures how far they are from its own
    choice: ``gaps[i]`` is the largest ``|pinned value - own value|`` at the same rank, relative to
    ``max(1, |own value|)`` (0 where the pinned choice is the own one). ``other`` (the choices of another run, e.g.
    float32 PyTorch) is measured against the pinned ones the same way at the first call where the two differ
    (``spread``; later calls see other inputs, so are not comparable).
    """

    def __init__(self, pinned: Sequence[np.ndarray] | None = None,
                 other: Sequence[np.ndarray] | None = None) -> None:
        super().__init__()
        self.pinned = list(pinned) if pinned is not None else None
        self.other = list(other) if other is not None else []
        self.indices: list[np.ndarray] = []
        self.gaps: list[float] = []
        self.spread = 0.0
        self._diverged = False
        self.error: str | None = None

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.topk and func is not Tensor.topk:
            return func(*args, **kwargs)
        values, indices = func(*args, **kwargs)
        call = len(self.indices)
        if self.pinned is not None and self.error is None:
            if call >= len(self.pinned) or tuple(self.pinned[call].shape) != tuple(indices.shape):
                got = tuple(self.pinned[call].shape) if call < len(self.pinned) else "none"
                self.error = f"top-k call {call + 1}: PyTorch selects {tuple(indices.shape)}, the ONNX graph {got}"
            else:
                source, dim = _topk_input_and_dim(*args, **kwargs)
                chosen = torch.as_tensor(self.pinned[call], device=indices.device)
                chosen_values = source.gather(dim, chosen)
                self.gaps.append(_relative_gap(chosen_values, values))
                if not self._diverged and call < len(self.other) and self.other[call].shape == self.pinned[call].shape \
                        and not np.array_equal(self.other[call], self.pinned[call]):
                    self._diverged = True
                    other = source.gather(dim, torch.as_tensor(self.other[call], device=indices.device))
                    self.spread = _relative_gap(other, chosen_values)
                values, indices = chosen_values, chosen
        self.indices.append(indices.cpu().numpy())
        return torch.return_types.topk((values, indices))


def _relative_gap(values: Tensor, reference: Tensor) -> float:
    """Largest ``|values - reference| / max(1, |reference|)`` (0 for no elements)."""
    if not values.numel():
        return 0.0
    return float(((values - reference).abs() / reference.abs().clamp(min=1)).max())


def _topk_input_and_dim(source: Tensor, k: int, dim: int = -1, *args: Any, **kwargs: Any) -> tuple[Tensor, int]:
    """``(input, dim)`` of a ``topk(input, k, dim=-1, largest=True, sorted=True)`` call."""
    return source, dim


def topk_index_names(proto: Any) -> list[str]:
    """Names of the index outputs of the graph's TopK nodes, in graph (= execution) order."""
    return [node.output[1] for node in proto.graph.node if node.op_type == "TopK"]


class Verifier:
    """Runs an exported file and its PyTorch model on the same inputs and judges the differences (see the module
    docstring). The session that exposes the TopK choices and the float64 model are made only when needed."""

    def __init__(self, path: str | os.PathLike[str], model: nn.Module, tolerance: float = 1e-3,
                 tie: float = 1e-4) -> None:
        self.path = Path(path)
        self.model = model
        self.tolerance = tolerance
        self.tie = tie
        self.session = ort_session(self.path)
        self.wrapper = ExportModel(model).eval()
        self._choices_session: Any = None
        self._choice_names: list[str] = []
        self._wrapper64: ExportModel | None = None

    def onnx_outputs(self, images: Tensor, sizes: Tensor) -> list[np.ndarray]:
        feed = {"images": images.numpy(), "orig_sizes": sizes.numpy()}
        try:
            return self.session.run(OUTPUT_NAMES, feed)
        except Exception as e:
            batch, _, height, width = images.shape
            raise ExportError(f"onnxruntime cannot run {self.path} on a {batch}x3x{height}x{width} input: {e}") from e

    def onnx_choices(self, images: Tensor, sizes: Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(outputs, indices of every TopK node)`` from a copy of the graph that also outputs the latter."""
        if self._choices_session is None:
            import onnx

            proto = onnx.load(str(self.path))
            self._choice_names = topk_index_names(proto)
            known = {o.name for o in proto.graph.output}
            for name in self._choice_names:
                if name not in known:
                    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
            self._choices_session = ort_session(proto.SerializeToString())
        feed = {"images": images.numpy(), "orig_sizes": sizes.numpy()}
        got = self._choices_session.run(OUTPUT_NAMES + self._choice_names, feed)
        return got[:len(OUTPUT_NAMES)], got[len(OUTPUT_NAMES):]

    def reference64(self, images: Tensor, sizes: Tensor, pinned: Sequence[np.ndarray],
                    other: Sequence[np.ndarray] = ()) -> tuple[list[np.ndarray], TopKChoices]:
        """PyTorch in float64 (a copy of the model), each top-k taking ``pinned``'s choice (``other``: see
        :class:`TopKChoices`)."""
        if self._wrapper64 is None:
            self._wrapper64 = ExportModel(copy.deepcopy(self.model).double()).eval()
        mode = TopKChoices(pinned, other)
        with torch.no_grad(), mode:
            out = self._wrapper64(images.double(), sizes)
        return [t.numpy() for t in out], mode

    def check(self, images: Tensor, sizes: Tensor) -> dict[str, Any]:
        """One input: a record with the float32 differences (``scores``, ``boxes``, ``label_mismatch``), ``near_tie``
        and ``failure`` (None when the input passes); where the top-k choices differed, also the float64 arbitration:
        ``float64`` (the differences to it) and ``tie_gap`` (the largest relative float64 score difference between
        the competing choices)."""
        recorder = TopKChoices()
        with torch.no_grad(), recorder:
            ref = [t.numpy() for t in self.wrapper(images, sizes)]
        got = self.onnx_outputs(images, sizes)
        record: dict[str, Any] = {**compare_outputs(ref, got, sizes.numpy()), "near_tie": False, "failure": None}
        if self._agrees(record):
            return record
        failure = (f"scores {record['scores']:.2e}, boxes {record['boxes']:.2e}, "
                   f"{int(record['label_mismatch'])} label mismatches")
        if not recorder.indices:  # no discrete choice in the model: nothing to arbitrate
            record["failure"] = failure
            return record
        got_again, choices = self.onnx_choices(images, sizes)
        if max(compare_outputs(got, got_again, sizes.numpy())[k] for k in ("scores", "boxes")) > self.tolerance:
            record["failure"] = failure + " (and the graph with its TopK choices exposed gives other outputs)"
            return record
        if len(choices) == len(recorder.indices) and all(
                a.shape == b.shape and np.array_equal(a, b) for a, b in zip(choices, recorder.indices)):
            record["failure"] = failure + " (with the same top-k choices: not a near-tie)"
            return record
        ref64, pinned = self.reference64(images, sizes, choices, recorder.indices)
        if pinned.error is not None or len(pinned.gaps) != len(choices):
            record["failure"] = failure + f" (cannot match the graph's TopK nodes to PyTorch's: {pinned.error or ''}"\
                f"{len(choices)} in the graph, {len(pinned.gaps)} in PyTorch)"
            return record
        diff64 = compare_outputs([r.astype(g.dtype) for r, g in zip(ref64, got)], got, sizes.numpy())
        # the width of the tie: how far (in float64) onnxruntime's choice is from the best one, and from float32
        # PyTorch's where that took the other side
        record.update(float64=diff64, tie_gap=max([pinned.spread, *pinned.gaps]))
        if max(pinned.gaps) > self.tie:
            record["failure"] = failure + (f"; onnxruntime's top-k choice is {max(pinned.gaps):.1e} (relative) from "
                                           f"float64 PyTorch's, beyond rounding ({self.tie:g}): not a near-tie")
        elif not self._agrees(diff64):
            record["failure"] = failure + (f"; with onnxruntime's top-k choices float64 PyTorch still differs: "
                                           f"scores {diff64['scores']:.2e}, boxes {diff64['boxes']:.2e}, "
                                           f"{int(diff64['label_mismatch'])} label mismatches")
        else:
            record["near_tie"] = True
        return record

    def _agrees(self, diff: Mapping[str, float]) -> bool:
        return max(diff["scores"], diff["boxes"]) <= self.tolerance and diff["label_mismatch"] == 0


def verify_onnx(path: str | os.PathLike[str], model: nn.Module, shapes: Sequence[tuple[int, int, int]],
                tolerance: float = 1e-3, seed: int = 0, tie: float = 1e-4) -> list[dict[str, Any]]:
    """Run the ONNX file and PyTorch on the same random inputs for each ``(batch, height, width)``; return one
    record per shape (see :meth:`Verifier.check`), and raise :class:`ExportError` when one disagrees (a difference
    above ``tolerance`` that is not a near-tie within ``tie``)."""
    verifier = Verifier(path, model, tolerance, tie)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for batch, height, width in shapes:
        images = torch.randn(batch, 3, height, width, generator=gen)
        # original sizes differ per image, so the box scaling is checked too
        sizes = torch.tensor([[height * (1 + i), width + 37 * i] for i in range(batch)], dtype=torch.int64)
        records.append({"batch": batch, "height": height, "width": width, **verifier.check(images, sizes)})
    failures = [r for r in records if r["failure"]]
    if failures:
        raise ExportError(f"the ONNX model disagrees with PyTorch (tolerance {tolerance}): " + "; ".join(
            f"batch {r['batch']} at {r['height']}x{r['width']}: {r['failure']}" for r in failures))
    return records
