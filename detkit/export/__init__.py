"""export (see DESIGN.md section 2)."""
