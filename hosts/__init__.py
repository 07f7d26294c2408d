"""Host adapters: route a host UNet's attention calls to the core's hooks.

``hosts.comfy`` imports ComfyUI and ``hosts.diffusers`` imports diffusers; neither is imported here.
"""
