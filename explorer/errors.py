"""The few exceptions the explorer raises on purpose.

Every message says what came in, what is allowed, and what to do next. The app translates the
``code`` of an error into the user's language; ``str(err)`` is the English text for logs, the CLI
and notebooks.
"""
from __future__ import annotations

from typing import Any


class ExplorerError(Exception):
    """Base class: an error whose message is meant for the person who caused it.

    Args:
        message: English text: what was received, what is allowed, what to do.
        code: a stable key (``"image_too_large"``) the app looks up in its translations.
        params: values the translated message formats in (``{"width": 20000}``).
    """

    code = "error"

    def __init__(self, message: str, code: str | None = None, **params: Any) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.params = params


class ModelSourceError(ExplorerError):
    """A model spec that names nothing we can build (unknown name, unsupported family)."""

    code = "model_source"


class HubUnreachableError(ExplorerError):
    """Pretrained weights were asked for and the model hub cannot be reached."""

    code = "hub_unreachable"


class CheckpointError(ExplorerError):
    """A checkpoint file that is unsafe, damaged, or does not fit the architecture."""

    code = "checkpoint"


class ImageError(ExplorerError):
    """An image that cannot be decoded safely, or is too large, too small, or not an image."""

    code = "image"


class CaptureError(ExplorerError):
    """The forward pass ran but the hooks saw nothing, or the forward pass itself failed."""

    code = "capture"


class InputError(ExplorerError):
    """Any other argument outside what is allowed (a layer index, a query token, an image set)."""

    code = "input"
