"""The recipe follows the data: the rules on made-up data sets, the trainer filling a config's nulls (printed and
written to config.yaml, explicit values winning), train.max_minutes fitting the schedule, and `detkit data check`."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit.cli import main  # noqa: E402
from detkit.config import compose, to_container  # noqa: E402
from detkit.engine.recipe import OWN_DATA_TREE, data_stats, derive_recipe, pending_keys  # noqa: E402
from detkit.engine.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.hidden_dim=32", "model.backbone.embed_dim=32", "model.backbone.depth=2",
              "model.backbone.num_heads=2", "model.backbone.window_blocks=[0]", "model.backbone.out_indices=[0,1]",
              "model.transformer.num_layers=1", "model.transformer.sa_heads=2", "model.transformer.ca_heads=2",
              "model.transformer.dim_feedforward=64", "model.group_detr=2"]


class MadeUp:
    """Annotations only: ``per_image`` object counts, square objects of ``sides`` (cycled) in ``size`` px images."""

    def __init__(self, per_image: list[int], sides: list[float], size: int) -> None:
        self.per_image, self.sides, self.size = per_image, sides, size

    def __len__(self) -> int:
        return len(self.per_image)

    def image_info(self, index: int) -> dict:
        return {"id": index + 1, "file_name": f"{index}.png", "width": self.size, "height": self.size}

    def annotations(self, index: int):
        sides = [self.sides[(index + k) % len(self.sides)] for k in range(self.per_image[index])]
        boxes = np.array([[0, 0, s, s] for s in sides], np.float32).reshape(-1, 4)
        return boxes, np.zeros(len(boxes), np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.int64)


def choices(data: MadeUp, tree: dict = OWN_DATA_TREE) -> dict:
    recipe = derive_recipe(tree, data_stats(data))
    return {c.key: c for c in recipe.choices} | {"warnings": recipe.warnings}


def test_many_small_objects_get_queries_and_their_own_resolution():
    got = choices(MadeUp([45] + [20] * 39, [10, 14, 18, 25, 40], size=512))
    assert got["model.num_queries"].value == 100
    assert str(got["model.num_queries"]) == \
        "num_queries 100: up to 45 objects in one image (x2 slack, rounded up to 100)"
    assert got["model.postprocessor.num_select"].value == 100
    assert got["data.val_transforms.size"].value == 512  # small objects: no pixel given away
    assert got["data.train_transforms.sizes"].value == [384, 448, 512, 576, 640]
    assert got["train.epochs"].value == 300  # 40 images: 12000 / 40
    assert got["train.warmup_iters"].value == round(0.03 * 5 * 300) and got["train.eval_interval"].value == 38
    assert any("lwdetr_tiny_finetune.yaml" in w for w in got["warnings"])  # 40 images: too few from scratch


def test_few_large_objects_get_a_small_input_and_few_epochs():
    got = choices(MadeUp([1, 2] * 2000, [300, 420, 600], size=1024))
    assert got["model.num_queries"].value == 30
    # a tenth of the objects are 300 px in 1024 px images: 128 px still shows them at 37 px
    assert got["data.val_transforms.size"].value == 128
    assert got["train.epochs"].value == 12 and got["train.eval_interval"].value == 2
    assert not got["warnings"]


def test_empty_split_and_explicit_values():
    empty = choices(MadeUp([], [10], size=256))
    assert any("empty" in w for w in empty["warnings"]) and empty["model.num_queries"].value == 30
    background = choices(MadeUp([0] * 300, [10], size=256))
    assert any("no objects" in w for w in background["warnings"])
    assert background["data.val_transforms.size"].value == 256
    # an explicit value wins, and is checked against the data
    tree = {**OWN_DATA_TREE, "model": {"type": "lwdetr", "num_queries": 30, "postprocessor": {"num_select": None}},
            "train": {**OWN_DATA_TREE["train"], "epochs": 5}}
    got = choices(MadeUp([45] * 10, [12], size=320), tree)
    assert "model.num_queries" not in got and "train.epochs" not in got
    assert got["model.postprocessor.num_select"].value == 30
    assert any("num_queries=30 is below the 45 objects" in w for w in got["warnings"])
    assert got["train.eval_interval"].value == 1


def test_own_data_config_derives_prints_and_writes_them(tmp_path, caplog, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "data"), "--num-train", "12", "--num-val", "2",
                 "--size", "256"]) == 0
    assert main(["data", "check", str(tmp_path / "data")]) == 0
    printed = capsys.readouterr().out
    assert "objects per image" in printed and "num_queries 30: up to" in printed and "input size" in printed
    assert "lwdetr_tiny_finetune.yaml" in printed  # 12 images: use the fine-tuning config
    config = REPO / "configs" / "lwdetr_own_data.yaml"
    assert {"model.num_queries", "data.val_transforms.size", "train.epochs", "train.warmup_iters",
            "train.eval_interval"} <= set(pending_keys(to_container(compose(config))))
    cfg = compose(config, [f"data.root={tmp_path / 'data'}", "data.num_workers=0", *TINY_MODEL,
                           "train.epochs=7", "train.batch_size=4", "train.max_steps=1", "runtime.device=cpu",
                           f"runtime.output_dir={tmp_path / 'run'}", "runtime.progress=log",
                           "runtime.tensorboard=false", "runtime.plot=false"])
    with caplog.at_level(logging.INFO, logger="detkit"):
        trainer = Trainer(cfg)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("derived ")]
    assert any(m.startswith("derived num_queries 30: up to") for m in logged)
    assert not any(m.startswith("derived epochs") for m in logged)  # explicit: train.epochs=7 wins
    size = trainer.cfg.data.val_transforms.size
    assert isinstance(size, int) and size % 64 == 0 and trainer.unwrapped_model.num_queries == 30
    assert trainer.train_ds.transforms is not None and trainer.val_ds[0][0].shape[1:] == (size, size)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["model"]["num_queries"] == 30 and written["train"]["epochs"] == 7
    assert written["data"]["val_transforms"]["size"] == size and written["train"]["warmup_iters"] >= 1
    assert not pending_keys(written)
    trainer._close_log_file()


def test_max_minutes_ends_training_with_the_schedule_fitted(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1000, max_minutes=0.04, lr_schedule="cosine", min_lr_ratio=0.0,
                      eval_interval=0)
    trainer = Trainer(cfg, datasets=(TinyShapes(16), TinyShapes(4, seed=1, flip=False)))
    planned = trainer.total_steps
    trainer.fit()
    assert "train.max_minutes=0.04 reached" in trainer.stop_reason
    assert trainer.step < planned and trainer.elapsed_training() < 0.04 * 60 + 5
    factor = trainer.scheduler.lr_lambdas[0]
    assert factor.total_steps < planned / 10  # the cosine was fitted to the time ...
    assert factor(trainer.step - 1) < 0.5  # ... so the lr had come down when the time was up
    assert math.isfinite(trainer.last_eval.get("AP", float("nan")))  # and the final evaluation ran


def test_lr_factor_fit_moves_a_planned_step_decay():
    from detkit.engine.optim import LRFactor

    step = LRFactor("step", steps_per_epoch=10, total_steps=100, lr_drop=5, lr_drop_factor=0.1)
    step.fit(40)  # drop planned at half the run: at step 20 now
    assert step(19) == 1.0 and step(20) == pytest.approx(0.1)
    constant = LRFactor("step", steps_per_epoch=10, total_steps=100, lr_drop=10)
    constant.fit(40)
    assert constant(39) == 1.0  # the official 'drop at the end' stays a constant lr
    cosine = LRFactor("cosine", steps_per_epoch=10, total_steps=100)
    cosine.fit(50)
    assert cosine(49) < 0.01 and cosine(0) == pytest.approx(1.0)


def test_a_derived_config_evaluates_with_the_values_of_the_run():
    from detkit.engine.recipe import apply_recipe, resolved_overrides

    tree = to_container(compose(REPO / "configs" / "lwdetr_own_data.yaml"))
    recipe = derive_recipe(tree, data_stats(MadeUp([45] * 10, [12], size=320)))
    saved = apply_recipe(tree, recipe)  # what the run's checkpoint records
    overrides = resolved_overrides(tree, saved)
    assert "model.num_queries=100" in overrides and "data.val_transforms.size=320" in overrides
    assert not pending_keys(to_container(compose(REPO / "configs" / "lwdetr_own_data.yaml", overrides)))
