"""Large buffers that are handed out again once nothing refers to them.

Used by :mod:`explorer.capture` (attention, head means, token states, TNT inner attention),
:func:`explorer.analysis.rollout.fused_layers` (the fused layers a slider setting makes) and
:func:`explorer.render.overlay.overlay` (overlays at a photo's own size): all write tens to
hundreds of MB that a fresh allocation would first have to fault in page by page.
"""
from __future__ import annotations

import math
import sys
import threading
from typing import Any

import numpy as np


class BufferPool:
    """Large float buffers, handed out again once nothing refers to them.

    Writing a layer at a time into a fresh 258 MB float16 buffer (DINOv2-S at 1370 tokens) took
    130 ms from ``torch.empty``, 70 ms from numpy and 35 ms into a recycled one: the rest is page
    faults, which a plain forward pass never pays because the allocator recycles its activations.
    Here a capture's buffers (and rollout's fused layers) are recycled by the next request for the
    same size if every tensor made from them is gone by then (explaining images one after another,
    moving a slider): the pool holds the newest :attr:`keep` numpy arrays, and an array whose only
    references are the pool's own is free. Memory kept idle is at most those arrays.

    Arrays come from numpy, whose large allocations ask Linux for transparent huge pages: a fresh
    buffer then takes a few hundred page faults instead of sixty thousand.
    """

    #: smaller buffers go straight to numpy. From 1 MB the C allocator hands out fresh pages too
    #: (ViT-B's 22 MB of attention, TNT's 10 MB of inner attention): recycling them made a
    #: capture 2-3 % faster
    min_bytes = 2**20

    def __init__(self, keep: int) -> None:
        #: how many arrays the pool holds on to
        self.keep = keep
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised numpy array of ``shape`` and ``dtype`` (recycled from 1 MB)."""
        np_dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * np_dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype=np_dtype)
        with self._lock:  # the view exists before the lock goes: no two callers share an array
            for arr in self._arrays:
                # free: referenced only by the pool's list, this loop and getrefcount's argument
                if arr.nbytes == nbytes and sys.getrefcount(arr) <= 3:
                    return arr.view(np_dtype).reshape(shape)
            fresh = np.empty(nbytes, dtype=np.uint8)
            self._arrays = (self._arrays + [fresh])[-self.keep:]
            return fresh.view(np_dtype).reshape(shape)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """:meth:`array` as a torch tensor (``dtype`` torch.float16 or torch.float32)."""
        import torch

        return torch.from_numpy(self.array(shape, {torch.float16: np.float16, torch.float32: np.float32}[dtype]))

    def release(self) -> None:
        """Let go of the arrays nobody else holds (their memory goes back to the system)."""
        with self._lock:
            self._arrays = [a for a in self._arrays if sys.getrefcount(a) > 3]


#: one capture's attention, head means, token states and (TNT) inner attention
BUFFERS = BufferPool(keep=4)
#: rollout's fused layers: an Explanation caches two head fusions (max and min; mean fusion reads
#: the head means kept at capture), and a third is computed when the older one has gone
FUSED = BufferPool(keep=2)
#: overlays at a photo's own size (36 MB for 12 MP, where fresh pages cost 6-9 ms of a 21-ms
#: overlay): the views of one image make two, and the app's display-size overlay lives beside
#: them (with two kept, each display overlay pushed a 36-MB buffer out: +20 ms for the next pair)
OVERLAYS = BufferPool(keep=3)
#: the heatmap values an overlay colours, one byte a pixel of the model's box (8 MB for a 12-MP
#: photo): two overlays of one image are made together
VALUES = BufferPool(keep=2)
