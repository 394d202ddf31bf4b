"""One training step of detkit or Hugging Face on random inputs, for the training section of :mod:`bench.run` and for
:mod:`bench.gpu`."""

from __future__ import annotations

from collections.abc import Callable

import torch

TRAINING_CASES = {"detr_r50": ("detr_r50.yaml", 512, 512), "lwdetr_tiny": ("lwdetr_tiny_coco.yaml", 640, 640)}


def _targets(batch: int, num: int, seed: int, num_classes: int = 91) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        cxcy = torch.rand(num, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(num, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(1, num_classes, (num,), generator=g), "boxes": torch.cat((cxcy, wh), 1),
                    "image_id": i})
    return out


def _training_inputs(batch: int, h: int, w: int, device: str, num_classes: int = 91):
    """Seeded random ``images (B, 3, h, w)``, an all-valid ``mask`` and 8 random targets per image."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, h, w, device=device)
    mask = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in _targets(batch, 8, 1, num_classes=num_classes)]
    return images, mask, targets


def detkit_training_step(config: str, batch: int, h: int, w: int, device: str = "cpu",
                         amp: torch.dtype | None = None, overrides: list[str] | None = None):
    """``(step_fn, model)``: one step as detkit's trainer runs it (forward and loss under ``amp`` autocast, backward,
    clip 0.1, the trainer's optimizer: official groups, fused AdamW)."""
    from detkit import compose
    from detkit.engine.optim import build_optimizer

    from bench.models import REPO as BREPO
    from bench.models import build_detkit

    model = build_detkit(config, overrides, device=device).train()
    images, mask, targets = _training_inputs(batch, h, w, device, num_classes=model.num_classes)
    opt = build_optimizer(model, dict(compose(BREPO / "configs" / config, overrides or []).train))
    params = [p for g in opt.param_groups for p in g["params"]]

    def loss() -> torch.Tensor:
        with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
            return model.criterion(model(images, mask), targets)["loss"]

    return _optimizer_step(loss, opt, params), model


def _optimizer_step(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, params: list[torch.Tensor]):
    """One training step of either implementation: ``loss_fn()`` (forward and loss), backward, clip 0.1, ``opt``."""

    def step() -> torch.Tensor:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1, foreach=True)
        opt.step()
        return loss.detach()

    return step


def training_step_fns(case: str, impl: str, device: str = "cpu", batch: int = 2):
    """``(step_fn, model)`` running one full training step of ``impl`` (``detkit`` or ``hf``) on ``case``."""
    from detkit import compose

    from bench.models import REPO as BREPO
    from bench.models import build_hf_detr, build_hf_lwdetr

    config, h, w = TRAINING_CASES[case]
    if impl == "detkit":
        return detkit_training_step(config, batch, h, w, device)
    images, mask, targets = _training_inputs(batch, h, w, device)
    train_cfg = dict(compose(BREPO / "configs" / config).train)
    model = (build_hf_detr(device) if case == "detr_r50" else build_hf_lwdetr(case.split("_")[1], h, device))
    model.train()
    if case == "detr_r50":
        # HF's freezing rule looks for "stage.1" in names that read "stages.1", so with its own ResNet the whole
        # backbone ends up frozen; train stages 1-3 (torchvision's layer2-4) as the official recipe does
        for name, p in model.named_parameters():
            if any(f"encoder.stages.{i}." in name for i in (1, 2, 3)):
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: the HF Trainer's default optimizer ("adamw_torch_fused") with torch >= 2.8
    opt = torch.optim.AdamW(params, lr=float(train_cfg["lr"]), weight_decay=float(train_cfg["weight_decay"]),
                            fused=True)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    pixel_mask = (~mask).long()

    return _optimizer_step(lambda: model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss, opt,
                           params), model
