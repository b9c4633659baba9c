"""torch.compile(fullgraph=True) traces the drop-in on every backend that runs here (the kernel
backends' ops as custom ops with fake implementations)."""

import pytest
import torch

import memenc_fast as mf
from memenc_fast.numerics import judge

from helpers import CUDA_FUSED_BACKENDS, PRESETS, TINY, build_encoder, make_inputs, reference_outputs, requires_cuda

# The triton backend runs on the CPU under Triton's interpreter (which the tests set without a GPU).
CPU_BACKENDS = mf.available_backends("cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fullgraph_compile_matches_reference(backend):
    torch._dynamo.reset()
    encoder = build_encoder(TINY, seed=41)
    pix_feat, masks = make_inputs(TINY, 3, seed=42)
    compiled = torch.compile(encoder, fullgraph=True)
    with torch.no_grad(), mf.use_backend(backend):
        out = compiled(pix_feat, masks, skip_mask_sigmoid=True)
    assert encoder.last_backend == backend
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64, skip_mask_sigmoid=True)
    verdict = judge(out["vision_features"], oracle["vision_features"], torch.float32)
    assert verdict.passed, verdict.describe()
    torch.testing.assert_close(out["vision_pos_enc"][0], oracle["vision_pos_enc"][0].float(), rtol=0, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_fullgraph_compile_matches_reference(backend, mode):
    """As SAM 2.1's fast video predictor compiles the encoder (fullgraph, static shapes), on every
    GPU backend; ``reduce-overhead`` also replays the kernels inside torch's CUDA graphs."""
    torch._dynamo.reset()
    device = torch.device("cuda")
    encoder = build_encoder(PRESETS["small"], seed=43, dtype=torch.bfloat16, device=device)
    inputs = [make_inputs(PRESETS["small"], 2, seed=s, dtype=torch.bfloat16, device=device) for s in (44, 45, 46)]
    compiled = torch.compile(encoder, fullgraph=True, dynamic=False, mode=mode)
    with torch.no_grad(), mf.use_backend(backend):
        for pix_feat, masks in inputs:  # later calls replay what the first ones compiled
            out = compiled(pix_feat, masks)["vision_features"].clone()
            assert encoder.last_backend == backend
            oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
            same = reference_outputs(encoder, pix_feat, masks, torch.bfloat16)["vision_features"]
            verdict = judge(out, oracle, torch.bfloat16, "cuda", same_dtype_ref=same)
            assert verdict.passed, verdict.describe()


def test_compiled_code_splits_batches_past_the_launch_limit():
    """Compiled code traces the same op chain as eager, batch splitting included: two TINY objects
    per launch gives three launches of each kernel op for five objects."""
    if "triton" not in mf.available_backends("cpu"):
        pytest.skip("the triton backend cannot run here")
    torch._dynamo.reset()
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    encoder = build_encoder(TINY, seed=47)
    encoder.max_elements_per_launch = 2 * 16 * (256 + 32)  # two TINY objects per launch
    pix_feat, masks = make_inputs(TINY, 5, seed=48)
    with torch.no_grad(), mf.use_backend("triton"):
        expected = encoder(pix_feat, masks)["vision_features"]
        out = torch.compile(encoder, fullgraph=True, backend=recording)(pix_feat, masks)["vision_features"]
    assert len(graphs) == 1
    assert graphs[0].count("memenc_fast.triton_mask_downsample") == 3, graphs
    assert graphs[0].count("memenc_fast.triton_proj_add") == 3, graphs
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
