"""Attention math and controllers, in plain PyTorch (no host imports)."""
