"""One rank of the distributed engine tests (run under torchrun or with RANK/WORLD_SIZE/MASTER_* set).

``python ddp_worker.py OUT_DIR MODE [DETECTOR ...]`` with MODE ``train`` (train each detector of
``support.engine.DETECTORS`` named, default ``tiny``, in turn into ``OUT_DIR/DETECTOR`` and write its weights there;
one process group for all of them) or ``raise`` (rank 1 raises after its second step, the others must fail within
the process-group timeout).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.engine import NO_DROPOUT, detector_config, shapes  # noqa: E402

from detkit import plugins  # noqa: E402
from detkit.engine import distributed as du  # noqa: E402
from detkit.engine.sampling import EpochBatchSampler  # noqa: E402
from detkit.engine.trainer import train  # noqa: E402

N, SEED = 16, 7


def empty_indices() -> list[int]:
    """The samples of rank 1's first batch (2 ranks x 2 images): they get no objects."""
    s = EpochBatchSampler(N, 2, seed=SEED, rank=1, world_size=2)
    s.set_epoch(0)
    return [i for i, _ in next(iter(s))]


def datasets(detector: str = "tiny"):
    return shapes(detector, N, empty=empty_indices()), shapes(detector, 6, seed=1, flip=False)


def config(out: Path, batch_size: int, timeout_s: int = 60, detector: str = "tiny"):
    # no dropout / drop path: each rank draws its own masks, one process other ones
    return detector_config(detector, out, [*NO_DROPOUT[detector], f"runtime.dist_timeout_s={timeout_s}"], name="run",
                           epochs=1, batch_size=batch_size, max_steps=3, seed=SEED)


class RaiseOnRank1:
    @plugins.hookimpl
    def detkit_after_step(self, trainer, step, losses):
        if trainer.rank == 1 and step == 2:
            raise RuntimeError("rank 1 fails on purpose")


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    timeout_s = int(os.environ.get("TEST_TIMEOUT_S", "60"))
    if mode == "raise":
        plugins.plugin_manager().register(RaiseOnRank1())
        train(config(out, batch_size=2, timeout_s=timeout_s), datasets=datasets())
        return
    du.init_distributed("cpu", "gloo", timeout_s)  # one group for every detector: train() leaves it open
    try:
        for detector in sys.argv[3:] or ["tiny"]:
            metrics = train(config(out / detector, batch_size=2, timeout_s=timeout_s, detector=detector),
                            datasets=datasets(detector))
            if int(os.environ.get("RANK", "0")) == 0:
                (out / detector / "metrics.json").write_text(json.dumps(metrics))
    finally:
        du.teardown()


if __name__ == "__main__":
    main()
