"""Backbone-only initialisation (``model.backbone.weights``): torchvision names through a pre-filled torch hub
cache, local files, timm, the LW-DETR ViT MIM layout with another position grid; loader keys in configs; URL cache
and checksum. Nothing is downloaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detkit.config import compose, to_container
from detkit.errors import CheckpointError, ConfigError
from detkit.weights import apply as P
from detkit.models.build import build_model
from tests.conftest import CONFIGS

SMALL_DETR = ["model.hidden_dim=32", "model.num_classes=3", "model.num_queries=5", "model.transformer.nhead=2",
              "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=1",
              "model.transformer.dim_feedforward=32", "model.backbone.depth=18", "model.backbone.weights=null"]


def detr18(*extra: str) -> dict:
    return to_container(compose(CONFIGS / "detr_r50.yaml", [*SMALL_DETR, *extra]).model)


def tiny_lwdetr(*extra: str) -> dict:
    return to_container(compose(CONFIGS / "lwdetr_vit.yaml", ["model.num_classes=2", "model.num_queries=5",
                                                                "model.group_detr=1", *extra]).model)


def test_loader_keys_leave_the_recipe_and_are_type_checked():
    cfg = detr18("model.init_from=https://example.org/detr-r50-e632da11.pth", "model.class_map=o365_to_coco",
                 "model.init_from_ema=true", "model.backbone.weights=IMAGENET1K_V1")
    node, spec = P.split_loader_keys(cfg)
    assert "init_from" not in node and "class_map" not in node and "weights" not in node["backbone"]
    assert spec.init_from.endswith("e632da11.pth") and spec.init_from_ema is True
    assert spec.backbone_weights == "IMAGENET1K_V1" and spec.backbone["type"] == "resnet"
    with torch.device("meta"):
        build_model(cfg)  # the recipe never sees the loader keys; no file is read
    assert P.has_pretrained(cfg) and not P.has_pretrained(detr18())
    with pytest.raises(ConfigError, match="model.init_from must be a path"):
        P.split_loader_keys({**cfg, "init_from": 3})
    with pytest.raises(ConfigError, match="model.class_map must be"):
        P.split_loader_keys({**cfg, "class_map": [1, 2]})


def test_finetune_presets_build_without_weight_files():
    # (tests/test_cli.py runs `detkit check` over every config, these included)
    for name, lr in (("detr_r50_finetune.yaml", 1e-4), ("lwdetr_tiny_finetune.yaml", 1e-4)):
        cfg = compose(CONFIGS / name)
        assert cfg.model.num_classes is None and cfg.train.lr == lr and cfg.data.label_map == "contiguous"
        source = P.split_loader_keys(to_container(cfg.model))[1].init_from
        assert source.startswith("https://") and not Path(source).exists()
        with torch.device("meta"):
            build_model(to_container(cfg.model) | {"num_classes": 5})


def test_url_cache_checksum_and_offline_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    src = tmp_path / "w.pth"
    torch.save({"x": torch.arange(4.0)}, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    good = src.rename(tmp_path / f"weights-{digest[:10]}.pth")
    path = P.resolve_source(good.as_uri(), progress=False)
    assert path == tmp_path / "home" / "hub" / "checkpoints" / good.name and path.read_bytes() == good.read_bytes()
    bad = tmp_path / "other-0123abcd.pth"
    bad.write_bytes(good.read_bytes())
    with pytest.raises(CheckpointError, match="does not start with '0123abcd'"):
        P.resolve_source(bad.as_uri(), progress=False)
    assert not (tmp_path / "home" / "hub" / "checkpoints" / bad.name).exists()
    with pytest.raises(CheckpointError, match="cannot download .*put it at .*unreachable.pth"):
        P.resolve_source("http://127.0.0.1:9/unreachable.pth", progress=False)


def _torchvision_resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # make the frozen BN statistics non-trivial
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(100)
    return net.state_dict()


def test_resnet_torchvision_name_from_a_prefilled_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = _torchvision_resnet18_state()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "resnet18-f37072fd.pth")  # the file name of ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    model = build_model(detr18())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    [report] = P.apply_pretrained(model, detr18("model.backbone.weights=IMAGENET1K_V1"))
    own = model.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer3.1.conv2.weight", "layer4.1.bn2.bias"):
        assert torch.equal(own[f"backbone.body.{key}"], state[key])
    assert torch.equal(own["neck.proj.weight"], before["neck.proj.weight"])  # only the backbone changed
    assert report.target == "backbone" and "ResNet18_Weights.IMAGENET1K_V1" in report.format
    assert report.file == str(cache / "resnet18-f37072fd.pth")
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    assert len(report.converted) == sum(1 for k in own if k.startswith("backbone.")) and not report.reinitialised
    # the same file by path; a wrong name gets the choices
    P.load_backbone_weights(build_model(detr18()), str(cache / "resnet18-f37072fd.pth"), {"type": "resnet"})
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        P.apply_pretrained(model, detr18("model.backbone.weights=IMAGENET1K_V7"))
    with pytest.raises(ConfigError, match="ResNet18_Weights"):
        P.apply_pretrained(model, detr18("model.backbone.weights=ResNet50_Weights.IMAGENET1K_V1"))


def test_vit_mim_checkpoint_with_another_position_grid(tmp_path):
    cfg = tiny_lwdetr()
    torch.manual_seed(0)
    model = build_model(cfg)
    vit = model.backbone
    d, g = vit.embed_dim, vit.pretrain_grid
    gen = torch.Generator().manual_seed(3)
    block = {k: torch.randn(v.shape, generator=gen) for k, v in vit.blocks[0].state_dict().items()}
    mim = {"encoder.cls_token": torch.randn(1, 1, d, generator=gen),
           "encoder.pos_embed": torch.randn(1, 1 + 16 * 16, d, generator=gen),  # a 256-pixel pretraining grid
           "encoder.patch_embed.proj.weight": torch.randn(d, 3, 16, 16, generator=gen),
           "encoder.patch_embed.proj.bias": torch.randn(d, generator=gen),
           "encoder.norm.weight": torch.ones(d), "encoder.norm.bias": torch.zeros(d)}
    for i in range(12):  # the MIM encoder is deeper than the detector's ViT
        mim.update({f"encoder.blocks.{i}.{k}": v + i for k, v in block.items()})
    mim["decoder.blocks.0.norm1.weight"] = torch.ones(d)
    torch.save({"model": mim, "epoch": 299}, tmp_path / "caev2_tiny.pth")
    [report] = P.apply_pretrained(model, {**cfg, "backbone": {**cfg["backbone"],
                                                              "weights": str(tmp_path / "caev2_tiny.pth")}})
    own = model.state_dict()
    expected = F.interpolate(mim["encoder.pos_embed"][:, 1:].reshape(1, 16, 16, d).permute(0, 3, 1, 2),
                             size=(g, g), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, d)
    torch.testing.assert_close(own["backbone.pos_embed"][:, 1:], expected)
    assert torch.equal(own["backbone.pos_embed"][:, :1], mim["encoder.pos_embed"][:, :1])
    assert report.resized == ["backbone.pos_embed"] and "(1, 257, 192)->(1, 197, 192)" in report.table()
    depth = vit.depth
    for i in (0, depth - 1):
        assert torch.equal(own[f"backbone.blocks.{i}.attn.qkv.weight"], mim[f"encoder.blocks.{i}.attn.qkv.weight"])
        assert torch.equal(own[f"backbone.blocks.{i}.gamma_1"], mim[f"encoder.blocks.{i}.gamma_1"])
    unexpected = set(report.unexpected)
    assert {"encoder.cls_token", "encoder.norm.weight", "decoder.blocks.0.norm1.weight",
            f"encoder.blocks.{depth}.mlp.fc1.weight", "encoder.blocks.11.gamma_2"} <= unexpected
    assert len(unexpected) == 4 + (12 - depth) * len(block)  # cls token, final norm (2), decoder, extra blocks
    assert not report.reinitialised
    with pytest.raises(ConfigError, match="no such file.*'vit' backbone has no named weights"):
        P.apply_pretrained(model, {**cfg, "backbone": {**cfg["backbone"], "weights": "caev2_tiny"}})


@pytest.fixture
def timm_backbone(timm_plugin):
    return {"type": "timm", "name": "resnet18", "out_indices": [4]}


def test_timm_backbone_from_a_local_file_and_checkpoint_path(tmp_path, timm_backbone, monkeypatch):
    import timm

    torch.manual_seed(5)
    full = timm.create_model("resnet18")
    torch.save(full.state_dict(), tmp_path / "resnet18_local.pth")
    cfg = {**detr18(), "backbone": timm_backbone}
    model = build_model(cfg)
    [report] = P.apply_pretrained(model, {**cfg, "backbone": {**cfg["backbone"],
                                                              "weights": str(tmp_path / "resnet18_local.pth")}})
    own = model.state_dict()
    assert torch.equal(own["backbone.model.layer4.1.conv2.weight"], full.state_dict()["layer4.1.conv2.weight"])
    assert torch.equal(own["backbone.model.bn1.running_var"], full.state_dict()["bn1.running_var"])
    assert report.format == "timm file" and not report.reinitialised
    # the plugin's checkpoint_path argument names the same kind of file; it is applied after the build too
    node = {**cfg, "backbone": {**cfg["backbone"], "checkpoint_path": str(tmp_path / "resnet18_local.pth")}}
    with torch.device("meta"):
        build_model(node)  # builds without reading the file
    other = build_model(node)
    P.apply_pretrained(other, node)
    assert torch.equal(other.state_dict()["backbone.model.conv1.weight"], full.state_dict()["conv1.weight"])
    # a pretrained tag goes through timm's hub download: offline that is a clear error, a typo gets the tags
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time otherwise
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="no pretrained tag 'resnet18.a1_in1kk'; did you mean"):
        P.load_backbone_weights(model, "a1_in1kk", cfg["backbone"])
    with pytest.raises(CheckpointError, match="cannot load timm weights 'a1_in1k'"):
        P.load_backbone_weights(model, "a1_in1k", cfg["backbone"])
