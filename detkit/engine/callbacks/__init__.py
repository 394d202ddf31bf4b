"""Training callbacks (EMA, running statistics, checkpoints, logging): fills CALLBACKS."""
