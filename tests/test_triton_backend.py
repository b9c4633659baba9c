"""The ``triton`` backend (``kernels/`` through ``memenc_fast/backends/triton/``).

Without a GPU the kernels run on the CPU in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported): each op against the torch op on the module's live
parameters (the float64 torch op as the oracle, the same-dtype torch op as the bar), with the
parameters in the activations' dtype or in another one (fp32 parameters under bf16/fp16 autocast
above all); the launch configurations GPUs get (``for_interpreter=False``, A100 and H100 limits,
the MLP's hidden split across programs); that every chooser fills a wave of each report GPU's SMs
at B=1 within its shared memory; the whole module against the float64 reference; the custom ops'
fakes and one traced call per kernel op under torch.compile; which ops the backend refuses and
why, per GPU generation; the torch op where a GPU refuses a launch; input errors; that every
launch the kernel report compiles binds its kernel's arguments (``kernels/`` importing nothing
of the rest of the package is ``test_layout``'s); each op's precision taken from the TF32 flag its
reference layer obeys, and the fp32 tensor-core blockings TF32 runs; the MLP split's cost model,
the split MLP rerun alone, views into larger tensors. Outputs are poisoned (NaN) before every
run; fp32 runs with torch's TF32 flags off but where a test sets them.

GPU part (``requires_cuda``): full SAM 2 size, B in {1, 8}, fp32/bf16/fp16 and fp32 parameters
under bf16 autocast, each op and the module, each op under each combination of the TF32 flags, a
side stream.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import warnings
from dataclasses import replace
from typing import Iterator, Optional, Tuple

import pytest
import torch

import memenc_fast as mf
from memenc_fast import gpus
from memenc_fast.backends import kernel_args, torch_ops, triton_interpreted
from memenc_fast.structure import Structure, read_structure
from memenc_fast.tools import bench, kernel_report
from memenc_fast.numerics import judge, relative_error

from helpers import PRESETS, build_encoder, make_inputs, reference_outputs, requires_cuda, tf32_settings

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources, PTXASError  # noqa: E402
if not torch.cuda.is_available() and not triton_interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)

from memenc_fast.backends import triton as triton_ops  # noqa: E402
from memenc_fast.backends.kernel_args import poison_outputs  # noqa: E402
from memenc_fast.backends.triton import _common as triton_common  # noqa: E402
from memenc_fast.backends.triton._common import device_spec  # noqa: E402
from memenc_fast.kernels import cxblock as cx  # noqa: E402
from memenc_fast.kernels import mask_downsample as md  # noqa: E402
from memenc_fast.kernels import out_proj as op  # noqa: E402
from memenc_fast.kernels import proj_add as pa  # noqa: E402
from memenc_fast.kernels import _common as kernel_common  # noqa: E402
from memenc_fast.kernels._common import (  # noqa: E402
    SYSTEM_SHARED_BYTES,
    Launch,
    fits_shared_memory,
    pipelined_shared_bytes,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.gpu  # every test here runs its kernels on the GPU where there is one
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (activations, parameters): one dtype, and parameters in another (fp32 under autocast above all).
DTYPE_PAIRS = [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                          (torch.float32, torch.bfloat16)]
A100, H100 = gpus.TARGETS["sm_80"], gpus.TARGETS["sm_90a"]


@pytest.fixture(autouse=True)
def _ieee_fp32() -> Iterator[None]:
    """fp32 is held to IEEE's 1e-5 here: torch's TF32 flags off (cuDNN's is on by default), but
    in the tests that set them."""
    with tf32_settings(conv=False, matmul=False):
        yield


def _ids(value: object) -> str:
    """Test ids: dtypes by name, everything else as pytest would."""
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else str(value)


def _pair_ids(pair: Tuple[torch.dtype, torch.dtype]) -> str:
    return f"{_ids(pair[0])}-params_{_ids(pair[1])}"


SAM2_DOWNSAMPLER = dict(kernel_size=3, stride=2, padding=1, total_stride=16)
# (downsampler, mask size for 5x7 features): sam2's configs, sam2's class defaults, a 2-stage one.
GEOMETRIES = {
    "k3s2x4": (SAM2_DOWNSAMPLER, (80, 112)),
    "k3s2x4_odd": (SAM2_DOWNSAMPLER, (79, 111)),
    "k4s4x2": (dict(kernel_size=4, stride=4, padding=0, total_stride=16), (80, 112)),
    "k3s2x2": (dict(kernel_size=3, stride=2, padding=1, total_stride=4), (20, 28)),
}


def _encoder(dim: int = 32, out_dim: int = 16, seed: int = 0, downsampler: Optional[dict] = None,
             **fuser: object) -> torch.nn.Module:
    block = mf.CXBlock(dim, **{k: v for k, v in fuser.items() if k in ("kernel_size", "padding",
                                                                        "layer_scale_init_value")})
    encoder = mf.MemoryEncoder(
        out_dim, mf.MaskDownSampler(embed_dim=dim, **(downsampler or SAM2_DOWNSAMPLER)),
        mf.Fuser(block, 2, dim=dim, input_projection=bool(fuser.get("input_projection", False))),
        mf.PositionEmbeddingSine(16), in_dim=dim)
    mf.tools.presets.randomize_parameters(encoder, seed)
    return encoder.eval()


def _structure(encoder: torch.nn.Module, dtype: torch.dtype) -> Structure:
    """The op records of a copy of ``encoder`` with its parameters in ``dtype`` on DEVICE."""
    structure = read_structure(copy.deepcopy(encoder).to(device=DEVICE, dtype=dtype))
    assert structure.reason is None, structure.reason
    return structure


def _structures(encoder: torch.nn.Module, params: torch.dtype) -> Tuple[Structure, Structure]:
    """The records with parameters in ``params``, and the float64 oracle's records of the very same
    values (parameters rounded to ``params`` first, as the kernels read them)."""
    rounded = copy.deepcopy(encoder).to(params)
    return _structure(rounded, params), _structure(rounded, torch.float64)


def _check(out: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, same: torch.Tensor) -> None:
    """The project's accuracy rule against the float64 oracle; ``same`` is the same-dtype torch op."""
    assert out.dtype == dtype and out.shape == oracle.shape, (out.dtype, out.shape, oracle.shape)
    verdict = judge(out, oracle, dtype, DEVICE.type, same_dtype_ref=same, allow_tf32=False)
    assert verdict.passed, verdict.describe()


def _masks(batch: int, size: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn((batch, 1, *size), generator=generator)).to(device=DEVICE, dtype=dtype)


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------ mask path


MASK_CASES = [(name, (torch.float32, torch.float32), mode) for name in GEOMETRIES for mode in ("sigmoid", "scaled")]
MASK_CASES += [("k3s2x4", pair, mode) for pair in DTYPE_PAIRS[1:] for mode in ("sigmoid", "scaled")]


@pytest.mark.parametrize(("geometry", "dtypes", "mode"), MASK_CASES,
                         ids=lambda v: _pair_ids(v) if isinstance(v, tuple) else str(v))
def test_mask_downsample_matches_torch_op(geometry: str, dtypes: Tuple[torch.dtype, torch.dtype], mode: str) -> None:
    dtype, params = dtypes
    downsampler, size = GEOMETRIES[geometry]
    structure, structure64 = _structures(_encoder(downsampler=downsampler, seed=1), params)
    masks = _masks(3, size, dtype, seed=2)
    # SAM 2's own transform (skip_mask_sigmoid=True after sigmoid * 20 - 10) or the module's sigmoid.
    args = (True, 1.0, 0.0) if mode == "sigmoid" else (False, 20.0, -10.0)
    inputs = masks if mode == "sigmoid" else torch.sigmoid(masks)
    with poison_outputs():
        out = triton_ops.mask_downsample(inputs, structure.stages, None, *args)
    assert out.permute(0, 2, 3, 1).is_contiguous()
    oracle = torch_ops.mask_downsample(inputs.double(), structure64.stages, None, *args)
    _check(out, oracle, dtype, torch_ops.mask_downsample(inputs, structure.stages, None, *args))


@pytest.mark.parametrize(("geometry", "size", "dtypes", "device"), [
    ("k3s2x4", (32, 48), (torch.bfloat16, torch.bfloat16), H100),
    ("k3s2x4", (32, 48), (torch.bfloat16, torch.float32), A100),
    ("k3s2x2", (20, 28), (torch.float32, torch.float32), A100),
    ("k4s4x2", (80, 112), (torch.float16, torch.float32), H100),
], ids=lambda v: _pair_ids(v) if isinstance(v, tuple) and isinstance(v[0], torch.dtype) else None)
def test_mask_path_gpu_configuration_with_a_persistent_grid(geometry: str, size: tuple,
                                                            dtypes: Tuple[torch.dtype, torch.dtype],
                                                            device: object) -> None:
    """The blocking a GPU runs (several pixel blocks per stage region, K chunks sized to the
    device's shared memory) with fewer programs than tiles, so programs loop over tiles and
    reuse their scratch slots."""
    dtype, params = dtypes
    structure, structure64 = _structures(_encoder(downsampler=GEOMETRIES[geometry][0], seed=3), params)
    stages = structure.stages
    masks = _masks(3, size, dtype, seed=4)
    geom = md.MaskGeometry.of([s.weight for s in stages], stages[0].stride, stages[0].padding,
                                   [s.eps for s in stages])
    out = torch.full((3, *geom.output_size(*size)[-1], geom.channels[-1]), float("nan"), dtype=dtype,
                     device=DEVICE)
    md.plan_mask_path(masks, geom, [s.weight for s in stages], [s.bias for s in stages],
                      [s.norm_weight for s in stages], [s.norm_bias for s in stages], True, 1.0, 0.0, out, device,
                      max_programs=2, for_interpreter=False).run()
    oracle = torch_ops.mask_downsample(masks.double(), structure64.stages, None, True)
    _check(out.permute(0, 3, 1, 2), oracle, dtype, torch_ops.mask_downsample(masks, stages, None, True))


def test_mask_downsample_resizes_like_sam3_first() -> None:
    structure = _structure(_encoder(downsampler=dict(SAM2_DOWNSAMPLER, interpol_size=[48, 64]), seed=5),
                           torch.float32)
    assert structure.interpol_size() == (48, 64)
    masks = _masks(2, (40, 56), torch.float32, seed=6)
    with poison_outputs():
        out = triton_ops.mask_downsample(masks, structure.stages, structure.interpol_size(), True, 2.0, -1.0)
    expected = torch_ops.mask_downsample(masks, structure.stages, structure.interpol_size(), True, 2.0, -1.0)
    assert out.shape == (2, 256, 3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_mask_downsample_reads_broadcast_and_strided_masks() -> None:
    structure = _structure(_encoder(downsampler=GEOMETRIES["k3s2x2"][0], seed=7), torch.float32)
    base = _masks(1, (20, 56), torch.float32, seed=8)
    masks = base[..., ::2].expand(3, -1, -1, -1)  # batch stride 0, column stride 2
    with poison_outputs():
        out = triton_ops.mask_downsample(masks, structure.stages, None, True)
    torch.testing.assert_close(out, torch_ops.mask_downsample(masks.contiguous(), structure.stages, None, True),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("int64_offsets", [False, True], ids=["int32_offsets", "int64_offsets"])
def test_kernels_read_views_into_larger_tensors_as_their_contiguous_copies(int64_offsets: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Views with storage offsets and strides that are not their own shape's (a window of a
    larger mask, a channel slice of a wider pix_feat, every other channel of channels-last
    features) give exactly what their contiguous copies give, with int32 offsets within an image
    and with the int64 ones a view reaching past 2**31 elements gets (taken here by every view: a
    view that far needs gigabytes, more than a CPU test may take)."""
    if int64_offsets:
        monkeypatch.setattr(kernel_common, "INT32_REACH", 1)
    fp32 = torch.float32
    structure = _structure(_encoder(dim=32, seed=100, downsampler=GEOMETRIES["k3s2x2"][0]), fp32)
    masks = _masks(2, (26, 40), fp32, seed=101)[:, :, 3:23, 5:33]
    assert masks.storage_offset() > 0 and not masks.is_contiguous()
    with poison_outputs():
        features = triton_ops.mask_downsample(masks, structure.stages, None, True)
        assert torch.equal(features, triton_ops.mask_downsample(masks.contiguous(), structure.stages, None, True))
    pix_feat = _randn(2, 40, 5, 7, dtype=fp32, seed=102)[:, 3:35]
    channels = structure.projection.mask_weight.shape[1]
    mask_features = _randn(2, 5, 7, 2 * channels, dtype=fp32, seed=103)[..., 1::2].permute(0, 3, 1, 2)
    with poison_outputs():
        out = triton_ops.proj_add(mask_features, pix_feat, structure.projection)
        expected = triton_ops.proj_add(mask_features.contiguous(), pix_feat.contiguous(), structure.projection)
    assert torch.equal(out, expected)
    torch.testing.assert_close(out, torch_ops.proj_add(mask_features, pix_feat, structure.projection), rtol=1e-5,
                               atol=1e-5)


def test_views_reaching_past_int32_offsets_take_int64_ones() -> None:
    """Only a view whose offsets within one image reach 2**31 gets int64 offsets (they cost
    registers): the mask and proj_add's sources, planned from meta tensors."""
    def meta(shape: Tuple[int, ...], stride: Tuple[int, ...]) -> torch.Tensor:
        return torch.empty_strided(shape, stride, device="meta")

    geom = md.SAM2_GEOMETRY
    convs = [torch.empty((c_out, c_in, 3, 3), device="meta") for c_in, c_out in zip(geom.channels[:-1],
                                                                                      geom.channels[1:])]
    vectors = [torch.empty((c_out,), device="meta") for c_out in geom.channels[1:]]
    features = torch.empty((1, 64, 64, 256), device="meta")
    for masks, wide in ((meta((1, 1, 1024, 1024), (2**40, 2**40, 1024, 1)), False),
                        (meta((1, 1, 1024, 1024), (2**40, 2**40, 2**22, 1)), True)):
        launch = md.plan_mask_path(masks, geom, convs, vectors, vectors, vectors, True, 1.0, 0.0, features, H100,
                                   for_interpreter=False)
        assert launch.constexprs["WIDE"] == (wide, False, False, False)
    weight, bias = torch.empty((256, 256, 1, 1), device="meta"), torch.empty((256,), device="meta")
    pix_feat = meta((1, 256, 64, 64), (2**40, 2**24, 64, 1))  # channel 255 at 255 * 2**24
    launch = pa.plan_proj_add(features.permute(0, 3, 1, 2), pix_feat, weight, bias, weight, bias, features, H100,
                              for_interpreter=False)
    assert (launch.constexprs["WIDE_A"], launch.constexprs["WIDE_C"]) == (False, True)


# ------------------------------------------------------------------------------ proj_add, out_proj


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_pair_ids)
@pytest.mark.parametrize("dim", [32, 48])
def test_proj_add_matches_torch_op(dtypes: Tuple[torch.dtype, torch.dtype], dim: int) -> None:
    dtype, params = dtypes
    structure, structure64 = _structures(_encoder(dim=dim, seed=9), params)
    # The mask path's channels-last features and a broadcast NCHW pix_feat, as the module passes them.
    mask_features = _randn(3, 5, 7, 256, dtype=dtype, seed=10).permute(0, 3, 1, 2)
    pix_feat = _randn(1, dim, 5, 7, dtype=dtype, seed=11).expand(3, -1, -1, -1)
    with poison_outputs():
        out = triton_ops.proj_add(mask_features, pix_feat, structure.projection)
    assert out.shape == (3, 5, 7, dim) and out.is_contiguous()
    oracle = torch_ops.proj_add(mask_features.double(), pix_feat.double(), structure64.projection)
    _check(out, oracle, dtype, torch_ops.proj_add(mask_features, pix_feat, structure.projection))


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_pair_ids)
def test_out_proj_matches_torch_op(dtypes: Tuple[torch.dtype, torch.dtype]) -> None:
    dtype, params = dtypes
    structure, structure64 = _structures(_encoder(dim=48, out_dim=20, seed=12), params)
    x = _randn(3, 5, 7, 48, dtype=dtype, seed=13)
    with poison_outputs():
        out = triton_ops.out_proj(x, structure.out_projection)
    assert out.shape == (3, 20, 5, 7) and out.is_contiguous()
    _check(out, torch_ops.out_proj(x.double(), structure64.out_projection), dtype,
           torch_ops.out_proj(x, structure.out_projection))


def test_out_proj_identity_is_a_layout_change() -> None:
    x = _randn(2, 3, 5, 16, dtype=torch.bfloat16, seed=14)
    out = triton_ops.out_proj(x, None)
    assert out.is_contiguous() and torch.equal(out, x.permute(0, 3, 1, 2))


@pytest.mark.parametrize(("dtypes", "device"), [((torch.float32, torch.float32), H100),
                                                ((torch.bfloat16, torch.bfloat16), H100),
                                                ((torch.bfloat16, torch.float32), A100),
                                                ((torch.float16, torch.float32), H100)],
                         ids=lambda v: _pair_ids(v) if isinstance(v, tuple) else None)
def test_pointwise_gpu_configuration(dtypes: Tuple[torch.dtype, torch.dtype], device: object) -> None:
    dtype, params = dtypes
    structure, structure64 = _structures(_encoder(dim=64, out_dim=24, seed=15), params)
    mask_features = _randn(2, 9, 11, 256, dtype=dtype, seed=16).permute(0, 3, 1, 2)
    pix_feat = _randn(2, 64, 9, 11, dtype=dtype, seed=17)
    projection = structure.projection
    tokens = torch.full((2, 9, 11, 64), float("nan"), dtype=dtype, device=DEVICE)
    pa.plan_proj_add(mask_features, pix_feat, *projection, tokens, device, for_interpreter=False).run()
    oracle = torch_ops.proj_add(mask_features.double(), pix_feat.double(), structure64.projection)
    _check(tokens, oracle, dtype, torch_ops.proj_add(mask_features, pix_feat, projection))
    out = torch.full((2, 24, 9, 11), float("nan"), dtype=dtype, device=DEVICE)
    op.plan_out_proj(tokens, *structure.out_projection, out, device, for_interpreter=False).run()
    _check(out, torch_ops.out_proj(tokens.double(), structure64.out_projection), dtype,
           torch_ops.out_proj(tokens, structure.out_projection))


# ------------------------------------------------------------------------------ CXBlock


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_pair_ids)
@pytest.mark.parametrize("dim", [32, 48])
def test_cxblock_matches_torch_op(dtypes: Tuple[torch.dtype, torch.dtype], dim: int) -> None:
    dtype, params = dtypes
    structure, structure64 = _structures(_encoder(dim=dim, seed=18), params)
    x = _randn(3, 5, 7, dim, dtype=dtype, seed=19)
    with poison_outputs():
        out = triton_ops.cxblock(x, structure.blocks[0])
    assert out.is_contiguous()
    _check(out, torch_ops.cxblock(x.double(), structure64.blocks[0]), dtype, torch_ops.cxblock(x, structure.blocks[0]))


def test_cxblock_without_gamma_and_with_a_5x5_dwconv() -> None:
    structure, structure64 = _structures(_encoder(dim=32, seed=20, kernel_size=5, padding=2,
                                                  layer_scale_init_value=0.0), torch.float32)
    block = structure.blocks[1]
    assert block.gamma is None and tuple(block.dw_weight.shape[-2:]) == (5, 5)
    x = _randn(3, 6, 5, 32, dtype=torch.float32, seed=21)
    with poison_outputs():
        out = triton_ops.cxblock(x, block)
    _check(out, torch_ops.cxblock(x.double(), structure64.blocks[1]), torch.float32, torch_ops.cxblock(x, block))


@pytest.mark.parametrize("dtypes", [pair for pair in DTYPE_PAIRS if pair[0] != torch.float32], ids=_pair_ids)
def test_cxblock_out_proj_matches_torch_ops(dtypes: Tuple[torch.dtype, torch.dtype]) -> None:
    dtype, params = dtypes
    structure, structure64 = _structures(_encoder(dim=48, out_dim=20, seed=22), params)
    x = _randn(3, 5, 7, 48, dtype=dtype, seed=23)
    with poison_outputs():
        out = triton_ops.cxblock_out_proj(x, structure.blocks[1], structure.out_projection)
    assert out.shape == (3, 20, 5, 7) and out.is_contiguous()
    oracle = torch_ops.out_proj(torch_ops.cxblock(x.double(), structure64.blocks[1]), structure64.out_projection)
    same = torch_ops.out_proj(torch_ops.cxblock(x, structure.blocks[1]), structure.out_projection)
    _check(out, oracle, dtype, same)


# An H100 with 8 SMs: the MLP's 16 hidden chunks of fp32 split 4 ways (not 16, which costs the
# interpreter as many programs).
EIGHT_SM_H100 = gpus.GpuSpec("8-SM H100", (9, 0), 8, H100.shared_memory_per_block)


@pytest.mark.parametrize(("dtypes", "device"), [((torch.float32, torch.float32), EIGHT_SM_H100),
                                                ((torch.bfloat16, torch.bfloat16), H100),
                                                ((torch.bfloat16, torch.float32), A100),
                                                ((torch.float16, torch.float32), EIGHT_SM_H100)],
                         ids=lambda v: _pair_ids(v) if isinstance(v, tuple) else None)
def test_cxblock_gpu_configuration(dtypes: Tuple[torch.dtype, torch.dtype], device: object) -> None:
    """The GPUs' MLP blocking (several hidden chunks, BH sized to the device's shared memory;
    fp32's K chunks; the 2 token tiles of 70 tokens leave SMs idle, so the hidden is split across
    programs, whose shares the last one sums) and dwconv tiles, on a token count that leaves a
    partial last tile, with the out_proj epilogue where it is fused."""
    dtype, params = dtypes
    structure, structure64 = _structures(_encoder(dim=64, out_dim=24, seed=24), params)
    block, block64 = structure.blocks[0], structure64.blocks[0]
    layer = structure.out_projection if cx.fuses_out_proj(dtype, params, device) else None
    x = _randn(2, 5, 7, 64, dtype=dtype, seed=25)
    normed = torch.full_like(x, float("nan"))
    out = torch.full((2, 24, 5, 7) if layer else x.shape, float("nan"), dtype=dtype, device=DEVICE)
    launches = cx.plan_block(x, block.dw_weight, block.dw_bias, block.padding, block.norm_weight, block.norm_bias,
                             block.eps, block.w1, block.b1, block.w2, block.b2, block.gamma, *(layer or (None, None)),
                             normed, out, device, for_interpreter=False)
    assert launches[1].grid[1] > 1, launches[1].config
    for launch in launches:
        launch.run()
    oracle, same = torch_ops.cxblock(x.double(), block64), torch_ops.cxblock(x, block)
    if layer:
        oracle = torch_ops.out_proj(oracle, structure64.out_projection)
        same = torch_ops.out_proj(same, layer)
    _check(out, oracle, dtype, same)


# ------------------------------------------------------------------------------ configurations


def test_choosers_size_pipelines_to_the_weights_dtype_and_the_device() -> None:
    """fp32 weights under bf16 autocast take twice the shared memory of bf16 ones: on an A100 the
    MLP takes narrower hidden chunks, on a small device the mask path's last stage smaller K
    chunks, and every configuration's estimate stays within its device's limit (the kernel report
    checks the compiled sizes)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    assert device_spec(torch.device("cpu")) == H100  # what CPU tests plan for is what the report compiles
    assert cx.choose_mlp_config(4096, 256, 1024, bf16, bf16, A100).bh == 64
    assert cx.choose_mlp_config(4096, 256, 1024, bf16, fp32, H100).bh == 64
    assert cx.choose_mlp_config(4096, 256, 1024, bf16, fp32, A100).bh == 32
    tight = gpus.GpuSpec("tight", (8, 6), 40, 96 * 1024)
    for device in (A100, H100, tight):
        for weights in (bf16, fp32):
            mlp = cx.choose_mlp_config(4096, 256, 1024, bf16, weights, device)
            assert fits_shared_memory(cx.mlp_shared_bytes(mlp, 256, bf16, weights), device)
            pw = pa.choose_config(64, 4096, 256, bf16, weights, device)
            tiles = [(pw.bm * pw.bk, bf16), (pw.bk * pw.bn, weights)]
            assert pw.num_stages >= 2 and fits_shared_memory(pipelined_shared_bytes(pw.num_stages, bf16, tiles), device)
    assert pa.choose_config(64, 4096, 256, bf16, bf16, tight).num_stages == 2
    assert md.choose_config(md.SAM2_GEOMETRY, 64, (64, 64), bf16, bf16, tight).bk[-1] == 64
    assert md.choose_config(md.SAM2_GEOMETRY, 64, (64, 64), bf16, fp32, tight).bk[-1] == 32


SAM_SHAPES = {"sam2": (1024, 64), "sam3": (1152, 72)}  # (mask size, feature size) per object


def _sam_launches(shape: str, batch: int, dtype: torch.dtype, device: gpus.GpuSpec, tf32: bool = False) -> list:
    """Every launch of one forward at SAM 2's or SAM 3's size, as planned for ``device`` (with
    TF32 allowed to every op by ``tf32``)."""
    def meta(*size: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device="meta")

    mask, side = SAM_SHAPES[shape]
    geom = md.SAM2_GEOMETRY
    convs = [meta(c_out, c_in, 3, 3) for c_in, c_out in zip(geom.channels[:-1], geom.channels[1:])]
    vectors = [meta(c_out) for c_out in geom.channels[1:]]
    tokens = meta(batch, side, side, 256)
    launches = [md.plan_mask_path(meta(batch, 1, mask, mask), geom, convs, vectors, vectors, vectors, True, 1.0, 0.0,
                                  tokens, device, for_interpreter=False, tf32=tf32),
                pa.plan_proj_add(tokens.permute(0, 3, 1, 2), meta(batch, 256, side, side), meta(256, 256, 1, 1),
                                 meta(256), meta(256, 256, 1, 1), meta(256), tokens, device, for_interpreter=False,
                                 tf32=tf32)]
    block = (meta(256, 1, 7, 7), meta(256), (3, 3), meta(256), meta(256), 1e-6, meta(1024, 256), meta(1024),
             meta(256, 1024), meta(256), meta(256))
    launches += cx.plan_block(tokens, *block, None, None, tokens, tokens, device, for_interpreter=False, tf32=tf32)
    launches += cx.plan_block(tokens, *block, meta(64, 256, 1, 1), meta(64), tokens, meta(batch, 64, side, side),
                              device, for_interpreter=False, tf32=tf32, out_tf32=tf32)[1:]
    launches.append(op.plan_out_proj(tokens, meta(64, 256, 1, 1), meta(64), meta(batch, 64, side, side), device,
                                     for_interpreter=False, tf32=tf32))
    return launches


@pytest.mark.parametrize("device", gpus.REPORT_GPUS, ids=lambda gpu: gpu.name)
def test_every_kernel_fills_a_wave_at_b1_within_the_gpus_shared_memory(device: gpus.GpuSpec) -> None:
    """SAM 2.1 encodes one object per call (and SAM 3 few): at B=1 every launch of a forward, at
    SAM 2's 64x64 and SAM 3's 72x72 features, gives each SM of each GPU users run a program (or
    says why a smaller grid is faster), and the configurations' shared-memory estimates fit the
    GPU (the kernel report checks the compiled kernels); fp32 with IEEE and with TF32 dots."""
    cases = [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True)]
    for shape in SAM_SHAPES:
        for dtype, tf32 in cases:
            for launch in _sam_launches(shape, 1, dtype, device, tf32):
                assert launch.programs >= device.sm_count or launch.small_grid_reason, (
                    shape, dtype, tf32, launch.kernel, launch.config, launch.grid)
    bf16, fp32 = torch.bfloat16, torch.float32
    for compute, weights, tf32 in ((bf16, bf16, False), (bf16, fp32, False), (fp32, fp32, True)):
        mlp = cx.choose_mlp_config(4096, 256, 1024, compute, weights, device, tf32)
        # The estimate is of the tensor-core loop (whole channel rows staged); sm_75 has no TF32.
        assert fits_shared_memory(cx.mlp_shared_bytes(mlp, 256, compute, weights), device) or (
            tf32 and mlp.bk is not None and device.capability < (8, 0))


def test_mlp_split_weighs_rounds_of_programs_against_the_shares_traffic() -> None:
    """The hidden is split where the SMs' time saved outweighs the fp32 shares' traffic: on an
    H100 at B=1 (64 tiles) 2 ways (128 programs, 16 MiB of shares) rather than the 4 that fill
    its 132 SMs (256 programs in 2 rounds, 32 MiB); not on an A100 (108 SMs: a 2-way split runs
    2 rounds of half tiles); on an L4 (58 SMs) 2 ways (3 rounds of half tiles beat 2 of whole
    ones); not from B=2 on an H100; on a GPU with SMs to spare, fewer splits than fill it; none
    whose shares outgrow the L2."""
    bf16, fp32 = torch.bfloat16, torch.float32
    h100 = cx.choose_mlp_config(4096, 256, 1024, bf16, bf16, H100)
    assert (h100.bh, h100.split) == (64, 2)
    assert cx.share_traffic_bytes(h100, 4096, 256) == 2 * 8 * 2**20  # 8 MiB stored, then read back
    assert cx.share_traffic_bytes(replace(h100, split=4), 4096, 256) == 2 * 16 * 2**20
    assert cx.share_traffic_bytes(replace(h100, split=1), 4096, 256) == 0
    assert cx.choose_mlp_config(4096, 256, 1024, fp32, fp32, H100, tf32=True).split == 2
    assert cx.choose_mlp_config(4096, 256, 1024, bf16, bf16, A100).split == 1
    assert cx.choose_mlp_config(4096, 256, 1024, bf16, bf16, gpus.TARGETS["sm_89"]).split == 2  # L4
    for batch in (2, 8, 64):
        assert cx.choose_mlp_config(batch * 4096, 256, 1024, bf16, bf16, H100).split == 1, batch
    wide = gpus.GpuSpec("512-SM", (9, 0), 512, H100.shared_memory_per_block, H100.l2_bytes)
    assert cx.choose_mlp_config(4096, 256, 1024, bf16, bf16, wide).split == 2  # 8 would fill it
    # Shares beyond the L2 are not priced, not chosen: a T4's 4 MiB against a 2-way split's 8 MiB.
    t4 = gpus.TARGETS["sm_75"]
    assert cx.choose_mlp_config(4096, 256, 1024, torch.float16, torch.float16, t4).split == 1
    assert cx.choose_mlp_config(4096, 256, 1024, fp32, fp32, replace(t4, l2_bytes=64 * 2**20)).split > 1


def test_mlp_launch_says_its_split_its_traffic_and_why_its_grid_is_small() -> None:
    """What the kernel report shows of the MLP (config: split and shares' traffic; grid: waves;
    the reason for a grid under a wave), and ``forced_mlp_split``, which ``bench --ops`` uses to
    time the MLP with other splits."""
    def mlp(device: gpus.GpuSpec) -> Launch:
        return _sam_launches("sam2", 1, torch.bfloat16, device)[3]

    planned = mlp(H100)
    assert planned.kernel == "cxblock_mlp" and planned.grid == (64, 2)
    assert planned.config == "BM=64 BH=64 split=2 w8 s2 shares=16.0MiB W=bf16"
    assert planned.small_grid_reason == ("filling 132 SMs takes a 4-way split of the hidden, whose 32.0 MiB of "
                                         "fp32 shares cost more than the idle SMs")
    assert mlp(A100).config == "BM=64 BH=64 w8 s2 W=bf16" and "2-way split" in mlp(A100).small_grid_reason
    assert mlp(gpus.TARGETS["sm_86"]).small_grid_reason == (
        "filling 72 SMs takes a 2-way split of the hidden, whose 8.0 MiB of fp32 shares outgrow the 6 MiB L2")
    for split, config in ((1, "BM=64 BH=64 w8 s2 W=bf16"), (4, "BM=64 BH=64 split=4 w8 s2 shares=32.0MiB W=bf16"),
                          (64, "BM=64 BH=64 split=16 w8 s2 shares=128.0MiB W=bf16")):
        with cx.forced_mlp_split(split):
            forced = mlp(H100)
        assert forced.config == config and forced.grid == (64, min(split, 16)), split
    assert mlp(H100).config == planned.config
    with pytest.raises(ValueError, match="split must be at least 1; got 0"):
        with cx.forced_mlp_split(0):
            pass


def test_bench_ops_times_the_triton_mlp_under_each_split() -> None:
    """``bench --ops`` rows for the triton cxblock: the cost model's split, then each forced one."""
    settings = bench._op_settings("triton", "cxblock")
    assert list(settings) == ["cxblock"] + [f"cxblock split={split}" for split in bench.MLP_SPLITS]
    for row, setting in settings.items():
        with setting():
            launch = _sam_launches("sam2", 1, torch.bfloat16, H100)[3]
        assert launch.grid == (64, 2 if row == "cxblock" else int(row.rsplit("=", 1)[1])), row
    assert list(bench._op_settings("torch", "cxblock")) == ["cxblock"]
    assert list(bench._op_settings("triton", "proj_add")) == ["proj_add"]


def test_split_mlp_launch_reruns_alone() -> None:
    """The last program of each token tile sets the tile's arrival count back to zero after its
    epilogue: the MLP launch rerun alone (a benchmark of one op, a reused plan), without the
    dwconv kernel zeroing the counts first, writes its output again."""
    structure, structure64 = _structures(_encoder(dim=64, out_dim=24, seed=98), torch.float32)
    block, block64 = structure.blocks[0], structure64.blocks[0]
    x = _randn(2, 5, 7, 64, dtype=torch.float32, seed=99)
    normed, out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    dwconv, mlp = cx.plan_block(x, block.dw_weight, block.dw_bias, block.padding, block.norm_weight,
                                block.norm_bias, block.eps, block.w1, block.b1, block.w2, block.b2, block.gamma, None,
                                None, normed, out, EIGHT_SM_H100, for_interpreter=False)
    assert mlp.grid == (2, 4), mlp.config
    counts = mlp.args["count_ptr"]
    oracle, same = torch_ops.cxblock(x.double(), block64), torch_ops.cxblock(x, block)
    dwconv.run()
    mlp.run()
    _check(out, oracle, torch.float32, same)
    assert torch.equal(counts, torch.zeros_like(counts))
    out.fill_(float("nan"))
    mlp.run()
    _check(out, oracle, torch.float32, same)


def test_shared_memory_model_matches_the_compiled_pointwise_kernel() -> None:
    """The estimate against the cubins of the pointwise kernel (sm_90a, triton 3.6 and 3.9 alike,
    less the 1 KiB the system reserves): BM=64 BN=128 BK=64 s3 with bf16 weights, BM=64 BN=64
    BK=64 s3 with fp32 weights and bf16 activations."""
    bf16, fp32 = torch.bfloat16, torch.float32
    assert pipelined_shared_bytes(3, bf16, [(64 * 64, bf16), (64 * 128, bf16)]) == 74752 - SYSTEM_SHARED_BYTES
    assert pipelined_shared_bytes(3, bf16, [(64 * 64, bf16), (64 * 64, fp32)]) == 66560 - SYSTEM_SHARED_BYTES


# ------------------------------------------------------------------------------ the module


def _run(encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor, backend: str, **kwargs):
    with torch.no_grad(), mf.use_backend(backend), poison_outputs():
        return encoder(pix_feat, masks, **kwargs)


def _check_module(encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor, dtype: torch.dtype,
                  **kwargs) -> Optional[str]:
    """Runs ``encoder`` on triton, judges it against the float64 reference, and returns what the
    triton run said it left to torch ops (``last_backend_reason``)."""
    out = _run(encoder, pix_feat, masks, "triton", **kwargs)
    assert encoder.last_backend == "triton"
    reason = encoder.last_backend_reason
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64, **kwargs)["vision_features"]
    same = _run(encoder, pix_feat, masks, "reference", **kwargs)
    feats = out["vision_features"]
    assert feats.is_contiguous()
    verdict = judge(feats, oracle, dtype, DEVICE.type, same_dtype_ref=same["vision_features"], allow_tf32=False)
    assert verdict.passed, verdict.describe()
    assert torch.equal(out["vision_pos_enc"][0], same["vision_pos_enc"][0])
    return reason


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_module_matches_reference(dtype: torch.dtype, skip_mask_sigmoid: bool) -> None:
    encoder = _encoder(dim=32, out_dim=16, seed=26).to(device=DEVICE, dtype=dtype)
    pix_feat = _randn(3, 32, 5, 7, dtype=dtype, seed=27)
    masks = _masks(3, (80, 112), dtype, seed=28)
    _check_module(encoder, pix_feat, masks, dtype, skip_mask_sigmoid=skip_mask_sigmoid)


def test_module_other_structures_and_caller_transform() -> None:
    """sam2's class-default downsampler, a fuser input projection, an Identity out_proj, no gamma,
    a 5x5 dwconv, SAM 2's sigmoid*20-10 as mask_scale/mask_bias and a broadcast mask."""
    encoder = _encoder(dim=32, out_dim=32, seed=29, downsampler=GEOMETRIES["k4s4x2"][0], kernel_size=5,
                       padding=2, layer_scale_init_value=0.0, input_projection=True).to(DEVICE)
    assert isinstance(encoder.out_proj, torch.nn.Identity)
    encoder.mask_scale, encoder.mask_bias = 20.0, -10.0
    pix_feat = _randn(3, 32, 5, 7, dtype=torch.float32, seed=30)
    _check_module(encoder, pix_feat, _masks(1, (80, 112), torch.float32, seed=31), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_ids)
def test_module_under_autocast_with_fp32_parameters(dtype: torch.dtype) -> None:
    """SAM 2's usual case: fp32 parameters, bf16/fp16 autocast; the kernels read the fp32
    parameters as stored and round them as the reference's casts do."""
    encoder = _encoder(dim=32, out_dim=16, seed=32).to(DEVICE)
    pix_feat = _randn(2, 32, 5, 7, dtype=torch.float32, seed=33)
    masks = _masks(2, (80, 112), torch.float32, seed=34)
    with torch.autocast(DEVICE.type, dtype=dtype):
        out = _run(encoder, pix_feat, masks, "triton")["vision_features"]
        assert encoder.last_backend == "triton"
        same = _run(encoder, pix_feat, masks, "reference")["vision_features"]
    assert encoder.pix_feat_proj.weight.dtype == torch.float32
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    assert out.dtype == same.dtype == dtype
    verdict = judge(out, oracle, dtype, DEVICE.type, same_dtype_ref=same)
    assert verdict.passed, verdict.describe()


def test_module_reads_parameters_changed_in_place() -> None:
    """No copies of the weights: an in-place update and a .data swap reach the next forward."""
    encoder = _encoder(dim=32, out_dim=16, seed=35).to(DEVICE)
    pix_feat = _randn(2, 32, 5, 7, dtype=torch.float32, seed=36)
    masks = _masks(2, (80, 112), torch.float32, seed=37)
    _run(encoder, pix_feat, masks, "triton")
    with torch.no_grad():
        encoder.fuser.layers[1].pwconv2.weight.mul_(-2.0)
        conv = encoder.mask_downsampler.encoder[3]
        conv.weight.data = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(80)).to(DEVICE) / 3
    _check_module(encoder, pix_feat, masks, torch.float32)


def test_module_resizes_like_sam3() -> None:
    encoder = _encoder(dim=32, out_dim=16, seed=38, downsampler=dict(SAM2_DOWNSAMPLER, interpol_size=[96, 112]))
    encoder = encoder.to(DEVICE)
    pix_feat = _randn(2, 32, 6, 7, dtype=torch.float32, seed=39)
    _check_module(encoder, pix_feat, _masks(2, (80, 100), torch.float32, seed=40), torch.float32)


def test_sam2_channels_module_matches_reference() -> None:
    """SAM 2's channel widths (1 -> 4 -> 16 -> 64 -> 256 mask stages, dim 256, hidden 1024,
    out_dim 64) in bf16 at B=1, at an eighth of SAM 2's spatial size (128x128 masks, 8x8
    features): every kernel runs its SAM 2 blocking over whole channel rows, in a few seconds of
    interpreter; the full size runs in the GPU tests."""
    preset = PRESETS["small"]
    encoder = build_encoder(preset, seed=41, dtype=torch.bfloat16, device=DEVICE)
    pix_feat, masks = make_inputs(preset, 1, seed=42, dtype=torch.bfloat16, device=DEVICE)
    _check_module(encoder, pix_feat, masks, torch.bfloat16)


# ------------------------------------------------------------------------------ custom ops, compile


def _op_samples(dtype: torch.dtype) -> dict:
    """Small inputs for each custom op, parameters from a tiny encoder in ``dtype``."""
    encoder = _encoder(dim=16, out_dim=24, seed=43, downsampler=GEOMETRIES["k3s2x2"][0]).requires_grad_(False)
    structure = _structure(encoder, dtype)
    stages, block, layer = structure.stages, structure.blocks[0], structure.out_projection
    x = _randn(1, 3, 5, 16, dtype=dtype, seed=44)
    block_args = (x, block.dw_weight, block.dw_bias, list(block.padding), block.norm_weight, block.norm_bias,
                  float(block.eps), block.w1, block.b1, block.w2, block.b2, block.gamma)
    return {
        "triton_mask_downsample": (_masks(1, (12, 20), dtype, seed=45), [s.weight for s in stages],
                                   [s.bias for s in stages], [s.norm_weight for s in stages],
                                   [s.norm_bias for s in stages], [float(s.eps) for s in stages], [2, 2], [1, 1],
                                   True, 1.0, 0.0),
        "triton_proj_add": (_randn(1, 16, 3, 5, dtype=dtype, seed=46), _randn(1, 16, 3, 5, dtype=dtype, seed=47),
                            *structure.projection),
        "triton_cxblock": block_args,
        "triton_cxblock_out_proj": (*block_args, *layer),
        "triton_out_proj": (x, *layer),
    }


@pytest.mark.parametrize("name", ["triton_mask_downsample", "triton_proj_add", "triton_cxblock",
                                  "triton_cxblock_out_proj", "triton_out_proj"])
def test_custom_ops_pass_opcheck(name: str) -> None:
    """Schema, fake (shapes, dtypes, strides against the real kernel) and AOT dispatch of each op."""
    args = _op_samples(torch.bfloat16)[name]
    torch.library.opcheck(getattr(torch.ops.memenc_fast, name).default, args)


def test_compiled_module_calls_one_custom_op_per_kernel_op() -> None:
    """torch.compile(fullgraph=True) traces the pipeline: one custom-op call per op, no graph
    break, the fused last block in bf16, and the same result as eager."""
    torch._dynamo.reset()
    graphs = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm.code)
        return gm.forward

    encoder = _encoder(dim=32, out_dim=16, seed=48).to(device=DEVICE, dtype=torch.bfloat16)
    pix_feat = _randn(2, 32, 5, 7, dtype=torch.bfloat16, seed=49)
    masks = _masks(2, (80, 112), torch.bfloat16, seed=50)
    with torch.no_grad(), mf.use_backend("triton"):
        expected = encoder(pix_feat, masks)["vision_features"]
        out = torch.compile(encoder, fullgraph=True, backend=recording)(pix_feat, masks)["vision_features"]
    assert len(graphs) == 1, graphs
    calls = {name: graphs[0].count(f"memenc_fast.{name}.default") for name in
             ("triton_mask_downsample", "triton_proj_add", "triton_cxblock", "triton_cxblock_out_proj",
              "triton_out_proj")}
    assert calls == {"triton_mask_downsample": 1, "triton_proj_add": 1, "triton_cxblock": 1,
                     "triton_cxblock_out_proj": 1, "triton_out_proj": 0}, calls
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------ refusals, errors


def test_unsupported_ops_say_why_and_run_as_torch_ops(caplog: pytest.LogCaptureFixture) -> None:
    """Five mask stages, dim 320 and a tanh GELU: the backend refuses the mask path and the block
    (once, for the structure), the module still runs on triton for the rest and matches."""
    encoder = _encoder(dim=320, out_dim=16, seed=51, downsampler=dict(kernel_size=3, stride=2, padding=1,
                                                                      total_stride=32)).to(DEVICE)
    structure = read_structure(encoder)
    refused = triton_ops.unsupported_ops(structure, DEVICE, torch.float32)
    assert refused["mask_downsample"] == "the kernel unrolls at most 4 stages; this downsampler has 5"
    assert refused["cxblock"] == "block 0 has dim 320; the MLP kernel holds at most 256 channels"
    assert refused["cxblock_out_proj"] == refused["cxblock"] and "proj_add" not in refused
    with caplog.at_level(logging.INFO, logger="memenc_fast"):
        reason = _check_module(encoder, _randn(2, 320, 2, 3, dtype=torch.float32, seed=52),
                               _masks(2, (64, 96), torch.float32, seed=53), torch.float32)
    assert "mask_downsample runs the torch op: the kernel unrolls at most 4 stages" in caplog.text
    assert "cxblock runs the torch op: block 0 has dim 320" in reason

    tanh = _encoder(seed=54)
    tanh.fuser.layers[1].act = torch.nn.GELU(approximate="tanh")
    tanh.mask_downsampler.encoder[2] = torch.nn.GELU(approximate="tanh")
    refused = triton_ops.unsupported_ops(read_structure(tanh), DEVICE, torch.bfloat16)
    assert refused["mask_downsample"] == "stage 0's activation is not exact GELU, the one the kernel fuses"
    assert refused["cxblock"] == "block 1's activation is not exact GELU, the one the kernel fuses"


def test_unsupported_ops_leave_out_proj_unfused_where_it_does_not_fuse() -> None:
    structure = read_structure(_encoder(seed=55))
    assert triton_ops.unsupported_ops(structure, DEVICE, torch.bfloat16) == {}
    assert set(triton_ops.unsupported_ops(structure, DEVICE, torch.float32)) == {"cxblock_out_proj"}
    identity = read_structure(_encoder(dim=32, out_dim=32, seed=56))
    assert triton_ops.unsupported_ops(identity, DEVICE, torch.bfloat16) == {
        "cxblock_out_proj": "out_proj is an Identity: there is nothing to fuse"}


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """Makes ``cuda`` devices look like the given GpuSpec to the backend (no GPU needed)."""
    def use(spec: gpus.GpuSpec) -> torch.device:
        monkeypatch.setattr(triton_common, "gpu_spec", lambda device: spec)
        return torch.device("cuda", 0)

    return use


def test_gpus_without_bf16_or_tensor_cores_are_refused_or_passed_over(fake_gpu) -> None:
    structure = read_structure(_encoder(seed=80))
    t4 = fake_gpu(gpus.TARGETS["sm_75"])
    refused = triton_ops.unsupported_ops(structure, t4, torch.bfloat16)
    assert refused == {op: "bf16 needs sm_80; this is sm_75 (T4)" for op in mf.dispatch.OPS}
    assert triton_ops.auto_skip_reason(t4, torch.float16) == (
        "Triton has no tensor-core code for sm_75 (T4): its float16 dots run on CUDA cores")
    assert triton_ops.auto_skip_reason(t4, torch.float32) is None
    # fp16 runs, but out_proj stays out of the MLP, whose dots there run on CUDA cores.
    assert set(triton_ops.unsupported_ops(structure, t4, torch.float16)) == {"cxblock_out_proj"}
    bf16_structure = _structure(_encoder(seed=80), torch.bfloat16)
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"):
        device = fake_gpu(gpus.TARGETS[arch])
        assert triton_ops.unsupported_ops(bf16_structure, device, torch.bfloat16) == {}, arch
        assert triton_ops.auto_skip_reason(device, torch.bfloat16) is None, arch
        # fp32 parameters under bf16 autocast: out_proj leaves the MLP's epilogue on sm_100 only.
        autocast = triton_ops.unsupported_ops(structure, device, torch.bfloat16)
        assert set(autocast) == ({"cxblock_out_proj"} if arch == "sm_100a" else set()), arch
        if autocast:
            assert "weights wider than the activations on sm_100" in autocast["cxblock_out_proj"]
    assert triton_ops.unsupported_ops(structure, torch.device("cpu"), torch.bfloat16) == {}


@pytest.fixture
def no_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals are remembered per process: each test starts without any."""
    monkeypatch.setattr(kernel_args, "_refused", set())


def _refusing(monkeypatch: pytest.MonkeyPatch, kernel: str, error: Exception) -> list:
    """Makes launches of ``kernel`` raise ``error``; returns the list of kernels launched."""
    launched = []
    run = Launch.run

    def refusing_run(launch: Launch) -> None:
        launched.append(launch.kernel)
        if launch.kernel == kernel:
            raise error
        run(launch)

    monkeypatch.setattr(Launch, "run", refusing_run)
    return launched


@pytest.mark.usefixtures("no_refusals")
def test_a_refused_launch_runs_the_torch_op_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the GPU refuses the MLP's launch (shared memory beyond what it has), the block runs
    the torch op: same result, one warning naming the kernel, the GPU and the reason, and the next
    call with those shapes goes straight to torch."""
    launched = _refusing(monkeypatch, "cxblock_mlp", OutOfResources(163840, 101376, "shared memory"))
    structure = _structure(_encoder(dim=32, seed=81), torch.bfloat16)
    x = _randn(2, 5, 7, 32, dtype=torch.bfloat16, seed=82)
    expected = torch_ops.cxblock(x, structure.blocks[0])
    with pytest.warns(RuntimeWarning) as caught:
        out = triton_ops.cxblock(x, structure.blocks[0])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "triton cxblock was refused on cpu (cpu)" in message and "cxblock_mlp [BM=" in message
    assert "out of resource: shared memory, Required: 163840, Hardware limit: 101376" in message
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.is_contiguous() and launched == ["dwconv_ln", "cxblock_mlp"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = triton_ops.cxblock(x, structure.blocks[0])
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert launched == ["dwconv_ln", "cxblock_mlp"]
    # Other shapes still try the kernels (refused here too, and said once more).
    with pytest.warns(RuntimeWarning, match="triton cxblock was refused"):
        other = triton_ops.cxblock(x[:1], structure.blocks[0])
    assert launched[2:] == ["dwconv_ln", "cxblock_mlp"]
    torch.testing.assert_close(other, expected[:1], rtol=0, atol=0)


@pytest.mark.usefixtures("no_refusals")
def test_a_refused_launch_falls_back_inside_compiled_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback lives in what the custom op runs, so compiled code gets the torch op too; a
    ptxas failure over the GPU's resources counts as a refusal, other errors propagate."""
    _refusing(monkeypatch, "proj_add", PTXASError("ptxas error: Entry function uses too much shared data"))
    structure = _structure(_encoder(dim=32, seed=83), torch.float32)
    mask_features = _randn(2, 256, 5, 7, dtype=torch.float32, seed=84)
    pix_feat = _randn(2, 32, 5, 7, dtype=torch.float32, seed=85)
    torch._dynamo.reset()
    compiled = torch.compile(lambda m, p: triton_ops.proj_add(m, p, structure.projection), fullgraph=True,
                             backend="eager")
    with pytest.warns(RuntimeWarning, match="triton proj_add was refused .* too much shared data"):
        out = compiled(mask_features, pix_feat)
    torch.testing.assert_close(out, torch_ops.proj_add(mask_features, pix_feat, structure.projection), rtol=0, atol=0)
    _refusing(monkeypatch, "out_proj", PTXASError("ptxas error: syntax error"))
    with pytest.raises(PTXASError, match="syntax error"):
        triton_ops.out_proj(_randn(2, 5, 7, 32, dtype=torch.float32, seed=86), structure.out_projection)


def test_bad_inputs_raise_errors_naming_expected_and_given() -> None:
    structure = _structure(_encoder(seed=57), torch.float32)
    stages, projection, block = structure.stages, structure.projection, structure.blocks[0]
    with pytest.raises(ValueError, match=r"masks must have shape \(\*, 1, \*, \*\); got shape \(1, 2, 80, 112\)"):
        triton_ops.mask_downsample(_randn(1, 2, 80, 112, dtype=torch.float32, seed=58), stages, None, True)
    with pytest.raises(TypeError, match="masks must be float32, bfloat16 or float16; got shape"):
        triton_ops.mask_downsample(_masks(1, (80, 112), torch.float64, seed=59), stages, None, True)
    wide_stride = _structure(_encoder(seed=60, downsampler=GEOMETRIES["k4s4x2"][0]), torch.float32).stages
    with pytest.raises(ValueError, match=r"masks of size 8x3 are too small for the downsampler: stage outputs "
                                         r"would be \[\(2, 0\), \(0, 0\)\]"):
        triton_ops.mask_downsample(_masks(1, (8, 3), torch.float32, seed=60), wide_stride, None, True)
    x = _randn(2, 7, 5, 32, dtype=torch.float32, seed=61).transpose(1, 2)
    with pytest.raises(ValueError, match="x must be contiguous"):
        triton_ops.cxblock(x, block)
    with pytest.raises(ValueError, match=r"mask_features must have shape \(2, 256, 5, 6\); got shape \(2, 256, 5, 7\)"):
        triton_ops.proj_add(_randn(2, 256, 5, 7, dtype=torch.float32, seed=62),
                            _randn(2, 32, 5, 6, dtype=torch.float32, seed=63), projection)
    with pytest.raises(TypeError, match="mask_features must have dtype bfloat16; got shape"):
        triton_ops.proj_add(_randn(2, 256, 5, 7, dtype=torch.float32, seed=64),
                            _randn(2, 32, 5, 7, dtype=torch.bfloat16, seed=65), projection)
    # A parameter whose .data changed shape or dtype since the structure was read.
    wide = block._replace(w1=torch.zeros(128, 48, device=DEVICE))
    with pytest.raises(ValueError, match=r"pwconv1 weight must have shape \(128, 32\); got shape \(128, 48\)"):
        triton_ops.cxblock(_randn(2, 5, 7, 32, dtype=torch.float32, seed=66), wide)
    double = block._replace(gamma=block.gamma.double())
    with pytest.raises(TypeError, match="gamma must be float32, bfloat16 or float16; got shape"):
        triton_ops.cxblock(_randn(2, 5, 7, 32, dtype=torch.float32, seed=67), double)
    elsewhere = projection._replace(pix_bias=torch.zeros(32, device="meta"))
    with pytest.raises(ValueError, match="pix_bias must be on .*, the activations' device; got shape"):
        triton_ops.proj_add(_randn(2, 256, 5, 7, dtype=torch.float32, seed=68),
                            _randn(2, 32, 5, 7, dtype=torch.float32, seed=69), elsewhere)


# ------------------------------------------------------------------------------ report


@pytest.mark.parametrize("module", ["mask_downsample", "proj_add", "cxblock", "out_proj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("target", sorted(gpus.TARGETS))
@pytest.mark.parametrize("batch", [1, 64])
def test_report_launches_bind_every_kernel_argument(module: str, dtype: torch.dtype, target: str,
                                                     batch: int) -> None:
    """Each launch the kernel report compiles binds every parameter of its kernel exactly once,
    for the activations' dtype and (16-bit) fp32 weights, and converts into a spec."""
    device = gpus.TARGETS[target]
    launches = importlib.import_module(f"memenc_fast.kernels.{module}").report_launches(batch, dtype, device)
    weight_dtypes = {launch.config.rsplit("W=", 1)[1] for launch in launches}
    expected = {"fp32", {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]}
    if module == "out_proj":  # only where the last block's MLP does not run it
        expected = {name for name, weights in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                                               ("fp16", torch.float16))
                    if name in expected and not cx.fuses_out_proj(dtype, weights, device)}
    assert weight_dtypes == expected
    for launch in launches:
        names = set(inspect.signature(launch.fn.fn).parameters)
        assert set(launch.args) | set(launch.constexprs) == names, launch.kernel
        assert not set(launch.args) & set(launch.constexprs), launch.kernel
        assert launch.flops > 0 and launch.min_bytes > 0
        spec = kernel_report.spec_from_launch(launch)
        assert set(spec.signature) | set(spec.constexprs) == names


# ------------------------------------------------------------------------------ GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_each_op_takes_its_precision_from_its_reference_layers_flag(dtype: torch.dtype,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The mask path, proj_add and out_proj replace nn.Conv2d layers and follow cuDNN's TF32 flag,
    the MLP replaces nn.Linear layers and follows cuBLAS's, each read when the op runs; 16-bit
    dots are IEEE whatever the flags. The interpreter computes every dot in fp32 whatever its
    input_precision (the GPU tests check the numbers), so this checks what each launch asks for."""
    planned: list = []
    monkeypatch.setattr(Launch, "run", lambda launch: planned.append(launch))
    structure = _structure(_encoder(dim=32, out_dim=16, seed=90), dtype)
    masks = _masks(1, (16, 16), dtype, seed=91)
    mask_features = _randn(1, 256, 1, 1, dtype=dtype, seed=92)
    pix_feat = _randn(1, 32, 1, 1, dtype=dtype, seed=93)
    tokens = _randn(1, 1, 1, 32, dtype=dtype, seed=94)
    fp32 = dtype == torch.float32
    for conv, matmul in ((False, False), (True, False), (False, True), (True, True)):
        planned.clear()
        with tf32_settings(conv, matmul):
            triton_ops.mask_downsample(masks, structure.stages, None, True)
            triton_ops.proj_add(mask_features, pix_feat, structure.projection)
            triton_ops.cxblock(tokens, structure.blocks[0])
            triton_ops.out_proj(tokens, structure.out_projection)
            triton_ops.cxblock_out_proj(tokens, structure.blocks[1], structure.out_projection)
        precisions = {launch.kernel: (launch.constexprs.get("PREC"), launch.constexprs.get("OUT_PREC"), launch.tf32)
                      for launch in planned}
        conv_prec, mlp_prec = ("tf32" if fp32 and conv else "ieee"), ("tf32" if fp32 and matmul else "ieee")
        assert precisions == {
            "mask_path": (conv_prec, None, conv_prec == "tf32"), "proj_add": (conv_prec, None, conv_prec == "tf32"),
            "dwconv_ln": (None, None, False), "cxblock_mlp": (mlp_prec, "ieee", mlp_prec == "tf32"),
            "out_proj": (conv_prec, None, conv_prec == "tf32"),
            "cxblock_mlp_out": (mlp_prec, conv_prec, mlp_prec == "tf32")}, (conv, matmul)


def test_tf32_allows_fp32_the_tensor_core_configurations() -> None:
    """Where torch allows an op TF32, its fp32 launch takes the tensor-core blocking a 16-bit one
    takes (whole channel rows, no K chunks of 16), on TF32 GPUs only."""
    fp32, t4 = torch.float32, gpus.TARGETS["sm_75"]
    assert cx.choose_mlp_config(4096, 256, 1024, fp32, fp32, H100).bk == 16
    assert cx.choose_mlp_config(4096, 256, 1024, fp32, fp32, H100, tf32=True).bk is None
    assert cx.choose_mlp_config(4096, 256, 1024, fp32, fp32, t4, tf32=True).bk == 16
    assert pa.choose_config(64, 4096, 256, fp32, fp32, H100).bk == 16
    assert pa.choose_config(64, 4096, 256, fp32, fp32, H100, tf32=True).bk == 64
    assert md.choose_config(md.SAM2_GEOMETRY, 64, (64, 64), fp32, fp32, H100).num_warps == 4
    assert md.choose_config(md.SAM2_GEOMETRY, 64, (64, 64), fp32, fp32, H100, tf32=True).num_warps == 8


def test_tf32_configurations_run_under_the_interpreter() -> None:
    """The fp32 tensor-core blockings (what TF32 runs on a GPU; the interpreter's dots are exact
    fp32, so IEEE's bound applies) of every kernel, split MLP included, match the float64 ops."""
    fp32 = torch.float32
    structure, structure64 = _structures(_encoder(dim=64, out_dim=24, seed=95), fp32)
    stages = structure.stages
    masks = _masks(2, (32, 48), fp32, seed=96)
    geom = md.MaskGeometry.of([s.weight for s in stages], stages[0].stride, stages[0].padding,
                              [s.eps for s in stages])
    features = torch.full((2, 2, 3, 256), float("nan"), dtype=fp32, device=DEVICE)
    md.plan_mask_path(masks, geom, [s.weight for s in stages], [s.bias for s in stages],
                      [s.norm_weight for s in stages], [s.norm_bias for s in stages], True, 1.0, 0.0, features, H100,
                      max_programs=2, for_interpreter=False, tf32=True).run()
    _check(features.permute(0, 3, 1, 2), torch_ops.mask_downsample(masks.double(), structure64.stages, None, True),
           fp32, None)
    pix_feat = _randn(2, 64, 2, 3, dtype=fp32, seed=97)
    tokens = torch.full((2, 2, 3, 64), float("nan"), dtype=fp32, device=DEVICE)
    pa.plan_proj_add(features.permute(0, 3, 1, 2), pix_feat, *structure.projection, tokens, H100,
                     for_interpreter=False, tf32=True).run()
    _check(tokens, torch_ops.proj_add(features.permute(0, 3, 1, 2).double(), pix_feat.double(),
                                      structure64.projection), fp32, None)
    block, block64 = structure.blocks[0], structure64.blocks[0]
    normed, out = torch.full_like(tokens, float("nan")), torch.full_like(tokens, float("nan"))
    launches = cx.plan_block(tokens, block.dw_weight, block.dw_bias, block.padding, block.norm_weight,
                             block.norm_bias, block.eps, block.w1, block.b1, block.w2, block.b2, block.gamma, None,
                             None, normed, out, EIGHT_SM_H100, for_interpreter=False, tf32=True)
    assert launches[1].grid[1] > 1 and launches[1].tf32, launches[1].config
    for launch in launches:
        launch.run()
    _check(out, torch_ops.cxblock(tokens.double(), block64), fp32, None)
    projected = torch.full((2, 24, 2, 3), float("nan"), dtype=fp32, device=DEVICE)
    op.plan_out_proj(out, *structure.out_projection, projected, H100, for_interpreter=False, tf32=True).run()
    _check(projected, torch_ops.out_proj(out.double(), structure64.out_projection), fp32, None)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_sam2_size_module_matches_reference(dtype: torch.dtype, batch: int) -> None:
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=70, dtype=dtype, device="cuda")
    pix_feat, masks = make_inputs(preset, batch, seed=71, dtype=dtype, device="cuda")
    _check_module(encoder, pix_feat, masks, dtype)


@requires_cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_sam2_size_autocast_with_fp32_parameters(batch: int) -> None:
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=72, device="cuda")
    pix_feat, masks = make_inputs(preset, batch, seed=73, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = _run(encoder, pix_feat, masks, "triton")["vision_features"]
        same = _run(encoder, pix_feat, masks, "reference")["vision_features"]
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    verdict = judge(out, oracle, torch.bfloat16, "cuda", same_dtype_ref=same)
    assert verdict.passed, verdict.describe()


@requires_cuda
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_pair_ids)
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_sam2_size_each_op_matches_torch_op(dtypes: Tuple[torch.dtype, torch.dtype], batch: int) -> None:
    dtype, params = dtypes
    preset = PRESETS["sam2"]
    structure, structure64 = _structures(build_encoder(preset, seed=74), params)
    pix_feat, masks = make_inputs(preset, batch, seed=75, dtype=dtype, device="cuda")
    blocks, blocks64, layer, layer64 = structure.blocks, structure64.blocks, structure.out_projection, \
        structure64.out_projection
    with poison_outputs():
        features = triton_ops.mask_downsample(masks, structure.stages, None, True)
        x = triton_ops.proj_add(features, pix_feat, structure.projection)
        block = triton_ops.cxblock(x, blocks[0])
        out = (triton_ops.cxblock_out_proj(block, blocks[1], layer) if dtype != torch.float32
               else triton_ops.out_proj(triton_ops.cxblock(block, blocks[1]), layer))
    _check(features, torch_ops.mask_downsample(masks.double(), structure64.stages, None, True), dtype,
           torch_ops.mask_downsample(masks, structure.stages, None, True))
    _check(x, torch_ops.proj_add(features.double(), pix_feat.double(), structure64.projection), dtype,
           torch_ops.proj_add(features, pix_feat, structure.projection))
    _check(block, torch_ops.cxblock(x.double(), blocks64[0]), dtype, torch_ops.cxblock(x, blocks[0]))
    _check(out, torch_ops.out_proj(torch_ops.cxblock(block.double(), blocks64[1]), layer64), dtype,
           torch_ops.out_proj(torch_ops.cxblock(block, blocks[1]), layer))


@requires_cuda
@pytest.mark.parametrize(("conv", "matmul"), [(False, False), (True, False), (False, True), (True, True)])
def test_gpu_sam2_size_fp32_ops_follow_their_layers_tf32_flag(conv: bool, matmul: bool) -> None:
    """Each fp32 op against its float64 oracle on the same inputs: within TF32's 1e-3 and above
    IEEE's 1e-5 (TF32 ran) where torch allows its reference layer TF32 (cuDNN's flag for the
    convs: mask path, proj_add, out_proj; cuBLAS's for the MLP's Linears), within 1e-5 where not."""
    preset = PRESETS["sam2"]
    structure, structure64 = _structures(build_encoder(preset, seed=104), torch.float32)
    pix_feat, masks = make_inputs(preset, 1, seed=105, device="cuda")
    with tf32_settings(conv, matmul), poison_outputs():
        features = triton_ops.mask_downsample(masks, structure.stages, None, True)
        x = triton_ops.proj_add(features, pix_feat, structure.projection)
        block = triton_ops.cxblock(x, structure.blocks[0])
        out = triton_ops.out_proj(block, structure.out_projection)
    results = {
        "mask_downsample": (features, torch_ops.mask_downsample(masks.double(), structure64.stages, None, True), conv),
        "proj_add": (x, torch_ops.proj_add(features.double(), pix_feat.double(), structure64.projection), conv),
        "cxblock": (block, torch_ops.cxblock(x.double(), structure64.blocks[0]), matmul),
        "out_proj": (out, torch_ops.out_proj(block.double(), structure64.out_projection), conv),
    }
    for op_name, (result, oracle, tf32) in results.items():
        error = relative_error(result, oracle)
        assert (1e-5 < error < 1e-3) if tf32 else (error < 1e-5), (op_name, conv, matmul, error)


@requires_cuda
@pytest.mark.parametrize(("conv", "matmul"), [(True, False), (True, True)], ids=["torch_defaults", "all_tf32"])
def test_gpu_sam2_size_module_under_tf32(conv: bool, matmul: bool) -> None:
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=76, device="cuda")
    pix_feat, masks = make_inputs(preset, 2, seed=77, device="cuda")
    with tf32_settings(conv, matmul):
        out = _run(encoder, pix_feat, masks, "triton")["vision_features"]
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    verdict = judge(out, oracle, torch.float32, "cuda", allow_tf32=True)
    assert verdict.passed, verdict.describe()


@requires_cuda
def test_gpu_device_spec_is_the_devices_own() -> None:
    properties = torch.cuda.get_device_properties(0)
    spec = device_spec(torch.device("cuda", 0))
    assert spec.sm_count == properties.multi_processor_count
    assert spec.capability == (properties.major, properties.minor)
    assert spec.shared_memory_per_block == properties.shared_memory_per_block_optin >= 48 * 1024
    assert spec.l2_bytes == properties.L2_cache_size > 0
    assert device_spec(torch.device("cpu")) == H100


@requires_cuda
def test_gpu_runs_on_the_current_stream() -> None:
    preset = PRESETS["small"]
    encoder = build_encoder(preset, seed=78, dtype=torch.bfloat16, device="cuda")
    pix_feat, masks = make_inputs(preset, 2, seed=79, dtype=torch.bfloat16, device="cuda")
    expected = _run(encoder, pix_feat, masks, "triton")["vision_features"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = _run(encoder, pix_feat, masks, "triton")["vision_features"]
    stream.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
