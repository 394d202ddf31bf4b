"""``oracle_test``: a detector that follows the detkit contract and locates one saturated object without learning.

Import as ``support.oracle_detector`` (tests put ``tests/`` on ``sys.path`` and name the module in
``plugins.imports``). It undoes the ImageNet normalisation, marks pixels whose saturation (max - min channel) is
above 0.4 outside the padding, and returns their bounding box, normalised by the unpadded size, as query 0 with
the class of the dominant channel (0 red, 1 green, 2 blue); the other queries say "no object". So predictions are
exact facts of the image, and a test of the predict pipeline (reading, resizing, batching with padding,
post-processing back to original pixels, drawing) can check boxes against the drawn truth.

With ``components=True`` every connected region of saturated pixels (8-connected) is one object, one query each
(up to ``num_queries``), and its score grows with the region's mean saturation (logit ``8 * (sat - 0.5)`` against
a no-object logit of 0), so objects of different colours rank differently: tiled prediction can be checked against
the objects drawn, and its COCO AP against that of the same objects predicted apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from detkit.models.postprocessors import SoftmaxPostProcessor
from detkit.registry import DETECTORS

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class _NoLoss(nn.Module):
    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        loss = outputs["pred_logits"].sum() * 0
        return {"loss": loss, "loss_ce": loss}


class OracleDetector(nn.Module):
    def __init__(self, num_classes: int = 3, num_queries: int = 4, components: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.components = components
        self.scale = nn.Parameter(torch.ones(()))  # something to save and load
        self.criterion = _NoLoss()
        self.postprocessor = SoftmaxPostProcessor()

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        b, _, h, w = images.shape
        if mask is None:
            mask = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        rgb = images * STD.to(images) + MEAN.to(images)
        sat = rgb.max(1).values - rgb.min(1).values
        obj = (sat > 0.4) & ~mask
        logits = torch.full((b, self.num_queries, self.num_classes + 1), -10.0, device=images.device)
        logits[..., -1] = 10.0
        boxes = torch.full((b, self.num_queries, 4), 0.5, device=images.device)
        boxes[..., 2:] = 0.1
        if self.components:
            return self._components(rgb, sat, obj, mask, logits, boxes)
        for i in range(b):
            ys, xs = torch.nonzero(obj[i], as_tuple=True)
            if len(xs) == 0:
                continue
            vh = float((~mask[i, :, 0]).sum())
            vw = float((~mask[i, 0, :]).sum())
            x1, x2 = float(xs.min()), float(xs.max()) + 1
            y1, y2 = float(ys.min()), float(ys.max()) + 1
            boxes[i, 0] = torch.tensor([(x1 + x2) / 2 / vw, (y1 + y2) / 2 / vh, (x2 - x1) / vw, (y2 - y1) / vh])
            label = int(rgb[i][:, ys, xs].mean(1).argmax())
            logits[i, 0, -1] = -10.0
            logits[i, 0, label] = 10.0
        return {"pred_logits": logits * self.scale, "pred_boxes": boxes}

    def _components(self, rgb: Tensor, sat: Tensor, obj: Tensor, mask: Tensor, logits: Tensor, boxes: Tensor
                    ) -> dict[str, Tensor]:
        from scipy import ndimage

        for i in range(len(obj)):
            vh = float((~mask[i, :, 0]).sum())
            vw = float((~mask[i, 0, :]).sum())
            regions, count = ndimage.label(obj[i].cpu().numpy(), structure=np.ones((3, 3)))
            for q, found in enumerate(ndimage.find_objects(regions)[:self.num_queries]):
                ys, xs = found
                inside = torch.from_numpy(regions[ys, xs] == q + 1).to(obj.device)
                x1, x2, y1, y2 = float(xs.start), float(xs.stop), float(ys.start), float(ys.stop)
                boxes[i, q] = torch.tensor([(x1 + x2) / 2 / vw, (y1 + y2) / 2 / vh, (x2 - x1) / vw, (y2 - y1) / vh])
                pixels = rgb[i][:, ys, xs][:, inside]
                logits[i, q, -1] = 0.0
                logits[i, q, int(pixels.mean(1).argmax())] = 8.0 * (float(sat[i][ys, xs][inside].mean()) - 0.5)
        return {"pred_logits": logits * self.scale, "pred_boxes": boxes}


@DETECTORS.register("oracle_test")
def oracle_test(num_classes: int = 3, num_queries: int = 4, components: bool = False) -> OracleDetector:
    """Test detector (see the module docstring)."""
    return OracleDetector(num_classes, num_queries, components)
