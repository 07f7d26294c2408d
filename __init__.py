"""RealEdit: ComfyUI entry point only.

ComfyUI imports this folder under whatever name it was cloned as; ``pip install -e .`` maps the same
folder to ``realedit``. Nothing here imports ComfyUI until ComfyUI asks for the nodes, so the core
(``realedit.attention``, ``.inversion``, ``.masks``) stays importable without it.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """Called by ComfyUI's loader: register model folders, return the extension."""
    from .nodes import RealEditExtension, register_model_folders

    register_model_folders()
    return RealEditExtension()
