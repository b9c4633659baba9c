"""The ``cuda`` backend (csrc/ kernels through memenc_fast/backends/cuda_lib.py and cuda_ops.py).

CPU part (runs everywhere): the library builds and exports every entry point; the kernels compile
for sm_80 and sm_90a without spills; the wrappers reject bad input before any launch; the backend
reports that there is no device; the custom ops' fake implementations give the right shapes; and
the kernels themselves run on the CPU through the host emulation in csrc/emulation.h (the real
kernel source built with the host compiler: warps as fibers, mma.sync rebuilt from the PTX
fragment layouts) and match the torch ops and the float64 reference.

GPU part (``requires_cuda``, skipped without a CUDA device): each op against the torch op on the
same packed weights and the whole module against the float64 reference, full SAM 2 size, B in
{1, 8}, fp32/bf16/fp16, outputs poisoned, odd sizes, B=3, a SAM 3 size, torch.compile and opcheck.
"""

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memenc_fast as mf
from memenc_fast.backends import cuda_lib, torch_ops
from memenc_fast.backends.kernel_args import poison_outputs
from memenc_fast.dispatch import BackendUnavailableError
from memenc_fast.tools.numerics import judge, relative_error
from memenc_fast import pipeline
from memenc_fast.packing import pack_weights, read_structure

from helpers import PRESETS, Preset, build_encoder, make_inputs, reference_outputs, requires_cuda

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
sys.path.insert(0, str(ROOT))
from build_tools.cuda_build import ARCHS_ENV, SKIP_ENV, build_cuda_library, find_nvcc  # noqa: E402

NVCC = find_nvcc(os.environ)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# SAM 2's channels (1 -> 4 -> 16 -> 64 -> 256, dim 256, out 64) at a small spatial size.
SMALL = Preset("small256", mask_size=64, feature_size=4)


def _cuda_ops():
    from memenc_fast.backends import cuda_ops

    return cuda_ops


# ------------------------------------------------------------------------------------ library


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> cuda_lib.CudaLibrary:
    """The installed library, else one built here for sm_80 with the project's build step."""
    if cuda_lib.library_path().is_file():
        return cuda_lib.CudaLibrary(cuda_lib.library_path())
    if NVCC is None:
        pytest.skip("the CUDA library is not built and nvcc is not found")
    env = {k: v for k, v in os.environ.items() if k != SKIP_ENV}
    env[ARCHS_ENV] = "80"
    result = build_cuda_library(CSRC, tmp_path_factory.mktemp("cudalib"), env=env, log=lambda line: None)
    assert result is not None
    return cuda_lib.CudaLibrary(result.library)


def test_library_loads_and_exports_every_entry_point(library: cuda_lib.CudaLibrary) -> None:
    dll = ctypes.CDLL(str(library.path))
    for name in cuda_lib.EXPORTS:
        assert hasattr(dll, name), name
    assert dll.memenc_fast_cuda_abi_version() == cuda_lib.ABI_VERSION
    assert library.error_string(0) == "no error"
    assert "invalid argument" in library.error_string(1)
    # The SAM 2 configuration has kernels; other channel counts do not.
    assert library.supported("mask_stem", 1, 4, 16) and not library.supported("mask_stem", 1, 8, 16)
    assert library.supported("conv3x3s2_ln_gelu", 16, 64) and library.supported("conv3x3s2_ln_gelu", 64, 256)
    assert not library.supported("conv3x3s2_ln_gelu", 64, 128)
    assert library.supported("proj_add", 256, 256, 256) and not library.supported("proj_add", 256, 250, 256)
    assert library.supported("dwconv_ln", 256, 7) and not library.supported("dwconv_ln", 256, 9)
    assert not library.supported("dwconv_ln", 100, 7)


def test_launchers_reject_null_pointers_with_a_cuda_error(library: cuda_lib.CudaLibrary) -> None:
    with pytest.raises(cuda_lib.CudaLaunchError, match=r"dwconv_ln: CUDA error 1: invalid argument"):
        library.call("dwconv_ln", 0, None, 1, 4, 4, 256, None, 7, None, None, 1e-6, None, None, 0, None)


def test_missing_library_gives_one_line_reason(tmp_path: Path) -> None:
    with pytest.raises(cuda_lib.CudaLibraryError) as err:
        cuda_lib.load.__wrapped__(tmp_path / cuda_lib.LIBRARY_NAME)
    assert str(err.value) == "the CUDA library was not built (pip install -e . with nvcc)"
    (tmp_path / cuda_lib.LIBRARY_NAME).write_text("not a library")
    with pytest.raises(cuda_lib.CudaLibraryError, match="failed to load"):
        cuda_lib.load.__wrapped__(tmp_path / cuda_lib.LIBRARY_NAME)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")
def test_backend_reports_no_device_here() -> None:
    reason = cuda_lib.unavailable_reason()
    assert reason in ("no CUDA device", "the CUDA library was not built (pip install -e . with nvcc)")
    assert "cuda" not in mf.available_backends()
    encoder = build_encoder(SMALL, seed=1)
    pix_feat, masks = make_inputs(SMALL, 1, seed=2)
    with mf.use_backend("cuda"), pytest.raises(BackendUnavailableError, match=reason):
        encoder(pix_feat, masks)
    if reason == "no CUDA device":
        count, code = cuda_lib.load().device_count()
        assert count == 0 and code != 0


@needs_nvcc
def test_kernels_compile_for_sm80_and_sm90a_without_spills(tmp_path: Path) -> None:
    """The CI gate: every csrc kernel compiles for both targets, hot kernels do not spill, shared
    memory fits, and the matrix kernels run on tensor cores (the kernel report's rules)."""
    from memenc_fast.tools import kernel_report as kr

    options = kr.Options(targets=("sm_80", "sm_90a"), batches=(1,), dtypes=kr.DTYPES, cubin_dir=tmp_path,
                         csrc_dir=CSRC)
    report = kr.Report()
    kr.report_cuda(options, report)
    print(kr.format_table(report.rows))
    names = {row.kernel for row in report.rows}
    assert {"mf::mask_stem_kernel", "mf::conv3x3s2_ln_gelu_kernel", "mf::proj_add_kernel",
            "mf::dwconv_ln_kernel"} <= names
    assert kr.violations(report.rows) == []
    sidecar = kr.load_sidecar(CSRC / "kernels.json")
    for row in report.rows:  # every kernel instantiation is annotated
        assert f"{row.kernel}<{row.config}>" in sidecar, (row.kernel, row.config)
        if row.matrix_work:
            assert row.tensor_core_instructions.get("HMMA", 0) > 0, (row.kernel, row.target, row.config)


# ---------------------------------------------------------------------------------- bad input


def _stem_args(dtype=torch.float32, masks=None, c1=4, c2=16):
    masks = torch.randn(2, 1, 32, 32, dtype=dtype) if masks is None else masks
    w = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    return [masks, w(c1, 1, 3, 3), w(c1), w(c1), w(c1), 1e-6, w(c2, c1, 3, 3), w(c2), w(c2), w(c2), 1e-6, True, 1.0,
            0.0]


BAD_INPUTS = [
    ("mask_stem", lambda: _stem_args(masks=torch.zeros(2, 1, 8, 8, dtype=torch.int32)), TypeError,
     "masks must be float32, bfloat16 or float16"),
    ("mask_stem", lambda: _stem_args(torch.float64), TypeError, "masks must be float32, bfloat16 or float16"),
    ("mask_stem", lambda: _stem_args(masks=torch.randn(2, 2, 8, 8)), ValueError, r"masks must have shape \(\*, 1, \*, \*\)"),
    ("mask_stem", lambda: _stem_args(masks=torch.randn(1, 8, 8)), ValueError, "masks must have shape"),
    ("mask_stem", lambda: _stem_args()[:1] + [_stem_args()[1].half()] + _stem_args()[2:], TypeError,
     "w1 must have dtype float32; got"),
    ("mask_stem", lambda: _stem_args(), ValueError, "masks must be on a CUDA device"),
    ("conv3x3s2_ln_gelu", lambda: [torch.randn(2, 8, 8, 16), torch.randn(64, 8, 3, 3), *[torch.randn(64)] * 3, 1e-6],
     ValueError, r"weight must have shape \(\*, 16, 3, 3\)"),
    ("conv3x3s2_ln_gelu", lambda: [torch.randn(2, 8, 8, 16), torch.randn(64, 16, 3, 3), torch.randn(32),
                                   torch.randn(64), torch.randn(64), 1e-6], ValueError, r"bias must have shape \(64\)"),
    ("conv3x3s2_ln_gelu", lambda: ["not a tensor", torch.randn(64, 16, 3, 3), *[torch.randn(64)] * 3, 1e-6],
     TypeError, "x must be a torch.Tensor; got str"),
    ("proj_add_tokens", lambda: [torch.randn(2, 256, 4, 4), torch.randn(2, 256, 4, 5), torch.randn(256, 512),
                                 torch.randn(256)], ValueError, r"pix_feat must have shape \(2, \*, 4, 4\)"),
    ("proj_add_tokens", lambda: [torch.randn(2, 256, 4, 4), torch.randn(2, 256, 4, 4), torch.randn(256, 500),
                                 torch.randn(256)], ValueError, r"weight must have shape \(\*, 512\)"),
    ("proj_add_tokens", lambda: [torch.randn(2, 256, 4, 4), torch.randn(2, 256, 4, 4).bfloat16(),
                                 torch.randn(256, 512), torch.randn(256)], TypeError, "pix_feat must have dtype float32"),
    ("proj_add_tokens", lambda: [torch.randn(2, 256, 4, 4), torch.randn(2, 256, 4, 4), torch.randn(256, 512),
                                 torch.randn(256)], ValueError, "mask_features must be on a CUDA device"),
    ("dwconv_ln", lambda: [torch.randn(2, 4, 4, 256), torch.randn(256, 1, 7, 5), torch.randn(256), torch.randn(256),
                           1e-6], ValueError, r"weight must have shape \(256, 1, 7, 7\)"),
    ("dwconv_ln", lambda: [torch.randn(2, 4, 4, 256), torch.randn(256, 1, 7, 7), torch.randn(256), torch.randn(128),
                           1e-6], ValueError, r"residual_bias must have shape \(256\)"),
    ("dwconv_ln", lambda: [torch.randn(4, 4, 256), torch.randn(256, 1, 7, 7), torch.randn(256), torch.randn(256),
                           1e-6], ValueError, r"x must have shape \(\*, \*, \*, \*\)"),
]


@pytest.mark.parametrize(("wrapper", "make_args", "error", "message"), BAD_INPUTS)
def test_wrappers_reject_bad_input_before_any_launch(monkeypatch: pytest.MonkeyPatch, wrapper, make_args, error,
                                                     message) -> None:
    cuda_ops = _cuda_ops()

    def no_launch(*args, **kwargs):
        raise AssertionError("a launch happened despite bad input")

    monkeypatch.setattr(cuda_ops, "_launch", no_launch)
    with pytest.raises(error, match=message):
        getattr(cuda_ops, wrapper)(*make_args())


def test_fake_implementations_give_shapes_and_dtypes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    _cuda_ops()  # registers the custom ops
    ops = torch.ops.memenc_fast
    with FakeTensorMode() as mode:
        for dtype in DTYPES:
            fake = lambda *shape: mode.from_tensor(torch.empty(*shape, dtype=dtype))  # noqa: E731
            args = [fake(3, 1, 61, 45), fake(4, 1, 3, 3), fake(4), fake(4), fake(4), 1e-6, fake(16, 4, 3, 3),
                    fake(16), fake(16), fake(16), 1e-6, True, 1.0, 0.0]
            stem = ops.cuda_mask_stem(*args)
            assert stem.shape == (3, 16, 12, 16) and stem.dtype == dtype
            conv = ops.cuda_conv3x3s2_ln_gelu(fake(3, 16, 12, 16), fake(64, 16, 3, 3), fake(64), fake(64), fake(64),
                                              1e-6)
            assert conv.shape == (3, 8, 6, 64) and conv.dtype == dtype
            tokens = ops.cuda_proj_add(fake(3, 256, 4, 3), fake(3, 256, 4, 3), fake(256, 512), fake(256))
            assert tokens.shape == (3, 4, 3, 256) and tokens.dtype == dtype
            normed, resid = ops.cuda_dwconv_ln(fake(3, 4, 3, 256), fake(256, 1, 7, 7), fake(256), fake(256), 1e-6)
            assert normed.shape == resid.shape == (3, 4, 3, 256) and normed.dtype == resid.dtype == dtype


# ---------------------------------------------------------------------- kernels, host-emulated


def _cuda_include_dir() -> Path:
    """The CUDA headers nvcc compiles against (nvcc may be a wrapper script outside the toolkit)."""
    dryrun = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True, check=False)
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if "INCLUDES=" in line:
            return Path(line.split('"')[1].split()[0].removeprefix("-I"))
    pytest.skip("could not find the CUDA headers from nvcc --dryrun")


@pytest.fixture(scope="module")
def emulated_library(tmp_path_factory: pytest.TempPathFactory) -> cuda_lib.CudaLibrary:
    """csrc/*.cu built by the host C++ compiler against csrc/emulation.h."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None or platform.machine() != "x86_64":
        pytest.skip("the kernel emulation needs an x86-64 host C++ compiler")
    if NVCC is None:
        pytest.skip("the kernel emulation needs the CUDA headers (nvcc not found)")
    include = _cuda_include_dir()
    out = tmp_path_factory.mktemp("emulated") / "libmemenc_fast_emulated.so"
    command = [compiler, "-x", "c++", "-DMEMENC_EMULATE", "-std=c++17", "-O1", "-fPIC", "-shared", f"-I{CSRC}",
               f"-I{include}", *map(str, sorted(CSRC.glob("*.cu"))), "-o", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return cuda_lib.CudaLibrary(out)


@pytest.fixture
def emulated(emulated_library: cuda_lib.CudaLibrary, monkeypatch: pytest.MonkeyPatch):
    """cuda_ops with its launches going to the emulated library, on CPU tensors."""
    cuda_ops = _cuda_ops()
    monkeypatch.setattr(cuda_lib, "load", lambda path=None: emulated_library)
    monkeypatch.setattr(cuda_ops, "check_same_device", lambda op, **tensors: torch.device("cpu"))
    monkeypatch.setattr(cuda_ops, "_launch", lambda name, device, *args: emulated_library.call(name, *args, 0, None))
    with poison_outputs():
        yield cuda_ops


def _packed(encoder: torch.nn.Module, dtype: torch.dtype):
    return pack_weights(read_structure(encoder), dtype, torch.device("cpu"))


def _close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Same computation, different rounding: fp32 ~1e-6, 16-bit a few output ulps."""
    error = relative_error(out, expected)
    assert error < (2e-5 if dtype == torch.float32 else 2e-2), error


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_ops_match_torch_ops(emulated, dtype: torch.dtype) -> None:
    encoder = build_encoder(SMALL, seed=3)
    packed = _packed(encoder, dtype)
    # Odd mask size (61x45 -> 4x3 features: 12 pixels, not a multiple of a 16-byte vector), batch 3.
    pix_feat, masks = make_inputs(SMALL, 3, seed=4, dtype=dtype, mask_size=(61, 45))
    pix_feat = pix_feat[..., :3].contiguous()
    for apply_sigmoid, scale, bias in ((True, 1.0, 0.0), (True, 20.0, -10.0), (False, 1.0, 0.0)):
        out = emulated.mask_downsample(masks, packed, apply_sigmoid, scale, bias)
        expected = torch_ops.mask_downsample(masks, packed, apply_sigmoid, scale, bias)
        assert out.shape == expected.shape == (3, 256, 4, 3) and out.dtype == dtype
        _close(out, expected, dtype)
    mask_features = expected
    tokens = emulated.proj_add(mask_features, pix_feat, packed)
    expected_tokens = torch_ops.proj_add(mask_features, pix_feat, packed)
    assert tokens.shape == (3, 4, 3, 256) and tokens.is_contiguous()
    _close(tokens, expected_tokens, dtype)
    for block in packed.blocks:
        _close(emulated.cxblock(expected_tokens, block), torch_ops.cxblock(expected_tokens, block), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_proj_add_reads_every_layout(emulated, dtype: torch.dtype) -> None:
    encoder = build_encoder(SMALL, seed=5)
    packed = _packed(encoder, dtype)
    generator = torch.Generator().manual_seed(6)
    mask_features = torch.randn(2, 256, 4, 4, generator=generator).to(dtype)
    pix_feat = torch.randn(1, 256, 4, 4, generator=generator).to(dtype)
    expected = torch_ops.proj_add(mask_features, pix_feat.expand(2, -1, -1, -1), packed)
    variants = [
        (mask_features, pix_feat.expand(2, -1, -1, -1)),  # NCHW, expanded batch (stride 0)
        (mask_features.contiguous(memory_format=torch.channels_last),
         pix_feat.expand(2, -1, -1, -1).contiguous(memory_format=torch.channels_last)),
        (mask_features.transpose(2, 3).contiguous().transpose(2, 3), pix_feat.expand(2, -1, -1, -1)),  # copied
    ]
    for m, p in variants:
        _close(emulated.proj_add(m, p, packed), expected, dtype)


def _fused(ops, encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor, dtype: torch.dtype):
    """The fused pipeline on the cuda backend's op table (``ops``: the emulated cuda_ops module)."""
    return pipeline.run_ops(mf.dispatch.op_table("cuda"), _packed(encoder, dtype), pix_feat, masks, True, 1.0, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_pipeline_matches_float64_reference(emulated, dtype: torch.dtype) -> None:
    encoder = build_encoder(SMALL, seed=7)
    pix_feat, masks = make_inputs(SMALL, 2, seed=8)
    with torch.no_grad():
        out = _fused(emulated, encoder, pix_feat.to(dtype), masks.to(dtype), dtype)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    same = None
    if dtype != torch.float32:
        same = reference_outputs(encoder, pix_feat, masks, dtype)["vision_features"]
    assert out.shape == (2, 64, 4, 4) and out.dtype == dtype
    verdict = judge(out, oracle, dtype, same_dtype_ref=same, allow_tf32=False)
    assert verdict.passed, verdict.describe()


def test_emulated_pipeline_compiles_to_one_graph(emulated) -> None:
    """fullgraph torch.compile of the cuda pipeline: kernel availability is asked at trace time,
    each kernel is a custom op whose fake gives its output (AOT autograd checks them)."""
    encoder = build_encoder(SMALL, seed=12)
    packed = _packed(encoder, torch.bfloat16)
    pix_feat, masks = make_inputs(SMALL, 2, seed=13, dtype=torch.bfloat16)
    ops = mf.dispatch.op_table("cuda")
    with torch.no_grad():
        expected = pipeline.run_ops(ops, packed, pix_feat, masks, True, 20.0, -10.0)
        torch._dynamo.reset()
        compiled = torch.compile(lambda p, m: pipeline.run_ops(ops, packed, p, m, True, 20.0, -10.0),
                                 fullgraph=True, backend="aot_eager")
        out = compiled(pix_feat, masks)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_emulated_pipeline_exports_with_the_kernels_as_custom_ops(emulated) -> None:
    encoder = build_encoder(SMALL, seed=14)
    packed = _packed(encoder, torch.float32)
    ops = mf.dispatch.op_table("cuda")

    class Pipeline(torch.nn.Module):
        def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
            return pipeline.run_ops(ops, packed, pix_feat, masks, True, 1.0, 0.0)

    pix_feat, masks = make_inputs(SMALL, 2, seed=15)
    program = torch.export.export(Pipeline(), (pix_feat, masks))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"memenc_fast.cuda_mask_stem.default", "memenc_fast.cuda_proj_add.default",
            "memenc_fast.cuda_dwconv_ln.default"} <= targets, targets
    pix_feat, masks = make_inputs(SMALL, 2, seed=16)
    with torch.no_grad():
        expected = pipeline.run_ops(ops, packed, pix_feat, masks, True, 1.0, 0.0)
    torch.testing.assert_close(program.module()(pix_feat, masks), expected, rtol=0, atol=0)


def test_emulated_tf32_mode_when_torch_allows_it(emulated) -> None:
    encoder = build_encoder(SMALL, seed=9)
    pix_feat, masks = make_inputs(SMALL, 1, seed=10)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.no_grad():
            out = _fused(emulated, encoder, pix_feat, masks, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    error = relative_error(out, oracle)
    assert 1e-6 < error < 1e-3, error  # visibly TF32, within the TF32 bound


def test_emulated_unsupported_configs_fall_back_per_op(emulated) -> None:
    block = mf.CXBlock(256, kernel_size=9, padding=4)
    encoder = mf.MemoryEncoder(64, mf.MaskDownSampler(embed_dim=256, kernel_size=4, stride=4, padding=0),
                               mf.Fuser(block, 1), mf.PositionEmbeddingSine(64), in_dim=256)
    mf.tools.presets.randomize_parameters(encoder, seed=11)
    packed = _packed(encoder.eval(), torch.float32)
    masks, tokens = torch.randn(1, 1, 32, 32), torch.randn(1, 2, 2, 256)
    torch.testing.assert_close(emulated.mask_downsample(masks, packed, True),
                               torch_ops.mask_downsample(masks, packed, True))
    torch.testing.assert_close(emulated.cxblock(tokens, packed.blocks[0]), torch_ops.cxblock(tokens, packed.blocks[0]))
    with pytest.raises(ValueError, match=r"no CUDA kernel for channels 16 -> 128"):
        emulated.conv3x3s2_ln_gelu(torch.randn(1, 4, 4, 16), torch.randn(128, 16, 3, 3), *[torch.randn(128)] * 3,
                                   1e-6)


# ------------------------------------------------------------------------------------- GPU


def _gpu_module_case(encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor) -> None:
    """The module on the cuda backend (outputs poisoned) against the float64 reference."""
    dtype = masks.dtype
    with torch.no_grad(), mf.use_backend("cuda"), poison_outputs():
        out = encoder(pix_feat, masks)["vision_features"]
    assert encoder.last_backend == "cuda" and out.dtype == dtype
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    same = reference_outputs(encoder, pix_feat, masks, dtype)["vision_features"] if dtype != torch.float32 else None
    verdict = judge(out, oracle, dtype, "cuda", same_dtype_ref=same)
    assert verdict.passed, verdict.describe()


def _gpu_preset_case(preset: Preset, batch: int, dtype: torch.dtype, seed: int) -> None:
    device = torch.device("cuda")
    encoder = build_encoder(preset, seed=seed, dtype=dtype, device=device)
    pix_feat, masks = make_inputs(preset, batch, seed=seed + 1, dtype=dtype, device=device)
    _gpu_module_case(encoder, pix_feat, masks)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_module_sam2_size_matches_reference(dtype: torch.dtype, batch: int) -> None:
    _gpu_preset_case(PRESETS["sam2"], batch, dtype, seed=20)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_module_odd_size_batch3(dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    encoder = build_encoder(SMALL, seed=22, dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(23)
    masks = (2 * torch.randn(3, 1, 333, 205, generator=generator)).to(device, dtype)  # -> 21 x 13 features
    pix_feat = torch.randn(3, 256, 21, 13, generator=generator).to(device, dtype)
    _gpu_module_case(encoder, pix_feat, masks)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_module_sam3_size_matches_reference(dtype: torch.dtype) -> None:
    _gpu_preset_case(PRESETS["sam3"], 2, dtype, seed=24)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_each_op_matches_torch_op(dtype: torch.dtype, batch: int) -> None:
    device = torch.device("cuda")
    cuda_ops = _cuda_ops()
    preset = PRESETS["sam2"]
    packed = pack_weights(read_structure(build_encoder(preset, seed=26, device=device)), dtype, device)
    pix_feat, masks = make_inputs(preset, batch, seed=27, dtype=dtype, device=device)
    bound = 2e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad(), poison_outputs():
        for transform in ((True, 1.0, 0.0), (True, 20.0, -10.0), (False, 1.0, 0.0)):
            out = cuda_ops.mask_downsample(masks, packed, *transform)
            expected = torch_ops.mask_downsample(masks, packed, *transform)
            assert relative_error(out, expected) < bound
        tokens = cuda_ops.proj_add(expected, pix_feat, packed)
        expected_tokens = torch_ops.proj_add(expected, pix_feat, packed)
        assert relative_error(tokens, expected_tokens) < bound
        for block in packed.blocks:
            assert relative_error(cuda_ops.cxblock(expected_tokens, block),
                                  torch_ops.cxblock(expected_tokens, block)) < bound


@requires_cuda
def test_gpu_runs_on_the_inputs_device_and_current_stream() -> None:
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    encoder = build_encoder(SMALL, seed=28, device=device, dtype=torch.bfloat16)
    pix_feat, masks = make_inputs(SMALL, 2, seed=29, device=device, dtype=torch.bfloat16)
    with torch.no_grad(), mf.use_backend("cuda"):
        expected = encoder(pix_feat, masks)["vision_features"]
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            out = encoder(pix_feat, masks)["vision_features"]
        stream.synchronize()
    assert out.device == device
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@requires_cuda
def test_gpu_torch_compile_traces_through() -> None:
    device = torch.device("cuda")
    encoder = build_encoder(SMALL, seed=30, device=device, dtype=torch.bfloat16)
    pix_feat, masks = make_inputs(SMALL, 2, seed=31, device=device, dtype=torch.bfloat16)
    with torch.no_grad(), mf.use_backend("cuda"):
        expected = encoder(pix_feat, masks)["vision_features"]
        out = torch.compile(encoder)(pix_feat, masks)["vision_features"]
    assert relative_error(out, expected) < 1e-2


@requires_cuda
def test_gpu_custom_ops_pass_opcheck() -> None:
    _cuda_ops()
    ops = torch.ops.memenc_fast
    device = torch.device("cuda")
    r = lambda *shape: torch.randn(*shape, device=device, dtype=torch.bfloat16)  # noqa: E731
    torch.library.opcheck(ops.cuda_mask_stem, (r(2, 1, 40, 40), r(4, 1, 3, 3), r(4), r(4), r(4), 1e-6,
                                               r(16, 4, 3, 3), r(16), r(16), r(16), 1e-6, True, 1.0, 0.0))
    torch.library.opcheck(ops.cuda_conv3x3s2_ln_gelu, (r(2, 10, 10, 64), r(256, 64, 3, 3), r(256), r(256), r(256),
                                                       1e-6))
    torch.library.opcheck(ops.cuda_proj_add, (r(2, 256, 4, 4), r(2, 256, 4, 4), r(256, 512), r(256)))
    torch.library.opcheck(ops.cuda_dwconv_ln, (r(2, 4, 4, 256), r(256, 1, 7, 7), r(256), r(256), 1e-6))
