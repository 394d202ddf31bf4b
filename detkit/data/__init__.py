"""Data: sets, transforms (fills TRANSFORMS), collation, data reports and ``detkit data``."""
