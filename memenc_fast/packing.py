"""Reads a memory encoder's structure once and packs its weights for the fused backends.

Packing folds what can be folded offline, so every backend runs the same, shorter math:

* the downsampler's last 1x1 conv, ``pix_feat_proj`` and (when present) the fuser's input
  projection become one GEMM over the concatenated input channels ``[mask ; pix_feat]`` with one
  summed bias;
* each CXBlock's LayerNorm affine is folded into ``pwconv1`` and ``gamma`` into ``pwconv2``.

Folding runs in at least float32 and the result is cast to the compute dtype. Packed weights are
cached per (dtype, device) and rebuilt whenever a parameter is replaced (``.to()``, ``.half()``,
``param.data = ...``) or updated in place (``load_state_dict``, optimizer steps): each cached pack
keeps a reference to the parameters it was built from together with their version counters.
"""

from __future__ import annotations

import functools
import operator
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

__all__ = [
    "EncoderStructure",
    "PackedStage",
    "PackedBlock",
    "PackedEncoder",
    "UnsupportedStructure",
    "read_structure",
    "pack_weights",
    "flatten_packed",
    "unflatten_packed",
    "PackCache",
    "is_exact_gelu",
    "derived",
]


class UnsupportedStructure(Exception):
    """The module is not built the way the fused backends expect; the message says how."""


def is_exact_gelu(module: nn.Module) -> bool:
    """True for ``nn.GELU()`` with the erf formulation (the only activation the kernels fuse)."""
    return type(module) is nn.GELU and module.approximate == "none"


@dataclass(frozen=True)
class EncoderStructure:
    """The submodules of a MemoryEncoder, grouped the way the fused pipeline uses them."""

    stage_convs: Tuple[nn.Conv2d, ...]
    stage_norms: Tuple[nn.Module, ...]
    stage_activations: Tuple[nn.Module, ...]
    mask_final_conv: nn.Conv2d
    interpol_size: Optional[List[int]]
    pix_feat_proj: nn.Conv2d
    fuser_proj: Optional[nn.Conv2d]
    blocks: Tuple[nn.Module, ...]
    out_proj: Optional[nn.Conv2d]
    position_encoding: nn.Module

    def parameters(self) -> List[torch.Tensor]:
        """Every tensor the packed weights are derived from, in a fixed order.

        Read straight from each owner's ``_parameters`` dict: this runs on every forward, and
        ``module.weight`` goes through ``nn.Module.__getattr__``.
        """
        return [owner[name] for owner, name in self._parameter_slots]

    @functools.cached_property
    def _parameter_slots(self) -> List[Tuple[Dict[str, torch.Tensor], str]]:
        def slots(module: nn.Module, *names: str) -> List[Tuple[Dict[str, torch.Tensor], str]]:
            return [(module._parameters, name) for name in names]

        found = []
        for conv, norm in zip(self.stage_convs, self.stage_norms):
            found += slots(conv, "weight", "bias") + slots(norm, "weight", "bias")
        found += slots(self.mask_final_conv, "weight", "bias") + slots(self.pix_feat_proj, "weight", "bias")
        if self.fuser_proj is not None:
            found += slots(self.fuser_proj, "weight", "bias")
        for block in self.blocks:
            found += slots(block.dwconv, "weight", "bias") + slots(block.norm, "weight", "bias")
            found += slots(block.pwconv1, "weight", "bias") + slots(block.pwconv2, "weight", "bias")
            if block.gamma is not None:
                found += slots(block, "gamma")
        if self.out_proj is not None:
            found += slots(self.out_proj, "weight", "bias")
        return found

    @property
    def all_activations_exact_gelu(self) -> bool:
        return all(is_exact_gelu(a) for a in self.stage_activations) and all(
            is_exact_gelu(b.act) for b in self.blocks
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedStructure(message)


def _is_pointwise_conv(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.bias is not None
        and module.padding_mode == "zeros"
    )


def _is_channel_layernorm(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "LayerNorm2d"
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "bias", None), torch.Tensor)
        and isinstance(getattr(module, "eps", None), float)
    )


def _is_inactive_drop_path(module: nn.Module, training: bool) -> bool:
    if type(module) is nn.Identity:
        return True
    drop_prob = getattr(module, "drop_prob", None)
    return type(module).__name__ == "DropPath" and (drop_prob == 0.0 or not training)


def read_structure(encoder: nn.Module) -> EncoderStructure:
    """Groups a memory encoder's submodules (this package's or sam2's/sam3's) for packing.

    Raises UnsupportedStructure naming the first submodule that the fused pipeline cannot run.
    """
    downsampler = encoder.mask_downsampler
    layers = list(getattr(downsampler, "encoder", []))
    _require(
        len(layers) >= 1 and (len(layers) - 1) % 3 == 0,
        "mask_downsampler.encoder is not [Conv2d, LayerNorm2d, activation] * n + [Conv2d 1x1]",
    )
    convs, norms, acts = layers[0:-1:3], layers[1:-1:3], layers[2:-1:3]
    for i, (conv, norm) in enumerate(zip(convs, norms)):
        _require(
            type(conv) is nn.Conv2d
            and conv.groups == 1
            and conv.dilation == (1, 1)
            and conv.bias is not None
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str),
            f"mask_downsampler.encoder[{3 * i}] is not a plain zero-padded Conv2d with bias",
        )
        _require(_is_channel_layernorm(norm), f"mask_downsampler.encoder[{3 * i + 1}] is not a LayerNorm2d")
    _require(_is_pointwise_conv(layers[-1]), "mask_downsampler.encoder[-1] is not a 1x1 Conv2d with bias")

    fuser = encoder.fuser
    fuser_proj = getattr(fuser, "proj", None)
    _require(
        type(fuser_proj) is nn.Identity or _is_pointwise_conv(fuser_proj),
        "fuser.proj is neither Identity nor a 1x1 Conv2d",
    )
    blocks = tuple(getattr(fuser, "layers", ()))
    for i, block in enumerate(blocks):
        _require(
            all(hasattr(block, name) for name in ("dwconv", "norm", "pwconv1", "act", "pwconv2", "drop_path")),
            f"fuser.layers[{i}] is not a CXBlock",
        )
        dw = block.dwconv
        _require(
            type(dw) is nn.Conv2d
            and dw.stride == (1, 1)
            and dw.dilation == (1, 1)
            and dw.bias is not None
            and dw.padding_mode == "zeros"
            and not isinstance(dw.padding, str)
            and dw.groups in (1, dw.in_channels),
            f"fuser.layers[{i}].dwconv is not a stride-1 zero-padded Conv2d",
        )
        _require(_is_channel_layernorm(block.norm), f"fuser.layers[{i}].norm is not a LayerNorm2d")
        _require(
            type(block.pwconv1) is nn.Linear and type(block.pwconv2) is nn.Linear
            and block.pwconv1.bias is not None and block.pwconv2.bias is not None,
            f"fuser.layers[{i}].pwconv1/pwconv2 are not Linear layers with bias",
        )
        _require(
            _is_inactive_drop_path(block.drop_path, block.training),
            f"fuser.layers[{i}].drop_path is active (training mode with drop_path > 0)",
        )
    out_proj = encoder.out_proj
    _require(
        type(out_proj) is nn.Identity or _is_pointwise_conv(out_proj),
        "out_proj is neither Identity nor a 1x1 Conv2d",
    )
    pe = encoder.position_encoding
    _require(
        type(pe).__name__ == "PositionEmbeddingSine"
        and all(hasattr(pe, a) for a in ("num_pos_feats", "temperature", "normalize", "scale")),
        "position_encoding is not a PositionEmbeddingSine",
    )
    return EncoderStructure(
        stage_convs=tuple(convs),
        stage_norms=tuple(norms),
        stage_activations=tuple(acts),
        mask_final_conv=layers[-1],
        interpol_size=getattr(downsampler, "interpol_size", None),
        pix_feat_proj=encoder.pix_feat_proj,
        fuser_proj=None if type(fuser_proj) is nn.Identity else fuser_proj,
        blocks=blocks,
        out_proj=None if type(out_proj) is nn.Identity else out_proj,
        position_encoding=pe,
    )


@dataclass(frozen=True)
class PackedStage:
    """One mask-downsampling stage: conv -> LayerNorm over channels -> activation."""

    weight: torch.Tensor  # (C_out, C_in, k, k)
    bias: torch.Tensor  # (C_out,)
    norm_weight: torch.Tensor  # (C_out,)
    norm_bias: torch.Tensor  # (C_out,)
    norm_eps: float
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    activation: nn.Module


@dataclass(frozen=True)
class PackedBlock:
    """A CXBlock with LayerNorm affine and gamma folded into the two Linear layers."""

    dw_weight: torch.Tensor  # (C, C // groups, k, k)
    dw_bias: torch.Tensor  # (C,)
    padding: Tuple[int, int]
    groups: int
    norm_eps: float
    w1: torch.Tensor  # (4C, C)
    b1: torch.Tensor  # (4C,)
    w2: torch.Tensor  # (C, 4C)
    b2: torch.Tensor  # (C,)
    activation: nn.Module


@dataclass(frozen=True)
class PackedEncoder:
    """Everything a fused forward needs, in one dtype on one device."""

    stages: Tuple[PackedStage, ...]
    interpol_size: Optional[List[int]]
    proj_weight: torch.Tensor  # (C, C_mask + C_pix): [mask final conv | pix_feat_proj]
    proj_bias: torch.Tensor  # (C,)
    mask_channels: int  # C_mask: the first columns of proj_weight
    blocks: Tuple[PackedBlock, ...]
    out_weight: Optional[torch.Tensor]  # (C_out, C) or None for Identity
    out_bias: Optional[torch.Tensor]
    all_activations_exact_gelu: bool


def flatten_packed(packed: PackedEncoder) -> Tuple[List[torch.Tensor], List[int], List[float]]:
    """``packed`` as (tensors, ints, floats): what a custom op's schema can carry.

    Only for exact-GELU encoders (the activations are not carried); ``unflatten_packed`` inverts it.
    """
    if not packed.all_activations_exact_gelu:
        raise ValueError("flatten_packed: expected an encoder whose activations are all exact GELU")
    tensors: List[torch.Tensor] = []
    ints: List[int] = [len(packed.stages)]
    floats: List[float] = []
    for stage in packed.stages:
        tensors += [stage.weight, stage.bias, stage.norm_weight, stage.norm_bias]
        ints += [*stage.kernel_size, *stage.stride, *stage.padding]
        floats.append(stage.norm_eps)
    ints += [0] if packed.interpol_size is None else [1, *packed.interpol_size]
    tensors += [packed.proj_weight, packed.proj_bias]
    ints += [packed.mask_channels, len(packed.blocks)]
    for block in packed.blocks:
        tensors += [block.dw_weight, block.dw_bias, block.w1, block.b1, block.w2, block.b2]
        ints += [*block.padding, block.groups]
        floats.append(block.norm_eps)
    if packed.out_weight is None:
        ints.append(0)
    else:
        ints.append(1)
        tensors += [packed.out_weight, packed.out_bias]
    return tensors, ints, floats


_EXACT_GELU = nn.GELU()  # stateless: one instance serves every rebuilt encoder (built per call)


def unflatten_packed(tensors: Sequence[torch.Tensor], ints: Sequence[int], floats: Sequence[float]) -> PackedEncoder:
    """The PackedEncoder that ``flatten_packed`` gave these (exact GELU activations)."""
    tensor_at, int_at, float_at = iter(tensors), iter(ints), iter(floats)

    def take(values: Iterator, count: int) -> tuple:
        return tuple(next(values) for _ in range(count))

    stages = []
    for _ in range(next(int_at)):
        weight, bias, norm_weight, norm_bias = take(tensor_at, 4)
        kernel_size, stride, padding = take(int_at, 2), take(int_at, 2), take(int_at, 2)
        stages.append(PackedStage(weight, bias, norm_weight, norm_bias, next(float_at), kernel_size, stride,
                                  padding, _EXACT_GELU))
    interpol_size = list(take(int_at, 2)) if next(int_at) else None
    proj_weight, proj_bias = take(tensor_at, 2)
    mask_channels = next(int_at)
    blocks = []
    for _ in range(next(int_at)):
        dw_weight, dw_bias, w1, b1, w2, b2 = take(tensor_at, 6)
        padding, groups = take(int_at, 2), next(int_at)
        blocks.append(PackedBlock(dw_weight, dw_bias, padding, groups, next(float_at), w1, b1, w2, b2, _EXACT_GELU))
    out_weight, out_bias = take(tensor_at, 2) if next(int_at) else (None, None)
    return PackedEncoder(tuple(stages), interpol_size, proj_weight, proj_bias, mask_channels, tuple(blocks),
                         out_weight, out_bias, True)


def _fold_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_weights(structure: EncoderStructure, dtype: torch.dtype, device: torch.device) -> PackedEncoder:
    """Folds and casts the weights of ``structure`` into a PackedEncoder.

    Differentiable when called with grad enabled (the torch backend uses that for training).
    """
    fold = _fold_dtype(structure.pix_feat_proj.weight.dtype)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def f(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=fold)

    stages = tuple(
        PackedStage(
            weight=cast(conv.weight),
            bias=cast(conv.bias),
            norm_weight=cast(norm.weight),
            norm_bias=cast(norm.bias),
            norm_eps=float(norm.eps),
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=tuple(conv.padding),
            activation=act,
        )
        for conv, norm, act in zip(structure.stage_convs, structure.stage_norms, structure.stage_activations)
    )

    mask_conv, pix_proj = structure.mask_final_conv, structure.pix_feat_proj
    proj_w = torch.cat([f(mask_conv.weight).flatten(1), f(pix_proj.weight).flatten(1)], dim=1)
    proj_b = f(mask_conv.bias) + f(pix_proj.bias)
    if structure.fuser_proj is not None:
        fuser_w = f(structure.fuser_proj.weight).flatten(1)
        proj_w = fuser_w @ proj_w
        proj_b = fuser_w @ proj_b + f(structure.fuser_proj.bias)

    blocks = []
    for block in structure.blocks:
        norm_w, norm_b = f(block.norm.weight), f(block.norm.bias)
        w1, b1 = f(block.pwconv1.weight), f(block.pwconv1.bias)
        w2, b2 = f(block.pwconv2.weight), f(block.pwconv2.bias)
        w1_folded = w1 * norm_w[None, :]
        b1_folded = b1 + w1 @ norm_b
        if block.gamma is not None:
            gamma = f(block.gamma)
            w2, b2 = gamma[:, None] * w2, gamma * b2
        blocks.append(
            PackedBlock(
                dw_weight=cast(block.dwconv.weight),
                dw_bias=cast(block.dwconv.bias),
                padding=tuple(block.dwconv.padding),
                groups=block.dwconv.groups,
                norm_eps=float(block.norm.eps),
                w1=cast(w1_folded),
                b1=cast(b1_folded),
                w2=cast(w2),
                b2=cast(b2),
                activation=block.act,
            )
        )

    out = structure.out_proj
    return PackedEncoder(
        stages=stages,
        interpol_size=structure.interpol_size,
        proj_weight=cast(proj_w),
        proj_bias=cast(proj_b),
        mask_channels=mask_conv.in_channels,
        blocks=tuple(blocks),
        out_weight=None if out is None else cast(f(out.weight).flatten(1)),
        out_bias=None if out is None else cast(out.bias),
        all_activations_exact_gelu=structure.all_activations_exact_gelu,
    )


_version_of = operator.attrgetter("_version")


def _fingerprint(params: Sequence[torch.Tensor]) -> Tuple[tuple, ...]:
    """What must not change for packed weights to stay valid: each parameter's storage address,
    version counter (bumped by in-place updates), dtype and shape (``param.data = ...`` changes
    these without a version bump). Tuples of each, since this runs on every forward."""
    return (tuple(map(torch.Tensor.data_ptr, params)), tuple(map(_version_of, params)),
            tuple([p.dtype for p in params]), tuple([p.shape for p in params]))


@dataclass(frozen=True)
class _CachedPack:
    sources: Tuple[torch.Tensor, ...]  # detached aliases: keep the storages (and so their addresses) alive
    fingerprint: Tuple[tuple, ...]
    packed: PackedEncoder

    def is_current(self, params: Sequence[torch.Tensor]) -> bool:
        return _fingerprint(params) == self.fingerprint


class PackCache:
    """Packed weights per (dtype, device), rebuilt whenever a source parameter changes.

    Safe under concurrent forwards: readers see either the old or the new complete entry, and
    building is serialized.
    """

    def __init__(self) -> None:
        self._entries: Dict[Tuple[torch.dtype, torch.device], _CachedPack] = {}
        self._lock = threading.Lock()

    def get(self, structure: EncoderStructure, dtype: torch.dtype, device: torch.device) -> PackedEncoder:
        params = structure.parameters()
        key = (dtype, device)
        entry = self._entries.get(key)
        if entry is not None and entry.is_current(params):
            return entry.packed
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.is_current(params):
                return entry.packed
            with torch.no_grad():
                packed = pack_weights(structure, dtype, device)
            sources = tuple(p.detach() for p in params)
            # Stale entries would keep replaced parameters alive; drop them with the rebuild.
            self._entries = {k: e for k, e in self._entries.items() if e.is_current(params)}
            self._entries[key] = _CachedPack(sources, _fingerprint(params), packed)
            return packed

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle) start empty: packs are derived data and locks cannot be copied.
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_T = TypeVar("_T")
_derived_lock = threading.Lock()
_derived: Dict[Tuple[int, str], Tuple[weakref.ref, Tuple[int, ...], Any]] = {}


def derived(owner: object, key: str, sources: Sequence[torch.Tensor], build: Callable[[], _T]) -> _T:
    """``build()`` (data a backend derives from packed weights, such as a kernel's weight layout),
    cached while ``owner`` lives and none of ``sources`` has been modified in place.

    Packed weights can alias module parameters (packing a parameter already in the compute
    dtype returns it unchanged), so the cache also keys on the sources' version counters.
    """
    if torch.compiler.is_compiling():
        # Traced code holds what it derives itself; a cache with a lock and weak references is
        # neither traceable nor needed there.
        with torch.no_grad():
            return build()
    slot = (id(owner), key)
    versions = tuple(t._version for t in sources)
    hit = _derived.get(slot)
    if hit is not None and hit[0]() is owner and hit[1] == versions:
        return hit[2]
    with torch.no_grad():
        value = build()

    def forget(_: weakref.ref, slot: Tuple[int, str] = slot) -> None:
        with _derived_lock:
            _derived.pop(slot, None)

    with _derived_lock:
        _derived[slot] = (weakref.ref(owner, forget), versions, value)
    return value
