"""position encodings (see DESIGN.md section 2)."""
