"""Swapping memenc-fast into SAM 3's tracker: ``from_sam3`` and ``patch_sam3``.

sam3's tracker only calls its memory encoder as ``(pix_feat, masks, skip_mask_sigmoid=True)``
after checking ``isinstance(self.maskmem_backbone, SimpleMaskEncoder)``; the drop-in therefore is
an instance of a subclass of both this package's MemoryEncoder and sam3's SimpleMaskEncoder.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch.nn as nn

from .modules import MemoryEncoder, swap_memory_encoder

__all__ = ["from_sam3", "patch_sam3", "sam3_compatible_class"]

_SAM3_MODULE = "sam3.model.memory"


def sam3_compatible_class(sam3_class: type) -> type:
    """memenc_fast's MemoryEncoder as a subclass of sam3's ``SimpleMaskEncoder`` (made once).

    Our forward and ``__init__``-free construction (``MemoryEncoder.wrap``) take precedence in the
    method order; sam3's class only contributes its identity for ``isinstance``.
    """
    existing: Optional[type] = globals().get("Sam3MemoryEncoder")
    if existing is not None and issubclass(existing, sam3_class):
        return existing
    cls = type("Sam3MemoryEncoder", (MemoryEncoder, sam3_class), {
        "__module__": __name__,
        "__doc__": "memenc_fast.MemoryEncoder that is also a sam3 SimpleMaskEncoder (see from_sam3).",
    })
    # Importable by name, so pickled modules can be loaded again.
    setattr(sys.modules[__name__], "Sam3MemoryEncoder", cls)
    return cls


def _sam3_base_class(module: nn.Module) -> type:
    for c in type(module).__mro__:
        if c.__name__ == "SimpleMaskEncoder" and c.__module__ == _SAM3_MODULE:
            return c
    raise TypeError(
        f"from_sam3 expects a {_SAM3_MODULE}.SimpleMaskEncoder; "
        f"got {type(module).__module__}.{type(module).__qualname__}"
    )


def from_sam3(sam3_mask_encoder: nn.Module) -> MemoryEncoder:
    """A memenc_fast MemoryEncoder that shares the submodules and parameters of a sam3
    ``SimpleMaskEncoder`` and is itself an instance of ``SimpleMaskEncoder``."""
    if isinstance(sam3_mask_encoder, MemoryEncoder):
        return sam3_mask_encoder
    cls = sam3_compatible_class(_sam3_base_class(sam3_mask_encoder))
    source = sam3_mask_encoder
    encoder = cls.wrap(source.mask_downsampler, source.pix_feat_proj, source.fuser, source.position_encoding,
                       source.out_proj)
    encoder.train(source.training)
    return encoder


def patch_sam3(model: object, fuse_mask_transform: bool = True) -> MemoryEncoder:
    """Replaces ``.maskmem_backbone`` of a sam3 tracker (or of a video model's ``.tracker``) in
    place with ``from_sam3``'s module, and returns it. Idempotent.

    With ``fuse_mask_transform`` the tracker's ``sigmoid(m) * 20 - 10`` step before the encoder
    moves into the encoder's first fused op (see ``MemoryEncoder.take_mask_transform``).
    """
    return swap_memory_encoder(model, "maskmem_backbone", "tracker", from_sam3, fuse_mask_transform,
                               "patch_sam3 expects a sam3 tracker (or a model with .tracker) holding .maskmem_backbone")
