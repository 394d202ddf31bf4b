"""The ``detkit convert`` CLI over the checkpoint formats of :mod:`detkit.weights.formats`; it fills no registry."""
