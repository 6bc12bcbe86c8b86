"""fedsite client package."""
