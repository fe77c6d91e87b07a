"""ViT Attention Explorer: open Vision Transformers up and see what they do."""
from .errors import ExplorerError
from .zoo import load_model, LoadedModel
from .capture import explain, explain_batch, Explanation

__version__ = "0.1.0"
__all__ = ["load_model", "LoadedModel", "explain", "explain_batch", "Explanation", "ExplorerError"]
