"""The ``triton`` backend (kernels/ through memenc_fast/backends/triton_ops.py).

Without a GPU the kernels run on the CPU in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported): each op against the torch op on the same packed
weights (float64 torch op as the oracle, the same-dtype torch op as the bar), the launch
configurations the GPU uses (``for_interpreter=False``), the whole module against the float64
reference, a SAM 2-sized forward, fallbacks and input errors, and that every kernel-report spec
names exactly its kernel's arguments. Outputs are poisoned (NaN) before every run.

GPU part (``requires_cuda``): full SAM 2 size, B in {1, 8}, fp32/bf16/fp16, each op and the
module, poisoned outputs, a side stream.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from typing import Iterator, Optional

import pytest
import torch

import memenc_fast as mf
from memenc_fast.backends import torch_ops, triton_interpreted
from memenc_fast.tools.numerics import judge
from memenc_fast.packing import PackedEncoder, pack_weights, read_structure

from helpers import PRESETS, build_encoder, make_inputs, reference_outputs, requires_cuda

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and not triton_interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)

from memenc_fast.backends import triton_ops  # noqa: E402
from memenc_fast.kernels import cxblock as cx  # noqa: E402
from memenc_fast.kernels import mask_downsample as md  # noqa: E402
from memenc_fast.kernels import proj_add as pa  # noqa: E402
from memenc_fast.backends.kernel_args import poison_outputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.gpu  # every test here runs its kernels on the GPU where there is one
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(value: object) -> str:
    """Test ids: dtypes by name, everything else as pytest would."""
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else str(value)


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


def _packed(encoder: torch.nn.Module, dtype: torch.dtype) -> PackedEncoder:
    return pack_weights(read_structure(encoder), dtype, DEVICE)


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


MASK_CASES = [(name, torch.float32, mode) for name in GEOMETRIES for mode in ("sigmoid", "scaled")]
MASK_CASES += [("k3s2x4", dtype, mode) for dtype in (torch.bfloat16, torch.float16) for mode in ("sigmoid", "scaled")]


@pytest.mark.parametrize(("geometry", "dtype", "mode"), MASK_CASES, ids=_ids)
def test_mask_downsample_matches_torch_op(geometry: str, dtype: torch.dtype, mode: str) -> None:
    downsampler, size = GEOMETRIES[geometry]
    encoder = _encoder(downsampler=downsampler, seed=1)
    packed, packed64 = _packed(encoder, dtype), _packed(encoder, torch.float64)
    masks = _masks(3, size, dtype, seed=2)
    # SAM 2's own transform (skip_mask_sigmoid=True after sigmoid * 20 - 10) or the module's sigmoid.
    args = (True, 1.0, 0.0) if mode == "sigmoid" else (False, 20.0, -10.0)
    inputs = masks if mode == "sigmoid" else torch.sigmoid(masks)
    with poison_outputs():
        out = triton_ops.mask_downsample(inputs, packed, *args)
    oracle = torch_ops.mask_downsample(inputs.double(), packed64, *args)
    _check(out, oracle, dtype, torch_ops.mask_downsample(inputs, packed, *args))


@pytest.mark.parametrize(("geometry", "size", "dtype"), [("k3s2x4", (32, 48), torch.bfloat16),
                                                         ("k3s2x2", (20, 28), torch.float32),
                                                         ("k4s4x2", (80, 112), torch.float16)], ids=_ids)
def test_mask_path_gpu_configuration_with_a_persistent_grid(geometry: str, size: tuple, dtype: torch.dtype) -> None:
    """The blocking the GPU runs (several pixel blocks per stage region) with fewer programs than
    tiles, so programs loop over tiles and reuse their scratch slots."""
    downsampler = GEOMETRIES[geometry][0]
    encoder = _encoder(downsampler=downsampler, seed=3)
    packed = _packed(encoder, dtype)
    masks = _masks(3, size, dtype, seed=4)
    with poison_outputs():
        out = md.launch_mask_path(masks, packed, True, max_programs=2, for_interpreter=False)
    oracle = torch_ops.mask_downsample(masks.double(), _packed(encoder, torch.float64), True)
    _check(out.permute(0, 3, 1, 2), oracle, dtype, torch_ops.mask_downsample(masks, packed, True))


def test_mask_downsample_resizes_like_sam3_first() -> None:
    encoder = _encoder(downsampler=dict(SAM2_DOWNSAMPLER, interpol_size=[48, 64]), seed=5)
    packed = _packed(encoder, torch.float32)
    masks = _masks(2, (40, 56), torch.float32, seed=6)
    out = triton_ops.mask_downsample(masks, packed, True, 2.0, -1.0)
    expected = torch_ops.mask_downsample(masks, packed, True, 2.0, -1.0)
    assert out.shape == (2, 256, 3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_mask_downsample_reads_broadcast_and_strided_masks() -> None:
    encoder = _encoder(downsampler=GEOMETRIES["k3s2x2"][0], seed=7)
    packed = _packed(encoder, torch.float32)
    base = _masks(1, (20, 56), torch.float32, seed=8)
    masks = base[..., ::2].expand(3, -1, -1, -1)  # batch stride 0, column stride 2
    out = triton_ops.mask_downsample(masks, packed, True)
    torch.testing.assert_close(out, torch_ops.mask_downsample(masks.contiguous(), packed, True),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ proj_add, out_proj


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("dim", [32, 48])
def test_proj_add_matches_torch_op(dtype: torch.dtype, dim: int) -> None:
    encoder = _encoder(dim=dim, seed=9)
    packed, packed64 = _packed(encoder, dtype), _packed(encoder, torch.float64)
    # The mask path's channels-last features and a broadcast NCHW pix_feat, as the module passes them.
    mask_features = _randn(3, 5, 7, 256, dtype=dtype, seed=10).permute(0, 3, 1, 2)
    pix_feat = _randn(1, dim, 5, 7, dtype=dtype, seed=11).expand(3, -1, -1, -1)
    with poison_outputs():
        out = triton_ops.proj_add(mask_features, pix_feat, packed)
    assert out.shape == (3, 5, 7, dim) and out.is_contiguous()
    oracle = torch_ops.proj_add(mask_features.double(), pix_feat.double(), packed64)
    _check(out, oracle, dtype, torch_ops.proj_add(mask_features, pix_feat, packed))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_out_proj_matches_torch_op(dtype: torch.dtype) -> None:
    encoder = _encoder(dim=48, out_dim=20, seed=12)
    packed, packed64 = _packed(encoder, dtype), _packed(encoder, torch.float64)
    x = _randn(3, 5, 7, 48, dtype=dtype, seed=13)
    with poison_outputs():
        out = triton_ops.out_proj(x, packed)
    assert out.shape == (3, 20, 5, 7) and out.is_contiguous()
    _check(out, torch_ops.out_proj(x.double(), packed64), dtype, torch_ops.out_proj(x, packed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_pointwise_gpu_configuration(dtype: torch.dtype) -> None:
    encoder = _encoder(dim=64, out_dim=64, seed=14)
    packed, packed64 = _packed(encoder, dtype), _packed(encoder, torch.float64)
    mask_features = _randn(2, 9, 11, 256, dtype=dtype, seed=15).permute(0, 3, 1, 2)
    pix_feat = _randn(2, 64, 9, 11, dtype=dtype, seed=16)
    with poison_outputs():
        launch, out = pa.plan_pointwise("proj_add", mask_features, pix_feat, packed.proj_weight, packed.proj_bias,
                                        True, sms=132, for_interpreter=False)
        launch.run()
    oracle = torch_ops.proj_add(mask_features.double(), pix_feat.double(), packed64)
    _check(out, oracle, dtype, torch_ops.proj_add(mask_features, pix_feat, packed))


# ------------------------------------------------------------------------------ CXBlock


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("dim", [32, 48])
def test_cxblock_matches_torch_op(dtype: torch.dtype, dim: int) -> None:
    encoder = _encoder(dim=dim, seed=17)
    packed, packed64 = _packed(encoder, dtype), _packed(encoder, torch.float64)
    x = _randn(3, 5, 7, dim, dtype=dtype, seed=18)
    with poison_outputs():
        out = triton_ops.cxblock(x, packed.blocks[0])
    assert out.is_contiguous()
    _check(out, torch_ops.cxblock(x.double(), packed64.blocks[0]), dtype, torch_ops.cxblock(x, packed.blocks[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_cxblock_out_proj_matches_torch_ops(dtype: torch.dtype) -> None:
    encoder = _encoder(dim=48, out_dim=20, seed=19)
    packed, packed64 = _packed(encoder, dtype), _packed(encoder, torch.float64)
    x = _randn(3, 5, 7, 48, dtype=dtype, seed=20)
    with poison_outputs():
        out = triton_ops.cxblock_out_proj(x, packed.blocks[1], packed)
    assert out.shape == (3, 20, 5, 7) and out.is_contiguous()
    oracle = torch_ops.out_proj(torch_ops.cxblock(x.double(), packed64.blocks[1]), packed64)
    _check(out, oracle, dtype, torch_ops.out_proj(torch_ops.cxblock(x, packed.blocks[1]), packed))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_cxblock_gpu_configuration(dtype: torch.dtype) -> None:
    """The GPU's MLP blocking (several hidden chunks; fp32's K chunks) and dwconv tiles, on a
    token count that leaves a partial last tile, with the out_proj epilogue where it is fused."""
    encoder = _encoder(dim=64, out_dim=24, seed=21)
    packed, packed64 = _packed(encoder, dtype), _packed(encoder, torch.float64)
    block, block64 = packed.blocks[0], packed64.blocks[0]
    x = _randn(2, 9, 11, 64, dtype=dtype, seed=22)
    fused = cx.fuses_out_proj(dtype)
    with poison_outputs():
        dw, normed = cx.plan_dwconv_ln(x, cx._dw_weight(block), block.dw_bias, (7, 7), block.padding,
                                       block.norm_eps, for_interpreter=False)
        dw.run()
        mlp, out = cx.plan_mlp(normed, x, block.w1, block.b1, block.w2, block.b2,
                               packed.out_weight if fused else None, packed.out_bias if fused else None,
                               for_interpreter=False)
        mlp.run()
    oracle = torch_ops.cxblock(x.double(), block64)
    same = torch_ops.cxblock(x, block)
    if fused:
        oracle, same = torch_ops.out_proj(oracle, packed64), torch_ops.out_proj(same, packed)
    _check(out, oracle, dtype, same)


# ------------------------------------------------------------------------------ the module


def _run(encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor, backend: str, **kwargs):
    with torch.no_grad(), mf.use_backend(backend), poison_outputs():
        return encoder(pix_feat, masks, **kwargs)


def _check_module(encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor, dtype: torch.dtype,
                  **kwargs) -> None:
    out = _run(encoder, pix_feat, masks, "triton", **kwargs)
    assert encoder.last_backend == "triton"
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64, **kwargs)["vision_features"]
    same = _run(encoder, pix_feat, masks, "reference", **kwargs)
    feats = out["vision_features"]
    assert feats.is_contiguous()
    verdict = judge(feats, oracle, dtype, DEVICE.type, same_dtype_ref=same["vision_features"], allow_tf32=False)
    assert verdict.passed, verdict.describe()
    assert torch.equal(out["vision_pos_enc"][0], same["vision_pos_enc"][0])


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_module_matches_reference(dtype: torch.dtype, skip_mask_sigmoid: bool) -> None:
    encoder = _encoder(dim=32, out_dim=16, seed=23).to(device=DEVICE, dtype=dtype)
    pix_feat = _randn(3, 32, 5, 7, dtype=dtype, seed=24)
    masks = _masks(3, (80, 112), dtype, seed=25)
    _check_module(encoder, pix_feat, masks, dtype, skip_mask_sigmoid=skip_mask_sigmoid)


def test_module_other_structures_and_caller_transform() -> None:
    """sam2's class-default downsampler, a fuser input projection, an Identity out_proj, no gamma,
    a 5x5 dwconv, SAM 2's sigmoid*20-10 as mask_scale/mask_bias and a broadcast mask."""
    encoder = _encoder(dim=32, out_dim=32, seed=26, downsampler=GEOMETRIES["k4s4x2"][0], kernel_size=5,
                       padding=2, layer_scale_init_value=0.0, input_projection=True).to(DEVICE)
    assert isinstance(encoder.out_proj, torch.nn.Identity)
    encoder.mask_scale, encoder.mask_bias = 20.0, -10.0
    pix_feat = _randn(3, 32, 5, 7, dtype=torch.float32, seed=27)
    _check_module(encoder, pix_feat, _masks(1, (80, 112), torch.float32, seed=28), torch.float32)


def test_module_under_autocast_matches_reference_under_autocast() -> None:
    encoder = _encoder(dim=32, out_dim=16, seed=47).to(DEVICE)
    pix_feat = _randn(2, 32, 5, 7, dtype=torch.float32, seed=48)
    masks = _masks(2, (80, 112), torch.float32, seed=49)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = _run(encoder, pix_feat, masks, "triton")["vision_features"]
        same = _run(encoder, pix_feat, masks, "reference")["vision_features"]
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    assert out.dtype == same.dtype == torch.bfloat16
    verdict = judge(out, oracle, torch.bfloat16, DEVICE.type, same_dtype_ref=same)
    assert verdict.passed, verdict.describe()


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_fp32_dots_follow_torch_tf32_setting() -> None:
    """IEEE fp32 dots unless torch allows TF32 matmuls, as torch itself decides."""
    x = torch.empty((1, 4, 4, 32), device="meta")
    weight, bias = torch.empty((16, 32), device="meta"), torch.empty((16,), device="meta")
    for allowed, expected in ((False, "ieee"), (True, "tf32")):
        with _tf32(allowed):
            launch, _ = pa.plan_pointwise("out_proj", x.permute(0, 3, 1, 2), None, weight, bias, False, 132)
            assert launch.constexprs["PREC"] == expected


def test_sam2_size_module_matches_reference() -> None:
    """SAM 2's full size at B=1 (1024x1024 masks, 64x64x256 features, bf16): 20-40 s in the
    interpreter on 2 cores, reference runs included."""
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=29, dtype=torch.bfloat16, device=DEVICE)
    pix_feat, masks = make_inputs(preset, 1, seed=30, dtype=torch.bfloat16, device=DEVICE)
    _check_module(encoder, pix_feat, masks, torch.bfloat16)


# ------------------------------------------------------------------------------ fallbacks, errors, report


def test_unsupported_configurations_fall_back_to_torch_ops_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    encoder = _encoder(dim=320, out_dim=16, seed=31, downsampler=dict(kernel_size=3, stride=2, padding=1,
                                                                      total_stride=32))
    packed = _packed(encoder, torch.float32)
    masks = _masks(2, (64, 96), torch.float32, seed=32)
    x = _randn(2, 2, 3, 320, dtype=torch.float32, seed=33)
    with caplog.at_level(logging.INFO, logger="memenc_fast"):
        features = triton_ops.mask_downsample(masks, packed, True)
        block = triton_ops.cxblock(x, packed.blocks[0])
    torch.testing.assert_close(features, torch_ops.mask_downsample(masks, packed, True))
    torch.testing.assert_close(block, torch_ops.cxblock(x, packed.blocks[0]))
    text = caplog.text
    assert "mask_downsample runs the torch op: the kernel unrolls at most 4 stages" in text
    assert "cxblock runs the torch op: dim 320 is wider than the 256 channels" in text


def test_bad_inputs_raise_errors_naming_expected_and_given() -> None:
    encoder = _encoder(seed=34)
    packed = _packed(encoder, torch.float32)
    with pytest.raises(TypeError, match="masks must have dtype float32; got shape"):
        triton_ops.mask_downsample(_masks(1, (80, 112), torch.float16, seed=35), packed, True)
    with pytest.raises(ValueError, match=r"masks must have shape \(\*, 1, \*, \*\); got shape \(1, 2, 80, 112\)"):
        triton_ops.mask_downsample(_randn(1, 2, 80, 112, dtype=torch.float32, seed=36), packed, True)
    with pytest.raises(ValueError, match="too small for the downsampler"):
        triton_ops.mask_downsample(_masks(1, (8, 3), torch.float32, seed=37),
                                   _packed(_encoder(downsampler=GEOMETRIES["k4s4x2"][0]), torch.float32), True)
    x = _randn(2, 7, 5, 32, dtype=torch.float32, seed=38).transpose(1, 2)
    with pytest.raises(ValueError, match="x must be contiguous"):
        triton_ops.cxblock(x, packed.blocks[0])
    with pytest.raises(ValueError, match=r"pix_feat must have shape \(2, \*, 5, 7\); got shape \(2, 32, 5, 6\)"):
        triton_ops.proj_add(_randn(2, 256, 5, 7, dtype=torch.float32, seed=39),
                            _randn(2, 32, 5, 6, dtype=torch.float32, seed=40), packed)


@pytest.mark.parametrize("module", ["mask_downsample", "proj_add", "cxblock", "out_proj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 64])
def test_report_specs_describe_every_kernel_argument(module: str, dtype: torch.dtype, batch: int) -> None:
    """Each spec the kernel report compiles binds every parameter of its kernel exactly once."""
    specs = importlib.import_module(f"memenc_fast.kernels.{module}").report_specs(batch, dtype)
    assert specs
    for spec in specs:
        names = set(inspect.signature(spec.fn.fn).parameters)
        assert set(spec.signature) | set(spec.constexprs) == names, spec.kernel
        assert not set(spec.signature) & set(spec.constexprs), spec.kernel
        assert spec.flops > 0 and spec.min_bytes > 0


# ------------------------------------------------------------------------------ GPU


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_sam2_size_module_matches_reference(dtype: torch.dtype, batch: int) -> None:
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=41, dtype=dtype, device="cuda")
    pix_feat, masks = make_inputs(preset, batch, seed=42, dtype=dtype, device="cuda")
    _check_module(encoder, pix_feat, masks, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_sam2_size_each_op_matches_torch_op(dtype: torch.dtype, batch: int) -> None:
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=43)
    packed, packed64 = _packed(encoder, dtype), _packed(encoder, torch.float64)
    pix_feat, masks = make_inputs(preset, batch, seed=44, dtype=dtype, device="cuda")
    with poison_outputs():
        features = triton_ops.mask_downsample(masks, packed, True)
        x = triton_ops.proj_add(features, pix_feat, packed)
        block = triton_ops.cxblock(x, packed.blocks[0])
        out = triton_ops.cxblock_out_proj(block, packed.blocks[1], packed)
    _check(features, torch_ops.mask_downsample(masks.double(), packed64, True), dtype,
           torch_ops.mask_downsample(masks, packed, True))
    _check(x, torch_ops.proj_add(features.double(), pix_feat.double(), packed64), dtype,
           torch_ops.proj_add(features, pix_feat, packed))
    _check(block, torch_ops.cxblock(x.double(), packed64.blocks[0]), dtype, torch_ops.cxblock(x, packed.blocks[0]))
    _check(out, torch_ops.out_proj(torch_ops.cxblock(block.double(), packed64.blocks[1]), packed64), dtype,
           torch_ops.out_proj(torch_ops.cxblock(block, packed.blocks[1]), packed))


@requires_cuda
def test_gpu_sam2_size_tf32_when_torch_allows_it() -> None:
    preset = PRESETS["sam2"]
    encoder = build_encoder(preset, seed=50, device="cuda")
    pix_feat, masks = make_inputs(preset, 2, seed=51, device="cuda")
    with _tf32(True):
        out = _run(encoder, pix_feat, masks, "triton")["vision_features"]
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    verdict = judge(out, oracle, torch.float32, "cuda", allow_tf32=True)
    assert verdict.passed, verdict.describe()


@requires_cuda
def test_gpu_runs_on_the_current_stream() -> None:
    preset = PRESETS["small"]
    encoder = build_encoder(preset, seed=45, dtype=torch.bfloat16, device="cuda")
    pix_feat, masks = make_inputs(preset, 2, seed=46, dtype=torch.bfloat16, device="cuda")
    expected = _run(encoder, pix_feat, masks, "triton")["vision_features"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = _run(encoder, pix_feat, masks, "triton")["vision_features"]
    stream.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
