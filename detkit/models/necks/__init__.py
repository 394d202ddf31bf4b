"""necks (see DESIGN.md section 2)."""
