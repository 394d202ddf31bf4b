"""Checkpoint files: atomic writes, RNG states, fine-tuning with other classes."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit.engine import checkpoint as ck  # noqa: E402
from detkit.weights import io as wio  # noqa: E402
from detkit.engine.trainer import Trainer, train  # noqa: E402
from detkit.errors import CheckpointError  # noqa: E402


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    wio.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(20)  # a partial file on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        wio.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = wio.load_checkpoint_file(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth"]  # no temporary file left behind

    # a file cut short by a crash of a non-atomic writer is refused with a clear error
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated"):
        wio.load_checkpoint_file(tmp_path / "cut.pth")


def test_rng_capture_restore_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ck.capture_rng()
    wio.save_checkpoint({"rng": state}, tmp_path / "r.pth")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.restore_rng(wio.load_checkpoint_file(tmp_path / "r.pth")["rng"])  # weights_only load works
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_finetune_from_in_training_reports_and_changes_classes(tmp_path):
    base = TinyShapes(8, classes=("red", "green", "blue")), TinyShapes(4, seed=1, flip=False)
    train(tiny_config(tmp_path, name="base", epochs=1, eval_interval=-1), datasets=base)
    src = wio.load_checkpoint_file(tmp_path / "base" / "checkpoint_last.pth")
    other = (TinyShapes(8, classes=("green", "yellow")), TinyShapes(4, seed=1, flip=False, classes=("green", "yellow")))
    ft = Trainer(tiny_config(tmp_path, name="ft", epochs=1, finetune_from=str(tmp_path / "base" /
                                                                                "checkpoint_last.pth")),
                 datasets=other)
    assert ft.cfg.model.num_classes == 2  # followed the data set
    w = ft.unwrapped_model.state_dict()["class_embed.weight"]
    assert w.shape[0] == 3
    assert torch.equal(w[0], src["model"]["class_embed.weight"][1])  # green
    assert torch.equal(w[2], src["model"]["class_embed.weight"][3])  # no-object
    assert torch.equal(ft.unwrapped_model.state_dict()["attn.in_proj_weight"], src["model"]["attn.in_proj_weight"])
    assert (tmp_path / "ft" / "finetune_report.json").is_file()
    assert ft.finetune_report.new_classes == ["yellow"]
    ft.fit()
    assert wio.load_checkpoint_file(tmp_path / "ft" / "checkpoint_last.pth")["classes"] == ["green", "yellow"]


def test_finetune_refuses_unrelated_weights(tmp_path):
    wio.save_checkpoint({"model": {"foo.weight": torch.zeros(3)}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="no key"):
        Trainer(tiny_config(tmp_path, finetune_from=str(tmp_path / "x.pth")),
                datasets=(TinyShapes(8), TinyShapes(4, flip=False)))


def test_checkpoint_carries_category_ids_to_inference(tmp_path):
    from detkit.loading import default_cat_ids, load_for_inference

    cat_ids = [3, 7, 11]
    data = TinyShapes(8, cat_ids=cat_ids), TinyShapes(4, seed=1, flip=False, cat_ids=cat_ids)
    train(tiny_config(tmp_path, epochs=1, max_steps=1, eval_interval=-1), datasets=data)
    path = tmp_path / "run" / "checkpoint_last.pth"
    ckpt = wio.load_checkpoint_file(path)
    assert ckpt["classes"] == ["red", "green", "blue"] and ckpt["cat_ids"] == cat_ids
    loaded = load_for_inference(path)
    assert default_cat_ids(loaded) == data[0].cat_ids  # COCO results use the data set's own category ids


def test_checkpoint_cat_ids_none_without_dataset_ids(tmp_path):
    ds = TinyShapes(8), TinyShapes(4, seed=1, flip=False)
    for d in ds:
        d.cat_ids = None
    trainer = Trainer(tiny_config(tmp_path, epochs=1, max_steps=1, eval_interval=-1), datasets=ds)
    assert trainer.cat_ids is None and trainer.state_dict()["cat_ids"] is None
