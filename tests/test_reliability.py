"""Edge cases and robustness: empty batches, non-finite logits, concurrent forwards, random configs."""

import concurrent.futures
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import memenc_fast as mf
from memenc_fast.structure import read_structure
from memenc_fast.numerics import judge, relative_error, tolerance

from helpers import (CUDA_FUSED_BACKENDS, CUDA_MARKS, TINY, backend_device_params, build_encoder, make_inputs,
                     reference_outputs, requires_cuda)


@pytest.mark.parametrize(("backend", "device"), backend_device_params())
def test_empty_batch_gives_empty_outputs(backend, device):
    encoder = build_encoder(TINY, device=device)
    pix_feat, masks = make_inputs(TINY, 2, device=device)
    with torch.no_grad(), mf.use_backend(backend):
        out = encoder(pix_feat[:0], masks[:0])
    assert out["vision_features"].shape == (0, TINY.out_dim, 4, 4)
    assert out["vision_pos_enc"][0].shape == (0, TINY.out_dim, 4, 4)


@pytest.mark.parametrize(("backend", "device"), backend_device_params(fused_only=True))
@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_non_finite_logits_behave_like_the_reference(backend, device, skip_mask_sigmoid):
    """inf logits saturate the sigmoid like the reference; NaN propagates the same way."""
    encoder = build_encoder(TINY, device=device)
    pix_feat, masks = make_inputs(TINY, 2, device=device)
    masks[0, 0, :8, :8] = math.inf
    masks[0, 0, 8:16, :8] = -math.inf
    masks[0, 0, 30, 30] = math.nan  # batch item 1 stays finite: items are independent
    with torch.no_grad():
        with mf.use_backend("reference"):
            expected = encoder(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)["vision_features"]
        with mf.use_backend(backend):
            out = encoder(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)["vision_features"]
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    finite = torch.isfinite(expected)
    bound = 10 * tolerance(torch.float32, device)  # per element: 10x the norm-wise bound
    torch.testing.assert_close(out[finite], expected[finite], rtol=bound, atol=bound)
    assert finite[1].all()


@pytest.mark.parametrize(("backend", "device"), backend_device_params(fused_only=True))
def test_concurrent_forwards_and_weight_updates_stay_correct(backend, device):
    """Threads share one module (and its caches) while another thread reloads the weights."""
    encoders = [build_encoder(TINY, seed=s, device=device) for s in (51, 52)]
    shared = build_encoder(TINY, seed=51, device=device)
    # Triton's interpreter runs a whole kernel under the GIL, so more rounds add time there, not
    # interleavings.
    rounds = 1 if device == "cpu" and backend == "triton" else 3
    inputs = [make_inputs(TINY, 2, seed=s, device=device) for s in range(6 if rounds > 1 else 4)]
    with torch.no_grad(), mf.use_backend(backend):
        expected = {
            (w, i): encoders[w](*inputs[i])["vision_features"] for w in range(2) for i in range(len(inputs))
        }

    def forward(i):
        with torch.no_grad(), mf.use_backend(backend):
            return i, shared(*inputs[i])["vision_features"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(forward, list(range(len(inputs))) * rounds))
    for i, out in results:
        torch.testing.assert_close(out, expected[(0, i)], rtol=0, atol=0)

    shared.load_state_dict(encoders[1].state_dict())
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(forward, list(range(len(inputs))) * rounds))
    for i, out in results:
        torch.testing.assert_close(out, expected[(1, i)], rtol=0, atol=0)


@st.composite
def encoder_configs(draw):
    stride, layers = draw(st.sampled_from([(2, 1), (2, 2), (2, 4), (4, 1), (4, 2)]))
    kernel_size = draw(st.sampled_from([stride, stride + 1, 3]))
    padding = draw(st.integers(0, (kernel_size - 1) // 2 + 1))
    dim = draw(st.sampled_from([8, 16, 24, 32]))
    feat_h, feat_w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return dict(
        stride=stride, total_stride=stride**layers, kernel_size=kernel_size, padding=padding, dim=dim,
        out_dim=draw(st.sampled_from([dim, 8, 12])), num_layers=draw(st.integers(0, 2)),
        block_kernel=draw(st.sampled_from([(7, 3), (3, 1), (5, 2)])), feat=(feat_h, feat_w),
        batch=draw(st.integers(1, 3)), input_projection=draw(st.booleans()),
        skip_mask_sigmoid=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def _mask_size_for(config):
    """The mask size whose downsampling gives exactly the feature size, if there is one."""
    sizes = []
    for feat in config["feat"]:
        candidates = [m for m in range(1, feat * config["total_stride"] * 2 + 8)
                      if _downsample(m, config) == feat]
        if not candidates:
            return None
        sizes.append(candidates[-1])
    return tuple(sizes)


def _downsample(size, config):
    layers = round(math.log(config["total_stride"], config["stride"]))
    for _ in range(layers):
        size = (size + 2 * config["padding"] - config["kernel_size"]) // config["stride"] + 1
        if size < 1:
            return -1
    return size


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(config=encoder_configs(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def test_random_configs_match_reference(device, config, dtype):
    mask_size = _mask_size_for(config)
    assume(mask_size is not None)
    dim = config["dim"]
    block = mf.CXBlock(dim, kernel_size=config["block_kernel"][0], padding=config["block_kernel"][1])
    encoder = mf.MemoryEncoder(
        config["out_dim"],
        mf.MaskDownSampler(embed_dim=dim, kernel_size=config["kernel_size"], stride=config["stride"],
                           padding=config["padding"], total_stride=config["total_stride"]),
        mf.Fuser(block, config["num_layers"], dim=dim, input_projection=config["input_projection"]),
        mf.PositionEmbeddingSine(config["out_dim"]),
        in_dim=dim,
    )
    mf.tools.presets.randomize_parameters(encoder, seed=config["seed"])
    encoder = encoder.to(device, dtype).eval()
    generator = torch.Generator().manual_seed(config["seed"])
    pix_feat = torch.randn((config["batch"], dim) + config["feat"], generator=generator).to(device, dtype)
    masks = (2 * torch.randn((config["batch"], 1) + mask_size, generator=generator)).to(device, dtype)
    kwargs = dict(skip_mask_sigmoid=config["skip_mask_sigmoid"])
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64, **kwargs)["vision_features"]
    same = reference_outputs(encoder, pix_feat, masks, dtype, **kwargs)["vision_features"]
    # A draw where even the reference in this dtype misses the bound (tiny, ill-conditioned in
    # bf16) tests nothing about the backends.
    assume(relative_error(same, oracle) < tolerance(dtype, device))
    for backend in mf.available_backends(device)[1:]:
        if backend != "torch" and dtype == torch.float64:
            continue
        with torch.no_grad(), mf.use_backend(backend):
            out = encoder(pix_feat, masks, **kwargs)["vision_features"]
        verdict = judge(out, oracle, dtype, device, same_dtype_ref=same if dtype == torch.bfloat16 else None)
        assert verdict.passed, f"{backend} {config} {dtype}: {verdict.describe()}"


@pytest.mark.parametrize(("backend", "device"), backend_device_params(fused_only=True))
def test_large_batches_are_split_below_the_element_limit(backend, device, monkeypatch):
    """The splitting logic that keeps every launch under 2**31 elements, exercised with a small
    limit: each launch must stay under it, and the split result must equal the unsplit one."""
    from memenc_fast import pipeline

    encoder = build_encoder(TINY, seed=53, device=device)
    pix_feat, masks = make_inputs(TINY, 5, seed=54, device=device)
    with torch.no_grad(), mf.use_backend(backend):
        whole = encoder(pix_feat, masks)["vision_features"]
    structure = read_structure(encoder)
    # TINY's largest per-object tensor: the 16 tokens x (256 mask + 32 feature) channels of proj+add
    per_object = 16 * (256 + 32)
    assert pipeline.objects_per_launch(structure, (64, 64), (4, 4), 2 * per_object) == 2
    launches = []
    real_run_ops = pipeline.run_ops

    def recording_run_ops(ops, structure, pix, mask, *options):
        launches.append(mask.shape[0])
        return real_run_ops(ops, structure, pix, mask, *options)

    monkeypatch.setattr(pipeline, "run_ops", recording_run_ops)
    monkeypatch.setattr(encoder, "max_elements_per_launch", 2 * per_object)
    with torch.no_grad(), mf.use_backend(backend):
        split = encoder(pix_feat, masks)["vision_features"]
    assert launches == [2, 2, 1]
    # The same ops on fewer objects at a time; oneDNN and cuBLAS block batches differently.
    bound = tolerance(torch.float32, device)
    torch.testing.assert_close(split, whole, rtol=bound, atol=bound)


def test_sam2_sized_launches_stay_under_2_to_the_31():
    """At SAM 2's size the largest per-object tensor is the MLP hidden (4096 tokens x 1024), so
    one launch takes at most 511 objects: B=512 masks (2^29 elements) already split."""
    from memenc_fast import pipeline

    preset = mf.tools.presets.PRESETS["sam2"]
    encoder = build_encoder(preset)
    chunk = pipeline.objects_per_launch(read_structure(encoder), (1024, 1024), (64, 64),
                                        encoder.max_elements_per_launch)
    assert chunk == (2**31 - 1) // (4096 * 1024) == 511


@requires_cuda
@pytest.mark.heavy
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_masks_past_2_to_the_31_elements(backend):
    """2049 SAM 2-sized bf16 masks, one tensor of 2^31 + 2^20 elements (the last object starts at
    element 2^31), against a broadcast pix_feat: the objects at both ends, at the first launch
    boundary and past 2^31 match the reference run on them alone."""
    from memenc_fast import pipeline

    device = torch.device("cuda")
    if torch.cuda.mem_get_info(device)[0] < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory")
    preset = mf.tools.presets.PRESETS["sam2"]
    encoder = build_encoder(preset, seed=61, dtype=torch.bfloat16, device=device)
    batch = 2**31 // preset.mask_size**2 + 1
    generator = torch.Generator(device).manual_seed(62)
    masks = torch.randn((batch, 1, preset.mask_size, preset.mask_size), generator=generator, device=device,
                        dtype=torch.bfloat16).mul_(2.0)
    assert masks.numel() > 2**31
    pix_feat = make_inputs(preset, 1, seed=63, dtype=torch.bfloat16, device=device)[0]
    with torch.no_grad(), mf.use_backend(backend):
        features = encoder(pix_feat, masks)["vision_features"]
    assert encoder.last_backend == backend and features.shape[0] == batch
    chunk = pipeline.objects_per_launch(read_structure(encoder), masks.shape[-2:], pix_feat.shape[-2:],
                                        encoder.max_elements_per_launch)
    assert chunk < batch
    for index in sorted({0, chunk - 1, chunk, batch - 2, batch - 1}):
        one = masks[index:index + 1]
        oracle = reference_outputs(encoder, pix_feat, one, torch.float64)["vision_features"]
        same = reference_outputs(encoder, pix_feat, one, torch.bfloat16)["vision_features"]
        verdict = judge(features[index:index + 1], oracle, torch.bfloat16, "cuda", same_dtype_ref=same)
        assert verdict.passed, f"object {index}: {verdict.describe()}"
