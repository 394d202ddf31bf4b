"""Prediction heads (DETR class and box head): fills HEADS."""
