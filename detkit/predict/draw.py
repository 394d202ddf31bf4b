"""Drawing predictions on images: a box, the class name and the score per detection, one colour per class."""

from __future__ import annotations

from typing import Any

import numpy as np

from detkit.predict.api import Prediction

__all__ = ["class_colour", "draw_predictions"]


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per class (golden-ratio hues)."""
    import colorsys

    h = (label * 0.618033988749895 + 0.08) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_predictions(image: np.ndarray, pred: Prediction) -> Any:
    """The image with each box, class name and score drawn on it (a PIL image)."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    h, w = image.shape[:2]
    line = max(1, round(min(h, w) / 200))
    font_size = max(10, round(min(h, w) / 32))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    # lowest score first, so the best boxes are drawn on top
    for i in reversed(range(len(pred))):
        x1, y1, x2, y2 = (float(v) for v in pred.boxes[i])
        colour = class_colour(int(pred.labels[i]))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        text = f"{pred.class_names[i]} {float(pred.scores[i]):.2f}"
        tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx2 - tx1, ty2 - ty1
        top = y1 - th - 2 * line if y1 - th - 2 * line >= 0 else y1
        left = min(max(x1, 0), max(w - tw - 2 * line, 0))
        draw.rectangle([left, top, left + tw + 2 * line, top + th + 2 * line], fill=colour)
        draw.text((left + line - tx1, top + line - ty1), text, fill=(0, 0, 0) if sum(colour) > 450 else (255, 255, 255),
                  font=font)
    return canvas
