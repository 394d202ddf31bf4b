"""Training engine: trainer, evaluator, checkpoints, distributed helpers."""
