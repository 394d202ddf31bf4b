"""The COCO recipes start where the papers start: DETR's ResNet from torchvision's ImageNet weights, LW-DETR from the
official Objects365-pretrained detectors (class heads remapped to COCO); ``null`` trains from scratch. The weight
files are small stand-ins in a temporary torch hub cache; nothing is downloaded (see ``conftest.no_network_downloads``).
"""

from __future__ import annotations

import math

import pytest
import torch

from detkit.config import compose, to_container
from detkit.data.classes import COCO_OFFICIAL_CLASSES
from detkit.weights import apply as P
from detkit.weights import class_rows
from detkit.models.build import build_model
from tests.conftest import CONFIGS
from tests.support.pretrained_files import O365_SLOTS, official_lwdetr_o365, prefill_hub_cache

HF = "https://huggingface.co/xbsu/LW-DETR/resolve/main/pretrain_weights"
DETR_RECIPES = {"detr_r50.yaml": 50, "detr_r50_dc5.yaml": 50, "detr_r101.yaml": 101, "detr_r101_dc5.yaml": 101}
LWDETR_SIZES = ("tiny", "small", "medium", "large", "xlarge")


def spec(config: str, *overrides: str) -> P.LoaderSpec:
    return P.split_loader_keys(to_container(compose(CONFIGS / config, list(overrides)).model))[1]


@pytest.mark.parametrize("config, depth", DETR_RECIPES.items())
def test_detr_recipes_start_the_resnet_from_torchvision_imagenet_weights(config, depth):
    from torchvision.models import get_model_weights

    s = spec(config)
    assert s.backbone_weights == "IMAGENET1K_V1" and s.init_from is None and s.backbone["depth"] == depth
    # what the official code's torchvision `pretrained=True` loads
    url = get_model_weights(f"resnet{depth}")["IMAGENET1K_V1"].url
    assert url == {50: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                   101: "https://download.pytorch.org/models/resnet101-63fe2227.pth"}[depth]
    assert not P.has_pretrained(compose(CONFIGS / config, ["model.backbone.weights=null"]).model)


@pytest.mark.parametrize("size", LWDETR_SIZES)
def test_lwdetr_recipes_start_from_the_official_objects365_detectors(size):
    s = spec(f"lwdetr_{size}_coco.yaml")
    assert s.init_from == f"{HF}/LWDETR_{size}_30e_objects365.pth"  # scripts/lwdetr_<size>_coco_train.sh
    assert s.class_map == "o365_to_coco" and s.init_from_ema is None  # the official code loads 'model'
    assert not P.has_pretrained(compose(CONFIGS / f"lwdetr_{size}_coco.yaml", ["model.init_from=null"]).model)


def test_fine_tuning_presets_do_not_download_a_backbone_they_replace():
    for config in ("detr_r50_finetune.yaml", "lwdetr_tiny_finetune.yaml", "lwdetr_vit.yaml"):
        assert spec(config).backbone_weights is None


def test_lwdetr_recipe_url_resolves_through_the_download_cache(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = compose(CONFIGS / "lwdetr_tiny_coco.yaml")
    url = P.split_loader_keys(to_container(cfg.model))[1].init_from
    ckpt = official_lwdetr_o365(shared, "tiny", real=("class_embed", "backbone.0.encoder.blocks.5.mlp.fc2"))
    cached = prefill_hub_cache(tmp_path / "torch_home", url, ckpt)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if "class_embed" in k}
    # what the trainer does with the recipe (data.label_map=coco_official: the 91 COCO slots)
    reports = P.apply_pretrained(model, cfg.model, classes=list(COCO_OFFICIAL_CLASSES))
    [report] = reports
    assert report.source == url and report.file == str(cached) and report.format == "official LW-DETR"
    assert report.entry == "model" and not report.unexpected
    own, o365 = model.state_dict(), ckpt["model"]
    assert torch.equal(own["backbone.blocks.5.mlp.fc2.weight"], o365["backbone.0.encoder.blocks.5.mlp.fc2.weight"])
    cmap = class_rows.load_class_map("o365_to_coco")  # COCO name -> Objects365 row (util/obj365_to_coco_model.py)
    names = list(COCO_OFFICIAL_CLASSES)
    for key in ("class_embed", "transformer.enc_out_class_embed.12"):
        weight, bias = own[f"{key}.weight"], own[f"{key}.bias"]
        assert weight.shape[0] == len(names) < O365_SLOTS
        for name in ("person", "dog", "toothbrush"):
            assert torch.equal(weight[names.index(name)], o365[f"{key}.weight"][cmap[name]])
        na = names.index("N/A")  # an unused COCO id keeps the prior bias
        assert torch.equal(weight[na], fresh[f"{key}.weight"][na])
        assert bias[na].item() == pytest.approx(-math.log((1 - 0.01) / 0.01))
    assert len(report.matched_classes) == 80 and report.new_classes == []


def test_objects365_map_on_a_data_set_with_some_coco_classes(shared, tmp_path):
    torch.save(official_lwdetr_o365(shared, "tiny", real=("class_embed",)), tmp_path / "o365.pth")
    cfg = to_container(compose(CONFIGS / "lwdetr_tiny_coco.yaml", ["model.num_classes=3"]).model)
    model = build_model(cfg)
    report = P.init_from(model, str(tmp_path / "o365.pth"), classes=["dog", "person", "widget"],
                         class_map="o365_to_coco")
    cmap = class_rows.load_class_map("o365_to_coco")
    weight = model.state_dict()["class_embed.weight"]
    o365 = torch.load(tmp_path / "o365.pth")["model"]["class_embed.weight"]
    assert torch.equal(weight[0], o365[cmap["dog"]]) and torch.equal(weight[1], o365[cmap["person"]])
    assert report.matched_classes == [f"dog <- {cmap['dog']}", f"person <- {cmap['person']}"]
    assert report.new_classes == ["widget"]
