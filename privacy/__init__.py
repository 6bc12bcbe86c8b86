"""fedsite privacy package."""
