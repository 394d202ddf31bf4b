"""transformers (see DESIGN.md section 2)."""
