"""DDIM inversion and the reference feature bank, in plain PyTorch (no host imports)."""
