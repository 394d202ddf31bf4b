"""Tensor operations below the models (box ops, multi-scale deformable attention, precision); fills no registry."""
