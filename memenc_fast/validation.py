"""Input checks for the drop-in modules: clear errors naming what was expected and what was given,
raised before any backend runs (where sam2 would fail deep inside a conv, or not at all)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .structure import Structure

__all__ = ["check_encoder_inputs", "module_parameter", "autocast_dtype", "describe_tensor"]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device_type`` here, or None when autocast is off there
    (or the device type has no autocast at all, like ``meta``)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:
        pass
    return None


def describe_tensor(t: torch.Tensor) -> str:
    """Shape, dtype and device of ``t``, for error messages."""
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def module_parameter(encoder: nn.Module, structure: Optional[Structure]) -> Optional[torch.Tensor]:
    """A parameter whose device and dtype are the module's: ``pix_feat_proj``'s weight where the
    structure is known, else the first."""
    if structure is not None:
        return structure.projection.pix_weight
    return next(encoder.parameters(), None)


def check_encoder_inputs(pix_feat: object, masks: object, encoder: nn.Module,
                         structure: Optional[Structure]) -> Tuple[torch.dtype, bool]:
    """Validates a MemoryEncoder forward's inputs against the module; returns the dtype the
    forward computes in and whether that is autocast's.

    ``structure`` is the module's structure where the fused path can run it, else None: checks
    that need it (mask channels, the feature size the masks make) are then left to the reference
    forward. Raises TypeError for wrong types/dtypes and ValueError for wrong shapes/devices.
    """
    for name, t in (("pix_feat", pix_feat), ("masks", masks)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"MemoryEncoder: {name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in _FLOATING:
            raise TypeError(
                f"MemoryEncoder: {name} must be a floating tensor (float16, bfloat16, float32 or float64); "
                f"got {str(t.dtype).replace('torch.', '')}"
                + (" (convert binary masks with masks.float())" if name == "masks" else "")
            )
        if t.dim() != 4:
            raise ValueError(f"MemoryEncoder: {name} must be 4-D (B, C, H, W); got {describe_tensor(t)}")
    assert isinstance(pix_feat, torch.Tensor) and isinstance(masks, torch.Tensor)
    param = module_parameter(encoder, structure)
    if structure is not None and pix_feat.shape[1] != structure.in_dim:
        raise ValueError(f"MemoryEncoder: pix_feat must have {structure.in_dim} channels (in_dim); "
                         f"got {describe_tensor(pix_feat)}")
    if structure is not None and masks.shape[1] != structure.mask_channels:
        raise ValueError(f"MemoryEncoder: masks must have {structure.mask_channels} channel(s); "
                         f"got {describe_tensor(masks)}")
    if param is not None and masks.device != param.device:
        raise ValueError(
            f"MemoryEncoder: mismatched devices: masks are on {masks.device} but the module's parameters "
            f"are on {param.device}; move one to the other (pix_feat may stay elsewhere: it is moved to masks)"
        )
    batch_m, batch_p = masks.shape[0], pix_feat.shape[0]
    if batch_m != batch_p and 1 not in (batch_m, batch_p):
        raise ValueError(
            f"MemoryEncoder: pix_feat and masks must have the same batch size (or one of them 1); "
            f"got pix_feat {describe_tensor(pix_feat)} and masks {describe_tensor(masks)}"
        )
    if structure is not None:
        expected = structure.feature_size((masks.shape[-2], masks.shape[-1]))
        if tuple(pix_feat.shape[-2:]) != expected:
            raise ValueError(
                f"MemoryEncoder: masks of size {masks.shape[-2]}x{masks.shape[-1]} downsample to "
                f"{expected[0]}x{expected[1]}, but pix_feat is {pix_feat.shape[-2]}x{pix_feat.shape[-1]}; "
                f"the mask size must be the feature size times the downsampler's total stride"
            )
    autocast = autocast_dtype(masks.device.type)
    if autocast is not None:
        return autocast, True
    if param is None:
        return masks.dtype, False
    for name, t in (("pix_feat", pix_feat), ("masks", masks)):
        if t.dtype != param.dtype:
            raise TypeError(
                f"MemoryEncoder: {name} dtype {str(t.dtype).replace('torch.', '')} does not match the "
                f"module's parameter dtype {str(param.dtype).replace('torch.', '')}; cast the input, "
                f"the module, or run under torch.autocast"
            )
    return param.dtype, False
