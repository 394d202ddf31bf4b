"""Data sets, transforms and collation."""
