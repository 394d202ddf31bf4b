"""Position encodings (sine, learned): fills POSITION_ENCODINGS."""
