"""Detection models: every module below registers its components when imported (see DESIGN.md section 2)."""
