"""Hugging Face ``transformers``' SAM 2 video memory encoder, fused in place.

transformers re-implements SAM 2's memory encoder as ``Sam2VideoMemoryEncoder`` (generated from
the same source for ``Sam3TrackerVideoModel`` and ``EdgeTamVideoModel``), held by the model as
``.memory_encoder`` and called by ``Sam2VideoModel._encode_new_memory`` as
``features, pos = self.memory_encoder(pix_feat, mask_for_mem)``. Its math is sam2's with three
differences at the boundary: it never applies a sigmoid (its caller passes ``sigmoid(logits) *
20 - 10``, or the binarized mask scaled the same way), it returns a ``(features,
position_encoding)`` tuple, and it computes the position encoding in the features' dtype.

``patch_transformers`` turns the model's own memory encoder into a subclass of its class whose
forward runs memenc-fast's fused ops over its very submodules (``memenc_fast.structure``
recognises transformers' tree: ``mask_downsampler.layers``/``final_conv``,
``feature_projection``, ``memory_fuser.layers``, ``projection``) and calls its own position
encoding module. Nothing else changes: the same object, submodules, parameters, ``state_dict``
keys and hooks, so ``from_pretrained`` (also into a model patched in its ``__init__``),
``save_pretrained``, ``device_map`` and optimizers work as before. Whatever the fused path cannot
prove equal (another activation, a hook, ...) runs transformers' own forward.

``memory_encoder_from_transformers`` instead builds a standalone ``memenc_fast.MemoryEncoder``
with sam2's keys, and ``state_dict_from_transformers``/``state_dict_to_transformers`` convert
checkpoints. Nothing here imports transformers: classes are recognised in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import re
from typing import Dict, Iterable, List, Mapping, Tuple, TypeVar

import torch
import torch.nn as nn

from .modules import CXBlock, FusedEncoder, Fuser, MaskDownSampler, MemoryEncoder, PositionEmbeddingSine
from .structure import TRANSFORMERS_MODELS, is_exact_gelu, known_class

__all__ = [
    "TransformersMemoryEncoder",
    "fused_class",
    "memory_encoder_from_transformers",
    "patch_transformers",
    "state_dict_from_transformers",
    "state_dict_to_transformers",
    "transformers_key_map",
]

_EXPECTED = "a transformers Sam2VideoMemoryEncoder (or Sam3TrackerVideoMemoryEncoder, EdgeTamVideoMemoryEncoder)"

T = TypeVar("T")


def _is_transformers_memory_encoder(module: object) -> bool:
    # A patched module's class is a subclass of transformers' (``fused_class``).
    return any(known_class("transformers_memory_encoder", cls) for cls in type(module).__mro__)


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
    if not is_exact_gelu(module):
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


class TransformersMemoryEncoder(FusedEncoder):
    """The fused forward of a transformers memory encoder: ``patch_transformers`` makes the
    model's module an instance of a subclass of both this class and its own (``fused_class``).

    ``forward(vision_features, masks) -> (features, position_encoding)`` as transformers';
    ``last_backend`` tells which backend ran (``FusedEncoder`` has the other attributes).
    """

    def forward(self, vision_features: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # transformers' caller has applied sigmoid, scale and bias (or binarized) already.
        features, _ = self._fused(vision_features, masks, True)
        if features is None:
            return super().forward(vision_features, masks)
        position_encoding = self.position_encoding(features.shape, features.device, features.dtype)
        return features, position_encoding


def fused_class(transformers_class: type) -> type:
    """The subclass of ``transformers_class`` (one of transformers' memory encoders) and
    ``TransformersMemoryEncoder`` that ``patch_transformers`` gives the module; made once, and
    importable from this module by name (so patched modules pickle)."""
    name = f"Fused{transformers_class.__name__}"
    existing = globals().get(name)
    if existing is not None and issubclass(existing, transformers_class):
        return existing
    cls = type(name, (TransformersMemoryEncoder, transformers_class), {
        "__module__": __name__,
        "__doc__": f"transformers' {transformers_class.__name__} with memenc-fast's fused forward.",
    })
    globals()[name] = cls
    return cls


def __getattr__(name: str) -> type:
    """``Fused<transformers class>`` on demand, for unpickling in a process that never patched."""
    for model, prefix in TRANSFORMERS_MODELS:
        if name == f"Fused{prefix}MemoryEncoder":
            module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
            return fused_class(getattr(module, f"{prefix}MemoryEncoder"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch_transformers(model: object) -> TransformersMemoryEncoder:
    """Gives ``.memory_encoder`` of a transformers ``Sam2VideoModel`` (or ``Sam3TrackerVideoModel``,
    ``EdgeTamVideoModel``, the ``.tracker_model`` of a ``Sam3VideoModel``, any object holding such
    a memory encoder under that name, or the memory encoder itself) memenc-fast's fused forward,
    in place, and returns it. Idempotent; works before or after the model's weights are loaded.

    The module stays the same object with the same submodules, parameters and ``state_dict``
    keys; only its class becomes ``fused_class(its class)``. Raises TypeError for anything else.
    """
    holder = model
    if not hasattr(holder, "memory_encoder") and hasattr(holder, "tracker_model"):
        holder = holder.tracker_model  # Sam3VideoModel keeps its Sam3TrackerVideoModel there
    current = model if _is_transformers_memory_encoder(model) else getattr(holder, "memory_encoder", None)
    if isinstance(current, TransformersMemoryEncoder):
        return current
    if not _is_transformers_memory_encoder(current):
        raise TypeError(
            f"patch_transformers expects a transformers Sam2VideoModel (or any object holding {_EXPECTED} "
            f"as .memory_encoder); got {_qualified_name(model)}"
            + ("" if current is None else f" whose .memory_encoder is {_qualified_name(current)}")
        )
    current.__class__ = fused_class(type(current))
    current._init_fused_state()
    return current
