"""Training steps of the shipped models read values back to the host once per optimizer step (the non-finite check
and the logged losses), however many micro-batches the step accumulates; the Hungarian assignment, which runs on the
host by design, is counted apart."""

from __future__ import annotations

import pytest

from conftest import CONFIGS
from detkit.config import compose
from detkit.engine.trainer import Trainer
from support.host_syncs import HostSyncCounter

SMALL = {
    "lwdetr_vit.yaml": ["model.backbone.depth=2", "model.backbone.window_blocks=[0]", "model.backbone.out_indices=[1]",
                        "model.transformer.num_layers=2", "model.num_queries=10", "model.postprocessor.num_select=10"],
    "detr_r50.yaml": ["model.backbone.depth=18", "model.transformer.num_encoder_layers=1",
                      "model.transformer.num_decoder_layers=2", "model.num_queries=10",
                      "data.format=synthetic", "data.synthetic.image_size=64",
                      "data.train_transforms=null", "data.val_transforms=null", "model.backbone.weights=null"],
}


@pytest.mark.parametrize("config", sorted(SMALL))
def test_one_host_read_per_optimizer_step(tmp_path, config):
    overrides = SMALL[config] + [
        f"runtime.output_dir={tmp_path}", "runtime.device=cpu", "runtime.tensorboard=false", "runtime.plot=false",
        "runtime.progress=log", "data.num_workers=0", "data.synthetic.num_train=12", "data.synthetic.num_val=2",
        "data.synthetic.image_size=64", "train.batch_size=2", "train.accumulate=3", "train.ema=true",
        "train.eval_interval=-1", "train.checkpoint_minutes=0", "train.log_interval=1000"]
    cfg = compose(CONFIGS / config, overrides)
    trainer = Trainer(cfg)
    trainer._register_callbacks()
    try:
        loader = iter(trainer._train_loader())
        windows = [[next(loader) for _ in range(3)] for _ in range(2)]  # the sampler reads on the host, not the step
        trainer.model.train()
        with HostSyncCounter() as probe:
            probe.exclude(trainer.criterion.matcher)
            for window in windows:
                trainer._optimizer_step(window)
        probe.remove()
    finally:
        trainer._unregister_callbacks()
        trainer._close_log_file()
    assert trainer.step == 2 and trainer.last_step_ok
    assert sum(probe.inside.values()) > 0, "the probe must see the matcher's host transfer"
    assert sum(probe.outside.values()) <= 2, f"host reads outside matching in 2 steps: {dict(probe.outside)}"
