"""Inference-only model optimisations: fold (frozen) batch norm into the preceding convolution, channels-last convs.

:func:`optimize_for_inference` rewrites a detector **in place** for prediction, benchmarking and export: the outputs
stay equal to the plain eval model up to float rounding, but the module tree changes (each folded norm becomes an
``nn.Identity`` and its convolution gains a bias), so the state dict of the returned model is *not* the training /
checkpoint one. Load weights first, then optimise; never train or save the optimised model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["fold_batch_norms", "optimize_for_inference", "is_optimized"]

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map ``y = x * scale + shift`` of an eval-mode / frozen batch norm, per channel."""
    eps = float(getattr(bn, "eps", 1e-5))
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    scale = weight.double() * torch.rsqrt(bn.running_var.double() + eps)
    shift = bias.double() - bn.running_mean.double() * scale
    return scale, shift


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.Module) -> None:
    scale, shift = _bn_scale_shift(bn)
    w = conv.weight
    conv.weight = nn.Parameter((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype), requires_grad=False)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    conv.bias = nn.Parameter((b * scale + shift).to(w.dtype), requires_grad=False)


def _foldable_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, norm_name)`` children of ``module`` whose forward computes ``norm(conv(x))`` directly.

    Registration order equals call order in the modules this is used for (torchvision ResNet stem, ``Bottleneck`` /
    ``BasicBlock``, ``IntermediateLayerGetter`` (runs its children in order), ``nn.Sequential`` such as the downsample branch, detkit's ``ConvX``); a convolution directly
    followed by a batch norm among those children is a pair.
    """
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if not isinstance(module, (nn.Sequential, IntermediateLayerGetter, ResNet, Bottleneck, BasicBlock)):
        return []
    children = list(module.named_children())
    pairs = []
    for (n1, m1), (n2, m2) in zip(children, children[1:]):
        if type(m1) is nn.Conv2d and isinstance(m2, _NORMS) and m1.out_channels == m2.running_mean.numel():
            if isinstance(m2, nn.BatchNorm2d) and (m2.training or not m2.track_running_stats):
                continue  # a training batch norm uses batch statistics: not an affine map
            pairs.append((n1, n2))
    return pairs


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` / ``FrozenBatchNorm2d`` into the convolution before it (in place).

    The norm is replaced by ``nn.Identity``. Returns the number of folded pairs.
    """
    count = 0
    for parent in list(model.modules()):
        for conv_name, bn_name in _foldable_pairs(parent):
            _fold(getattr(parent, conv_name), getattr(parent, bn_name))
            setattr(parent, bn_name, nn.Identity())
            count += 1
    return count


def is_optimized(model: nn.Module) -> bool:
    return bool(getattr(model, "_detkit_inference_optimized", False))


def optimize_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Prepare a detector for fast inference (in place; returns ``model``).

    - ``model.eval()`` and ``requires_grad_(False)``;
    - batch norms folded into their convolutions (:func:`fold_batch_norms`);
    - ``channels_last``: convolution weights of the backbone and neck in channels-last layout (oneDNN / cuDNN run
      NHWC convolutions faster; activations follow the weights' layout).
    """
    model.eval()
    model.requires_grad_(False)
    fold_batch_norms(model)
    if channels_last:
        for name in ("backbone", "neck"):
            part = getattr(model, name, None)
            if part is not None:
                for m in part.modules():
                    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                        m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    model._detkit_inference_optimized = True
    return model
