"""fedsite coordinator package."""
