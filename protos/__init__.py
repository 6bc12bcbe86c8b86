"""fedsite protos package."""
