"""convert (see DESIGN.md section 2)."""
