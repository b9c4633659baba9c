"""The drop-in modules: sam2's constructors, parameter names and outputs, with fused backends.

``MemoryEncoder`` runs the whole fused pipeline of the backend in force (see ``dispatch``) over its
submodules' live parameters (see ``structure``); the submodule classes keep the reference math and
add what the pipeline needs from them (a cached position encoding). A MemoryEncoder holding
sam2's or sam3's own submodules (a hydra config that only swaps the top-level ``_target_``, or
``from_sam2``) runs fused as well.
"""

from __future__ import annotations

import contextlib

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from . import reference
from . import backends as _backends  # noqa: F401  (registers the shipped backends)
from .dispatch import Selection, available_backends, select_cached
from .graphs import GraphCache
from .pipeline import run_in_chunks
from .position import cached_position_encoding
from .structure import Structure, UnsupportedStructure, read_structure
from .validation import check_encoder_inputs

__all__ = [
    "FusedEncoder",
    "LayerNorm2d",
    "MaskDownSampler",
    "CXBlock",
    "Fuser",
    "PositionEmbeddingSine",
    "MemoryEncoder",
]

LayerNorm2d = reference.LayerNorm2d
MaskDownSampler = reference.MaskDownSampler
CXBlock = reference.CXBlock
Fuser = reference.Fuser


class PositionEmbeddingSine(reference.PositionEmbeddingSine):
    """sam2's / sam3's PositionEmbeddingSine, computed once per (H, W, dtype, device).

    ``precompute_resolution`` (sam3) fills the cache for ``resolution // stride`` (strides 4, 8,
    16, 32) on the default device at construction; sam2's ``warmup_cache`` does the same for
    ``image_size`` on the current CUDA device when one exists, as sam2 does. Every call returns a
    fresh tensor, as sam2's does.
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: int = 10000,
        normalize: bool = True,
        scale: Optional[float] = None,
        precompute_resolution: Optional[int] = None,
        *,
        warmup_cache: bool = True,
        image_size: int = 1024,
        strides: Tuple[int, ...] = (4, 8, 16, 32),
    ) -> None:
        super().__init__(num_pos_feats, temperature, normalize, scale, precompute_resolution,
                         warmup_cache=warmup_cache, image_size=image_size, strides=strides)
        if precompute_resolution is not None:
            self._warm(precompute_resolution, torch.get_default_device())
        elif warmup_cache and torch.cuda.is_available():
            self._warm(image_size, torch.device("cuda", torch.cuda.current_device()))

    def _warm(self, resolution: int, device: torch.device) -> None:
        for stride in self.strides:
            size = resolution // stride
            cached_position_encoding(self, 1, size, size, torch.float32, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cached_position_encoding(self, x.shape[0], x.shape[-2], x.shape[-1], torch.float32, x.device)


class FusedEncoder(nn.Module):
    """What every module with a fused forward shares (this package's MemoryEncoder, and the
    transformers adapter): the structure read from its own submodules and re-checked per call,
    backend selection, the fused pipeline, CUDA graphs, and the attributes below.

    ``mask_scale``/``mask_bias`` (default 1, 0) are applied to the mask after the optional
    sigmoid, inside the first fused op. ``cuda_graphs = True`` replays a CUDA graph captured per
    input signature (and set of parameter addresses) for fused forwards on CUDA without grad, for
    B=1 latency; the output is a fresh tensor. Fused forwards split the batch so that no
    intermediate of one launch holds more than ``max_elements_per_launch`` elements (32-bit index
    arithmetic stays safe in every kernel). After each forward, ``last_backend`` names the backend
    that ran and ``last_backend_reason`` says why the reference ran instead of a fused backend, or
    which ops a fused backend left to the torch backend (None when there is nothing to say).
    """

    max_elements_per_launch: int = 2**31 - 1

    def _init_fused_state(self) -> None:
        available_backends()  # imports the backends' ops now, outside any compiled region
        self.mask_scale = 1.0
        self.mask_bias = 0.0
        self.cuda_graphs = False
        self._graphs = GraphCache()
        self._structure: Optional[Structure] = None
        self.last_backend: Optional[str] = None
        self.last_backend_reason: Optional[str] = None

    def _current_structure(self) -> Tuple[Optional[Structure], Optional[str]]:
        """This module's structure as of now (re-read when anything it rests on changed), or None
        and why its submodules cannot be told apart."""
        compiling = torch.compiler.is_compiling()
        cached = self._structure
        if cached is not None and not compiling and cached.is_current():
            return cached, None
        try:
            structure = read_structure(self, snapshot=not compiling)
        except UnsupportedStructure as err:
            return None, str(err)
        if not compiling:
            self._structure = structure
        return structure, None

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_structure"] = None  # it holds references into this very module's dicts
        return state

    def _fused(self, pix_feat: torch.Tensor, masks: torch.Tensor,
               skip_mask_sigmoid: bool) -> Tuple[Optional[torch.Tensor], Optional[Structure]]:
        """The fused forward's features and the structure it ran, or (None, None) when the
        backend in force or the structure says the reference must run."""
        structure, structure_error = self._current_structure()
        fusable = structure if structure is not None and structure.reason is None else None
        dtype, autocast = check_encoder_inputs(pix_feat, masks, self, fusable)
        needs_grad = torch.is_grad_enabled() and (
            masks.requires_grad or pix_feat.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        selection = select_cached(structure, structure_error, masks.device, dtype, needs_grad)
        # Plain attributes: nn.Module.__setattr__'s checks cost more than the rest of the line.
        self.__dict__["last_backend"] = selection.name
        self.__dict__["last_backend_reason"] = selection.reason
        if selection.is_reference:
            return None, None
        with torch.autocast(masks.device.type, enabled=False) if autocast else contextlib.nullcontext():
            return self._fused_features(selection, structure, pix_feat, masks, skip_mask_sigmoid, dtype,
                                        needs_grad), structure

    def _fused_features(self, selection: Selection, structure: Structure, pix_feat: torch.Tensor,
                        masks: torch.Tensor, skip_mask_sigmoid: bool, dtype: torch.dtype,
                        needs_grad: bool) -> torch.Tensor:
        device = masks.device
        if masks.dtype != dtype:
            masks = masks.to(dtype)
        if pix_feat.dtype != dtype or pix_feat.device != device:
            pix_feat = pix_feat.to(device=device, dtype=dtype)
        mask_batch, pix_batch = masks.shape[0], pix_feat.shape[0]
        if mask_batch != pix_batch:  # one of them has batch 1: broadcast it, as sam2's add does
            batch = pix_batch if mask_batch == 1 else mask_batch
            masks = masks.expand(batch, -1, -1, -1)
            pix_feat = pix_feat.expand(batch, -1, -1, -1)
        options = (not skip_mask_sigmoid, float(self.mask_scale), float(self.mask_bias))
        ops, limit = selection.ops, self.max_elements_per_launch
        if (self.cuda_graphs and device.type == "cuda" and not needs_grad
                and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()):
            signature = (tuple(pix_feat.shape), tuple(masks.shape), dtype, device, options, selection.name,
                         structure.interpol_size())
            return self._graphs.run(signature, structure,
                                    lambda pix, mask: run_in_chunks(ops, structure, pix, mask, options, limit),
                                    pix_feat, masks)
        return run_in_chunks(ops, structure, pix_feat, masks, options, limit)


class MemoryEncoder(FusedEncoder, reference.MemoryEncoder):
    """Drop-in for ``sam2.modeling.memory_encoder.MemoryEncoder`` (and sam3's SimpleMaskEncoder).

    Same constructor, submodules, ``state_dict`` keys and outputs; the forward runs the backend in
    force (``memenc_fast.use_backend``, ``$MEMENC_FAST_BACKEND``, else automatic choice) over the
    submodules' live parameters. SAM 2's caller transform ``sigmoid(m) * 20 - 10`` can move into
    the first fused op (``take_mask_transform``). See ``FusedEncoder`` for the attributes.
    """

    def __init__(
        self,
        out_dim: int,
        mask_downsampler: nn.Module,
        fuser: nn.Module,
        position_encoding: nn.Module,
        in_dim: int = 256,
    ) -> None:
        super().__init__(out_dim, mask_downsampler, fuser, position_encoding, in_dim)
        self._init_fused_state()

    @classmethod
    def wrap(
        cls,
        mask_downsampler: nn.Module,
        pix_feat_proj: nn.Conv2d,
        fuser: nn.Module,
        position_encoding: nn.Module,
        out_proj: nn.Module,
    ) -> "MemoryEncoder":
        """A MemoryEncoder around existing submodules, sharing their parameters (no copy)."""
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        encoder.mask_downsampler = mask_downsampler
        encoder.pix_feat_proj = pix_feat_proj
        encoder.fuser = fuser
        encoder.position_encoding = position_encoding
        encoder.out_proj = out_proj
        encoder._init_fused_state()
        return encoder

    def forward(
        self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
    ) -> Dict[str, object]:
        x, structure = self._fused(pix_feat, masks, skip_mask_sigmoid)
        if x is None:
            return self._reference_forward(pix_feat, masks, skip_mask_sigmoid)
        pos = cached_position_encoding(structure.position_encoding, x.shape[0], x.shape[-2], x.shape[-1],
                                       x.dtype, masks.device)
        return {"vision_features": x, "vision_pos_enc": [pos]}

    def take_mask_transform(self, caller: object) -> None:
        """Moves a SAM 2 / SAM 3 caller's ``sigmoid(m) * scale + bias`` transform (its
        ``sigmoid_scale_for_mem_enc`` / ``sigmoid_bias_for_mem_enc``) into this module's first
        fused op, and sets the caller's to the identity; the results are unchanged, two passes
        over every full-resolution mask are saved. Putting another memory encoder back into
        ``caller`` afterwards needs the caller's two attributes restored from ``mask_scale`` and
        ``mask_bias``.
        """
        scale = float(getattr(caller, "sigmoid_scale_for_mem_enc", 1.0))
        bias = float(getattr(caller, "sigmoid_bias_for_mem_enc", 0.0))
        # The caller's transform runs first, then ours: (m * scale + bias) * ours + our_bias.
        self.mask_scale, self.mask_bias = scale * self.mask_scale, bias * self.mask_scale + self.mask_bias
        if hasattr(caller, "sigmoid_scale_for_mem_enc"):
            caller.sigmoid_scale_for_mem_enc = 1.0
        if hasattr(caller, "sigmoid_bias_for_mem_enc"):
            caller.sigmoid_bias_for_mem_enc = 0.0

    def _reference_forward(self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool):
        if self.mask_scale != 1.0 or self.mask_bias != 0.0:
            masks = (masks if skip_mask_sigmoid else torch.sigmoid(masks)) * self.mask_scale + self.mask_bias
            skip_mask_sigmoid = True
        return super().forward(pix_feat, masks, skip_mask_sigmoid)


def swap_memory_encoder(
    model: object,
    attribute: str,
    container: str,
    convert: Callable[[nn.Module], "MemoryEncoder"],
    fuse_mask_transform: bool,
    expected: str,
) -> "MemoryEncoder":
    """The patch functions' common part: finds ``model.<attribute>`` (or
    ``model.<container>.<attribute>``), replaces it in place with ``convert(original)``, moves the
    holder's mask transform into it when asked, and returns it; a module already ours is kept."""
    holder = model
    if not hasattr(holder, attribute) and hasattr(holder, container):
        holder = getattr(holder, container)
    if not hasattr(holder, attribute):
        raise TypeError(f"{expected}; got {type(model).__qualname__}")
    current = getattr(holder, attribute)
    if isinstance(current, MemoryEncoder):
        return current
    encoder = convert(current)
    if fuse_mask_transform:
        encoder.take_mask_transform(holder)
    setattr(holder, attribute, encoder)
    return encoder
