"""The triton ``cxblock`` and ``cxblock_out_proj`` ops: dwconv + LayerNorm in one kernel, the
MLP (with gamma and the residual, and for the last block ``out_proj``) in another
(``memenc_fast.kernels.cxblock``), on the block's live parameters; the torch ops where the GPU
refuses a launch."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from ...kernels._common import Launch
from ...kernels.cxblock import plan_block
from ...precision import conv_tf32, matmul_tf32
from ...structure import Block, Pointwise
from .. import torch_ops
from ..kernel_args import check_tensor, eager_or_custom_op, new_output
from ._common import EXACT_GELU, check_device, check_parameters, device_spec, run_or_fall_back

__all__ = ["cxblock", "cxblock_out_proj", "block_tokens", "block_out_proj"]

_OP = "cxblock"


def _run_block(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, padding: List[int],
               norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, w1: torch.Tensor, b1: torch.Tensor,
               w2: torch.Tensor, b2: torch.Tensor, gamma: Optional[torch.Tensor], out_weight: Optional[torch.Tensor],
               out_bias: Optional[torch.Tensor]) -> torch.Tensor:
    check_tensor(_OP, "x", x, shape=(None, None, None, None), contiguous=True)
    device = check_device(_OP, x=x)
    batch, height, width, channels = x.shape
    hidden = w1.shape[0]
    expected = [("dwconv weight", dw_weight, (channels, 1, *dw_weight.shape[2:])),
                ("dwconv bias", dw_bias, (channels,)),
                ("norm weight", norm_weight, (channels,)), ("norm bias", norm_bias, (channels,)),
                ("pwconv1 weight", w1, (hidden, channels)), ("pwconv1 bias", b1, (hidden,)),
                ("pwconv2 weight", w2, (channels, hidden)), ("pwconv2 bias", b2, (channels,))]
    if gamma is not None:
        expected.append(("gamma", gamma, (channels,)))
    if out_weight is not None:
        n_out = out_weight.shape[0]
        expected += [("out_proj weight", out_weight, (n_out, channels, 1, 1)), ("out_proj bias", out_bias, (n_out,))]
    check_parameters(_OP, device, expected)
    fused = out_weight is not None
    # The reference's MLP layers are nn.Linear (cuBLAS's TF32 flag), out_proj an nn.Conv2d
    # (cuDNN's): both read at every call.
    tf32 = x.dtype == torch.float32 and matmul_tf32()
    out_tf32 = fused and x.dtype == torch.float32 and conv_tf32()

    def plan() -> Tuple[List[Launch], torch.Tensor]:
        normed = new_output(x.shape, x.dtype, x.device)
        out = new_output((batch, out_weight.shape[0], height, width) if fused else x.shape, x.dtype, x.device)
        if not x.numel():
            return [], out
        launches = plan_block(x, dw_weight.contiguous(), dw_bias.contiguous(), (padding[0], padding[1]),
                              norm_weight.contiguous(), norm_bias.contiguous(), eps, w1.contiguous(), b1.contiguous(),
                              w2.contiguous(), b2.contiguous(), None if gamma is None else gamma.contiguous(),
                              out_weight.contiguous() if fused else None, out_bias.contiguous() if fused else None,
                              normed, out, device_spec(device), tf32=tf32, out_tf32=out_tf32)
        return list(launches), out

    def torch_op() -> torch.Tensor:
        block = Block(dw_weight, dw_bias, (padding[0], padding[1]), channels, norm_weight, norm_bias, eps, w1, b1,
                      w2, b2, gamma, EXACT_GELU)
        tokens = torch_ops.cxblock(x, block)
        if fused:
            return torch_ops.out_proj(tokens, Pointwise(out_weight, out_bias))
        return tokens.contiguous()

    signature = (x.shape, x.dtype, dw_weight.shape, w1.shape[0], w1.dtype, w2.dtype, gamma is None,
                 None if out_weight is None else (out_weight.shape, out_weight.dtype), tf32, out_tf32)
    return run_or_fall_back("cxblock_out_proj" if fused else "cxblock", device, signature, plan, torch_op)


def block_tokens(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, padding: List[int],
                 norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """One CXBlock on tokens ``x`` (B, H, W, C) contiguous -> tokens, in x's dtype:
    ``x + gamma * (pwconv2(GELU(pwconv1(LayerNorm(dwconv(x))))))`` (gamma None: 1).

    ``dw_weight`` (C, 1, KH, KW) with ``padding`` keeping the size, ``w1`` (H, C), ``w2`` (C, H),
    the rest (C,) or (H,), each in any float dtype.
    """
    return _run_block(x, dw_weight, dw_bias, padding, norm_weight, norm_bias, eps, w1, b1, w2, b2, gamma,
                      None, None)


def block_out_proj(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, padding: List[int],
                   norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, w1: torch.Tensor,
                   b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, gamma: Optional[torch.Tensor],
                   out_weight: torch.Tensor, out_bias: torch.Tensor) -> torch.Tensor:
    """``block_tokens`` with the 1x1 conv ``out_weight`` (N, C, 1, 1), ``out_bias`` (N,) in the
    MLP's epilogue: tokens (B, H, W, C) -> NCHW (B, N, H, W) contiguous (16-bit dtypes)."""
    return _run_block(x, dw_weight, dw_bias, padding, norm_weight, norm_bias, eps, w1, b1, w2, b2, gamma,
                      out_weight, out_bias)


@torch.library.custom_op("memenc_fast::triton_cxblock", mutates_args=())
def _cxblock_op(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, padding: List[int],
                norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, w1: torch.Tensor, b1: torch.Tensor,
                w2: torch.Tensor, b2: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
    return block_tokens(x, dw_weight, dw_bias, padding, norm_weight, norm_bias, eps, w1, b1, w2, b2, gamma)


@_cxblock_op.register_fake
def _(x, dw_weight, dw_bias, padding, norm_weight, norm_bias, eps, w1, b1, w2, b2, gamma):
    return x.new_empty(x.shape)


@torch.library.custom_op("memenc_fast::triton_cxblock_out_proj", mutates_args=())
def _cxblock_out_proj_op(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, padding: List[int],
                         norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, w1: torch.Tensor,
                         b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, gamma: Optional[torch.Tensor],
                         out_weight: torch.Tensor, out_bias: torch.Tensor) -> torch.Tensor:
    return block_out_proj(x, dw_weight, dw_bias, padding, norm_weight, norm_bias, eps, w1, b1, w2, b2, gamma,
                          out_weight, out_bias)


@_cxblock_out_proj_op.register_fake
def _(x, dw_weight, dw_bias, padding, norm_weight, norm_bias, eps, w1, b1, w2, b2, gamma, out_weight, out_bias):
    batch, height, width, _ = x.shape
    return x.new_empty((batch, out_weight.shape[0], height, width))


def _block_args(x: torch.Tensor, block: Block) -> Tuple[Any, ...]:
    return (x, block.dw_weight, block.dw_bias, list(block.padding), block.norm_weight, block.norm_bias,
            float(block.eps), block.w1, block.b1, block.w2, block.b2, block.gamma)


def cxblock(x: torch.Tensor, block: Block) -> torch.Tensor:
    """The ``cxblock`` op (see ``torch_ops.cxblock``): tokens (B, H, W, C) -> tokens."""
    return eager_or_custom_op(block_tokens, _cxblock_op)(*_block_args(x, block))


def cxblock_out_proj(x: torch.Tensor, block: Block, layer: Pointwise) -> torch.Tensor:
    """``out_proj(cxblock(x, block), layer)`` with out_proj in the MLP kernel's epilogue: tokens
    (B, H, W, C) -> NCHW output (B, N, H, W), contiguous. ``unsupported_ops`` keeps it to
    16-bit dtypes and a real out_proj (not an Identity)."""
    return eager_or_custom_op(block_out_proj, _cxblock_out_proj_op)(*_block_args(x, block), layer.weight, layer.bias)
