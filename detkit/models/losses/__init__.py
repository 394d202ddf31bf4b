"""Training criteria (set criterion, IA-BCE): fills LOSSES."""
