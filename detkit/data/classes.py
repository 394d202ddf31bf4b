"""Class tables of public label sets: COCO's official 91-slot layout and the Objects365 -> COCO head map.

Plain lists and dicts (no heavy imports): the weight loader (:mod:`detkit.weights`), the converters and the data
sets read them.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["COCO_OFFICIAL_CLASSES", "CLASS_MAPS", "o365_to_coco"]

# fmt: off
#: COCO 2017 names at their category ids (index 0 and the 10 ids unused by the 2017 release are "N/A"), as the
#: official DETR / LW-DETR checkpoints lay out their 91 class logits
COCO_OFFICIAL_CLASSES: list[str] = [
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]

# The official LW-DETR Objects365 -> COCO head remap (util/obj365_to_coco_model.py): COCO category id ``c`` takes
# Objects365 row ``o + 1`` for the pairs below.
_COCO_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35,
    36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
    65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]
_O365_IDS = [
    0, 46, 5, 58, 114, 55, 116, 65, 21, 40, 176, 127, 249, 24, 56, 139, 92, 78, 99, 96, 144, 295, 178, 180, 38, 39, 13,
    43, 120, 219, 148, 173, 165, 154, 137, 113, 145, 146, 204, 8, 35, 10, 88, 84, 93, 26, 112, 82, 265, 104, 141, 152,
    234, 143, 150, 97, 2, 50, 25, 75, 98, 153, 37, 73, 115, 132, 106, 61, 163, 134, 277, 81, 133, 18, 94, 30, 169, 70,
    328, 226,
]
# fmt: on


def o365_to_coco() -> dict[str, int]:
    """COCO class name -> row of an Objects365 class head (the official LW-DETR map)."""
    return {COCO_OFFICIAL_CLASSES[c]: o + 1 for c, o in zip(_COCO_IDS, _O365_IDS, strict=True)}


#: built-in class maps usable as ``model.class_map: NAME`` (COCO class name -> checkpoint row)
CLASS_MAPS: dict[str, Callable[[], dict[str, int]]] = {"o365_to_coco": o365_to_coco}
