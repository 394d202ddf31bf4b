"""``detkit eval``: numbers equal pycocotools run directly, per-class tables, confusion matrix, errors."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.tools import make_checkpoint, tiny_lwdetr_config  # noqa: E402

from detkit.cli import main  # noqa: E402
from detkit.data.datasets.base import make_coco  # noqa: E402
from detkit.engine.eval_report import (best_f1, build_report, confusion_matrix, format_report,  # noqa: E402
                                       plot_pr_curves, run_cocoeval)
from detkit.engine.evaluator import COCO_METRICS  # noqa: E402
from detkit.errors import DetkitError  # noqa: E402

CATS = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]


def scene(seed: int = 0, n_images: int = 40):
    """Ground truth (with a crowd region) and noisy detections: shifted true boxes, wrong classes, false ones."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 10, "file_name": f"{i}.png", "width": 320, "height": 240} for i in range(n_images)]
    anns, dets = [], []
    for im in images:
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(0, 250), rng.uniform(0, 180)
            w, h = rng.uniform(6, 70, 2)
            c = int(rng.choice([1, 3, 7]))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            if rng.random() < 0.85:
                cat = c if rng.random() < 0.8 else int(rng.choice([1, 3, 7]))
                dets.append({"image_id": im["id"], "category_id": cat, "score": float(rng.uniform(0.2, 1)),
                             "bbox": [x + rng.normal(0, 4), y + rng.normal(0, 4), w * rng.uniform(0.8, 1.2), h]})
        for _ in range(int(rng.integers(0, 3))):
            dets.append({"image_id": im["id"], "category_id": int(rng.choice([1, 3, 7])),
                         "score": float(rng.uniform(0, 0.6)),
                         "bbox": [*rng.uniform(0, 200, 2), *rng.uniform(5, 60, 2)]})
    anns.append({"id": len(anns) + 1, "image_id": images[0]["id"], "category_id": 1, "bbox": [0, 0, 100, 100],
                 "area": 10000, "iscrowd": 1})
    dets.append({"image_id": images[0]["id"], "category_id": 1, "score": 0.9, "bbox": [10, 10, 50, 50]})
    return make_coco(images, anns, CATS), dets


def cocoeval(gt, dets, cat_ids=None):
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_report_numbers_equal_pycocotools():
    gt, dets = scene()
    report, _ = build_report(gt, dets)
    ev = cocoeval(gt, dets)
    assert report["metrics"] == {k: max(float(v), 0.0) for k, v in zip(COCO_METRICS, ev.stats)}
    assert 0.2 < report["metrics"]["AP50"] < 0.95  # a non-trivial case
    # per class: COCOeval restricted to that class, run directly
    for row in report["per_class"]:
        one = cocoeval(gt, dets, [row["category_id"]])
        assert row["AP"] == pytest.approx(one.stats[0], abs=1e-12)
        assert row["AP50"] == pytest.approx(one.stats[1], abs=1e-12)
        assert row["AP75"] == pytest.approx(one.stats[2], abs=1e-12)
        assert row["AR100"] == pytest.approx(one.stats[8], abs=1e-12)
    assert [r["class"] for r in report["per_class"]] == ["cat", "dog", "bird"]
    text = format_report(report)
    assert "AP50" in text and "bird" in text and "background" in text


def test_best_f1_equals_the_pycocotools_matching():
    gt, dets = scene(seed=1)
    ev = cocoeval(gt, dets)
    ours = best_f1(gt, dets, [1, 3, 7])
    for c in (1, 3, 7):
        scores, hits, n_gt = [], [], 0
        for e in ev.evalImgs:
            if e is None or e["category_id"] != c or e["aRng"] != [0, 1e10] or e["maxDet"] != 100:
                continue
            keep = ~np.asarray(e["dtIgnore"][0], bool)
            scores += list(np.asarray(e["dtScores"])[keep])
            hits += list(np.asarray(e["dtMatches"][0])[keep] > 0)  # IoU 0.5 row
            n_gt += int((~np.asarray(e["gtIgnore"], bool)).sum())
        order = np.argsort(-np.asarray(scores), kind="mergesort")
        tp = np.cumsum(np.asarray(hits)[order])
        precision, recall = tp / np.arange(1, len(tp) + 1), tp / n_gt
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        k = int(np.argmax(f1))
        assert ours[c]["num_gt"] == n_gt
        assert ours[c]["threshold"] == pytest.approx(np.asarray(scores)[order][k])
        assert (ours[c]["precision"], ours[c]["recall"], ours[c]["f1"]) == pytest.approx(
            (precision[k], recall[k], f1[k]))


def test_confusion_matrix_counts_a_known_case():
    images = [{"id": 1, "file_name": "a", "width": 100, "height": 100}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 60, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [70, 0, 30, 30], "area": 900, "iscrowd": 1},
    ]
    gt = make_coco(images, anns, CATS)
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20], "score": 0.9},  # cat -> cat
        {"image_id": 1, "category_id": 1, "bbox": [51, 50, 20, 20], "score": 0.8},  # dog seen as cat
        {"image_id": 1, "category_id": 3, "bbox": [30, 30, 10, 10], "score": 0.7},  # false dog
        {"image_id": 1, "category_id": 7, "bbox": [75, 5, 20, 20], "score": 0.9},  # on the crowd region: ignored
        {"image_id": 1, "category_id": 7, "bbox": [0, 60, 30, 30], "score": 0.3},  # below the threshold
    ]
    m = confusion_matrix(gt, dets, [1, 3, 7], conf_threshold=0.5)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1  # cat found
    expected[1, 0] = 1  # dog predicted as cat
    expected[2, 3] = 1  # bird missed
    expected[3, 1] = 1  # false dog
    np.testing.assert_array_equal(m, expected)
    assert confusion_matrix(gt, dets, [1, 3, 7], conf_threshold=0.2)[2, 2] == 1


def test_faster_coco_eval_backend_gives_the_same_numbers(tmp_path):
    gt, dets = scene(seed=2)
    ref, ev_ref = run_cocoeval(gt, dets, "pycocotools")
    fast, ev_fast = run_cocoeval(gt, dets, "faster-coco-eval")
    assert fast == pytest.approx(ref, abs=1e-12)
    np.testing.assert_allclose(ev_fast.eval["precision"], ev_ref.eval["precision"], atol=1e-12)
    report, ev = build_report(gt, dets, backend="faster-coco-eval")
    png = plot_pr_curves(ev, report, tmp_path / "pr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_faster_coco_eval_says_how_to_install(monkeypatch):
    gt, dets = scene()
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails as if not installed
    with pytest.raises(DetkitError, match=r"pip install 'detkit\[fast-eval\]'"):
        run_cocoeval(gt, dets, "faster-coco-eval")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = tiny_lwdetr_config(tmp)
    return cfg, make_checkpoint(cfg, tmp / "ckpt.pth", seed=3)


def test_eval_cli_matches_pycocotools_on_its_detections(tiny, tmp_path, capsys):
    from detkit.config import compose, to_container
    from detkit.data.build import build_datasets

    cfg, ckpt = tiny
    out, dets_path = tmp_path / "report" / "metrics.json", tmp_path / "dets.json"
    assert main(["eval", str(cfg), "--checkpoint", str(ckpt), "--out", str(out), "--detections", str(dets_path),
                 "--conf", "0.0"]) == 0
    printed = capsys.readouterr().out
    assert "per class" in printed and "confusion matrix" in printed
    report = json.loads(out.read_text())
    dets = json.loads(dets_path.read_text())
    _, val = build_datasets(to_container(compose(cfg).data), train=False)
    assert len(dets) == 4 * 10  # 4 images x num_select
    ev = cocoeval(val.coco_gt(), dets)
    assert report["metrics"] == {k: max(float(v), 0.0) for k, v in zip(COCO_METRICS, ev.stats)}
    assert [r["class"] for r in report["per_class"]] == ["circle", "square", "triangle"]
    matrix = np.asarray(report["confusion_matrix"]["matrix"])
    n_gt = len(val.coco_gt().getAnnIds())
    assert matrix.shape == (4, 4) and matrix[:3].sum() == n_gt  # every object is matched or missed once
    assert matrix.sum() - matrix[:3, :3].sum() - matrix[:3, 3].sum() == matrix[3].sum()
    assert Path(report["pr_curves_png"]).read_bytes()[:4] == b"\x89PNG"
    assert report["weights"] == "model" and report["num_images"] == 4


def test_eval_bad_inputs_give_clear_errors(tiny, tmp_path, capsys):
    cfg, ckpt = tiny

    def run(*args: str) -> str:
        code = main(["eval", *args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        return err

    assert "checkpoint not found" in run(str(cfg), "--checkpoint", str(tmp_path / "nope.pth"))
    assert "config file not found" in run(str(tmp_path / "nope.yaml"), "--checkpoint", str(ckpt))
    # same architecture, other width: the weights do not fit
    err = run(str(cfg), "--checkpoint", str(ckpt), "model.hidden_dim=48")
    assert "wrong config" in err and "does not fit" in err
    # another architecture
    detr = tiny_lwdetr_config(tmp_path, "detr.yaml", defaults=[], model={
        "type": "detr", "backbone": {"type": "resnet", "depth": 18}, "neck": {"type": "input_proj"}})
    assert "wrong config" in run(str(detr), "--checkpoint", str(ckpt))
    # the data set has other classes than the checkpoint
    err = run(str(cfg), "--checkpoint", str(ckpt), "data.synthetic.shapes=[circle,star,ring]")
    assert "classes" in err and "star" in err


@pytest.mark.slow
def test_eval_under_torchrun_gathers_every_rank(tiny, tmp_path):
    """Two CPU processes (gloo) each predict half of the images; rank 0 reports on all of them."""
    import os
    import socket
    import subprocess

    cfg, ckpt = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    common = [str(repo / "tools/eval.py"), str(cfg), "--checkpoint", str(ckpt)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "tests")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), *common,
                           "--out", str(tmp_path / "dist.json"), "--detections", str(tmp_path / "dist_dets.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["eval", str(cfg), "--checkpoint", str(ckpt), "--out", str(tmp_path / "one.json"),
                 "--detections", str(tmp_path / "one_dets.json")]) == 0
    dist, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dist", "one"))
    assert dist["world_size"] == 2 and one["world_size"] == 1
    assert dist["metrics"] == one["metrics"] and dist["per_class"] == one["per_class"]
    key = lambda d: (d["image_id"], -d["score"], d["category_id"])  # noqa: E731
    a = sorted(json.loads((tmp_path / "dist_dets.json").read_text()), key=key)
    b = sorted(json.loads((tmp_path / "one_dets.json").read_text()), key=key)
    assert len(a) == len(b) == 40 and a == b
