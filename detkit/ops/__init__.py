"""ops (see DESIGN.md section 2)."""
