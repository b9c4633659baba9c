"""Swapping memenc-fast into Hugging Face ``transformers``' SAM 2 video model.

transformers re-implements SAM 2's memory encoder as ``Sam2VideoMemoryEncoder`` (the same module
serves ``Sam3TrackerVideoModel`` and ``EdgeTamVideoModel``, generated from the same source), held
by the model as ``.memory_encoder`` and called by ``Sam2VideoModel._encode_new_memory`` as
``features, pos = self.memory_encoder(pix_feat, mask_for_mem)``. Its math is sam2's, with three
differences at the boundary, each reproduced here:

* it never applies a sigmoid: its caller passes ``sigmoid(logits) * 20 - 10`` (or the binarized
  mask scaled the same way) already, so our encoder runs with ``skip_mask_sigmoid=True`` and its
  ``mask_scale``/``mask_bias`` left at 1 and 0 (the caller's transform happens before the call,
  so it cannot move into our first fused op without patching transformers' model code);
* it returns a ``(features, position_encoding)`` tuple, not sam2's dict with a one-element list;
* it computes the position encoding in the features' dtype (sam2 computes it in float32 and
  casts); the two agree bit for bit in float32 only, so the adapter calls transformers' own
  position-encoding module.

Its LayerNorms (``nn.LayerNorm`` over permuted channels, eps 1e-6) and ``"gelu"`` activations
(erf GELU) compute what sam2's ``LayerNorm2d`` and ``nn.GELU()`` compute; other activations are
rejected and eps values copied. Structurally, its names differ (``transformers_key_map``), its
layer scale ``scale`` (sam2's ``gamma``) and output ``projection`` always exist (sam2 drops
``out_proj`` when it keeps the channel count: ours gets a 1x1 conv then), and its MLP width is a
config field that must be sam2's 4 x dim.

Nothing here imports transformers: classes are recognized by module and name.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import CXBlock, Fuser, MaskDownSampler, MemoryEncoder, PositionEmbeddingSine
from .structure import is_exact_gelu

__all__ = [
    "TransformersMemoryEncoder",
    "memory_encoder_from_transformers",
    "patch_transformers",
    "state_dict_from_transformers",
    "state_dict_to_transformers",
    "transformers_key_map",
]

_TRANSFORMERS_MEMORY_ENCODERS = frozenset({
    ("transformers.models.sam2_video.modeling_sam2_video", "Sam2VideoMemoryEncoder"),
    ("transformers.models.sam3_tracker_video.modeling_sam3_tracker_video", "Sam3TrackerVideoMemoryEncoder"),
    ("transformers.models.edgetam_video.modeling_edgetam_video", "EdgeTamVideoMemoryEncoder"),
})
_EXPECTED = "a transformers Sam2VideoMemoryEncoder (or Sam3TrackerVideoMemoryEncoder, EdgeTamVideoMemoryEncoder)"

T = TypeVar("T")


def _is_transformers_memory_encoder(module: object) -> bool:
    return any((c.__module__, c.__name__) in _TRANSFORMERS_MEMORY_ENCODERS for c in type(module).__mro__)


def _qualified_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def transformers_key_map(num_stages: int, num_blocks: int) -> Dict[str, str]:
    """transformers' memory-encoder ``state_dict`` key -> memenc_fast's (= sam2's) key, for a
    mask downsampler of ``num_stages`` conv stages and a fuser of ``num_blocks`` CXBlocks."""
    key_map: Dict[str, str] = {}
    for i in range(num_stages):
        for theirs, index in (("conv", 3 * i), ("layer_norm", 3 * i + 1)):
            for p in ("weight", "bias"):
                key_map[f"mask_downsampler.layers.{i}.{theirs}.{p}"] = f"mask_downsampler.encoder.{index}.{p}"
    for p in ("weight", "bias"):
        key_map[f"mask_downsampler.final_conv.{p}"] = f"mask_downsampler.encoder.{3 * num_stages}.{p}"
        key_map[f"feature_projection.{p}"] = f"pix_feat_proj.{p}"
    for j in range(num_blocks):
        key_map[f"memory_fuser.layers.{j}.scale"] = f"fuser.layers.{j}.gamma"
        for theirs, ours in (("depthwise_conv", "dwconv"), ("layer_norm", "norm"),
                             ("pointwise_conv1", "pwconv1"), ("pointwise_conv2", "pwconv2")):
            for p in ("weight", "bias"):
                key_map[f"memory_fuser.layers.{j}.{theirs}.{p}"] = f"fuser.layers.{j}.{ours}.{p}"
    for p in ("weight", "bias"):
        key_map[f"projection.{p}"] = f"out_proj.{p}"
    return key_map


def _count(keys: Iterable[str], pattern: str) -> int:
    """1 + the largest index captured by ``pattern`` among ``keys`` (0 if none matches)."""
    indices = [int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m]
    return max(indices) + 1 if indices else 0


def _rename(state_dict: Mapping[str, T], key_map: Mapping[str, str], source: str) -> Dict[str, T]:
    """``state_dict`` with every key renamed through ``key_map``; a ValueError names every key that
    the map does not know and every key the map expects but ``state_dict`` lacks."""
    unmapped = [k for k in state_dict if k not in key_map]
    missing = [k for k in key_map if k not in state_dict]
    if unmapped or missing:
        raise ValueError(
            f"cannot map this {source} memory-encoder state_dict: "
            f"keys with no counterpart {unmapped}; expected keys missing {missing}"
        )
    return {key_map[k]: v for k, v in state_dict.items()}


def state_dict_from_transformers(state_dict: Mapping[str, T]) -> Dict[str, T]:
    """A transformers memory-encoder ``state_dict`` under memenc_fast's (= sam2's) keys, ready for
    ``MemoryEncoder.load_state_dict`` (or a sam2 checkpoint). Raises ValueError naming any key
    that does not map."""
    stages = _count(state_dict, r"mask_downsampler\.layers\.(\d+)\.")
    blocks = _count(state_dict, r"memory_fuser\.layers\.(\d+)\.")
    return _rename(state_dict, transformers_key_map(stages, blocks), "transformers")


def state_dict_to_transformers(state_dict: Mapping[str, T]) -> Dict[str, T]:
    """The inverse of ``state_dict_from_transformers``: memenc_fast / sam2 keys to transformers'.

    transformers always has the output projection, so a sam2 encoder whose ``out_proj`` is an
    Identity (out_dim == in_dim) has no transformers form: ValueError.
    """
    # The downsampler's last index is its final 1x1 conv: 3 per stage before it.
    stages = (_count(state_dict, r"mask_downsampler\.encoder\.(\d+)\.") - 1) // 3
    blocks = _count(state_dict, r"fuser\.layers\.(\d+)\.")
    inverse = {ours: theirs for theirs, ours in transformers_key_map(max(stages, 0), blocks).items()}
    return _rename(state_dict, inverse, "memenc_fast")


def _check_exact_gelu(module: nn.Module, where: str) -> None:
    # transformers' ACT2FN["gelu"] is GELUActivation over F.gelu (erf); its other GELUs (tanh,
    # "gelu_python", quick, ...) compute differently from the nn.GELU() our kernels fuse.
    exact = is_exact_gelu(module) or (
        type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu
    )
    if not exact:
        raise ValueError(
            f"{where} is {module!r}; memenc_fast computes the exact (erf) GELU only, "
            "i.e. transformers' hidden_act='gelu'"
        )


def _build_equivalent(source: nn.Module) -> MemoryEncoder:
    """Our MemoryEncoder with ``source``'s configuration (weights not yet transferred)."""
    stages = list(source.mask_downsampler.layers)
    blocks = list(source.memory_fuser.layers)
    for i, stage in enumerate(stages):
        _check_exact_gelu(stage.activation, f"mask_downsampler.layers.{i}.activation")
    for j, block in enumerate(blocks):
        _check_exact_gelu(block.activation, f"memory_fuser.layers.{j}.activation")
        dim, hidden = block.pointwise_conv1.in_features, block.pointwise_conv1.out_features
        if hidden != 4 * dim:
            raise ValueError(
                f"memory_fuser.layers.{j} has an MLP of width {hidden} over {dim} channels; memenc_fast's "
                "CXBlock (sam2's) is 4 x dim wide: memory_fuser_intermediate_dim must be "
                "4 * memory_fuser_embed_dim"
            )
    # Empty lists (total stride 1, no fuser layers) build no such modules: defaults then.
    downsampler_args = {}
    if stages:
        conv = stages[0].conv
        downsampler_args = dict(kernel_size=conv.kernel_size[0], stride=conv.stride[0], padding=conv.padding[0])
    stride = downsampler_args.get("stride", 4)
    block_args = {}
    if blocks:
        dw = blocks[0].depthwise_conv
        block_args = dict(kernel_size=dw.kernel_size[0], padding=dw.padding[0])
    in_dim = source.feature_projection.in_channels
    out_dim = source.projection.out_channels
    pe = source.position_encoding
    encoder = MemoryEncoder(
        out_dim=out_dim,
        mask_downsampler=MaskDownSampler(embed_dim=source.mask_downsampler.final_conv.out_channels,
                                         total_stride=stride ** len(stages), **downsampler_args),
        # Any positive layer scale creates gamma; its value is overwritten by transformers' scale.
        fuser=Fuser(CXBlock(in_dim, layer_scale_init_value=1.0, **block_args), num_layers=len(blocks)),
        # Ours halves num_pos_feats, transformers' num_position_features is already the half.
        position_encoding=PositionEmbeddingSine(
            2 * pe.num_position_features, temperature=pe.temperature, normalize=pe.normalize,
            scale=pe.scale if pe.normalize else None, warmup_cache=False,
        ),
        in_dim=in_dim,
    )
    if isinstance(encoder.out_proj, nn.Identity):
        # transformers always has its projection conv, even when it keeps the channel count.
        encoder.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)
    # eps: transformers hard-codes sam2's 1e-6 today; copying it keeps any other value exact too.
    for i, stage in enumerate(stages):
        encoder.mask_downsampler.encoder[3 * i + 1].eps = float(stage.layer_norm.eps)
    for j, block in enumerate(blocks):
        encoder.fuser.layers[j].norm.eps = float(block.layer_norm.eps)
    return encoder


_CONV_GEOMETRY = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def _transfer_parameters(source: nn.Module, encoder: MemoryEncoder, key_map: Mapping[str, str],
                         share: bool) -> None:
    """Puts ``source``'s parameters into ``encoder`` under the mapped names: the very tensors when
    ``share``, else copies (same device, dtype and requires_grad). ValueError naming every key
    that does not map, every shape that differs and every conv whose geometry differs."""
    problems: List[str] = []
    theirs_params = dict(source.named_parameters())
    ours_params = dict(encoder.named_parameters())
    theirs_keys, ours_keys = list(source.state_dict()), list(encoder.state_dict())
    unmapped = [k for k in theirs_keys if key_map.get(k) not in ours_keys]
    missing = sorted(set(ours_keys) - {key_map.get(k) for k in theirs_keys})
    if unmapped:
        problems.append(f"transformers keys with no memenc_fast counterpart {unmapped}")
    if missing:
        problems.append(f"memenc_fast keys with no transformers source {missing}")
    pairs = [(t, key_map[t]) for t in theirs_keys if t not in unmapped]
    for theirs, ours in pairs:
        if theirs_params[theirs].shape != ours_params[ours].shape:
            problems.append(f"{theirs} {tuple(theirs_params[theirs].shape)} vs {ours} "
                            f"{tuple(ours_params[ours].shape)}")
        their_owner = source.get_submodule(theirs.rsplit(".", 1)[0])
        our_owner = encoder.get_submodule(ours.rsplit(".", 1)[0])
        if isinstance(their_owner, nn.Conv2d) and theirs.endswith(".weight"):
            differs = [a for a in _CONV_GEOMETRY if getattr(their_owner, a) != getattr(our_owner, a)]
            if differs:
                problems.append(f"{theirs.rsplit('.', 1)[0]} differs from {ours.rsplit('.', 1)[0]} in {differs}")
    if problems:
        raise ValueError(f"cannot map {_qualified_name(source)} onto memenc_fast.MemoryEncoder: "
                         + "; ".join(problems))
    for theirs, ours in pairs:
        param = theirs_params[theirs]
        if not share:
            param = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        owner, leaf = ours.rsplit(".", 1)
        setattr(encoder.get_submodule(owner), leaf, param)


def _key_map_of(source: nn.Module) -> Dict[str, str]:
    return transformers_key_map(len(source.mask_downsampler.layers), len(source.memory_fuser.layers))


def memory_encoder_from_transformers(transformers_memory_encoder: nn.Module, *,
                                     share_parameters: bool = False) -> MemoryEncoder:
    """A memenc_fast MemoryEncoder computing what a transformers ``Sam2VideoMemoryEncoder``
    computes, with sam2's interface: ``enc(pix_feat, masks, skip_mask_sigmoid=True)`` on the masks
    transformers passes gives its features (and its position encoding in float32).

    Weights are copied through ``transformers_key_map`` (same device, dtype, requires_grad and
    train/eval mode), or shared (the very Parameter objects) with ``share_parameters=True``.
    Raises TypeError for any other module, ValueError naming every key that does not map or
    differs in shape, and for configurations sam2's module cannot express (an MLP width other than
    4 x dim, an activation other than the exact GELU).
    """
    source = transformers_memory_encoder
    if not _is_transformers_memory_encoder(source):
        raise TypeError(f"memory_encoder_from_transformers expects {_EXPECTED}; got {_qualified_name(source)}")
    encoder = _build_equivalent(source)
    _transfer_parameters(source, encoder, _key_map_of(source), share_parameters)
    encoder.train(source.training)
    return encoder


def _save_with_transformers_keys(module: "TransformersMemoryEncoder", state_dict: Dict[str, object],
                                 prefix: str, local_metadata: dict) -> None:
    inner = prefix + "encoder."
    # In the state_dict's order, so the keys come out in transformers' own order.
    for key in [k for k in state_dict if k.startswith(inner)]:
        theirs = module.ours_to_transformers.get(key[len(inner):])
        if theirs is not None:
            state_dict[prefix + theirs] = state_dict.pop(key)


def _load_transformers_keys(module: "TransformersMemoryEncoder", state_dict: Dict[str, object], prefix: str,
                            local_metadata: dict, strict: bool, missing_keys: List[str],
                            unexpected_keys: List[str], error_msgs: List[str]) -> None:
    for ours, theirs in module.ours_to_transformers.items():
        key = prefix + theirs
        if key in state_dict:
            state_dict[prefix + "encoder." + ours] = state_dict.pop(key)


class TransformersMemoryEncoder(nn.Module):
    """Stands in for transformers' ``Sam2VideoMemoryEncoder``: the same
    ``forward(vision_features, masks) -> (features, position_encoding)``, computed by the
    memenc_fast MemoryEncoder ``self.encoder`` (so the fused backends run; ``encoder.last_backend``
    tells which) and transformers' own position-encoding module ``self.position_encoding``.

    ``state_dict()`` and ``load_state_dict()`` speak transformers' keys (translated through
    ``transformers_key_map``), so a patched model saves (``save_pretrained``) and loads checkpoints
    unchanged; ``named_parameters()`` shows memenc_fast's names under ``encoder.``.
    """

    def __init__(self, encoder: MemoryEncoder, position_encoding: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.position_encoding = position_encoding  # transformers' module: no parameters, exact dtype semantics
        stages = (len(encoder.mask_downsampler.encoder) - 1) // 3
        self.ours_to_transformers = {
            ours: theirs for theirs, ours in transformers_key_map(stages, len(encoder.fuser.layers)).items()
        }
        self.register_state_dict_post_hook(_save_with_transformers_keys)
        self.register_load_state_dict_pre_hook(_load_transformers_keys)

    @classmethod
    def from_transformers(cls, transformers_memory_encoder: nn.Module) -> "TransformersMemoryEncoder":
        """The adapter over ``transformers_memory_encoder``'s very parameters (no copy)."""
        encoder = memory_encoder_from_transformers(transformers_memory_encoder, share_parameters=True)
        adapter = cls(encoder, transformers_memory_encoder.position_encoding)
        adapter.train(transformers_memory_encoder.training)
        return adapter

    def forward(self, vision_features: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # transformers' caller has applied sigmoid, scale and bias (or binarized) already.
        features = self.encoder(vision_features, masks, skip_mask_sigmoid=True)["vision_features"]
        position_encoding = self.position_encoding(features.shape, features.device, features.dtype)
        return features, position_encoding


def patch_transformers(model: object) -> TransformersMemoryEncoder:
    """Replaces ``.memory_encoder`` of a transformers ``Sam2VideoModel`` (or ``Sam3TrackerVideoModel``,
    ``EdgeTamVideoModel``, the ``.tracker_model`` of a ``Sam3VideoModel``, or any object holding
    such a memory encoder under that name) in place with a ``TransformersMemoryEncoder`` and
    returns it. Idempotent.

    The adapter holds the original's very parameters (same values, device and dtype; optimizers
    keep working) and keeps transformers' ``state_dict`` keys, so the patched model still loads
    (``load_state_dict``) and saves (``save_pretrained``) transformers checkpoints. Raises
    TypeError for anything else.
    """
    holder = model
    if not hasattr(holder, "memory_encoder") and hasattr(holder, "tracker_model"):
        holder = holder.tracker_model  # Sam3VideoModel keeps its Sam3TrackerVideoModel there
    current = getattr(holder, "memory_encoder", None)
    if isinstance(current, TransformersMemoryEncoder):
        return current
    if not _is_transformers_memory_encoder(current):
        raise TypeError(
            f"patch_transformers expects a transformers Sam2VideoModel (or any object holding {_EXPECTED} "
            f"as .memory_encoder); got {_qualified_name(model)}"
            + ("" if current is None else f" whose .memory_encoder is {_qualified_name(current)}")
        )
    adapter = TransformersMemoryEncoder.from_transformers(current)
    holder.memory_encoder = adapter
    return adapter
