"""DETR building blocks checked against independent facts (formulas, torchvision, the official key layout)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FrozenBatchNorm2d

from detkit.models.backbones.resnet import ResNet
from detkit.models.heads.detr_head import DETRHead
from detkit.models.layers import MLP
from detkit.models.losses.set_criterion import SetCriterion
from detkit.models.matchers.hungarian import HungarianMatcher
from detkit.models.position_encodings.learned import LearnedPositionEncoding
from detkit.models.layers import downsample_mask
from detkit.models.position_encodings.sine import SinePositionEncoding
from detkit.models.postprocessors import SigmoidTopKPostProcessor, SoftmaxPostProcessor
from detkit.models.transformers.detr import DETRTransformer


# -- position encodings --------------------------------------------------------------------------------------------
def test_sine_encoding_matches_direct_formula() -> None:
    npf = 4
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, 2:, :] = True  # last row padding
    mask[0, :, 3:] = True  # last column padding
    pos = SinePositionEncoding(num_pos_feats=npf)(mask)
    assert pos.shape == (1, 2 * npf, 3, 4)
    valid_h, valid_w = 2, 3
    for y in range(3):
        for x in range(4):
            # cumulative count of valid cells along each axis, normalised by the total along that row/column
            ycount = sum(1 for yy in range(y + 1) if not mask[0, yy, x])
            ytotal = sum(1 for yy in range(3) if not mask[0, yy, x])
            xcount = sum(1 for xx in range(x + 1) if not mask[0, y, xx])
            xtotal = sum(1 for xx in range(4) if not mask[0, y, xx])
            ypos = ycount / (ytotal + 1e-6) * 2 * math.pi
            xpos = xcount / (xtotal + 1e-6) * 2 * math.pi
            for i in range(npf):
                div = 10000 ** (2 * (i // 2) / npf)
                f = math.sin if i % 2 == 0 else math.cos
                assert pos[0, i, y, x].item() == pytest.approx(f(ypos / div), abs=1e-5)  # y first
                assert pos[0, npf + i, y, x].item() == pytest.approx(f(xpos / div), abs=1e-5)
    assert valid_h * valid_w == int((~mask).sum())


def test_sine_unnormalised_and_mask_downsampling() -> None:
    pos = SinePositionEncoding(num_pos_feats=2, normalize=False)(torch.zeros(1, 2, 2, dtype=torch.bool))
    # unnormalised: positions are 1, 2; channel 0 is sin(y), channel 1 cos(y) (div = 1 for i < 2)
    assert pos[0, 0, :, 0].tolist() == pytest.approx([math.sin(1), math.sin(2)], abs=1e-6)
    assert pos[0, 1, :, 0].tolist() == pytest.approx([math.cos(1), math.cos(2)], abs=1e-6)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[:, :, 64:] = True
    small = downsample_mask(mask, (2, 3))
    assert small.dtype == torch.bool and small.tolist() == [[[False, False, True], [False, False, True]]]


def test_learned_encoding_layout() -> None:
    torch.manual_seed(0)
    enc = LearnedPositionEncoding(num_pos_feats=3, num_embeddings=50)
    w = enc.row_embed.weight.detach()
    assert w.shape == (50, 3) and float(w.min()) >= 0 and float(w.max()) <= 1  # uniform init
    pos = enc(torch.zeros(2, 4, 5, dtype=torch.bool))
    assert pos.shape == (2, 6, 4, 5)
    assert torch.equal(pos[1, :3, 2, 3], enc.col_embed.weight[3])  # x (column) first
    assert torch.equal(pos[0, 3:, 2, 3], enc.row_embed.weight[2])
    with pytest.raises(ValueError, match="larger"):
        enc(torch.zeros(1, 51, 2, dtype=torch.bool))


# -- backbone -------------------------------------------------------------------------------------------------------
def test_frozen_batch_norm_arithmetic() -> None:
    bn = FrozenBatchNorm2d(3)
    bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    bn.running_mean.copy_(torch.tensor([0.5, 1.0, -2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(2, 3, 4, 4)
    expected = torch.empty_like(x)
    for c in range(3):
        scale = bn.weight[c] / math.sqrt(bn.running_var[c] + 1e-5)
        expected[:, c] = (x[:, c] - bn.running_mean[c]) * scale + bn.bias[c]
    torch.testing.assert_close(bn(x), expected)
    assert sorted(dict(bn.named_buffers())) == ["bias", "running_mean", "running_var", "weight"]
    assert not list(bn.parameters())


def test_resnet_structure_strides_and_freezing() -> None:
    net = ResNet(depth=50, return_layers=["layer2", "layer4"])
    assert net.out_channels == [512, 2048] and net.strides == [8, 32]
    bns = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert bns and all(isinstance(m, FrozenBatchNorm2d) for m in bns)
    trainable = {n.split(".")[1] for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[1] for n, p in net.named_parameters() if not p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"} and frozen == {"conv1", "layer1"}
    feats = net(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 512, 8, 12), (1, 2048, 2, 3)]
    dc5 = ResNet(depth=50, dilation=True)
    assert dc5.strides == [16]
    assert tuple(dc5(torch.randn(1, 3, 64, 96))[0].shape) == (1, 2048, 4, 6)
    assert all(p.requires_grad for p in ResNet(depth=18, frozen_stages=-1).parameters())
    assert sum(p.requires_grad for p in ResNet(depth=18, frozen_stages=4).parameters()) == 0
    with pytest.raises(ValueError, match="return_layers"):
        ResNet(return_layers=["layer5"])


def test_resnet_drops_num_batches_tracked() -> None:
    net = ResNet(depth=18)
    state = net.state_dict()
    assert not any("num_batches_tracked" in k for k in state)
    state["body.bn1.num_batches_tracked"] = torch.tensor(3)
    net.load_state_dict(state)  # FrozenBatchNorm2d deletes the key instead of failing


# -- transformer, head ----------------------------------------------------------------------------------------------
def test_transformer_keys_equal_official(shared) -> None:
    official = json.loads((shared / "reference/state_dicts/detr_r50.json").read_text())
    official = {k: v for k, v in official.items() if k.startswith("transformer.")}
    with torch.device("meta"):
        tr = DETRTransformer()
    ours = {f"transformer.{k}": list(v.shape) for k, v in tr.state_dict().items()}
    assert ours == official


def test_transformer_shapes_and_final_norm() -> None:
    torch.manual_seed(0)
    tr = DETRTransformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=3, dim_feedforward=32).eval()
    src, pos = torch.randn(2, 16, 3, 4), torch.randn(2, 16, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 2:] = True
    hs, memory = tr(src, mask, torch.randn(5, 16), pos)
    assert hs.shape == (3, 2, 5, 16) and memory.shape == (2, 16, 3, 4)
    # every intermediate output went through the (identity-initialised) decoder LayerNorm: zero mean, unit variance
    torch.testing.assert_close(hs.mean(-1), torch.zeros(3, 2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(hs.var(-1, unbiased=False), torch.ones(3, 2, 5), atol=1e-3, rtol=0)
    # padded memory positions do not influence the output of image 1
    src2 = src.clone()
    src2[1, :, :, 2:] = 100.0
    hs2, _ = tr(src2, mask, tr.decoder.norm.weight.new_zeros(5, 16) + 0.1, pos)
    hs1, _ = tr(src, mask, tr.decoder.norm.weight.new_zeros(5, 16) + 0.1, pos)
    torch.testing.assert_close(hs1[:, 1], hs2[:, 1])


def test_mlp_and_head() -> None:
    mlp = MLP(8, 16, 4, 3)
    assert [k for k in mlp.state_dict()] == [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    x = torch.randn(5, 8)
    ref = mlp.layers[2](F.relu(mlp.layers[1](F.relu(mlp.layers[0](x)))))
    torch.testing.assert_close(mlp(x), ref)
    head = DETRHead(hidden_dim=8, num_classes=3)
    with torch.no_grad():
        logits, boxes = head(torch.randn(2, 1, 5, 8))
    assert logits.shape == (2, 1, 5, 4) and boxes.shape == (2, 1, 5, 4)
    assert float(boxes.min()) > 0 and float(boxes.max()) < 1


# -- loss -----------------------------------------------------------------------------------------------------------
def _criterion(**kw) -> SetCriterion:
    return SetCriterion(num_classes=2, matcher=HungarianMatcher(), **kw)


def test_loss_hand_computed() -> None:
    # one image, two queries, classes {0, 1} + no-object (2); one target of class 1 that query 0 clearly matches
    logits = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    target_box = torch.tensor([[0.5, 0.5, 0.4, 0.2]])
    targets = [{"labels": torch.tensor([1]), "boxes": target_box}]
    out = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)

    def nll(row: list[float], cls: int) -> float:
        return -(row[cls] - math.log(sum(math.exp(v) for v in row)))

    ce = (1.0 * nll([0.0, 2.0, 0.0], 1) + 0.1 * nll([1.0, 0.0, 3.0], 2)) / (1.0 + 0.1)
    l1 = 0.2  # only the width differs, by 0.2
    giou = 0.5  # [0.4,0.4,0.6,0.6] inside [0.3,0.4,0.7,0.6]: IoU = 0.04/0.08, hull = union
    assert out["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss_bbox"].item() == pytest.approx(5 * l1, rel=1e-5)
    assert out["loss_giou"].item() == pytest.approx(2 * (1 - giou), rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + 5 * l1 + 2 * (1 - giou), rel=1e-5)
    assert out["class_error"].item() == 0.0  # argmax of query 0 is class 1
    assert out["cardinality_error"].item() == 0.0  # one non-no-object prediction, one target
    assert not out["class_error"].requires_grad


def test_loss_aux_weights_and_empty_images() -> None:
    torch.manual_seed(0)
    crit = _criterion(eos_coef=0.5, weights={"ce": 2.0, "bbox": 1.0, "giou": 0.0})
    assert crit.state_dict() == {}  # nothing persistent: the model state dict stays the official one
    main = {"pred_logits": torch.randn(2, 3, 3, requires_grad=True), "pred_boxes": torch.rand(2, 3, 4)}
    aux = {"pred_logits": torch.randn(2, 3, 3), "pred_boxes": torch.rand(2, 3, 4)}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    out = crit({**main, "aux_outputs": [aux]}, targets)
    assert set(out) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0", "loss",
                        "class_error", "cardinality_error"}
    alone = crit(aux, targets)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert out[f"{k}_0"].item() == pytest.approx(alone[k].item(), rel=1e-6)
    assert out["loss_giou"].item() == 0.0
    # cross-entropy with class weights [1, 1, 0.5], scaled by 2; image 1 only has no-object targets
    weight = torch.tensor([1.0, 1.0, 0.5])
    matched = crit.matcher(main, targets)[0]
    tgt = torch.full((2, 3), 2, dtype=torch.int64)
    tgt[0, matched[0]] = targets[0]["labels"][matched[1]]
    ref = F.cross_entropy(main["pred_logits"].reshape(-1, 3), tgt.reshape(-1), weight=weight)
    assert out["loss_ce"].item() == pytest.approx(2 * ref.item(), rel=1e-5)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    out["loss"].backward()
    assert main["pred_logits"].grad is not None
    # no targets at all: box losses are 0 (num_boxes clamps to 1), ce still defined
    none = crit(main, [targets[1], targets[1]])
    assert none["loss_bbox"].item() == 0.0 and math.isfinite(none["loss_ce"].item())


def test_loss_rejects_unknown_weight() -> None:
    with pytest.raises(ValueError, match="cls"):
        _criterion(weights={"cls": 1.0})


# -- post-processing ------------------------------------------------------------------------------------------------
def test_softmax_postprocessor_coordinates() -> None:
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.0, 5.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25], [0.25, 0.75, 0.1, 0.1]]])
    (res,) = SoftmaxPostProcessor()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 400]]))
    p = torch.tensor([2.0, 0.0, 1.0]).softmax(0)
    assert res["labels"].tolist() == [0, 0] and res["labels"].dtype == torch.int64
    assert res["scores"][0].item() == pytest.approx(p[0].item())
    # (h, w) = (200, 400): x scaled by 400, y by 200
    assert res["boxes"][0].tolist() == pytest.approx([100.0, 75.0, 300.0, 125.0])
    assert res["boxes"][1].tolist() == pytest.approx([80.0, 140.0, 120.0, 160.0])


def test_sigmoid_topk_postprocessor() -> None:
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 2, 1] = 3.0
    logits[0, 0, 3] = 2.0
    logits[0, 2, 0] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1], [0.25, 0.25, 0.5, 0.5]]])
    (res,) = SigmoidTopKPostProcessor(num_select=3)({"pred_logits": logits, "pred_boxes": boxes},
                                                   torch.tensor([[100, 50]]))
    assert res["labels"].tolist() == [1, 3, 0]
    assert res["scores"].tolist() == pytest.approx([1 / (1 + math.exp(-v)) for v in (3.0, 2.0, 1.0)])
    torch.testing.assert_close(res["boxes"], torch.tensor([[0.0, 0, 25, 50], [0, 0, 50, 100], [0, 0, 25, 50]]))
    (all_pairs,) = SigmoidTopKPostProcessor(num_select=100)({"pred_logits": logits, "pred_boxes": boxes},
                                                           torch.tensor([[100, 50]]))
    assert len(all_pairs["scores"]) == 12
