"""Tiny random-weight models and synthetic images: the built-in model of the demo and the tests.

Nothing here downloads anything. ``testbed.comfy_models`` imports ComfyUI; the rest does not.
"""
