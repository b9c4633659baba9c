"""The ``cuda`` backend: the CUDA kernels of ``csrc/`` where they apply, cuBLAS (through torch) for
the remaining GEMMs, and the ``torch`` op, per op, for configurations without a kernel.

What runs each op is in :data:`IMPLEMENTATIONS`. The op functions have the signatures of
``torch_ops`` (the op vocabulary); features between ops are channels-last tokens.

Each kernel launch has a validated Python wrapper (:func:`mask_stem`, :func:`conv3x3s2_ln_gelu`,
:func:`proj_add_tokens`, :func:`dwconv_ln`) that checks dtypes, ranks, sizes and devices before
anything is launched, and a ``torch.library`` custom op (``memenc_fast::cuda_*``) with a fake
implementation, so ``torch.compile`` traces through. Eager calls go to the wrappers directly (a
custom-op call costs ~10 µs of dispatch, as much as a whole B=1 kernel); traced code calls the
custom ops.
"""

from typing import Callable, Dict, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F

from ..dispatch import constant_while_tracing, log_once
from .kernel_args import check_same_device, check_tensor, new_output
from ..packing import PackedBlock, PackedEncoder, derived, is_exact_gelu
from . import cuda_lib, torch_ops

__all__ = [
    "IMPLEMENTATIONS",
    "MLP_CHUNK_TOKENS",
    "mask_downsample",
    "proj_add",
    "cxblock",
    "mask_stem",
    "conv3x3s2_ln_gelu",
    "proj_add_tokens",
    "dwconv_ln",
]


IMPLEMENTATIONS: Dict[str, str] = {
    "mask_downsample": "CUDA mask_stem_kernel (sigmoid/scale/bias + stages 1-2 chained, CUDA cores) + "
                       "conv3x3s2_ln_gelu_kernel per later stage (implicit GEMM on tensor cores)",
    "proj_add": "CUDA proj_add_kernel (concatenated-K GEMM on tensor cores, bias epilogue)",
    "cxblock": "CUDA dwconv_ln_kernel (dwconv7x7 + LayerNorm + residual) + MLP on cuBLAS through torch",
    "out_proj": "torch op (cuBLAS)",
}
"""What runs each op of this backend (configurations without a kernel run the torch op)."""

MLP_CHUNK_TOKENS = 8192
"""Tokens per MLP chunk: the 1024-wide hidden of 8192 tokens is 16 MB in bf16, which stays in an
H100's 50 MB L2 between the GEMM that writes it, GELU and the GEMM that reads it."""

_T = TypeVar("_T")

# ---------------------------------------------------------------------------------------------
# checks, outputs, caches


@constant_while_tracing
def _kernel_exists(op: str, *sizes: int) -> bool:
    """Whether the library has a kernel ``op`` for these sizes (asked through ctypes)."""
    return cuda_lib.load().supported(op, *sizes)


def _supported(op: str, what: str, *sizes: int) -> None:
    if not _kernel_exists(op, *sizes):
        raise ValueError(f"{op}: no CUDA kernel for {what}")


def _launch(name: str, device: torch.device, *args: object) -> None:
    """Runs a launcher on ``device`` and torch's current stream there."""
    cuda_lib.load().call(name, *args, device.index, torch.cuda.current_stream(device).cuda_stream)


def _taps_last(weight: torch.Tensor) -> torch.Tensor:
    """Conv weights (C_out, C_in, 3, 3) as (C_out, 3, 3, C_in): one tap's k tile is contiguous."""
    return derived(weight, "taps_last", [weight], lambda: weight.permute(0, 2, 3, 1).contiguous())


def _log_fallback(op: str, reason: str) -> None:
    log_once(f"memenc_fast: cuda {op} runs the torch op: {reason}")


def _conv_out(size: int) -> int:
    return (size - 1) // 2 + 1


def _precise() -> bool:
    """fp32 GEMMs at IEEE-level accuracy (3xTF32) unless torch allows TF32 matmuls."""
    return not torch.backends.cuda.matmul.allow_tf32


# ---------------------------------------------------------------------------------------------
# kernel wrappers


def mask_stem(masks: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, g1: torch.Tensor, be1: torch.Tensor,
              eps1: float, w2: torch.Tensor, b2: torch.Tensor, g2: torch.Tensor, be2: torch.Tensor, eps2: float,
              apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    """Mask stages 1 and 2 fused: masks (B, 1, H, W), any strides -> (B, H2, W2, C2) channels-last.

    ``sigmoid`` when ``apply_sigmoid``, then ``* scale + bias``, then per stage conv3x3 stride 2
    padding 1 (weights ``w``, bias ``b``) -> LayerNorm over channels (``g``, ``be``, ``eps``) -> GELU.
    """
    op = "mask_stem"
    check_tensor(op, "masks", masks, shape=(None, 1, None, None))
    dtype = masks.dtype
    c1, c2 = check_tensor(op, "w1", w1, dtype, (None, 1, 3, 3)).shape[0], check_tensor(op, "w2", w2, dtype).shape[0]
    check_tensor(op, "w2", w2, dtype, (c2, c1, 3, 3))
    for name, t, c in (("b1", b1, c1), ("g1", g1, c1), ("be1", be1, c1), ("b2", b2, c2), ("g2", g2, c2),
                       ("be2", be2, c2)):
        check_tensor(op, name, t, dtype, (c,))
    device = check_same_device(op, masks=masks, w1=w1, b1=b1, g1=g1, be1=be1, w2=w2, b2=b2, g2=g2, be2=be2)
    _supported(op, f"channels 1 -> {c1} -> {c2}", 1, c1, c2)
    batch, _, height, width = masks.shape
    out = new_output((batch, _conv_out(_conv_out(height)), _conv_out(_conv_out(width)), c2), masks.dtype, masks.device)
    weights = [t.contiguous() for t in (w1, b1, g1, be1, w2, b2, g2, be2)]
    stride_b, _, stride_h, stride_w = masks.stride()
    _launch(op, device, cuda_lib.DTYPE_CODES[dtype], masks.data_ptr(), stride_b if batch > 1 else 0, stride_h,
            stride_w, batch, height, width, *[t.data_ptr() for t in weights[:4]], eps1,
            *[t.data_ptr() for t in weights[4:]], eps2, int(apply_sigmoid), scale, bias, out.data_ptr())
    return out


def conv3x3s2_ln_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                      norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """One mask stage on tensor cores: x (B, H, W, C_in) channels-last -> conv3x3 stride 2 padding 1
    (``weight`` (C_out, C_in, 3, 3)) -> LayerNorm over C_out -> GELU -> (B, Ho, Wo, C_out)."""
    op = "conv3x3s2_ln_gelu"
    check_tensor(op, "x", x, shape=(None, None, None, None))
    batch, height, width, c_in = x.shape
    c_out = check_tensor(op, "weight", weight, x.dtype, (None, c_in, 3, 3)).shape[0]
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        check_tensor(op, name, t, x.dtype, (c_out,))
    device = check_same_device(op, x=x, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias)
    _supported(op, f"channels {c_in} -> {c_out}", c_in, c_out)
    x = x.contiguous()
    params = [t.contiguous() for t in (bias, norm_weight, norm_bias)]
    out = new_output((batch, _conv_out(height), _conv_out(width), c_out), x.dtype, x.device)
    _launch(op, device, cuda_lib.DTYPE_CODES[x.dtype], c_in, c_out, x.data_ptr(), batch, height, width,
            _taps_last(weight).data_ptr(), *[t.data_ptr() for t in params], eps, int(_precise()), out.data_ptr())
    return out


def _gemm_source(t: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
    """(tensor, batch, channel and flattened-pixel strides) of a (B, C, H, W) GEMM input in a layout
    the kernel reads in 16-byte vectors: channels-last or channels-first as it lies, else a
    channels-last copy."""
    batch, channels, height, width = t.shape
    vec = 16 // t.element_size()
    stride_b, stride_c, stride_h, stride_w = t.stride()
    stride_b = stride_b if batch > 1 else 0
    aligned = t.data_ptr() % 16 == 0 and stride_b % vec == 0
    if aligned and stride_c == 1 and stride_h == width * stride_w and stride_w % vec == 0:
        return t, stride_b, 1, stride_w
    if aligned and stride_w == 1 and stride_h == width and stride_c % vec == 0 and (height * width) % vec == 0:
        return t, stride_b, stride_c, 1
    t = t.contiguous(memory_format=torch.channels_last)
    return t, (t.stride(0) if batch > 1 else 0), 1, channels


def proj_add_tokens(mask_features: torch.Tensor, pix_feat: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor) -> torch.Tensor:
    """``weight . [mask_features ; pix_feat] + bias`` per pixel -> tokens (B, H, W, C_out).

    ``mask_features`` (B, C_m, H, W) and ``pix_feat`` (B, C_p, H, W), any memory layout
    (channels-last and NCHW are read in place); ``weight`` (C_out, C_m + C_p).
    """
    op = "proj_add"
    check_tensor(op, "mask_features", mask_features, shape=(None, None, None, None))
    batch, c_m, height, width = mask_features.shape
    dtype = mask_features.dtype
    c_p = check_tensor(op, "pix_feat", pix_feat, dtype, (batch, None, height, width)).shape[1]
    c_out = check_tensor(op, "weight", weight, dtype, (None, c_m + c_p)).shape[0]
    check_tensor(op, "bias", bias, dtype, (c_out,))
    device = check_same_device(op, mask_features=mask_features, pix_feat=pix_feat, weight=weight, bias=bias)
    _supported(op, f"channels {c_m} + {c_p} -> {c_out}", c_m, c_p, c_out)
    (m, m_b, m_c, m_p), (p, p_b, p_c, p_p) = _gemm_source(mask_features), _gemm_source(pix_feat)
    weight, bias = weight.contiguous(), bias.contiguous()
    out = new_output((batch, height, width, c_out), mask_features.dtype, mask_features.device)
    _launch(op, device, cuda_lib.DTYPE_CODES[dtype], m.data_ptr(), m_b, m_c, m_p, c_m, p.data_ptr(), p_b, p_c,
            p_p, c_p, batch, height * width, weight.data_ptr(), bias.data_ptr(), c_out, int(_precise()),
            out.data_ptr())
    return out


def dwconv_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual_bias: torch.Tensor,
              eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Depthwise KxK conv ("same" padding) + LayerNorm over channels (no affine) on tokens
    x (B, H, W, C) -> (normalized tokens, ``x + residual_bias``), both (B, H, W, C)."""
    op = "dwconv_ln"
    check_tensor(op, "x", x, shape=(None, None, None, None))
    channels = x.shape[3]
    size = check_tensor(op, "weight", weight, x.dtype, (channels, 1, None, None)).shape[2]
    check_tensor(op, "weight", weight, x.dtype, (channels, 1, size, size))
    check_tensor(op, "bias", bias, x.dtype, (channels,))
    check_tensor(op, "residual_bias", residual_bias, x.dtype, (channels,))
    device = check_same_device(op, x=x, weight=weight, bias=bias, residual_bias=residual_bias)
    _supported(op, f"{channels} channels and a {size}x{size} kernel", channels, size)
    x = x.contiguous()
    params = [t.contiguous() for t in (weight, bias, residual_bias)]
    normed, resid = new_output(x.shape, x.dtype, x.device), new_output(x.shape, x.dtype, x.device)
    batch, height, width, _ = x.shape
    _launch(op, device, cuda_lib.DTYPE_CODES[x.dtype], x.data_ptr(), batch, height, width, channels,
            params[0].data_ptr(), size, params[1].data_ptr(), params[2].data_ptr(), eps, normed.data_ptr(),
            resid.data_ptr())
    return normed, resid


# ---------------------------------------------------------------------------------------------
# custom ops (torch.compile traces these; their fakes give shapes and dtypes only)


@torch.library.custom_op("memenc_fast::cuda_mask_stem", mutates_args=())
def _mask_stem_op(masks: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, g1: torch.Tensor, be1: torch.Tensor,
                  eps1: float, w2: torch.Tensor, b2: torch.Tensor, g2: torch.Tensor, be2: torch.Tensor,
                  eps2: float, apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    return mask_stem(masks, w1, b1, g1, be1, eps1, w2, b2, g2, be2, eps2, apply_sigmoid, scale, bias)


@_mask_stem_op.register_fake
def _(masks, w1, b1, g1, be1, eps1, w2, b2, g2, be2, eps2, apply_sigmoid, scale, bias):
    batch, _, height, width = masks.shape
    return masks.new_empty((batch, _conv_out(_conv_out(height)), _conv_out(_conv_out(width)), w2.shape[0]))


@torch.library.custom_op("memenc_fast::cuda_conv3x3s2_ln_gelu", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
             norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    return conv3x3s2_ln_gelu(x, weight, bias, norm_weight, norm_bias, eps)


@_conv_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, eps):
    batch, height, width, _ = x.shape
    return x.new_empty((batch, _conv_out(height), _conv_out(width), weight.shape[0]))


@torch.library.custom_op("memenc_fast::cuda_proj_add", mutates_args=())
def _proj_add_op(mask_features: torch.Tensor, pix_feat: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    return proj_add_tokens(mask_features, pix_feat, weight, bias)


@_proj_add_op.register_fake
def _(mask_features, pix_feat, weight, bias):
    batch, _, height, width = mask_features.shape
    return mask_features.new_empty((batch, height, width, weight.shape[0]))


@torch.library.custom_op("memenc_fast::cuda_dwconv_ln", mutates_args=())
def _dwconv_ln_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual_bias: torch.Tensor,
                  eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return dwconv_ln(x, weight, bias, residual_bias, eps)


@_dwconv_ln_op.register_fake
def _(x, weight, bias, residual_bias, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _kernel(eager: Callable[..., _T], op: Callable[..., _T]) -> Callable[..., _T]:
    """The custom op while torch.compile traces, the plain wrapper otherwise."""
    return op if torch.compiler.is_compiling() else eager


# ---------------------------------------------------------------------------------------------
# the op vocabulary


def _mask_path_reason(packed: PackedEncoder) -> Optional[str]:
    stages = packed.stages
    if len(stages) < 2:
        return f"the fused mask path needs at least 2 stages; this downsampler has {len(stages)}"
    for i, stage in enumerate(stages):
        if stage.kernel_size != (3, 3) or stage.stride != (2, 2) or stage.padding != (1, 1):
            return (f"mask stage {i + 1} is a {stage.kernel_size} conv with stride {stage.stride} and padding "
                    f"{stage.padding}; the kernels run 3x3 stride 2 padding 1 (sam2's configs)")
        if not is_exact_gelu(stage.activation):
            return f"mask stage {i + 1} does not use exact GELU"
    channels = [stages[0].weight.shape[1]] + [stage.weight.shape[0] for stage in stages]
    if not _kernel_exists("mask_stem", *channels[:3]):
        return f"no CUDA kernel for mask stages 1-2 with channels {' -> '.join(map(str, channels[:3]))}"
    for i in range(2, len(stages)):
        if not _kernel_exists("conv3x3s2_ln_gelu", channels[i], channels[i + 1]):
            return f"no CUDA kernel for mask stage {i + 1} with channels {channels[i]} -> {channels[i + 1]}"
    return None


def mask_downsample(masks: torch.Tensor, packed: PackedEncoder, apply_sigmoid: bool, scale: float = 1.0,
                    bias: float = 0.0) -> torch.Tensor:
    """``torch_ops.mask_downsample`` on the CUDA kernels: (B, C, h, w) with channels-last memory."""
    reason = derived(packed, "mask_path_reason", [], lambda: _mask_path_reason(packed))
    if reason is not None:
        _log_fallback("mask_downsample", reason)
        return torch_ops.mask_downsample(masks, packed, apply_sigmoid, scale, bias)
    if packed.interpol_size is not None and list(masks.shape[-2:]) != list(packed.interpol_size):
        # The resize comes after the transform, so both run here and the kernel gets the result.
        x = (torch.sigmoid(masks) if apply_sigmoid else masks) * scale + bias
        masks = F.interpolate(x.float(), size=packed.interpol_size, mode="bilinear", align_corners=False,
                              antialias=True).to(masks.dtype)
        apply_sigmoid, scale, bias = False, 1.0, 0.0
    first, second = packed.stages[:2]
    x = _kernel(mask_stem, _mask_stem_op)(
        masks, first.weight, first.bias, first.norm_weight, first.norm_bias, first.norm_eps, second.weight,
        second.bias, second.norm_weight, second.norm_bias, second.norm_eps, apply_sigmoid, scale, bias)
    for stage in packed.stages[2:]:
        x = _kernel(conv3x3s2_ln_gelu, _conv_op)(x, stage.weight, stage.bias, stage.norm_weight,
                                                 stage.norm_bias, stage.norm_eps)
    return x.permute(0, 3, 1, 2)


def proj_add(mask_features: torch.Tensor, pix_feat: torch.Tensor, packed: PackedEncoder) -> torch.Tensor:
    """``torch_ops.proj_add`` as one CUDA GEMM over the concatenated channels -> tokens (B, H, W, C)."""
    out_channels, in_channels = packed.proj_weight.shape
    mask_channels = packed.mask_channels
    if not _kernel_exists("proj_add", mask_channels, in_channels - mask_channels, out_channels):
        _log_fallback("proj_add", f"no CUDA kernel for channels {mask_channels} + "
                                  f"{in_channels - mask_channels} -> {out_channels}")
        return torch_ops.proj_add(mask_features, pix_feat, packed)
    return _kernel(proj_add_tokens, _proj_add_op)(mask_features, pix_feat, packed.proj_weight, packed.proj_bias)


def _block_reason(block: PackedBlock) -> Optional[str]:
    channels, per_group, height, width = block.dw_weight.shape
    if per_group != 1 or block.groups != channels:
        return "the dwconv is not depthwise"
    if height != width or block.padding != ((height - 1) // 2,) * 2:
        return f"the dwconv is {height}x{width} with padding {block.padding}; the kernel runs square 'same' convs"
    if not is_exact_gelu(block.activation):
        return "the MLP does not use exact GELU"
    if not _kernel_exists("dwconv_ln", channels, height):
        return f"no CUDA kernel for {channels} channels and a {height}x{width} dwconv"
    return None


def cxblock(x: torch.Tensor, block: PackedBlock) -> torch.Tensor:
    """``torch_ops.cxblock``: dwconv + LayerNorm (and the residual) on CUDA, the MLP on cuBLAS.

    The MLP runs over chunks of tokens so that its 4x-wide hidden stays in L2; the second GEMM
    accumulates into the residual the kernel wrote (``x + b2``), so the add costs no pass.
    """
    reason = derived(block, "block_reason", [], lambda: _block_reason(block))
    if reason is not None:
        _log_fallback("cxblock", reason)
        return torch_ops.cxblock(x, block)
    normed, resid = _kernel(dwconv_ln, _dwconv_ln_op)(x, block.dw_weight, block.dw_bias, block.b2, block.norm_eps)
    channels = x.shape[-1]
    rows, out_rows = normed.view(-1, channels), resid.view(-1, channels)
    if torch.compiler.is_compiling():
        # As in torch_ops: under a compiler the hidden's lifetime is the compiler's business.
        torch_ops._mlp_into(out_rows, rows, block)
        return resid
    for start in range(0, rows.shape[0], MLP_CHUNK_TOKENS):
        chunk = slice(start, start + MLP_CHUNK_TOKENS)
        torch_ops._mlp_into(out_rows[chunk], rows[chunk], block)
    return resid
