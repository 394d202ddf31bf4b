"""Official DETR / LW-DETR checkpoints to detkit and back (``detkit convert``); fills no registry."""
