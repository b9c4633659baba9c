"""torch.export, AOTInductor and ONNX keep working with the drop-in."""

import importlib.util

import pytest
import torch
from torch.export import Dim

import memenc_fast as mf
from memenc_fast.numerics import judge

from helpers import (CUDA_FUSED_BACKENDS, PRESETS, TINY, build_encoder, make_inputs, reference_outputs, requires_cuda,
                     requires_sam2)

CPU_BACKENDS = [b for b in mf.available_backends() if b in ("reference", "torch")]
# Backends that run here (the Triton interpreter included), exported as they declare.
ALL_BACKENDS = mf.available_backends("cpu")
requires_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None
    or importlib.util.find_spec("onnxscript") is None,
    reason="onnx, onnxscript and onnxruntime are not installed",
)


def _assert_matches_reference(encoder, out, pix_feat, masks):
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)
    verdict = judge(out["vision_features"].detach(), oracle["vision_features"], torch.float32)
    assert verdict.passed, verdict.describe()
    torch.testing.assert_close(out["vision_pos_enc"][0].detach(), oracle["vision_pos_enc"][0].float(),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_export_with_dynamic_batch(backend):
    encoder = build_encoder(TINY, seed=61)
    pix_feat, masks = make_inputs(TINY, 2, seed=62)
    batch = Dim("batch", min=1, max=64)
    # Kernel backends have no backward: an inference program (no grad), as deployments export.
    with mf.use_backend(backend), torch.set_grad_enabled(backend in ("reference", "torch")):
        program = torch.export.export(encoder, (pix_feat, masks), dynamic_shapes=({0: batch}, {0: batch}))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    if backend == "reference":
        assert any("conv2d" in t for t in targets)
    elif backend == "torch":
        assert any("addmm" in t for t in targets)  # the concatenated-K projection, the MLP
    else:
        assert any(t.startswith(f"memenc_fast.{backend}_") for t in targets), targets  # the kernels' custom ops
    for size in (1, 3):
        pix_feat, masks = make_inputs(TINY, size, seed=63 + size)
        _assert_matches_reference(encoder, program.module()(pix_feat, masks), pix_feat, masks)


def test_export_with_a_dynamic_mask_size_the_feature_size_cannot_follow_fails_clearly():
    encoder = build_encoder(TINY, seed=64)
    pix_feat, masks = make_inputs(TINY, 2, seed=65)
    with mf.use_backend("torch"), pytest.raises(Exception, match="mask_height|specialized|Constraints"):
        torch.export.export(encoder, (pix_feat, masks), dynamic_shapes=(None, {2: Dim("mask_height", min=16)}))


def test_aot_inductor_package_runs(tmp_path):
    encoder = build_encoder(TINY, seed=66)
    pix_feat, masks = make_inputs(TINY, 2, seed=67)
    with mf.use_backend("torch"):
        program = torch.export.export(encoder, (pix_feat, masks))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "encoder.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    _assert_matches_reference(encoder, runner(pix_feat, masks), pix_feat, masks)


def _onnx_round_trip(module, pix_feat, masks, path):
    import onnxruntime

    with torch.no_grad():
        torch.onnx.export(module, (pix_feat, masks), dynamo=True).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    features, pos = session.run(None, {names[0]: pix_feat.numpy(), names[1]: masks.numpy()})
    return {"vision_features": torch.from_numpy(features), "vision_pos_enc": [torch.from_numpy(pos)]}


@requires_onnx
@pytest.mark.parametrize("backend", ["auto"] + CPU_BACKENDS)
def test_onnx_export_runs_in_onnxruntime(backend, tmp_path):
    encoder = build_encoder(TINY, seed=68)
    pix_feat, masks = make_inputs(TINY, 2, seed=69)
    with mf.use_backend(backend):
        out = _onnx_round_trip(encoder, pix_feat, masks, tmp_path / "encoder.onnx")
    _assert_matches_reference(encoder, out, pix_feat, masks)


@requires_onnx
@requires_sam2
def test_onnx_export_of_a_patched_sam2_memory_encoder(tmp_path):
    from sam2.modeling import memory_encoder as sam2_me
    from sam2.modeling import position_encoding as sam2_pe

    original = sam2_me.MemoryEncoder(
        16, sam2_me.MaskDownSampler(embed_dim=32, kernel_size=3, stride=2, padding=1),
        sam2_me.Fuser(sam2_me.CXBlock(32), 2), sam2_pe.PositionEmbeddingSine(16), in_dim=32).eval()
    mf.tools.presets.randomize_parameters(original, seed=70)

    class Holder:
        pass

    holder = Holder()
    holder.memory_encoder = original
    patched = mf.patch_sam2(holder)
    pix_feat, masks = make_inputs(TINY, 2, seed=71)
    out = _onnx_round_trip(patched, pix_feat, masks, tmp_path / "patched.onnx")
    _assert_matches_reference(patched, out, pix_feat, masks)


@requires_cuda
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_torch_export_runs_on_the_gpu(backend):
    """The cuda backend exports its kernels as custom ops; the others export the torch ops."""
    device = torch.device("cuda")
    preset = PRESETS["small"]
    encoder = build_encoder(preset, seed=68, dtype=torch.bfloat16, device=device)
    pix_feat, masks = make_inputs(preset, 2, seed=69, dtype=torch.bfloat16, device=device)
    with mf.use_backend(backend):
        program = torch.export.export(encoder, (pix_feat, masks))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("memenc_fast.cuda_") for t in targets) == (backend == "cuda"), targets
    pix_feat, masks = make_inputs(preset, 2, seed=70, dtype=torch.bfloat16, device=device)
    out = program.module()(pix_feat, masks)["vision_features"]
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    same = reference_outputs(encoder, pix_feat, masks, torch.bfloat16)["vision_features"]
    verdict = judge(out, oracle, torch.bfloat16, "cuda", same_dtype_ref=same)
    assert verdict.passed, verdict.describe()
