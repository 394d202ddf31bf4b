"""LW-DETR transformer and loss pieces checked against hand-computed facts."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from detkit.models.losses.ia_bce import LWDETRCriterion, ia_bce_loss
from detkit.models.matchers.hungarian import HungarianMatcher
from detkit.models.transformers.lwdetr import (
    GroupedSelfAttention,
    LWDETRTransformer,
    compose_boxes,
    gen_encoder_output_proposals,
    gen_sineembed_for_position,
)


def test_proposals_validity_rules():
    # level 0: 10x10 map, image 1 has 6 valid rows and 8 valid columns; level 1: 5x5 map, no padding
    shapes = [(10, 10), (5, 5)]
    mask0 = torch.zeros(2, 10, 10, dtype=torch.bool)
    mask0[1, 6:, :] = True
    mask0[1, :, 8:] = True
    mask = torch.cat([mask0.flatten(1), torch.zeros(2, 25, dtype=torch.bool)], 1)
    memory = torch.ones(2, 125, 3)
    out_mem, props, valid = gen_encoder_output_proposals(memory, mask, shapes)
    p0 = props[:, :100].view(2, 10, 10, 4)
    # centre of cell (y=2, x=3): ((3 + .5)/10, (2 + .5)/10) in image 0; ((3 + .5)/8, (2 + .5)/6) in image 1
    torch.testing.assert_close(p0[0, 2, 3], torch.tensor([0.35, 0.25, 0.05, 0.05]))
    torch.testing.assert_close(p0[1, 2, 3], torch.tensor([3.5 / 8, 2.5 / 6, 0.05, 0.05]))
    # level 1 proposals are twice as large
    torch.testing.assert_close(props[0, 100 + 7], torch.tensor([2.5 / 5, 1.5 / 5, 0.1, 0.1]))
    v0 = valid[:, :100].view(2, 10, 10)
    # image 0: cell centres 0.05..0.95, all inside (0.01, 0.99)
    assert v0[0].all()
    # image 1: padded cells invalid; the last valid column (7.5/8 = 0.9375) is fine
    assert v0[1, :6, :8].all() and not v0[1, 6:].any() and not v0[1, :, 8:].any()
    assert (props[~valid] == 0).all() and (out_mem[~valid] == 0).all() and (out_mem[valid] == 1).all()
    # a 64x64 map: the border cells (centre 0.5/64 < 0.01) are invalid
    _, _, v = gen_encoder_output_proposals(torch.ones(1, 4096, 1), torch.zeros(1, 4096, dtype=torch.bool), [(64, 64)])
    v = v.view(64, 64)
    assert not v[0].any() and not v[:, 63].any() and v[1:63, 1:63].all()


def test_sine_embedding_order_and_values():
    pos = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    emb = gen_sineembed_for_position(pos, dim=8)
    assert emb.shape == (1, 1, 32)

    def one(v):
        out = []
        for i in range(8):
            arg = v * 2 * math.pi / 10000 ** (2 * (i // 2) / 8)
            out.append(math.sin(arg) if i % 2 == 0 else math.cos(arg))
        # the official code stacks (sin of even, cos of odd) and flattens: sin0, cos1, sin2, cos3, ...
        return out

    expected = one(0.2) + one(0.1) + one(0.3) + one(0.4)  # (y, x, w, h)
    torch.testing.assert_close(emb[0, 0], torch.tensor(expected))


def test_box_reparameterisation():
    ref = torch.tensor([0.5, 0.4, 0.2, 0.1])
    delta = torch.tensor([0.5, -1.0, math.log(2.0), 0.0])
    torch.testing.assert_close(compose_boxes(delta, ref), torch.tensor([0.6, 0.3, 0.4, 0.1]))


def test_grouped_self_attention_matches_mha_per_group_and_does_not_leak():
    torch.manual_seed(0)
    d, heads, q, g = 16, 4, 5, 3
    attn = GroupedSelfAttention(d, heads)
    mha = nn.MultiheadAttention(d, heads, batch_first=True)
    assert set(mha.state_dict()) == set(attn.state_dict())
    with torch.no_grad():
        attn.in_proj_bias.normal_()
    mha.load_state_dict(attn.state_dict())
    x = torch.randn(2, g * q, d)
    out = attn(x, x, x, groups=g)
    for i in range(g):
        part = x[:, i * q : (i + 1) * q]
        torch.testing.assert_close(out[:, i * q : (i + 1) * q], mha(part, part, part)[0], atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[:, q:] += torch.randn(2, (g - 1) * q, d)  # change every group but 0
    torch.testing.assert_close(attn(x2, x2, x2, groups=g)[:, :q], out[:, :q])
    # one group = ordinary attention over all queries
    torch.testing.assert_close(attn(x, x, x, groups=1), mha(x, x, x)[0], atol=1e-5, rtol=1e-5)


def test_transformer_groups_are_independent_and_reference_is_composed():
    torch.manual_seed(0)
    d, nq, groups = 32, 6, 3
    tr = LWDETRTransformer(d_model=d, num_layers=2, sa_heads=4, ca_heads=4, num_points=2, dim_feedforward=64,
                           num_levels=2, num_queries=nq, group_detr=groups, num_classes=5)
    with torch.no_grad():  # make the groups' two-stage heads and queries differ
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    srcs = [torch.randn(2, d, 6, 6), torch.randn(2, d, 3, 3)]
    masks = [torch.zeros(2, 6, 6, dtype=torch.bool), torch.zeros(2, 3, 3, dtype=torch.bool)]
    masks[0][1, :, 4:] = True
    masks[1][1, :, 2:] = True
    refpoint = torch.randn(groups * nq, 4) * 0.1
    query = torch.randn(groups * nq, d)
    hs, ref, hs_enc, ref_enc = tr(srcs, masks, refpoint, query)
    assert hs.shape == (2, 2, groups * nq, d) and ref.shape == (2, groups * nq, 4)
    assert hs_enc.shape == (2, groups * nq, d) and ref_enc.shape == (2, groups * nq, 4)
    # the reference is the learned offset composed with the (detached) top-k box
    torch.testing.assert_close(ref, compose_boxes(refpoint[None].expand(2, -1, -1), ref_enc.detach()))
    # group 0 alone gives the same as group 0 inside all groups
    hs1, ref1, hs_enc1, ref_enc1 = tr(srcs, masks, refpoint[:nq], query[:nq])
    torch.testing.assert_close(hs1, hs[:, :, :nq], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_enc1, ref_enc[:, :nq])
    # top-k picks the positions with the largest max class logit of group 0's head
    mem = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    mask = torch.cat([m.flatten(1) for m in masks], 1)
    om, props, _ = gen_encoder_output_proposals(mem, mask, [(6, 6), (3, 3)])
    om = tr.enc_output_norm[0](tr.enc_output[0](om))
    best = tr.enc_out_class_embed[0](om).max(-1).values.topk(nq, dim=1).indices
    boxes = compose_boxes(tr.enc_out_bbox_embed[0](om), props)
    torch.testing.assert_close(ref_enc1, boxes.gather(1, best[..., None].expand(-1, -1, 4)))


def test_two_stage_selection_gradients_equal_scoring_everything_with_autograd():
    """The transformer scores all positions without autograd and re-projects the selected rows only; the two-stage
    outputs and every gradient equal the official formulation (project, score and box every position with autograd,
    then gather the top-k)."""
    torch.manual_seed(0)
    d, nq, groups = 16, 5, 2
    tr = LWDETRTransformer(d_model=d, num_layers=1, sa_heads=2, ca_heads=2, num_points=2, dim_feedforward=32,
                           num_levels=1, num_queries=nq, group_detr=groups, num_classes=4).double()
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src = torch.randn(2, d, 5, 6, dtype=torch.float64, requires_grad=True)
    masks = [torch.zeros(2, 5, 6, dtype=torch.bool)]
    masks[0][1, :, 4:] = True
    refpoint = torch.randn(groups * nq, 4, dtype=torch.float64) * 0.1
    query = torch.randn(groups * nq, d, dtype=torch.float64)
    _, _, feats, boxes = tr([src], masks, refpoint, query)
    probe_f, probe_b = torch.randn_like(feats), torch.randn_like(boxes)
    grads = torch.autograd.grad((feats * probe_f).sum() + (boxes * probe_b).sum(), [src, *tr.parameters()],
                                allow_unused=True)

    mem = src.flatten(2).transpose(1, 2)
    om0, props, _ = gen_encoder_output_proposals(mem, masks[0].flatten(1), [(5, 6)])
    ref_feats, ref_boxes = [], []
    for g in range(groups):
        om = tr.enc_output_norm[g](tr.enc_output[g](om0))
        best = tr.enc_out_class_embed[g](om).max(-1).values.topk(nq, dim=1).indices[..., None]
        all_boxes = compose_boxes(tr.enc_out_bbox_embed[g](om), props)
        ref_feats.append(om.gather(1, best.expand(-1, -1, d)))
        ref_boxes.append(all_boxes.gather(1, best.expand(-1, -1, 4)))
    ref_feats, ref_boxes = torch.cat(ref_feats, 1), torch.cat(ref_boxes, 1)
    torch.testing.assert_close(feats, ref_feats, rtol=0, atol=1e-12)
    torch.testing.assert_close(boxes, ref_boxes, rtol=0, atol=1e-12)
    ref_grads = torch.autograd.grad((ref_feats * probe_f).sum() + (ref_boxes * probe_b).sum(),
                                    [src, *tr.parameters()], allow_unused=True)
    names = ["src"] + [n for n, _ in tr.named_parameters()]
    checked = 0
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        if b is None or not b.abs().sum():
            assert a is None or not a.abs().sum(), name
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
        checked += 1
    assert checked >= 1 + groups * 6  # src plus each group's projection, norm and box head


def test_ia_bce_hand_computed():
    # 1 image, 2 queries, 3 classes; query 1 matched to class 2 with IoU 0.5
    logits = torch.tensor([[[0.0, 1.0, -1.0], [2.0, -2.0, 0.5]]], requires_grad=True)
    s = torch.sigmoid(logits.detach())
    iou = torch.tensor([0.5])
    loss = ia_bce_loss(logits, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])), iou, num_boxes=2.0)
    sp = float(s[0, 1, 2])
    t = max(sp**0.25 * 0.5**0.75, 0.01)
    expected = -t * math.log(sp) - (1 - t) * math.log(1 - sp)
    for qi in range(2):
        for c in range(3):
            if (qi, c) != (1, 2):
                p = float(s[0, qi, c])
                expected += -(p**2) * math.log(1 - p)
    assert math.isclose(loss.item(), expected / 2, rel_tol=1e-5)
    # the clamp: a tiny IoU still gives t = 0.01
    pos = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    loss_small = ia_bce_loss(logits, pos, torch.tensor([0.0]), 1.0)
    neg = expected - (-t * math.log(sp) - (1 - t) * math.log(1 - sp))
    assert math.isclose(loss_small.item(), neg - 0.01 * math.log(sp) - 0.99 * math.log(1 - sp), rel_tol=1e-5)
    # the negative weight s^2 carries gradient (as the official code): d/dx [-s^2 log(1-s)] at x = 0
    loss.backward()
    p = 0.5
    grad_neg = (-2 * p * math.log(1 - p) + p**2 / (1 - p)) * p * (1 - p)
    assert math.isclose(float(logits.grad[0, 0, 0]), grad_neg / 2, rel_tol=1e-5)


def test_criterion_groups_num_boxes_and_weights():
    torch.manual_seed(0)
    matcher = HungarianMatcher(2, 5, 2, class_cost="focal")
    crit = LWDETRCriterion(matcher, num_classes=4, group_detr=2, weights={"cls": 1, "bbox": 5, "giou": 2})
    logits = torch.randn(1, 6, 4)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(1, 6, 1)
    boxes[0, 1] = torch.tensor([0.3, 0.3, 0.1, 0.1])
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]])}]
    crit.train()
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, target)
    # group 0 (queries 0-2) matches query 1 (exact box); group 1 (3-5): boxes equal, class cost decides
    # L1 of group 1's match: |0.5-0.3|*2 + |0.2-0.1|*2 = 0.6; num_boxes = 1 target * 2 groups
    assert math.isclose(float(losses["loss_bbox"]), 5 * 0.6 / 2, rel_tol=1e-5)
    # group 1's box 0.4..0.6 vs target 0.25..0.35: IoU 0, hull 0.35^2, union 0.04 + 0.01; group 0's GIoU is 1
    giou = 0 - (0.35**2 - 0.05) / 0.35**2
    assert math.isclose(float(losses["loss_giou"]), 2 * (0 + (1 - giou)) / 2, rel_tol=1e-4)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "class_error", "loss"}
    torch.testing.assert_close(losses["loss"], losses["loss_ce"] + losses["loss_bbox"] + losses["loss_giou"])
    crit.eval()  # one group of 6 queries: only query 1 matched
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, target)
    assert float(losses["loss_bbox"]) < 1e-6


def test_valid_ratios_count_unpadded_rows_and_columns():
    mask = torch.zeros(2, 4, 8, dtype=torch.bool)
    mask[1, 3:] = True
    mask[1, :, 6:] = True
    torch.testing.assert_close(LWDETRTransformer.valid_ratio(mask), torch.tensor([[1.0, 1.0], [6 / 8, 3 / 4]]))
