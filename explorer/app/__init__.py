"""The Gradio app (imports gradio: keep it out of the library's import path)."""
from .main import build_app, launch

__all__ = ["build_app", "launch"]
