"""Backbones (ResNet, LW-DETR ViT): fills BACKBONES."""
