"""The drop-in modules: sam2's constructors, parameter names and outputs, with fused backends.

``MemoryEncoder`` runs the whole fused pipeline of the backend in force (see ``dispatch``); the
submodule classes keep the reference math and add what the pipeline needs from them (a cached
position encoding). A MemoryEncoder holding sam2's or sam3's own submodules (a hydra config
that only swaps the top-level ``_target_``, or ``from_sam2``) runs fused as well.
"""

from __future__ import annotations

import contextlib

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from . import reference
from . import backends as _backends  # noqa: F401  (registers the shipped backends)
from .dispatch import Selection, available_backends, select_backend
from .graphs import GraphCache
from .packing import EncoderStructure, PackCache, UnsupportedStructure, pack_weights, read_structure
from .pipeline import opaque_forward, run_in_chunks, run_ops
from .position import cached_position_encoding
from .validation import autocast_dtype, check_encoder_inputs, downsampled_size

__all__ = [
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
    """sam2's / sam3's PositionEmbeddingSine, cached per (H, W, dtype, device), returned expanded.

    ``precompute_resolution`` (sam3) fills the cache for ``resolution // stride`` (strides 4, 8,
    16, 32) on the default device at construction; sam2's ``warmup_cache`` does the same for
    ``image_size`` on the current CUDA device when one exists, as sam2 does. The returned tensor
    is a read-only view shared across calls: clone it before writing to it.
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


class MemoryEncoder(reference.MemoryEncoder):
    """Drop-in for ``sam2.modeling.memory_encoder.MemoryEncoder`` (and sam3's SimpleMaskEncoder).

    Same constructor, submodules, ``state_dict`` keys and outputs; the forward runs the backend in
    force (``memenc_fast.use_backend``, ``$MEMENC_FAST_BACKEND``, else automatic choice).
    ``mask_scale``/``mask_bias`` (default 1, 0) are applied to the mask after the optional sigmoid
    inside the first fused op; SAM 2's caller transform ``sigmoid(m) * 20 - 10`` can be moved here.
    ``cuda_graphs = True`` replays a CUDA graph captured per input signature and weight version
    for fused forwards on CUDA without grad (for B=1 latency); the output is a fresh tensor.
    Fused forwards split the batch so that no intermediate of one launch holds more than
    ``max_elements_per_launch`` elements (32-bit index arithmetic stays safe in every kernel).
    """

    max_elements_per_launch: int = 2**31 - 1

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

    def _init_fused_state(self) -> None:
        available_backends()  # imports the backends' ops now, outside any compiled region
        self.mask_scale = 1.0
        self.mask_bias = 0.0
        self.cuda_graphs = False
        self._pack_cache = PackCache()
        self._graphs = GraphCache()
        self._structure: Optional[Tuple[bool, _ModuleTree, Optional[EncoderStructure], Optional[str]]] = None
        self.last_backend: Optional[str] = None

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

    def _read_structure(self) -> Tuple[Optional[EncoderStructure], Optional[str]]:
        if torch.compiler.is_compiling():
            # The compiler guards on the modules it reads; no cache needed (nor traceable).
            return self._structure_uncached()
        # Valid while no submodule anywhere was replaced, added or removed (this runs on every
        # forward: comparing each module's children with a snapshot is cheaper than walking them).
        cached = self._structure
        if cached is not None and cached[0] == self.training and _tree_unchanged(cached[1]):
            return cached[2], cached[3]
        tree = _module_tree(self)
        structure, error = self._structure_uncached()
        self._structure = (self.training, tree, structure, error)
        return structure, error

    def _structure_uncached(self) -> Tuple[Optional[EncoderStructure], Optional[str]]:
        try:
            return read_structure(self), None
        except UnsupportedStructure as err:
            return None, str(err)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_structure"] = None
        return state

    @staticmethod
    def _feature_size_of(structure: EncoderStructure) -> Callable[[Tuple[int, int]], Tuple[int, int]]:
        stages = [(c.kernel_size, c.stride, c.padding) for c in structure.stage_convs]
        return lambda mask_size: downsampled_size(mask_size, structure.interpol_size, stages)

    def forward(
        self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
    ) -> Dict[str, object]:
        structure, structure_error = self._read_structure()
        param = self.pix_feat_proj.weight
        if structure is not None and structure.stage_convs:
            mask_channels: Optional[int] = structure.stage_convs[0].in_channels
        else:
            mask_channels = structure.mask_final_conv.in_channels if structure is not None else None
        check_encoder_inputs(pix_feat, masks, self.pix_feat_proj.in_channels, mask_channels, param,
                             None if structure is None else self._feature_size_of(structure))
        device = masks.device
        dtype = autocast_dtype(device.type) or param.dtype
        needs_grad = torch.is_grad_enabled() and (
            masks.requires_grad or pix_feat.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        selection = select_backend(device, dtype, structure, structure_error, needs_grad)
        self.last_backend = selection.name
        if selection.is_reference:
            return self._reference_forward(pix_feat, masks, skip_mask_sigmoid)
        return self._fused_forward(selection, structure, pix_feat, masks, skip_mask_sigmoid, dtype, needs_grad)

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

    def _fused_forward(self, selection: Selection, structure: EncoderStructure, pix_feat: torch.Tensor,
                       masks: torch.Tensor, skip_mask_sigmoid: bool, dtype: torch.dtype, needs_grad: bool):
        device = masks.device
        ops = selection.ops
        if needs_grad or torch.compiler.is_compiling():
            packed = pack_weights(structure, dtype, device)
        else:
            packed = self._pack_cache.get(structure, dtype, device)
        with contextlib.ExitStack() as stack:
            if autocast_dtype(device.type) is not None:
                stack.enter_context(torch.autocast(device.type, enabled=False))
            masks = masks.to(dtype)
            pix_feat = pix_feat.to(device=device, dtype=dtype)
            if masks.shape[0] != pix_feat.shape[0]:  # one of them has batch 1: broadcast it
                batch = max(masks.shape[0], pix_feat.shape[0])
                masks = masks.expand(batch, -1, -1, -1)
                pix_feat = pix_feat.expand(batch, -1, -1, -1)
            options = (not skip_mask_sigmoid, self.mask_scale, self.mask_bias)
            limit = self.max_elements_per_launch

            def run(pix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return run_in_chunks(ops, packed, pix, mask, options, limit)

            if torch.compiler.is_compiling():
                if selection.traceable:
                    x = run_ops(ops, packed, pix_feat, masks, *options)
                else:
                    x = opaque_forward(selection.name, packed, pix_feat, masks, options, limit)
            elif (self.cuda_graphs and device.type == "cuda" and not needs_grad
                    and not torch.cuda.is_current_stream_capturing()):
                signature = (tuple(pix_feat.shape), tuple(masks.shape), dtype, device, options, selection.name)
                x = self._graphs.run(signature, packed, run, pix_feat, masks)
            else:
                x = run(pix_feat, masks)
        pos = cached_position_encoding(structure.position_encoding, x.shape[0], x.shape[-2], x.shape[-1],
                                       x.dtype, device)
        return {"vision_features": x, "vision_pos_enc": [pos]}


_ModuleTree = Tuple[Tuple[Dict[str, Optional[nn.Module]], Tuple[Optional[nn.Module], ...]], ...]


def _module_tree(root: nn.Module) -> _ModuleTree:
    """Every module's children dict under ``root``, with the children it holds now."""
    return tuple((m._modules, tuple(m._modules.values())) for m in root.modules())


def _tree_unchanged(tree: _ModuleTree) -> bool:
    # Tuple equality tests identity first: no nn.Module.__eq__ runs for unchanged children.
    return all(tuple(children.values()) == held for children, held in tree)


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
