"""The shipped configs train: DETR-R50 (tiny overrides) in-process, the main job through tools/train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkit.config import compose
from detkit.weights.io import load_checkpoint_file
from detkit.engine.trainer import Trainer
from tests.support.pretrained_files import prefill_hub_cache, torchvision_resnet_state

REPO = Path(__file__).resolve().parents[1]

SYNTH = ["data.format=synthetic", "data.root=null", "data.label_map=contiguous", "data.num_workers=0",
         "data.synthetic={image_size: 64, num_train: 4, num_val: 2, max_objects: 3, size_range: [0.2, 0.5]}"]


def test_detr_r50_config_trains_on_cpu(tmp_path, shared, monkeypatch):
    # the recipe's ImageNet ResNet-50 (model.backbone.weights=IMAGENET1K_V1), a small stand-in in the hub cache
    from torchvision.models import ResNet50_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    imagenet = torchvision_resnet_state(shared, 50, real=("layer1.0.conv1", "layer4.2.conv3"))
    cached = prefill_hub_cache(tmp_path / "torch_home", ResNet50_Weights.IMAGENET1K_V1.url, imagenet)
    cfg = compose(REPO / "configs" / "detr_r50.yaml", [
        *SYNTH,
        "data.train_transforms={type: detr_train, scales: [64], max_size: 96, crop_resize_sizes: [64], "
        "crop_min_size: 48, crop_max_size: 64}",
        "data.val_transforms={type: detr_val, size: 64, max_size: 96}",
        "model.num_classes=null", "model.hidden_dim=32", "model.num_queries=8", "model.transformer.nhead=2",
        "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=2",
        "model.transformer.dim_feedforward=64",
        "train.epochs=1", "train.batch_size=2", "train.max_steps=2", "train.lr=1e-3", "train.lr_backbone=1e-3",
        f"runtime.output_dir={tmp_path / 'detr'}", "runtime.device=cpu", "runtime.progress=log",
        "runtime.tensorboard=false", "runtime.plot=false",
    ])
    trainer = Trainer(cfg)
    model = trainer.unwrapped_model
    assert model.num_classes == 3  # followed the synthetic data set (circle, square, triangle)
    [source] = trainer.pretrained
    assert source["target"] == "backbone" and source["file"] == str(cached) and "IMAGENET1K_V1" in source["source"]
    for key in ("layer1.0.conv1.weight", "layer4.2.conv3.weight"):
        assert torch.equal(model.state_dict()[f"backbone.body.{key}"], imagenet[key])
    assert json.loads((tmp_path / "detr" / "pretrained.json").read_text()) == trainer.pretrained
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert any(g["lr"] == pytest.approx(1e-3) for g in groups.values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen  # stem + layer1 of the ResNet
    metrics = trainer.fit()
    assert trainer.step == 2 and "AP" in metrics
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["head.class_embed.weight"], after["head.class_embed.weight"])
    ckpt = load_checkpoint_file(tmp_path / "detr" / "checkpoint_last.pth")
    assert ckpt["classes"] == ["circle", "square", "triangle"] and ckpt["step"] == 2


@pytest.mark.slow
def test_main_job_command_runs(tmp_path):
    out = tmp_path / "main"
    proc = subprocess.run(
        [sys.executable, "tools/train.py", "configs/lwdetr_vit.yaml", *SYNTH[:3], "data.num_workers=0",
         "data.synthetic.num_train=8", "data.synthetic.num_val=4", "train.epochs=1", "train.batch_size=4",
         "train.max_steps=2", f"runtime.output_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert set(json.loads(last)) >= {"AP", "AP50"}
    ckpt = load_checkpoint_file(out / "checkpoint_last.pth")
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["num_classes"] == 3
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file() and (out / "curves.png").is_file()


def test_make_train_gives_the_default_config_its_time_budget_and_no_other():
    def command(*make_args: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under make test
        proc = subprocess.run(["make", "-n", "--no-print-directory", "train", *make_args], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True)
        [line] = [line for line in proc.stdout.splitlines() if "tools/train.py" in line]
        return line.split()[1:]

    assert command() == ["tools/train.py", "configs/lwdetr_vit.yaml", "train.max_minutes=9"]
    assert command("CONFIG=configs/detr_r50.yaml") == ["tools/train.py", "configs/detr_r50.yaml"]
    assert command("ARGS=train.max_minutes=5")[-2:] == ["train.max_minutes=9", "train.max_minutes=5"]
    cfg = compose(REPO / "configs" / "lwdetr_vit.yaml", command("ARGS=train.max_minutes=5")[2:])
    assert cfg.train.max_minutes == 5  # the user's value, given after the default, wins
