"""Position encodings, computed once per (size, parameters, dtype, device) and shared.

The encoding depends only on the feature map's shape, so every forward after the first returns
a cached tensor expanded over the batch (a read-only view: no copy per object).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Tuple

import torch
import torch.nn as nn

from .reference import sine_position_encoding

__all__ = ["cached_position_encoding"]

_MAX_ENTRIES = 64
_cache: "OrderedDict[Tuple, torch.Tensor]" = OrderedDict()
_lock = threading.Lock()


def cached_position_encoding(
    module: nn.Module, batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The (batch, C, height, width) encoding of a PositionEmbeddingSine-like ``module``.

    Works for this package's module and for sam2's/sam3's (same attributes). Computed in float32
    and cast to ``dtype``, exactly as sam2's ``position_encoding(x).to(x.dtype)``.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args = (height, width, module.num_pos_feats, module.temperature, module.normalize, module.scale)
    if torch.compiler.is_compiling():
        pos = sine_position_encoding(*args, device=device).to(dtype)
        return pos[None].expand(batch, -1, -1, -1)
    key = args + (dtype, device)
    pos = _cache.get(key)
    if pos is None:
        with torch.no_grad():
            pos = sine_position_encoding(*args, device=device).to(dtype)
        with _lock:
            _cache[key] = pos
            while len(_cache) > _MAX_ENTRIES:
                _cache.popitem(last=False)
    return pos[None].expand(batch, -1, -1, -1)
