"""fedsite simulations package."""
