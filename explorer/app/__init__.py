"""The Gradio app. ``views`` and ``handlers`` need no Gradio; ``build_app``/``launch`` import it
on first use (it costs seconds)."""
from typing import Any


def build_app(*args: Any, **kwargs: Any):
    from .main import build_app as build
    return build(*args, **kwargs)


def launch(*args: Any, **kwargs: Any) -> None:
    from .main import launch as run
    run(*args, **kwargs)


__all__ = ["build_app", "launch"]
