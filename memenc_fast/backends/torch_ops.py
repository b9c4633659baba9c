"""The ``torch`` backend: the fused pipeline in plain PyTorch, on any device and dtype.

It is the fallback for every op another backend lacks, so its signatures define the op
vocabulary (see ``dispatch.OPS``). Features between ops are channels-last tokens ``(B, H, W, C)``,
contiguous. The weights are the module's live parameters (``structure``'s records), cast to the
compute dtype where they differ from it (autocast).

The CPU twin of the GPU fusion plan: proj+add as two GEMMs accumulating into one output (no
concatenated copy), LayerNorm on contiguous channels (finite wherever sam2's is), gamma folded
into the second MLP weight per call where that pass is the cheaper one (256x1024 values, against
10^9 multiply-adds of a SAM 2 block), and each CXBlock MLP with its bias, GELU and residual in
oneDNN GEMM epilogues on the CPU where this host's probes find oneDNN serving that dtype and
faster, else over chunks of tokens so its 4x-wide hidden stays in cache (``cpu_fast_paths``
lists the verdicts).
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..dispatch import log_once
from ..numerics import relative_error, tolerance
from ..reference import resize_mask
from ..structure import Block, MaskStage, Pointwise, Projection, is_exact_gelu

__all__ = ["mask_downsample", "proj_add", "cxblock", "out_proj", "pointwise_tokens", "transformed_mask",
           "auto_skip_reason", "onednn_mlp_refusal", "cpu_fast_paths", "MLP_CHUNK_TOKENS", "ONEDNN_DTYPES"]

PER_OBJECT_MIN_PIXELS = 1 << 19
"""Masks of at least this many pixels go through the mask path one object at a time. On a 2-core
AMD EPYC (fp32, B=2 and 4), batched vs one at a time: 128² masks 1.1/1.4 vs 1.5/2.8 ms,
512² 6.6/13.6 vs 8.2/14.8 ms, but 1024² 50/78 vs 28/58 ms: past the cache, one object's stages
chained back to back win."""

MLP_CHUNK_TOKENS = 2048
"""Tokens per MLP chunk, in either formulation (oneDNN or addmm): 2048 x 1024 hidden x 4 B = 8 MB,
about what a core's share of L2/L3 holds (SAM 2 at B=4, 16k tokens, one thread: oneDNN in chunks
of 1024 to 4096 within 4% of each other, 8192 10-15% slower, on AVX-512 and emulated AVX2). A
chunk is also what the formulation probe times (``_mlp_prefers_onednn``)."""

MLP_PROBE_ROUNDS = 3
"""Timed calls of each MLP formulation per probe (after one warm-up call each): the fastest counts."""


def auto_skip_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``auto`` runs the reference rather than this backend on ``device`` in ``dtype``.

    The cost rule (the reference's time over this backend's, no grad; benchmarks/RESULTS.md has
    the tables): in fp32 this backend was ahead at every size measured, on a 2-core AMD EPYC whose
    vector extensions went unrecorded (32² to 1152² masks, B 1 to 16: 1.06x-1.95x) and on a
    2-core AVX-512 Intel Xeon, natively and with oneDNN and ATen capped at AVX2 (128² to 1152²
    masks, B 1 and 4: 1.02x-2.31x, the thinnest margin at 128² masks, B=1), with the MLP's
    formulation chosen per host by ``_mlp_prefers_onednn`` (a 2-core AVX2-only AMD EPYC measured
    0.98x at 512² and 1024², B=1, before that choice existed; not re-measured since). bf16 and
    fp16: 1.25x-2.3x on that Xeon, natively and capped at AVX2, where oneDNN refuses them (one
    thread). float64: 0.51x-0.77x on both (oneDNN, which runs this backend's channels-last
    convolutions and fused GEMMs, has no float64 kernels). So everywhere but float64 on the CPU
    this backend is the faster path.
    """
    if device.type == "cpu" and dtype == torch.float64:
        return "on the CPU in float64 the reference is faster (0.51x-0.77x measured: oneDNN has no float64 kernels)"
    return None


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _activate(activation: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x) if is_exact_gelu(activation) else type(activation).forward(activation, x)


def mask_downsample(masks: torch.Tensor, stages: Sequence[MaskStage], interpol_size: Optional[Tuple[int, int]],
                    apply_sigmoid: bool, scale: float = 1.0, bias: float = 0.0) -> torch.Tensor:
    """Mask logits (B, C, Hm, Wm) -> last stage's features (B, C', h, w), any memory layout.

    Applies ``sigmoid`` when asked, then ``* scale + bias`` (SAM 2's caller transform), the
    resize to ``interpol_size`` (SAM 3) when the masks have another size, then every conv ->
    LayerNorm2d -> activation stage. The downsampler's final 1x1 conv is part of ``proj_add``.
    Large masks run one object at a time (outside compiled code), so each object's intermediates
    stay in cache between stages (see ``PER_OBJECT_MIN_PIXELS``).
    """
    pixels = masks.shape[-2] * masks.shape[-1]
    if torch.compiler.is_compiling() or masks.shape[0] <= 1 or pixels < PER_OBJECT_MIN_PIXELS:
        return _mask_stages(masks, stages, interpol_size, apply_sigmoid, scale, bias)
    return torch.cat([_mask_stages(masks[i:i + 1], stages, interpol_size, apply_sigmoid, scale, bias)
                      for i in range(masks.shape[0])]).contiguous(memory_format=torch.channels_last)


def transformed_mask(masks: torch.Tensor, interpol_size: Optional[Tuple[int, int]], apply_sigmoid: bool,
                     scale: float, bias: float) -> torch.Tensor:
    """The mask after the optional sigmoid, ``* scale + bias`` and SAM 3's resize, in the masks'
    dtype. Kernels that fuse the first two call it only when a resize is due."""
    x = torch.sigmoid(masks) if apply_sigmoid else masks
    if scale != 1.0:
        x = x * scale
    if bias != 0.0:
        x = x + bias
    if interpol_size is not None and tuple(x.shape[-2:]) != tuple(interpol_size):
        x = resize_mask(x, interpol_size).to(masks.dtype)
    return x


def _layer_norm_formula(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        dim: int) -> torch.Tensor:
    """sam2's LayerNorm formula over ``dim`` (channels), in at least float32, then ``* weight +
    bias`` in x's dtype. Where squares overflow (inputs of ~1e19 and more) the variance is
    infinite and the output finite, as sam2's is (``F.layer_norm`` returns NaN there). A separate
    affine also gets its gradients reduced in float32 (torch's CPU layer_norm backward sums them in
    the input's dtype: in bf16 over a mask stage's 10^6 pixels ~50% off)."""
    dtype = x.dtype
    wide = x.float() if dtype in (torch.bfloat16, torch.float16) else x
    centered = wide - wide.mean(dim, keepdim=True)
    normed = centered * torch.rsqrt(centered.square().mean(dim, keepdim=True) + eps)
    shape = (-1,) + (1,) * (x.dim() - 1 - dim % x.dim())  # the channel axis of x, for broadcasting
    return torch.addcmul(_cast(bias, dtype).view(shape), normed.to(dtype), _cast(weight, dtype).view(shape))


def _affine_layer_norm(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension of tokens, then ``* weight + bias``; finite wherever
    sam2's LayerNorm2d is.

    On the CPU, eagerly, ``torch.native_layer_norm`` (two passes over the data; the formula
    written out takes six: a third of a B=1 forward) runs first, and the formula only where a
    row's 1/std is not finite (its variance overflowed). Elsewhere the formula runs: compilers fuse
    it, and a finiteness check would cost a device sync.
    """
    dtype = tokens.dtype
    if tokens.device.type == "cpu" and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and dtype in (torch.bfloat16, torch.float16)
            and (weight.requires_grad or bias.requires_grad)):
        out, _, rstd = torch.native_layer_norm(tokens, [tokens.shape[-1]], _cast(weight, dtype),
                                               _cast(bias, dtype), eps)
        if torch.isfinite(rstd.sum()):
            return out
    return _layer_norm_formula(tokens, weight, bias, eps, -1)


NCHW_LAYER_NORM_MAX_CHANNELS = 16
"""Mask stages this narrow normalize in NCHW, across channel planes: layer_norm over rows of 4 or
16 channels is slow (SAM 2 at 1024²: 5.3 ms vs 0.8 for stage 1's 4 channels, 1.0 vs 0.65 for
stage 2's 16, on a 2-core AMD EPYC); wider ones run layer_norm on channels-last rows."""


def _mask_stages(masks: torch.Tensor, stages: Sequence[MaskStage], interpol_size: Optional[Tuple[int, int]],
                 apply_sigmoid: bool, scale: float, bias: float) -> torch.Tensor:
    x = transformed_mask(masks, interpol_size, apply_sigmoid, scale, bias)
    dtype = masks.dtype
    for stage in stages:
        narrow = stage.weight.shape[0] <= NCHW_LAYER_NORM_MAX_CHANNELS
        x = x.contiguous(memory_format=torch.contiguous_format if narrow else torch.channels_last)
        x = F.conv2d(x, _cast(stage.weight, dtype), _cast(stage.bias, dtype), stride=stage.stride,
                     padding=stage.padding)
        if narrow:
            x = _activate(stage.activation, _layer_norm_formula(x.contiguous(), stage.norm_weight,
                                                                stage.norm_bias, stage.eps, 1))
        else:
            tokens = _affine_layer_norm(x.permute(0, 2, 3, 1).contiguous(), stage.norm_weight, stage.norm_bias,
                                        stage.eps)
            x = _activate(stage.activation, tokens).permute(0, 3, 1, 2)
    return x


def _matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 1x1 conv weight (N, C, 1, 1) as the (N, C) matrix, in ``dtype``."""
    return _cast(weight.flatten(1), dtype)


def proj_add(mask_features: torch.Tensor, pix_feat: torch.Tensor, projection: Projection) -> torch.Tensor:
    """``W_m m + b_m + W_p p + b_p`` -> tokens (B, H, W, C): two GEMMs accumulating into one
    output, each reading its source where it lies (pix_feat NCHW as transposed tokens), so no
    concatenated copy of the inputs is made."""
    batch, pix_channels, height, width = pix_feat.shape
    dtype = pix_feat.dtype
    mask_weight, pix_weight = _matrix(projection.mask_weight, dtype), _matrix(projection.pix_weight, dtype)
    bias = _cast(projection.mask_bias, dtype) + _cast(projection.pix_bias, dtype)
    pix_tokens = pix_feat.reshape(batch, pix_channels, height * width).transpose(1, 2)
    out = torch.baddbmm(bias, pix_tokens, pix_weight.t().expand(batch, -1, -1))
    mask_tokens = mask_features.permute(0, 2, 3, 1).reshape(-1, mask_weight.shape[1])
    out.view(-1, out.shape[-1]).addmm_(mask_tokens, mask_weight.t())
    return out.view(batch, height, width, out.shape[-1])


def pointwise_tokens(x: torch.Tensor, layer: Pointwise) -> torch.Tensor:
    """A 1x1 conv on tokens (B, H, W, C) -> tokens (B, H, W, N) (the fuser's input projection)."""
    return F.linear(x, _matrix(layer.weight, x.dtype), _cast(layer.bias, x.dtype))


def _second_layer(block: Block, dtype: torch.dtype, tokens: int) -> Tuple[torch.Tensor, torch.Tensor,
                                                                            Optional[torch.Tensor]]:
    """pwconv2's weight and bias in ``dtype``, and the gamma left to scale the MLP's output (None
    when folded in or absent).

    gamma is folded into the weight and bias (in at least float32): one pass over the hidden x C
    weight instead of one over the tokens x C output, and bf16 training's gradients as accurate
    as its test asks (scaling the output in bf16 gave a mask-stage weight 1.4x the reference's
    error). Eagerly without grad and with fewer tokens than hidden channels, the output pass is
    the cheaper (SAM 2 at 128² masks, 64 tokens: folding cost 4-10% of a forward), and gamma
    scales the output instead (a shape test compiled code never makes).
    """
    if block.gamma is None:
        return _cast(block.w2, dtype), _cast(block.b2, dtype), None
    if not torch.compiler.is_compiling() and not torch.is_grad_enabled() and tokens < block.w2.shape[1]:
        return _cast(block.w2, dtype), _cast(block.b2, dtype), _cast(block.gamma, dtype)
    fold = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = block.gamma.to(fold)
    return (gamma[:, None] * block.w2.to(fold)).to(dtype), (gamma * block.b2.to(fold)).to(dtype), None


def cxblock(x: torch.Tensor, block: Block) -> torch.Tensor:
    """One CXBlock on tokens (B, H, W, C): dwconv -> LayerNorm -> MLP -> gamma -> + residual."""
    channels = x.shape[-1]
    dtype = x.dtype
    mixed = F.conv2d(x.permute(0, 3, 1, 2), _cast(block.dw_weight, dtype), _cast(block.dw_bias, dtype),
                     padding=block.padding, groups=block.groups)
    normed = _affine_layer_norm(mixed.permute(0, 2, 3, 1).contiguous(), block.norm_weight, block.norm_bias,
                                block.eps).view(-1, channels)
    residual = x.view(-1, channels)
    w1, b1 = _cast(block.w1, dtype), _cast(block.b1, dtype)
    w2, b2, scale = _second_layer(block, dtype, normed.shape[0])
    if _onednn_fuses(normed, block.activation):
        try:
            if _mlp_prefers_onednn(normed, residual, w1, b1, w2, b2, scale):
                return _onednn_mlp(normed, residual, w1, b1, w2, b2, scale).view(x.shape)
        except RuntimeError as err:
            # The probe's tiny inputs passed but this size is refused: kept and logged the same
            # way, and the portable ops serve.
            _refuse_onednn(dtype, f"oneDNN refused a {normed.shape[0]}x{channels} MLP on this host: "
                                  f"{_first_sentence(err)}")
    return _addmm_mlp(normed, residual, w1, b1, w2, b2, scale, block.activation).view(x.shape)


def _addmm_mlp(normed: torch.Tensor, residual: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
               w2: torch.Tensor, b2: torch.Tensor, scale: Optional[torch.Tensor],
               activation: torch.nn.Module) -> torch.Tensor:
    """``residual + (act(normed @ w1^T + b1) @ w2^T + b2) [* scale]`` in portable torch ops,
    eagerly over chunks of ``MLP_CHUNK_TOKENS`` tokens so the 4x-wide hidden stays in cache."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        # Under a compiler or exporter the hidden's lifetime is the compiler's business, and
        # slicing by the token count would specialize a dynamic batch size; autograd keeps every
        # chunk's hidden anyway. (gamma is folded there: ``scale`` is None.)
        hidden = _activate(activation, torch.addmm(b1, normed, w1.t()))
        return residual + b2 + torch.mm(hidden, w2.t())
    out = residual + b2 if scale is None else torch.empty_like(residual)
    for start in range(0, normed.shape[0], MLP_CHUNK_TOKENS):
        rows = slice(start, start + MLP_CHUNK_TOKENS)
        hidden = _activate(activation, torch.addmm(b1, normed[rows], w1.t()))
        if scale is None:
            out[rows].addmm_(hidden, w2.t())
        else:
            torch.addcmul(residual[rows], torch.addmm(b2, hidden, w2.t()), scale, out=out[rows])
    return out


ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes in which the CXBlock MLP may run on oneDNN's fused linear ops, where this host's
probe (``onednn_mlp_refusal``) accepts them."""

_onednn_refusals: Dict[torch.dtype, Optional[str]] = {}


def onednn_mlp_refusal(dtype: torch.dtype) -> Optional[str]:
    """None where the CXBlock MLP runs on oneDNN's fused linear ops in ``dtype`` on this host,
    else why it does not (it then runs as addmm, GELU and addmm_: portable torch ops).

    Decided once per process and dtype, at first use, by running the fused ops on tiny seeded
    inputs and comparing them with the plain formula in float64 (oneDNN refuses bf16 and fp16
    inner products on CPUs without AVX-512: "could not create a primitive descriptor"); then
    kept, so a refused path is never tried again, and a refusal is logged once. Asked eagerly
    only: compiled code never takes this path.
    """
    try:
        return _onednn_refusals[dtype]
    except KeyError:
        return _refuse_onednn(dtype, _probe_onednn_mlp(dtype))


def _refuse_onednn(dtype: torch.dtype, reason: Optional[str]) -> Optional[str]:
    _onednn_refusals[dtype] = reason
    if reason is not None:
        log_once(f"memenc_fast: torch backend: the CXBlock MLP runs as addmm + GELU + addmm_ in "
                 f"{_dtype_name(dtype)}, not on oneDNN's fused linear ops: {reason}")
    return reason


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _first_sentence(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]


def _probe_onednn_mlp(dtype: torch.dtype) -> Optional[str]:
    """``onednn_mlp_refusal``'s probe: None where the fused ops run here in ``dtype`` and agree
    with the formula within DESIGN.md's tolerance for that dtype, else why not."""
    if dtype not in ONEDNN_DTYPES:
        return f"oneDNN has no {_dtype_name(dtype)} inner products"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN fused linear ops (torch.ops.mkldnn._linear_pointwise)"
    generator = torch.Generator().manual_seed(0)
    tokens, channels = 37, 32
    normed, residual, w1, b1, w2, b2, gamma = (
        torch.randn(shape, generator=generator, device="cpu").to(dtype)
        for shape in ((tokens, channels), (tokens, channels), (4 * channels, channels), (4 * channels,),
                      (channels, 4 * channels), (channels,), (channels,)))
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            got = [_onednn_mlp(normed, residual, w1, b1, w2, b2, scale) for scale in (None, gamma)]
    except RuntimeError as err:
        return f"oneDNN refuses them on this host: {_first_sentence(err)}"
    wide = [t.double() for t in (normed, residual, w1, b1, w2, b2, gamma)]
    mlp = F.linear(F.gelu(F.linear(wide[0], wide[2], wide[3])), wide[4], wide[5])
    error = max(relative_error(out, expected) for out, expected in zip(got, (wide[1] + mlp, wide[1] + mlp * wide[6])))
    bound = tolerance(dtype)
    if not error < bound:  # NaN fails too
        return f"their result is off on this host (relative error {error:.2g} against the formula; bound {bound:g})"
    return None


_mlp_choices: Dict[Tuple[torch.dtype, int, int, int, bool, int], Tuple[bool, float, float]] = {}
"""Per (dtype, channels, hidden width, token class, gamma folded or absent, intra-op threads):
(oneDNN chosen, its seconds, addmm's seconds) on one chunk, as ``_mlp_prefers_onednn`` measured
them. The thread count is part of what is measured: the two libraries scale differently."""


def _mlp_prefers_onednn(normed: torch.Tensor, residual: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                        w2: torch.Tensor, b2: torch.Tensor, scale: Optional[torch.Tensor]) -> bool:
    """Whether oneDNN's fused ops beat addmm + GELU + addmm_ for this MLP on this host.

    Which is faster depends on the processor, on the code paths oneDNN and MKL (behind addmm)
    each take there, and on the token count: on an AVX-512 Xeon oneDNN's epilogues won by up to
    1.15x at SAM 2 sizes and tied at 64 tokens; with oneDNN capped at AVX2 (MKL not) it lost by
    1.5x; with both capped it tied at 1024-4096 tokens and lost by 1.2x at 64 (one thread each).
    So it is measured: at the first MLP of each (dtype, widths, token class, thread count), both formulations
    run on the first chunk of its real tokens, ``MLP_PROBE_ROUNDS`` times each after a warm-up,
    and the choice is kept for the process. Token classes are powers of two up to
    ``MLP_CHUNK_TOKENS`` (both formulations run larger inputs chunk by chunk). The probe costs
    about eight chunk-sized MLPs, once per class.
    """
    rows = min(normed.shape[0], MLP_CHUNK_TOKENS)
    key = (normed.dtype, normed.shape[1], w1.shape[0], rows.bit_length(), scale is None, torch.get_num_threads())
    choice = _mlp_choices.get(key)
    if choice is None:
        choice = _mlp_choices[key] = _time_mlp_formulations(normed[:rows], residual[:rows], w1, b1, w2, b2, scale)
    return choice[0]


def _time_mlp_formulations(normed: torch.Tensor, residual: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                           w2: torch.Tensor, b2: torch.Tensor,
                           scale: Optional[torch.Tensor]) -> Tuple[bool, float, float]:
    gelu = torch.nn.GELU()
    formulations = (lambda: _onednn_mlp(normed, residual, w1, b1, w2, b2, scale),
                    lambda: _addmm_mlp(normed, residual, w1, b1, w2, b2, scale, gelu))
    for run in formulations:  # warm-up: oneDNN builds its kernels on first use
        run()
    best = [math.inf, math.inf]
    for _ in range(MLP_PROBE_ROUNDS):  # interleaved, so that a busy machine weighs on both alike
        for index, run in enumerate(formulations):
            start = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - start)
    return best[0] <= best[1], best[0], best[1]


def cpu_fast_paths() -> Dict[str, str]:
    """This host's verdict on each CPU fast path of this backend, for ``python -m memenc_fast info``:
    whether oneDNN's fused linear ops serve each dtype ("yes", or "no: " and why), and which MLP
    formulation each shape class measured so far got, SAM 2's (256 channels, a full chunk of
    tokens) measured here in every dtype oneDNN serves."""
    verdicts = {f"oneDNN fused MLP, {_dtype_name(dtype)}": "no: " + reason if reason else "yes"
                for dtype, reason in ((d, onednn_mlp_refusal(d)) for d in ONEDNN_DTYPES)}
    generator = torch.Generator().manual_seed(0)
    for dtype in ONEDNN_DTYPES:
        if onednn_mlp_refusal(dtype) is None:
            normed, residual, w1, b1, w2, b2 = (
                (torch.randn(shape, generator=generator) / shape[-1]**0.5).to(dtype)
                for shape in ((MLP_CHUNK_TOKENS, 256), (MLP_CHUNK_TOKENS, 256), (1024, 256), (1024,),
                              (256, 1024), (256,)))
            with torch.no_grad():
                _mlp_prefers_onednn(normed, residual, w1, b1, w2, b2, None)
    threads_now = torch.get_num_threads()
    for (dtype, channels, hidden, token_class, folded, threads), (onednn, onednn_s, addmm_s) in sorted(
            _mlp_choices.items(), key=lambda item: (_dtype_name(item[0][0]),) + item[0][1:]):
        low = (1 << token_class) >> 1
        tokens = f"{low}+" if low >= MLP_CHUNK_TOKENS else f"{low}-{max(2 * low - 1, 0)}"
        gamma = "" if folded else ", gamma on the output"
        other_threads = "" if threads == threads_now else f", {threads} threads"
        verdicts[f"CXBlock MLP, {_dtype_name(dtype)}, {channels}->{hidden}, {tokens} tokens{gamma}{other_threads}"] = (
            f"{'oneDNN' if onednn else 'addmm'} (measured: oneDNN {onednn_s * 1e3:.3g} ms, addmm "
            f"{addmm_s * 1e3:.3g} ms)")
    return verdicts


def _onednn_fuses(normed: torch.Tensor, activation: torch.nn.Module) -> bool:
    # oneDNN's fused ops have no autograd formula and are not for compilers to trace (the probe
    # is asked last, so never while tracing).
    return (normed.device.type == "cpu" and normed.dtype in ONEDNN_DTYPES and is_exact_gelu(activation)
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and onednn_mlp_refusal(normed.dtype) is None)


def _onednn_mlp(normed: torch.Tensor, residual: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                w2: torch.Tensor, b2: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + (GELU(normed @ w1^T + b1) @ w2^T + b2) [* scale]`` as two oneDNN GEMMs with
    the bias and GELU, then the bias and (without ``scale``) the residual, in their epilogues: no
    bias broadcast copies, no separate passes over the 4x-wide hidden or (without ``scale``) the
    output. Chunks of ``MLP_CHUNK_TOKENS`` bound the hidden's size at large batches."""
    linear = torch.ops.mkldnn._linear_pointwise
    chunks = []
    for start in range(0, max(normed.shape[0], 1), MLP_CHUNK_TOKENS):
        rows = slice(start, start + MLP_CHUNK_TOKENS)
        hidden = linear(normed[rows], w1, b1, "gelu", [], "none")
        chunks.append(linear.binary(hidden, residual[rows], w2, b2, "add") if scale is None
                      else torch.addcmul(residual[rows], linear(hidden, w2, b2, "none", [], ""), scale))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def out_proj(x: torch.Tensor, layer: Optional[Pointwise]) -> torch.Tensor:
    """Tokens (B, H, W, C) -> NCHW output (B, N, H, W), contiguous; the 1x1 conv if any."""
    batch, height, width, channels = x.shape
    tokens = x.view(batch, height * width, channels)
    if layer is None:
        return tokens.transpose(1, 2).reshape(batch, channels, height, width).contiguous()
    weight, bias = _matrix(layer.weight, x.dtype), _cast(layer.bias, x.dtype)[:, None]
    # W @ X^T writes channels-first directly: no transpose pass over the output. Without grad the
    # bias is the GEMM's accumulator (no separate pass adding it: 1.4-2.9x faster than matmul +
    # add, ahead of the reference's 1x1 conv, at SAM 2 sizes on AVX-512 and emulated AVX2); with
    # grad one GEMM over the whole batch keeps the weight's gradient a single reduction (through
    # the batch-expanded weight, bf16 gradients upstream drifted past their bound on AVX2).
    if torch.is_grad_enabled():
        out = torch.matmul(weight, tokens.transpose(1, 2)) + bias
    else:
        out = torch.baddbmm(bias, weight.expand(batch, -1, -1), tokens.transpose(1, 2))
    return out.view(batch, weight.shape[0], height, width)
