"""Whole detectors (DETR, LW-DETR), the recipes that assemble the components: fills DETECTORS."""
