"""Callbacks chosen in the config (EMA, checkpointing, logging); each registers in CALLBACKS."""
