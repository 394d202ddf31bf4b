"""matchers (see DESIGN.md section 2)."""
