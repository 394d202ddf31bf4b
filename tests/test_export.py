"""``detkit export``: ONNX with post-processing inside, metadata, parity with PyTorch at two sizes, near-ties told
from export errors, errors."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.tools import make_checkpoint, tiny_lwdetr_config, write_config  # noqa: E402

from detkit.cli import main  # noqa: E402
from detkit.export.onnx import (ExportError, batched_postprocess, compare_outputs, read_metadata,  # noqa: E402
                                verify_onnx)
from detkit.models.postprocessors import SigmoidTopKPostProcessor, SoftmaxPostProcessor  # noqa: E402
from detkit.loading import load_for_inference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_DETR = {
    "defaults": [str(REPO / "configs/_base_/models/detr_r50.yaml")],
    "model": {"num_classes": None, "num_queries": 8, "hidden_dim": 32,
              "backbone": {"depth": 18, "frozen_stages": 1},
              "transformer": {"nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64}},
    "data": {"num_workers": 0, "val_transforms": {"type": "detr_val", "size": 64, "max_size": 128},
             "synthetic": {"image_size": 96, "num_train": 2, "num_val": 2, "shapes": ["circle", "square"]}},
    "runtime": {"device": "cpu"},
}


def ort_run(path: Path, images: torch.Tensor, sizes: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["scores", "labels", "boxes"], {"images": images.numpy(), "orig_sizes": sizes.numpy()})


def reference(model: torch.nn.Module, images: torch.Tensor, sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """What the evaluator computes: the model and its own (per-image) post-processor."""
    with torch.no_grad():
        out = model(images, torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool))
        return model.postprocessor(out, sizes)


def check_against_pytorch(onnx_path: Path, model: torch.nn.Module, batch: int, h: int, w: int) -> None:
    gen = torch.Generator().manual_seed(batch * 1000 + h)
    images = torch.randn(batch, 3, h, w, generator=gen)
    sizes = torch.tensor([[480 + 10 * i, 640 - 20 * i] for i in range(batch)])
    scores, labels, boxes = ort_run(onnx_path, images, sizes)
    for i, ref in enumerate(reference(model, images, sizes)):
        np.testing.assert_allclose(scores[i], ref["scores"].numpy(), atol=1e-4)
        np.testing.assert_array_equal(labels[i], ref["labels"].numpy())
        np.testing.assert_allclose(boxes[i], ref["boxes"].numpy(), atol=1e-3 * 640)


def test_batched_postprocess_equals_the_modules():
    gen = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(3, 7, 5, generator=gen), "pred_boxes": torch.rand(3, 7, 4, generator=gen)}
    sizes = torch.tensor([[100, 200], [50, 60], [640, 480]])
    for post in (SoftmaxPostProcessor(), SigmoidTopKPostProcessor(num_select=9)):
        scores, labels, boxes = batched_postprocess(post, outputs, sizes)
        for i, ref in enumerate(post(outputs, sizes)):
            torch.testing.assert_close(scores[i], ref["scores"])
            torch.testing.assert_close(labels[i], ref["labels"])
            torch.testing.assert_close(boxes[i], ref["boxes"])


def test_export_lwdetr(tmp_path, capsys):
    cfg = tiny_lwdetr_config(tmp_path)
    ckpt = make_checkpoint(cfg, tmp_path / "ckpt.pth", seed=1)
    out = tmp_path / "lwdetr.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check passed" in printed
    # two batch sizes at two resolutions were compared
    for b in (1, 2):
        for size in ("128x128", "192x256"):
            assert f"batch {b}  {size}" in printed
    meta = read_metadata(out)
    assert json.loads(meta["classes"]) == ["circle", "square", "triangle"]
    pre = json.loads(meta["preprocessing"])
    assert pre["resize"] == {"type": "lwdetr_val", "size": 128} and pre["size_divisibility"] == 64
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["color"] == "RGB"
    assert meta["score"] == "sigmoid" and meta["model_type"] == "lwdetr"
    # one file for every size: the deformable attention's per-level shapes are computed in the graph
    assert meta["dynamic"] == "all" and "near-ties: 0 of 4 inputs" in printed
    import onnxruntime as ort

    assert ort.InferenceSession(str(out)).get_inputs()[0].shape == ["batch", 3, "height", "width"]
    import onnx

    proto = onnx.load(str(out))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert any(n.op_type == "GridSample" for n in proto.graph.node)  # deformable attention
    assert any(n.op_type == "TopK" for n in proto.graph.node)  # post-processing inside
    # independent check against the model's own post-processor, at a batch size and sizes the export did not see
    model = load_for_inference(ckpt).model
    check_against_pytorch(out, model, 3, 128, 128)
    check_against_pytorch(out, model, 1, 320, 192)


def test_export_detr_dynamic_size(tmp_path, capsys):
    cfg = write_config(tmp_path / "detr.yaml", TINY_DETR)
    ckpt = make_checkpoint(cfg, tmp_path / "ckpt.pth", seed=2)
    out = tmp_path / "detr.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--height", "64", "--width", "96"]) == 0
    printed = capsys.readouterr().out
    assert "dynamic batch and image size" in printed and "check passed" in printed
    assert read_metadata(out)["dynamic"] == "all"
    model = load_for_inference(ckpt).model
    check_against_pytorch(out, model, 2, 80, 112)  # a size the export never saw
    # the check does fail when the file and the model disagree
    with torch.no_grad():
        model.head.class_embed.bias[0] += 0.5  # one class only: softmax is shift-invariant
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        verify_onnx(out, model, [(1, 64, 96)])


def test_export_bad_inputs_give_clear_errors(tmp_path, capsys):
    cfg = tiny_lwdetr_config(tmp_path)
    ckpt = make_checkpoint(cfg, tmp_path / "ckpt.pth")

    def run(*args: str) -> str:
        code = main(["export", *args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        return err

    assert "checkpoint not found" in run("--checkpoint", str(tmp_path / "no.pth"), "--out", str(tmp_path / "a.onnx"))
    assert "multiples of 64" in run("--checkpoint", str(ckpt), "--out", str(tmp_path / "a.onnx"), "--height", "100")
    assert "opset" in run("--checkpoint", str(ckpt), "--out", str(tmp_path / "a.onnx"), "--opset", "13")
    assert not (tmp_path / "a.onnx").exists()


def test_compare_outputs_tolerates_swapped_ties_only():
    sizes = np.array([[100, 200]])
    scores = np.array([[0.9, 0.5, 0.5, 0.1]], np.float32)
    labels = np.array([[0, 1, 2, 0]])
    boxes = np.tile(np.array([10, 10, 50, 50], np.float32), (1, 4, 1))
    swapped = labels.copy()
    swapped[0, [1, 2]] = swapped[0, [2, 1]]  # equal scores: top-k may order them either way
    diff = compare_outputs((scores, labels, boxes), (scores, swapped, boxes + 0.1), sizes)
    assert diff["label_mismatch"] == 0 and diff["boxes"] == pytest.approx(0.1 / 100, rel=1e-3)
    wrong = labels.copy()
    wrong[0, 0] = 3
    assert compare_outputs((scores, labels, boxes), (scores, wrong, boxes), sizes)["label_mismatch"] == 1


def test_near_tie_is_told_from_an_export_error(tmp_path):
    """A two-stage top-k whose cut is a near-tie: float32 PyTorch and the file choose other proposals (every box
    differs); the check passes a correct export as a near-tie and still fails an export with a wrong constant."""
    import onnx
    from onnx import numpy_helper

    from detkit.export.onnx import export_onnx

    ckpt = make_checkpoint(tiny_lwdetr_config(tmp_path), tmp_path / "ckpt.pth", seed=1)
    model = load_for_inference(ckpt).model
    head = model.transformer.enc_out_class_embed[0]
    with torch.no_grad():  # every memory position scores exactly 0: the two-stage cut is an exact tie...
        head.weight.zero_()
        head.bias.zero_()
    out = export_onnx(model, tmp_path / "tie.onnx", 128, 128)
    # ... which a last-bit difference decides: PyTorch now ranks by one feature, the file by its tie rule
    near = copy.deepcopy(model)
    with torch.no_grad():
        near.transformer.enc_out_class_embed[0].weight[0, 0] = 1e-7
    shapes = [(1, 128, 128), (2, 192, 256)]
    records = verify_onnx(out, near, shapes)
    for r in records:
        assert r["near_tie"] and r["failure"] is None
        assert max(r["scores"], r["boxes"]) > 1e-2  # what the float32 comparison alone called an error
        assert max(r["float64"]["scores"], r["float64"]["boxes"]) < 1e-5 and 0 < r["tie_gap"] < 1e-6

    # a wrong constant in the graph: the near-tie is still there, and the check still fails
    proto = onnx.load(str(out))
    init = next(i for i in proto.graph.initializer if i.name == "detector.class_embed.bias")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(ExportError, match="with onnxruntime's top-k choices float64 PyTorch still differs"):
        verify_onnx(broken, near, shapes[:1])
