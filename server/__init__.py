"""The coordinator: Flower ServerApp, strategy wiring with privacy protection, checkpoints."""
