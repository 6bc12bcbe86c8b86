"""fedsite emulator package."""
