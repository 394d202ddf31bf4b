"""Detection models, modules and recipes only: its subpackages fill the component registries, postprocessors.py POSTPROCESSORS."""
