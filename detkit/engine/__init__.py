"""Training engine (trainer, loop, evaluation, checkpoints, optimizer, distributed): callbacks/ fills CALLBACKS."""
