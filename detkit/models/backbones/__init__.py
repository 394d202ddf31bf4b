"""backbones (see DESIGN.md section 2)."""
