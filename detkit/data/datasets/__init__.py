"""Data set formats, one module each; importing a module registers its format in ``DATASETS``."""
