"""losses (see DESIGN.md section 2)."""
