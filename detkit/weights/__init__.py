"""Everything about weight files, below models and engine: reading and writing them, URL sources, state dicts into
models, official checkpoint formats (the ``formats`` subpackage fills ``CHECKPOINT_FORMATS``) and pretrained weights."""
