"""Checkpoint files: atomic writes, refusal of code-running pickles, clear errors, load reports."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.nn as nn

from detkit.weights.io import load_checkpoint_file, save_checkpoint
from detkit.weights.state import load_checkpoint, load_state_dict
from detkit.errors import CheckpointError


class Evil:
    """Unpickling this runs a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil(str(marker))}, f)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    msg = str(info.value)
    assert "weights_only=True" in msg and "--trust-pickle" in msg and str(path) in msg
    assert not marker.exists()
    # the torch.save flavour of the same attack
    path2 = tmp_path / "evil2.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": Evil(str(marker))}, path2)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint_file(path2)
    assert not marker.exists()


def test_atomic_write_keeps_last_good_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint_file(path)["step"] == 1  # the previous one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth"]  # no temp files left behind


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"w": torch.randn(100, 100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        load_checkpoint_file(path)


def test_missing_file_and_unwritable_dir(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_checkpoint_file(tmp_path / "nope.pth")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint({"w": torch.zeros(1)}, blocker / "sub" / "c.pth")


def test_load_report_and_strictness(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    state["extra.weight"] = torch.zeros(1)
    state["1.weight"] = torch.zeros(5, 3)  # wrong shape
    del state["1.bias"]
    with pytest.raises(CheckpointError) as info:
        load_state_dict(model, state, strict=True, source="x.pth")
    msg = str(info.value)
    assert "extra.weight" in msg and "1.bias" in msg and "1.weight (5, 3)->(2, 3)" in msg
    before = model[1].weight.clone()
    report = load_state_dict(model, state, strict=False)
    assert sorted(report.loaded) == ["0.bias", "0.weight"]
    assert report.missing == ["1.bias"] and report.unexpected == ["extra.weight"] and len(report.reshaped) == 1
    assert torch.equal(model[0].bias, state["0.bias"]) and torch.equal(model[1].weight, before)
    assert "unexpected" in report.table()


def test_load_checkpoint_roundtrip(tmp_path):
    model = nn.Linear(4, 3)
    path = save_checkpoint({"model": model.state_dict(), "ema": {"module": {k: v * 0 for k, v in model.state_dict().items()}}},
                           tmp_path / "c.pth")
    other = nn.Linear(4, 3)
    assert load_checkpoint(other, path).ok
    assert torch.equal(other.weight, model.weight)
    load_checkpoint(other, path, use_ema=True)
    assert torch.count_nonzero(other.weight) == 0
