"""detectors (see DESIGN.md section 2)."""
