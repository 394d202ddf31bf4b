"""Inference on images: the :class:`Detector` / :class:`Prediction` API (``api``), drawing (``draw``) and the
``detkit predict`` CLI (``cli``); it fills no registry. Checkpoints are loaded by :mod:`detkit.loading`."""

from detkit.loading import LoadedModel, default_cat_ids, load_for_inference
from detkit.predict.api import IMAGE_SUFFIXES, Detector, Prediction, as_rgb_array, find_images, read_image
from detkit.predict.cli import predict_main
from detkit.predict.draw import class_colour, draw_predictions

__all__ = ["Detector", "Prediction", "read_image", "as_rgb_array", "find_images", "IMAGE_SUFFIXES", "draw_predictions",
           "class_colour", "predict_main", "LoadedModel", "load_for_inference", "default_cat_ids"]
