"""Swapping memenc-fast into a built sam2 model: ``from_sam2`` and ``patch_sam2``."""

from __future__ import annotations

import torch.nn as nn

from .modules import MemoryEncoder, swap_memory_encoder

__all__ = ["from_sam2", "patch_sam2"]


def _is_sam2_memory_encoder(module: object) -> bool:
    cls = type(module)
    return cls.__name__ == "MemoryEncoder" and cls.__module__ == "sam2.modeling.memory_encoder"


def from_sam2(sam2_memory_encoder: nn.Module) -> MemoryEncoder:
    """A memenc_fast MemoryEncoder sharing the submodules (so the very parameters: same values,
    device and dtype, and optimizers keep working) of a ``sam2.modeling.memory_encoder.MemoryEncoder``.

    The result has the same ``state_dict`` keys and train/eval mode as the original.
    """
    if isinstance(sam2_memory_encoder, MemoryEncoder):
        return sam2_memory_encoder
    if not _is_sam2_memory_encoder(sam2_memory_encoder):
        raise TypeError(
            "from_sam2 expects a sam2.modeling.memory_encoder.MemoryEncoder; "
            f"got {type(sam2_memory_encoder).__module__}.{type(sam2_memory_encoder).__qualname__}"
        )
    source = sam2_memory_encoder
    encoder = MemoryEncoder.wrap(
        source.mask_downsampler, source.pix_feat_proj, source.fuser, source.position_encoding, source.out_proj
    )
    encoder.train(source.training)
    return encoder


def patch_sam2(model_or_predictor: object, fuse_mask_transform: bool = True) -> MemoryEncoder:
    """Replaces ``model_or_predictor.memory_encoder`` (a sam2 model or video predictor) in place
    with the memenc_fast MemoryEncoder built by ``from_sam2``, and returns it. Idempotent.

    With ``fuse_mask_transform`` the model's ``sigmoid(m) * 20 - 10`` step before the encoder
    moves into the encoder's first fused op (see ``MemoryEncoder.take_mask_transform``).
    """
    # sam2's image predictor keeps the model as .model
    return swap_memory_encoder(model_or_predictor, "memory_encoder", "model", from_sam2, fuse_mask_transform,
                               "patch_sam2 expects a sam2 model or predictor with a .memory_encoder attribute")
