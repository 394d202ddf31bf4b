"""Encoder-decoder transformers (DETR, LW-DETR deformable): fills TRANSFORMERS."""
