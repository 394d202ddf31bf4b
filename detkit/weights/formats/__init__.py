"""Official checkpoint formats (DETR, LW-DETR): detect, convert to detkit and back, adapt groups; fills
``CHECKPOINT_FORMATS``."""

from detkit.weights.formats.base import CheckpointFormat, detect_official, find_detkit, find_official, get_format

__all__ = ["CheckpointFormat", "detect_official", "find_detkit", "find_official", "get_format"]
