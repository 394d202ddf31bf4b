"""Under DDP a ``model.init_from`` URL is downloaded by rank 0 alone while the other ranks wait at a barrier, then
read from the cache by them. The ranks are simulated by patching the helpers of :mod:`detkit.engine.distributed`;
no process is started and nothing leaves the machine (``file://`` URLs)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit.engine import distributed as du  # noqa: E402
from detkit.engine.trainer import Trainer, train  # noqa: E402
from detkit.weights import apply as P  # noqa: E402


def datasets():
    return TinyShapes(8), TinyShapes(4, seed=1, flip=False)


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A trained tiny checkpoint offered as a ``file://`` URL, an empty torch hub cache, and the events log."""
    train(tiny_config(tmp_path, name="src", epochs=1, max_steps=1, eval_interval=-1), datasets=datasets())
    served = tmp_path / "served" / "tiny-init.pth"
    served.parent.mkdir()
    shutil.copy(tmp_path / "src" / "checkpoint_last.pth", served)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / served.name
    events: list[str] = []
    real_download, real_read = torch.hub.download_url_to_file, P.read_checkpoint

    def download(url, dst, *a, **k):
        events.append("download")
        return real_download(url, dst, *a, **k)

    def read(path):
        events.append(f"read {Path(path).name}")
        return real_read(path)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(P, "read_checkpoint", read)
    return served, cached, events


def _trainer(tmp_path, url: str) -> Trainer:
    return Trainer(tiny_config(tmp_path, [f"model.init_from={url}"], name="run", epochs=1, eval_interval=-1),
                   datasets=datasets())


def test_rank0_downloads_then_reaches_the_barrier(tmp_path, monkeypatch, source):
    served, cached, events = source
    monkeypatch.setattr(du, "get_rank", lambda: 0)
    monkeypatch.setattr(du, "barrier", lambda: events.append("barrier"))
    trainer = _trainer(tmp_path, served.as_uri())
    assert events == ["download", f"read {served.name}", "barrier"]
    assert cached.is_file() and trainer.pretrained[0]["file"] == str(cached)


def test_other_ranks_wait_for_the_barrier_then_read_the_cache(tmp_path, monkeypatch, source):
    served, cached, events = source

    def barrier():  # rank 0 fills the cache while this rank waits here
        events.append("barrier")
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(served, cached)

    monkeypatch.setattr(du, "get_rank", lambda: 1)
    monkeypatch.setattr(du, "barrier", barrier)
    trainer = _trainer(tmp_path, served.as_uri())
    assert events == ["barrier", f"read {served.name}"]  # no download of its own
    assert trainer.pretrained[0]["file"] == str(cached)


def test_without_a_process_group_nothing_changes(tmp_path, source):
    served, cached, events = source
    assert not du.is_dist()
    trainer = _trainer(tmp_path, served.as_uri())
    assert events == ["download", f"read {served.name}"]
    assert trainer.pretrained[0]["file"] == str(cached)


def test_main_process_first_order(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(du, "barrier", lambda: events.append("barrier"))
    for rank in (0, 2):
        monkeypatch.setattr(du, "get_rank", lambda rank=rank: rank)
        with du.main_process_first():
            events.append(f"work {rank}")
    assert events == ["work 0", "barrier", "barrier", "work 2"]
    # a failure on rank 0 never releases the others to redo the work
    events.clear()
    monkeypatch.setattr(du, "get_rank", lambda: 0)
    with pytest.raises(RuntimeError):
        with du.main_process_first():
            raise RuntimeError("download failed")
    assert events == []
