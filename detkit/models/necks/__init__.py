"""Necks (DETR input projection, LW-DETR multi-scale projector): fills NECKS."""
