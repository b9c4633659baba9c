"""Position encodings, computed once per (size, parameters, dtype, device).

The encoding depends only on the feature map's shape and the module's hyper-parameters, all of
which are in the cache key. The cached tensor itself is never handed out: every call gets a fresh
copy (as sam2's module returns a fresh tensor), so a caller's in-place write cannot reach another
call, and an entry made under ``torch.inference_mode()`` is an ordinary tensor, usable by autograd
later.
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
    """A fresh (batch, C, height, width) encoding of a PositionEmbeddingSine-like ``module``.

    Works for this package's module and for sam2's/sam3's (same attributes). Computed in float32
    and cast to ``dtype``, exactly as sam2's ``position_encoding(x).to(x.dtype)``.
    """
    args = (height, width, module.num_pos_feats, module.temperature, module.normalize, module.scale)
    if torch.compiler.is_compiling():
        pos = sine_position_encoding(*args, device=device).to(dtype)
        return pos[None].repeat(batch, 1, 1, 1)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = args + (dtype, device)
    pos = _cache.get(key)
    if pos is None:
        with torch.inference_mode(False), torch.no_grad():
            pos = sine_position_encoding(*args, device=device).to(dtype)[None].contiguous()
        with _lock:
            _cache[key] = pos
            while len(_cache) > _MAX_ENTRIES:
                _cache.popitem(last=False)
    # clone() of the expanded view writes a contiguous copy per object.
    return pos.clone() if batch == 1 else pos.expand(batch, -1, -1, -1).clone()
