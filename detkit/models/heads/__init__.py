"""heads (see DESIGN.md section 2)."""
