"""Compatibility helpers for odd installs (no ComfyUI imports)."""
