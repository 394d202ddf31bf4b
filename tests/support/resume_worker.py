"""One rank of the ``train.resume=auto`` test: set a trainer up (no steps) and write where it starts from.

``python resume_worker.py RUN_PARENT OUT_JSON`` under RANK/WORLD_SIZE/MASTER_* (gloo). Rank 1 has a stale view of
the run directory (as a node of a cluster file system can, for a moment): it does not see ``checkpoint_last.pth``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit.engine import distributed as du  # noqa: E402
from detkit.engine import setup as engine_setup  # noqa: E402
from detkit.engine import trainer as trainer_module  # noqa: E402


def main() -> None:
    parent, out = Path(sys.argv[1]), Path(sys.argv[2])
    if os.environ.get("RANK") == "1":
        engine_setup.find_last_checkpoint = lambda run_dir: None  # the stale view
    cfg = tiny_config(parent, ["train.resume=auto", "runtime.dist_timeout_s=60"], epochs=2)
    try:
        trainer = trainer_module.Trainer(cfg, datasets=(TinyShapes(16), None))
        trainer._close_log_file()
        out.write_text(json.dumps({"step": trainer.step, "epoch": trainer.epoch,
                                   "batch_in_epoch": trainer.batch_in_epoch}))
    finally:
        du.teardown()


if __name__ == "__main__":
    main()
