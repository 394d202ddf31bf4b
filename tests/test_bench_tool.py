"""``detkit bench``: the JSON fields are present and agree with independently computed facts; clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.tools import make_checkpoint, tiny_lwdetr_config  # noqa: E402

from detkit.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = tiny_lwdetr_config(tmp)
    return cfg, make_checkpoint(cfg, tmp / "ckpt.pth")


def expected_params(cfg: Path) -> tuple[int, int]:
    """All parameters, and those used at inference: LW-DETR drops query groups 1.. and their two-stage heads."""
    from detkit.config import compose, to_container
    from detkit.models.build import build_model

    model_cfg = to_container(compose(cfg).model)
    model_cfg["num_classes"] = 3
    model = build_model(model_cfg)
    total = sum(p.numel() for p in model.parameters())
    groups, queries, d = model.group_detr, model.num_queries, model.transformer.d_model
    unused = (groups - 1) * queries * (4 + d)  # rows of refpoint_embed and query_feat
    for name in ("enc_output", "enc_output_norm", "enc_out_class_embed", "enc_out_bbox_embed"):
        heads = getattr(model.transformer, name)
        unused += sum(p.numel() for g in range(1, groups) for p in heads[g].parameters())
    return total, total - unused


def test_bench_torch_json(tiny, tmp_path, capsys):
    cfg, ckpt = tiny
    out = tmp_path / "bench.json"
    assert main(["bench", str(cfg), "--checkpoint", str(ckpt), "--height", "128", "--width", "192", "--batch", "2",
                 "--threads", "1", "--warmup", "1", "--iters", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "throughput" in printed and "TF32 on (CUDA only" in printed
    r = json.loads(out.read_text())
    assert r["tf32"] is True and r["amp"] == "none"  # runtime.tf32 defaults to true
    total, inference = expected_params(cfg)
    assert (r["params"], r["params_inference"]) == (total, inference)
    assert r["input"] == {"batch": 2, "height": 128, "width": 192}
    # the patch embedding alone costs 2 * (3*16*16) * embed_dim FLOPs per output position
    patch = 2 * 3 * 16 * 16 * 32 * (128 // 16) * (192 // 16)
    assert patch < r["flops_per_image"] < 100 * patch
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["median"] <= lat["max"]
    assert r["throughput_img_s"] == pytest.approx(2 / (lat["median"] / 1e3), rel=1e-2)
    assert r["memory"]["peak_rss_mb"] > 50
    assert r["device"]["type"] == "cpu" and r["device"]["threads"] == 1
    assert r["versions"]["torch"] == torch.__version__
    assert r["runtime"] == "torch" and r["iters"] == 3


def test_bench_onnxruntime(tiny, tmp_path, capsys):
    cfg, _ = tiny
    out = tmp_path / "bench.json"
    assert main(["bench", str(cfg), "--height", "128", "--width", "128", "--batch", "1", "--threads", "1",
                 "--warmup", "1", "--iters", "2", "--runtime", "onnxruntime", "--no-flops", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["runtime"] == "onnxruntime" and r["flops_per_image"] is None
    assert r["latency_ms"]["median"] > 0 and "onnxruntime" in r["versions"]
    assert any("num_classes is null" in n for n in r["notes"])  # no checkpoint: measured with 80 classes


def test_bench_onnxruntime_runs_an_exported_file_at_the_size_asked_for(tiny, tmp_path, capsys):
    import onnx

    from detkit.export.onnx import export_onnx
    from detkit.loading import load_for_inference

    cfg, ckpt = tiny
    onnx_file = export_onnx(load_for_inference(ckpt).model, tmp_path / "m.onnx", 128, 128)
    out = tmp_path / "bench.json"
    common = ["bench", str(cfg), "--checkpoint", str(ckpt), "--threads", "1", "--warmup", "0", "--iters", "1",
              "--runtime", "onnxruntime", "--no-flops"]
    assert main([*common, "--onnx", str(onnx_file), "--height", "192", "--width", "256", "--batch", "2",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["input"] == {"batch": 2, "height": 192, "width": 256} and r["latency_ms"]["median"] > 0
    # a file that fixes another size is refused, naming both
    proto = onnx.load(str(onnx_file))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for axis in (2, 3):
        dims[axis].Clear()
        dims[axis].dim_value = 128
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    capsys.readouterr()
    assert main([*common, "--onnx", str(fixed), "--height", "192", "--width", "256"]) == 2
    err = capsys.readouterr().err
    assert "takes images of ?x3x128x128" in err and "not the 1x3x192x256 asked for" in err
    assert main([*common, "--onnx", str(onnx_file), "--height", "160", "--width", "128"]) == 2
    assert "multiples of 64" in capsys.readouterr().err


def test_bench_bad_inputs_give_clear_errors(tiny, tmp_path, capsys):
    cfg, ckpt = tiny

    def run(*args: str) -> str:
        code = main(["bench", *args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        return err

    assert "config file not found" in run(str(tmp_path / "nope.yaml"))
    assert "checkpoint not found" in run(str(cfg), "--checkpoint", str(tmp_path / "nope.pth"))
    assert "--batch must be >= 1" in run(str(cfg), "--batch", "0")
    assert "wrong config" in run(str(cfg), "--checkpoint", str(ckpt), "model.hidden_dim=64", "--height", "128",
                                 "--width", "128")
