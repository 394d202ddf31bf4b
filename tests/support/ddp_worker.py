"""One rank of the distributed engine tests (run under torchrun or with RANK/WORLD_SIZE/MASTER_* set).

``python ddp_worker.py OUT_DIR MODE`` with MODE ``train`` (write the trained weights) or ``raise`` (rank 1 raises
after its second step, the others must fail within the process-group timeout).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit import plugins  # noqa: E402
from detkit.engine.sampling import EpochBatchSampler  # noqa: E402
from detkit.engine.trainer import train  # noqa: E402

N, SEED = 16, 7
TRAIN = dict(epochs=1, batch_size=2, max_steps=3, seed=SEED, dropout=None)


def empty_indices() -> list[int]:
    """The samples of rank 1's first batch (2 ranks x 2 images): they get no objects."""
    s = EpochBatchSampler(N, 2, seed=SEED, rank=1, world_size=2)
    s.set_epoch(0)
    return [i for i, _ in next(iter(s))]


def datasets():
    return TinyShapes(N, empty=empty_indices()), TinyShapes(6, seed=1, flip=False)


def config(out: Path, batch_size: int, timeout_s: int = 60):
    return tiny_config(out, ["model.dropout=0.0", f"runtime.dist_timeout_s={timeout_s}"], name="run", epochs=1,
                       batch_size=batch_size, max_steps=3, seed=SEED)


class RaiseOnRank1:
    @plugins.hookimpl
    def detkit_after_step(self, trainer, step, losses):
        if trainer.rank == 1 and step == 2:
            raise RuntimeError("rank 1 fails on purpose")


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "raise":
        plugins.plugin_manager().register(RaiseOnRank1())
    metrics = train(config(out, batch_size=2, timeout_s=int(os.environ.get("TEST_TIMEOUT_S", "60"))),
                    datasets=datasets())
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
