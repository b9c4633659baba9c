"""Which memory encoders the fused path may run, decided from the module itself and re-checked on
every call.

The fused ops compute what the reference forward computes only when every submodule that forward
calls is one whose math they reproduce: an exact class (this package's, sam2's or sam3's; no
subclass, no name matching), with no hooks (on the module or global), no parametrization (it
changes the class) or old-style weight_norm/spectral_norm/prune (they add pre-hooks), no
per-instance ``forward``, and settings the ops implement. ``read_structure`` decides that and
records everything the decision rests on; ``Structure.is_current`` re-checks all of it on every
forward (type, hooks, settings, parameters and children by identity, as C-level passes over lists
prepared once), so a change anywhere is seen by the next forward.

The op arguments (``MaskStage``, ``Projection``, ``Block``, ``Pointwise``) hold the modules' live
Parameter objects, never copies: in-place updates (through ``.data`` too), ``.data`` swaps,
fused optimizer steps and ``load_state_dict`` all reach the next forward, and a replaced
Parameter object fails ``is_current``. Settings (eps, stride, padding) are read when the
structure is read and are part of what ``is_current`` compares.
"""

from __future__ import annotations

import importlib
import itertools
import operator
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.module as _module_globals

from . import reference

__all__ = [
    "MaskStage",
    "Projection",
    "Block",
    "Pointwise",
    "Structure",
    "UnsupportedStructure",
    "read_structure",
    "is_exact_gelu",
    "known_class",
]


class UnsupportedStructure(Exception):
    """The fused path cannot run this module; the message says which submodule and why."""


class MaskStage(NamedTuple):
    """One mask-downsampling stage: conv -> LayerNorm over channels -> activation."""

    weight: torch.Tensor  # (C_out, C_in, KH, KW)
    bias: torch.Tensor  # (C_out,)
    norm_weight: torch.Tensor  # (C_out,)
    norm_bias: torch.Tensor  # (C_out,)
    eps: float
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    activation: nn.Module


class Projection(NamedTuple):
    """``W_m m + b_m + W_p p + b_p``: the downsampler's last 1x1 conv and ``pix_feat_proj``."""

    mask_weight: torch.Tensor  # (C, C_m, 1, 1)
    mask_bias: torch.Tensor  # (C,)
    pix_weight: torch.Tensor  # (C, C_p, 1, 1)
    pix_bias: torch.Tensor  # (C,)


class Pointwise(NamedTuple):
    """A 1x1 conv with bias (``out_proj``, the fuser's input projection)."""

    weight: torch.Tensor  # (N, C, 1, 1)
    bias: torch.Tensor  # (N,)


class Block(NamedTuple):
    """A CXBlock: ``x + gamma * (pwconv2(act(pwconv1(LayerNorm(dwconv(x))))))``."""

    dw_weight: torch.Tensor  # (C, C // groups, KH, KW)
    dw_bias: torch.Tensor  # (C,)
    padding: Tuple[int, int]
    groups: int
    norm_weight: torch.Tensor  # (C,)
    norm_bias: torch.Tensor  # (C,)
    eps: float
    w1: torch.Tensor  # (H, C)
    b1: torch.Tensor  # (H,)
    w2: torch.Tensor  # (C, H)
    b2: torch.Tensor  # (C,)
    gamma: Optional[torch.Tensor]  # (C,) or None
    activation: nn.Module


# The classes whose forward the fused ops reproduce, by role: (module, class name). sam2's and
# sam3's are resolved in sys.modules (an object can only be an instance of an imported class), so
# neither package is ever imported here.
_KNOWN_CLASSES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "mask_downsampler": (("memenc_fast.reference", "MaskDownSampler"),
                         ("sam2.modeling.memory_encoder", "MaskDownSampler"),
                         ("sam3.model.memory", "SimpleMaskDownSampler")),
    "layer_norm_2d": (("memenc_fast.reference", "LayerNorm2d"),
                      ("sam2.modeling.sam2_utils", "LayerNorm2d"),
                      ("sam3.model.model_misc", "LayerNorm2d")),
    "fuser": (("memenc_fast.reference", "Fuser"),
              ("sam2.modeling.memory_encoder", "Fuser"),
              ("sam3.model.memory", "SimpleFuser")),
    "cxblock": (("memenc_fast.reference", "CXBlock"),
                ("sam2.modeling.memory_encoder", "CXBlock"),
                ("sam3.model.memory", "CXBlock")),
    "drop_path": (("memenc_fast.reference", "DropPath"),
                  ("sam2.modeling.sam2_utils", "DropPath"),
                  ("timm.layers.drop", "DropPath")),
    "position_encoding": (("memenc_fast.reference", "PositionEmbeddingSine"),
                          ("memenc_fast.modules", "PositionEmbeddingSine"),
                          ("sam2.modeling.position_encoding", "PositionEmbeddingSine"),
                          ("sam3.model.position_encoding", "PositionEmbeddingSine")),
}

# Hugging Face transformers re-implements the module per model (generated from one source, so the
# same math): role -> class-name suffix, after the model's prefix.
TRANSFORMERS_MODELS = (("sam2_video", "Sam2Video"), ("sam3_tracker_video", "Sam3TrackerVideo"),
                       ("edgetam_video", "EdgeTamVideo"))
_TRANSFORMERS_ROLES = {
    "transformers_memory_encoder": "MemoryEncoder",
    "transformers_mask_downsampler": "MaskDownSampler",
    "transformers_mask_layer": "MaskDownSamplerLayer",
    "transformers_layer_norm": "LayerNorm",
    "transformers_fuser": "MemoryFuser",
    "transformers_cxblock": "MemoryFuserCXBlock",
}
_KNOWN_CLASSES.update({
    role: tuple((f"transformers.models.{model}.modeling_{model}", prefix + suffix)
                for model, prefix in TRANSFORMERS_MODELS)
    for role, suffix in _TRANSFORMERS_ROLES.items()
})
_KNOWN_CLASSES["transformers_gelu"] = (("transformers.activations", "GELUActivation"),)

# Stateless activations whose forward the torch backend runs as is; the kernels fuse exact GELU.
_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU)


def known_class(role: str, cls: type) -> bool:
    """Whether ``cls`` is exactly one of the classes known for ``role`` (see ``_KNOWN_CLASSES``)."""
    for module_name, class_name in _KNOWN_CLASSES[role]:
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, class_name, None) is cls:
            return True
    return False


def is_exact_gelu(module: nn.Module) -> bool:
    """True for the erf GELU, the activation the kernels fuse: ``nn.GELU()`` or transformers'
    ``ACT2FN["gelu"]`` (a ``GELUActivation`` calling ``F.gelu``)."""
    if type(module) is nn.GELU:
        return module.approximate == "none"
    return known_class("transformers_gelu", type(module)) and vars(module).get("act") is F.gelu


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_GLOBAL_HOOKS = tuple(getattr(_module_globals, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_MISSING = object()
_call = operator.itemgetter.__call__  # getter(d) mapped over pairs (operator.call is Python 3.11+)


class _Reader:
    """Collects, while a structure is read, what its validity rests on, and the first reason the
    fused path cannot run it."""

    def __init__(self) -> None:
        self.modules: List[nn.Module] = []
        self.slots: List[Tuple[dict, str]] = []
        self.containers: List[Dict[str, Optional[nn.Module]]] = []
        self.reason: Optional[str] = None

    def refuse(self, reason: str) -> None:
        """Records why the fused path cannot run this module (the first reason wins)."""
        if self.reason is None:
            self.reason = reason

    def watch(self, module: nn.Module, path: str, *settings: str) -> None:
        """``module`` is called by the reference forward: its type, hooks, per-instance ``forward``
        and the named ``settings`` must stay as they are now."""
        self.modules.append(module)
        state = vars(module)
        if "forward" in state:
            self.refuse(f"{path} has its own forward")
        if any(getattr(module, name) for name in _HOOK_DICTS):
            self.refuse(f"{path} has hooks (forward/backward hooks, or weight_norm/spectral_norm/prune)")
        for name in settings:
            self.slots.append((state, name))

    def parameter(self, module: nn.Module, path: str, name: str, optional: bool = False) -> Optional[torch.Tensor]:
        """``module``'s Parameter ``name``, which must stay the same object (``optional``: or None)."""
        params = module._parameters
        value = params.get(name)
        self.slots.append((params, name))
        if optional:
            # sam2 keeps gamma=None as a plain attribute: that must stay so too.
            self.slots.append((vars(module), name))
            if value is None and not (name in params or vars(module).get(name, _MISSING) is None):
                self.refuse(f"{path}.{name} is neither a registered parameter nor None")
        elif value is None:
            self.refuse(f"{path}.{name} is not a registered parameter")
        return value

    def children(self, module: nn.Module) -> None:
        """``module``'s children must stay the same objects, none added or removed."""
        children = module._modules
        self.containers.append(children)
        for name in children:
            self.slots.append((children, name))


class Structure:
    """A memory encoder's submodules as the fused ops take them, and what that rests on.

    ``reason`` is None when the fused path can run it, else why not. ``selections`` keeps the
    backend choices for this structure (see ``dispatch.select_cached``), ``objects_per_launch``
    the batch split per input size (see ``pipeline.run_in_chunks``).
    """

    def __init__(self, reader: _Reader, stages: Tuple[MaskStage, ...], projection: Projection,
                 fuser_projection: Optional[Pointwise], blocks: Tuple[Block, ...],
                 out_projection: Optional[Pointwise], downsampler: nn.Module, position_encoding: nn.Module,
                 snapshot: bool = True) -> None:
        self.reason = reader.reason
        self.stages = stages
        self.projection = projection
        self.fuser_projection = fuser_projection
        self.blocks = blocks
        self.out_projection = out_projection
        self.downsampler = downsampler
        self.position_encoding = position_encoding
        self.selections: Dict[Any, Any] = {}
        self.objects_per_launch: Dict[Any, int] = {}
        # Sizes the input checks and batch splitting use, from the weights' shapes as read now:
        # geometry is (kernel h, w, stride h, w, padding h, w) per mask stage.
        self.in_dim = projection.pix_weight.shape[1] if projection.pix_weight is not None else 0
        first = stages[0].weight if stages else projection.mask_weight
        self.mask_channels = first.shape[1] if first is not None else 0
        self.geometry = tuple((*s.weight.shape[-2:], *s.stride, *s.padding) for s in stages
                               if s.weight is not None and s.stride is not None and s.padding is not None)
        self.stage_channels = tuple(s.weight.shape[0] for s in stages if s.weight is not None)
        self.hidden_channels = tuple(b.w1.shape[0] for b in blocks if b.w1 is not None)
        if snapshot:
            self._take_snapshot(reader)

    def _take_snapshot(self, reader: _Reader) -> None:
        """Records what ``is_current`` compares."""
        self._modules = tuple(reader.modules)
        self._types = tuple(map(type, reader.modules))
        self._hooks = tuple(getattr(m, name) for m in reader.modules for name in _HOOK_DICTS) + _GLOBAL_HOOKS
        self._hooked = any(self._hooks)
        self._states = tuple(map(vars, reader.modules))
        self._overridden = self._has_own_forward()
        # Three passes over the recorded (dict, key) slots: tensors (parameters) by identity, since
        # Tensor.__eq__ compares values; other values, one itemgetter per dict, by tuple equality
        # (identity first); keys absent now must stay absent.
        tensors = [(d, k) for d, k in reader.slots if isinstance(d.get(k), torch.Tensor)]
        self._tensor_dicts, self._tensor_keys = tuple(d for d, _ in tensors), tuple(k for _, k in tensors)
        self._tensors = tuple(map(dict.get, self._tensor_dicts, self._tensor_keys))
        grouped: Dict[int, Tuple[dict, List[str]]] = {}
        for d, k in reader.slots:
            if k in d and not isinstance(d[k], torch.Tensor):
                grouped.setdefault(id(d), (d, []))[1].append(k)
        self._value_dicts = tuple(d for d, _ in grouped.values())
        self._value_getters = tuple(operator.itemgetter(*keys) for _, keys in grouped.values())
        self._values = tuple(map(_call, self._value_getters, self._value_dicts))
        absent = [(d, k) for d, k in reader.slots if k not in d]
        self._absent_dicts, self._absent_keys = tuple(d for d, _ in absent), tuple(k for _, k in absent)
        self._containers = tuple(reader.containers)
        self._counts = tuple(map(len, self._containers))

    def is_current(self) -> bool:
        """Whether nothing this structure rests on has changed. Runs on every forward."""
        return (
            all(map(operator.is_, map(type, self._modules), self._types))
            and any(self._hooks) is self._hooked
            and self._has_own_forward() is self._overridden
            and all(map(operator.is_, map(dict.get, self._tensor_dicts, self._tensor_keys), self._tensors))
            and self._current_values()
            and not any(map(operator.contains, self._absent_dicts, self._absent_keys))
            and tuple(map(len, self._containers)) == self._counts
        )

    def _current_values(self) -> bool:
        try:
            return tuple(map(_call, self._value_getters, self._value_dicts)) == self._values
        except KeyError:  # a setting was deleted
            return False

    def _has_own_forward(self) -> bool:
        return any(map(operator.contains, self._states, itertools.repeat("forward")))

    def interpol_size(self) -> Optional[Tuple[int, int]]:
        """The downsampler's resize target (SAM 3), read live (it is a mutable list)."""
        size = vars(self.downsampler).get("interpol_size")
        return None if size is None else (int(size[0]), int(size[1]))

    def feature_size(self, mask_size: Tuple[int, int]) -> Tuple[int, int]:
        """The spatial size the mask downsampler makes of ``mask_size``."""
        size = vars(self.downsampler).get("interpol_size")
        height, width = mask_size if size is None else size
        for kh, kw, sh, sw, ph, pw in self.geometry:
            height = (height + 2 * ph - kh) // sh + 1
            width = (width + 2 * pw - kw) // sw + 1
        return height, width

    def parameters(self) -> List[torch.Tensor]:
        """Every Parameter the fused ops read, in a fixed order."""
        found: List[torch.Tensor] = []
        for record in (*self.stages, self.projection, self.fuser_projection, *self.blocks, self.out_projection):
            if record is not None:
                found += [t for t in record if isinstance(t, torch.Tensor)]
        return found


def _pair(value: Any) -> Optional[Tuple[int, int]]:
    if isinstance(value, tuple) and len(value) == 2 and all(type(v) is int for v in value):
        return value
    return None


def _conv(reader: _Reader, conv: nn.Module, path: str, pointwise: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """A zero-padded, undilated, ungrouped (unless a dwconv) Conv2d: (weight, bias, stride, padding)."""
    if type(conv) is not nn.Conv2d:
        reader.refuse(f"{path} is a {_qualified(type(conv))}, not a torch.nn.Conv2d")
        return None, None, None, None
    reader.watch(conv, path, "stride", "padding", "dilation", "groups", "padding_mode")
    weight = reader.parameter(conv, path, "weight")
    bias = reader.parameter(conv, path, "bias")
    stride, padding = _pair(conv.stride), _pair(conv.padding)
    if stride is None or padding is None or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        reader.refuse(f"{path} is not a zero-padded, undilated conv with explicit padding")
    elif pointwise and (weight is None or tuple(weight.shape[-2:]) != (1, 1) or stride != (1, 1)
                        or padding != (0, 0) or conv.groups != 1):
        reader.refuse(f"{path} is not a 1x1 conv with stride 1, no padding and no groups")
    return weight, bias, stride, padding


def _layer_norm_2d(reader: _Reader, norm: nn.Module, path: str) -> Tuple[Optional[torch.Tensor], ...]:
    """A LayerNorm over the channels of NCHW maps: (weight, bias, eps)."""
    if known_class("transformers_layer_norm", type(norm)):
        # nn.LayerNorm over permuted channels, as sam2's LayerNorm2d computes it.
        reader.watch(norm, path, "eps", "data_format", "normalized_shape")
        weight = reader.parameter(norm, path, "weight")
        if vars(norm).get("data_format") != "channels_first" or (
                weight is not None and tuple(vars(norm).get("normalized_shape", ())) != tuple(weight.shape)):
            reader.refuse(f"{path} is not a LayerNorm over the channels of (N, C, H, W) maps")
    elif known_class("layer_norm_2d", type(norm)):
        reader.watch(norm, path, "eps")
        weight = reader.parameter(norm, path, "weight")
    else:
        reader.refuse(f"{path} is a {_qualified(type(norm))}, not a known LayerNorm2d")
        return None, None, None
    eps = vars(norm).get("eps")
    if type(eps) not in (float, int):
        reader.refuse(f"{path}.eps is not a number")
    return weight, reader.parameter(norm, path, "bias"), eps


def _activation(reader: _Reader, act: nn.Module, path: str) -> nn.Module:
    if type(act) in _ACTIVATIONS:
        reader.watch(act, path, "approximate" if type(act) is nn.GELU else "inplace")
    elif known_class("transformers_gelu", type(act)):
        reader.watch(act, path, "act")
        if not is_exact_gelu(act):
            reader.refuse(f"{path} is a GELUActivation that does not call torch's GELU")
    else:
        reader.refuse(f"{path} is a {_qualified(type(act))}; the fused path runs GELU, SiLU or ReLU")
    return act


def _mask_stage(reader: _Reader, conv: nn.Module, norm: nn.Module, act: nn.Module, path: str,
                names: Tuple[str, str, str]) -> MaskStage:
    weight, bias, stride, padding = _conv(reader, conv, f"{path}{names[0]}", pointwise=False)
    if type(conv) is nn.Conv2d and conv.groups != 1:
        reader.refuse(f"{path}{names[0]} is a grouped conv")
    norm_weight, norm_bias, eps = _layer_norm_2d(reader, norm, f"{path}{names[1]}")
    return MaskStage(weight, bias, norm_weight, norm_bias, eps, stride, padding,
                     _activation(reader, act, f"{path}{names[2]}"))


def _container(reader: _Reader, module: nn.Module, path: str, role: str, what: str) -> Dict[str, nn.Module]:
    """A container the reference forward calls, of a known class: its children."""
    if not known_class(role, type(module)):
        raise UnsupportedStructure(f"{path} is a {_qualified(type(module))}, not a known {what}")
    reader.watch(module, path)
    reader.children(module)
    return vars(module)["_modules"]


def _list(reader: _Reader, module: Optional[nn.Module], path: str, kind: type) -> List[nn.Module]:
    """The children of a ModuleList (iterated, not called) or Sequential (called) container."""
    if type(module) is not kind:
        raise UnsupportedStructure(f"{path} is not a torch.nn.{kind.__name__}")
    if kind is nn.Sequential:
        reader.watch(module, path)
    reader.children(module)
    return list(module)


def _sam2_mask_path(reader: _Reader, downsampler: nn.Module) -> Tuple[Tuple[MaskStage, ...], Tuple[torch.Tensor, ...]]:
    """sam2's/sam3's downsampler (``encoder``: [Conv2d, LayerNorm2d, act] * n + [Conv2d 1x1]): the
    stages and the final 1x1 conv's (weight, bias)."""
    path = "mask_downsampler"
    parts = _container(reader, downsampler, path, "mask_downsampler", "MaskDownSampler")
    modules = _list(reader, parts.get("encoder"), f"{path}.encoder", nn.Sequential)
    if len(modules) < 1 or (len(modules) - 1) % 3:
        raise UnsupportedStructure(f"{path}.encoder is not [Conv2d, LayerNorm2d, activation] * n + [Conv2d 1x1]")
    stages = tuple(_mask_stage(reader, *modules[i:i + 3], f"{path}.encoder.", (str(i), str(i + 1), str(i + 2)))
                   for i in range(0, len(modules) - 1, 3))
    final_weight, final_bias, _, _ = _conv(reader, modules[-1], f"{path}.encoder.{len(modules) - 1}", pointwise=True)
    return stages, (final_weight, final_bias)


def _transformers_mask_path(reader: _Reader, downsampler: nn.Module
                            ) -> Tuple[Tuple[MaskStage, ...], Tuple[torch.Tensor, ...]]:
    """transformers' downsampler (``layers`` of (conv, layer_norm, activation), ``final_conv``)."""
    path = "mask_downsampler"
    parts = _container(reader, downsampler, path, "transformers_mask_downsampler", "MaskDownSampler")
    stages = []
    for i, layer in enumerate(_list(reader, parts.get("layers"), f"{path}.layers", nn.ModuleList)):
        layer_parts = _container(reader, layer, f"{path}.layers.{i}", "transformers_mask_layer",
                                 "MaskDownSamplerLayer")
        stages.append(_mask_stage(reader, layer_parts.get("conv"), layer_parts.get("layer_norm"),
                                  layer_parts.get("activation"), f"{path}.layers.{i}.",
                                  ("conv", "layer_norm", "activation")))
    final_weight, final_bias, _, _ = _conv(reader, parts.get("final_conv"), f"{path}.final_conv", pointwise=True)
    return tuple(stages), (final_weight, final_bias)


def _optional_pointwise(reader: _Reader, module: nn.Module, path: str) -> Optional[Pointwise]:
    if type(module) is nn.Identity:
        reader.watch(module, path)
        return None
    weight, bias, _, _ = _conv(reader, module, path, pointwise=True)
    return Pointwise(weight, bias)


_SAM2_BLOCK = ("cxblock", "dwconv", "norm", "pwconv1", "act", "pwconv2", "gamma", "drop_path")
_TRANSFORMERS_BLOCK = ("transformers_cxblock", "depthwise_conv", "layer_norm", "pointwise_conv1", "activation",
                       "pointwise_conv2", "scale", None)


def _block(reader: _Reader, block: nn.Module, path: str, names: Tuple[Optional[str], ...]) -> Block:
    """A CXBlock, its parts found under ``names`` (``_SAM2_BLOCK``, ``_TRANSFORMERS_BLOCK``)."""
    role, dw_name, norm_name, fc1_name, act_name, fc2_name, gamma_name, drop_name = names
    parts = _container(reader, block, path, role, "CXBlock")
    dw = parts.get(dw_name)
    dw_weight, dw_bias, stride, padding = _conv(reader, dw, f"{path}.{dw_name}", pointwise=False)
    if type(dw) is nn.Conv2d:
        channels = dw_weight.shape[0] if dw_weight is not None else 0
        if stride != (1, 1) or dw.groups not in (1, channels):
            reader.refuse(f"{path}.{dw_name} is not a stride-1 depthwise (or dense) conv")
        elif dw_weight is not None and padding is not None and tuple(2 * p + 1 for p in padding) != tuple(
                dw_weight.shape[-2:]):
            reader.refuse(f"{path}.{dw_name} does not keep the spatial size (padding is not (kernel - 1) / 2)")
    norm_weight, norm_bias, eps = _layer_norm_2d(reader, parts.get(norm_name), f"{path}.{norm_name}")
    linears = []
    for name in (fc1_name, fc2_name):
        linear = parts.get(name)
        if type(linear) is not nn.Linear:
            reader.refuse(f"{path}.{name} is a {_qualified(type(linear))}, not a torch.nn.Linear")
            linears += [None, None]
            continue
        reader.watch(linear, f"{path}.{name}")
        linears += [reader.parameter(linear, f"{path}.{name}", "weight"),
                    reader.parameter(linear, f"{path}.{name}", "bias")]
    act = _activation(reader, parts.get(act_name), f"{path}.{act_name}")
    gamma = reader.parameter(block, path, gamma_name, optional=True)
    if drop_name is not None:
        _drop_path(reader, parts.get(drop_name), f"{path}.{drop_name}")
    return Block(dw_weight, dw_bias, padding, getattr(dw, "groups", 1), norm_weight, norm_bias, eps, *linears,
                 gamma, act)


def _drop_path(reader: _Reader, drop_path: nn.Module, path: str) -> None:
    if type(drop_path) is nn.Identity:
        reader.watch(drop_path, path)
    elif known_class("drop_path", type(drop_path)):
        reader.watch(drop_path, path, "drop_prob", "training")
        if drop_path.training and drop_path.drop_prob != 0.0:
            reader.refuse(f"{path} is active (training mode with drop_path > 0)")
    else:
        reader.refuse(f"{path} is a {_qualified(type(drop_path))}, not a known DropPath")


def read_structure(encoder: nn.Module, snapshot: bool = True) -> Structure:
    """The structure of a memory encoder: this package's, one holding sam2's/sam3's submodules, or
    transformers' (``feature_projection``, ``memory_fuser``, ``projection``).

    Raises UnsupportedStructure when its submodules cannot even be told apart (an unknown
    container class); otherwise the returned Structure's ``reason`` says whether the fused path
    can run it. Without ``snapshot`` (while torch.compile traces: the compiled code guards on
    what it read) it cannot answer ``is_current``.
    """
    reader = _Reader()
    if any(_GLOBAL_HOOKS):
        reader.refuse("global module hooks are registered (torch.nn.modules.module.register_module_*_hook)")
    reader.children(encoder)
    parts = vars(encoder)["_modules"]
    transformers = "feature_projection" in parts
    # sam2's/sam3's names, or transformers': (downsampler, feature projection, fuser, output projection).
    names = ("mask_downsampler", "feature_projection", "memory_fuser", "projection") if transformers else (
        "mask_downsampler", "pix_feat_proj", "fuser", "out_proj")
    read_mask_path = _transformers_mask_path if transformers else _sam2_mask_path
    stages, (mask_weight, mask_bias) = read_mask_path(reader, parts.get(names[0]))
    pix_weight, pix_bias, _, _ = _conv(reader, parts.get(names[1]), names[1], pointwise=True)
    fuser_parts = _container(reader, parts.get(names[2]), names[2], "transformers_fuser" if transformers else "fuser",
                             "Fuser")
    fuser_projection = None if transformers else _optional_pointwise(reader, fuser_parts.get("proj"), "fuser.proj")
    layers = _list(reader, fuser_parts.get("layers"), f"{names[2]}.layers", nn.ModuleList)
    block_names = _TRANSFORMERS_BLOCK if transformers else _SAM2_BLOCK
    blocks = tuple(_block(reader, block, f"{names[2]}.layers.{i}", block_names) for i, block in enumerate(layers))
    out_projection = _optional_pointwise(reader, parts.get(names[3]), names[3])
    position_encoding = parts.get("position_encoding")
    if not transformers:
        # transformers' adapter calls its own position-encoding module (through __call__).
        if not known_class("position_encoding", type(position_encoding)):
            raise UnsupportedStructure(f"position_encoding is a {_qualified(type(position_encoding))}, "
                                       "not a known PositionEmbeddingSine")
        reader.watch(position_encoding, "position_encoding")
    return Structure(reader, stages, Projection(mask_weight, mask_bias, pix_weight, pix_bias), fuser_projection,
                     blocks, out_projection, parts[names[0]], position_encoding, snapshot)
