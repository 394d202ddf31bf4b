"""Detection models, modules and recipes only: the subpackages fill the registries, postprocessors.py POSTPROCESSORS."""
