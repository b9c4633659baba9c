"""The torch backend against the float64 reference: dtypes, batch, sigmoid modes, odd sizes, configs."""

import copy

import pytest
import torch

import memenc_fast as mf
from memenc_fast.numerics import judge, relative_error

from helpers import CUDA_MARKS, PRESETS, TINY, build_encoder, make_inputs, reference_outputs


def _run(encoder, pix_feat, masks, backend, **kwargs):
    with torch.no_grad(), mf.use_backend(backend):
        return encoder(pix_feat, masks, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_matches_reference(dtype, batch, skip_mask_sigmoid):
    encoder = build_encoder(TINY, seed=11, dtype=dtype)
    pix_feat, masks = make_inputs(TINY, batch, seed=12, dtype=dtype)
    out = _run(encoder, pix_feat, masks, "torch", skip_mask_sigmoid=skip_mask_sigmoid)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64, skip_mask_sigmoid=skip_mask_sigmoid)
    same = _run(encoder, pix_feat, masks, "reference", skip_mask_sigmoid=skip_mask_sigmoid)
    feats = out["vision_features"]
    assert feats.dtype == dtype and feats.shape == (batch, TINY.out_dim, 4, 4) and feats.is_contiguous()
    verdict = judge(feats, oracle["vision_features"], dtype, same_dtype_ref=same["vision_features"])
    assert verdict.passed, verdict.describe()
    pos = out["vision_pos_enc"][0]
    assert pos.dtype == dtype and pos.shape == (batch, TINY.out_dim, 4, 4)
    assert torch.equal(pos, same["vision_pos_enc"][0])


def test_sam2_size_fp32():
    encoder = build_encoder(PRESETS["sam2"], seed=13)
    pix_feat, masks = make_inputs(PRESETS["sam2"], 2, seed=14)
    out = _run(encoder, pix_feat, masks, "torch")["vision_features"]
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    verdict = judge(out, oracle, torch.float32)
    assert verdict.passed, verdict.describe()


@pytest.mark.parametrize(
    "downsampler",
    [
        dict(kernel_size=4, stride=4, padding=0, total_stride=16),  # sam2's class defaults
        dict(kernel_size=3, stride=2, padding=1, total_stride=4),
    ],
)
def test_other_downsampler_configs(downsampler):
    encoder = mf.MemoryEncoder(
        16, mf.MaskDownSampler(embed_dim=32, **downsampler), mf.Fuser(mf.CXBlock(32), 1),
        mf.PositionEmbeddingSine(16), in_dim=32)
    mf.tools.presets.randomize_parameters(encoder, seed=15)
    encoder.eval()
    feat = 5
    mask = feat * downsampler["total_stride"]
    pix_feat, masks = torch.randn(3, 32, feat, feat), torch.randn(3, 1, mask, mask)
    out = _run(encoder, pix_feat, masks, "torch")["vision_features"]
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    assert judge(out, oracle, torch.float32).passed


def test_input_projection_identity_out_proj_no_gamma_and_other_activation():
    block = mf.CXBlock(32, kernel_size=5, padding=2, layer_scale_init_value=0.0)
    encoder = mf.MemoryEncoder(
        32, mf.MaskDownSampler(embed_dim=32, kernel_size=3, stride=2, padding=1, activation=torch.nn.SiLU),
        mf.Fuser(block, 2, dim=32, input_projection=True), mf.PositionEmbeddingSine(32), in_dim=32)
    mf.tools.presets.randomize_parameters(encoder, seed=16)
    encoder.eval()
    assert block.gamma is None and isinstance(encoder.out_proj, torch.nn.Identity)
    pix_feat, masks = torch.randn(2, 32, 3, 5), torch.randn(2, 1, 48, 80)
    out = _run(encoder, pix_feat, masks, "torch")["vision_features"]
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    assert judge(out, oracle, torch.float32).passed


def test_mask_scale_and_bias_match_callers_transform():
    """SAM 2's caller does sigmoid(m) * 20 - 10 then skip_mask_sigmoid=True; the module can do it."""
    encoder = build_encoder(TINY, seed=17)
    pix_feat, logits = make_inputs(TINY, 2, seed=18)
    transformed = torch.sigmoid(logits) * 20.0 - 10.0
    expected = _run(encoder, pix_feat, transformed, "reference", skip_mask_sigmoid=True)["vision_features"]
    encoder.mask_scale, encoder.mask_bias = 20.0, -10.0
    for backend in ("reference", "torch"):
        out = _run(encoder, pix_feat, logits, backend)["vision_features"]
        assert judge(out, expected.double(), torch.float32).passed, backend


def test_batch_broadcast_matches_reference():
    encoder = build_encoder(TINY, seed=19)
    pix_feat, masks = make_inputs(TINY, 3, seed=20)
    for pf, mk in ((pix_feat[:1], masks), (pix_feat, masks[:1])):
        out = _run(encoder, pf, mk, "torch")["vision_features"]
        oracle = reference_outputs(encoder, pf, mk, torch.float64)["vision_features"]
        assert out.shape[0] == 3
        assert judge(out, oracle, torch.float32).passed


def test_noncontiguous_and_channels_last_inputs():
    encoder = build_encoder(TINY, seed=21)
    pix_feat, masks = make_inputs(TINY, 2, seed=22)
    expected = _run(encoder, pix_feat, masks, "torch")["vision_features"]
    wide = torch.randn(2, TINY.in_dim, 4, 8)
    wide[..., ::2] = pix_feat
    variants = [
        (pix_feat.contiguous(memory_format=torch.channels_last), masks),
        (wide[..., ::2], masks.transpose(-1, -2).contiguous().transpose(-1, -2)),
    ]
    for pf, mk in variants:
        out = _run(encoder, pf, mk, "torch")["vision_features"]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_autocast_bf16_matches_reference_under_autocast():
    encoder = build_encoder(TINY, seed=23)
    pix_feat, masks = make_inputs(TINY, 2, seed=24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with mf.use_backend("torch"):
            out = encoder(pix_feat, masks)
        with mf.use_backend("reference"):
            same = encoder(pix_feat, masks)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)
    feats = out["vision_features"]
    assert feats.dtype == same["vision_features"].dtype == torch.bfloat16
    assert out["vision_pos_enc"][0].dtype == same["vision_pos_enc"][0].dtype
    verdict = judge(feats, oracle["vision_features"], torch.bfloat16, same_dtype_ref=same["vision_features"])
    assert verdict.passed, verdict.describe()


def _output_and_gradients(encoder, pix_feat, masks, backend):
    """The features of a forward with grad under ``backend``, and the gradients of a fixed random
    projection of them with respect to both inputs and every parameter."""
    encoder.zero_grad()
    pf, mk = pix_feat.clone().requires_grad_(), masks.clone().requires_grad_()
    with mf.use_backend(backend):
        out = encoder(pf, mk)["vision_features"]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out.double() * weights).sum().backward()
    return out.detach(), [pf.grad, mk.grad] + [p.grad.clone() for p in encoder.parameters()]


def test_training_with_grad_matches_reference_gradients():
    encoder = build_encoder(TINY, seed=25, dtype=torch.float64)
    pix_feat, masks = make_inputs(TINY, 2, seed=26, dtype=torch.float64)
    _, expected = _output_and_gradients(encoder, pix_feat, masks, "reference")
    _, grads = _output_and_gradients(encoder, pix_feat, masks, "torch")
    assert encoder.last_backend == "torch"
    for ref_grad, fused_grad in zip(expected, grads):
        torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def test_bf16_training_matches_reference(device):
    """bf16 training through the torch backend's fused, differentiable ops: the output and every
    gradient against float64, judged against the reference run in bf16. Gradients: no worse than
    1.25x the bf16 reference's own error (or 1e-2); those of under 64 elements (per-channel sums over
    every pixel of the first mask stages, where a few bf16 roundings dominate) within twice the
    worst error the bf16 reference makes on such tensors."""
    preset = PRESETS["small"]
    encoder = build_encoder(preset, seed=29, dtype=torch.bfloat16, device=device).train()
    pix_feat, masks = make_inputs(preset, 3, seed=30, dtype=torch.bfloat16, device=device)
    out, grads = _output_and_gradients(encoder, pix_feat, masks, "torch")
    assert encoder.last_backend == "torch"
    same_out, same_grads = _output_and_gradients(encoder, pix_feat, masks, "reference")
    oracle = copy.deepcopy(encoder).double()
    oracle_out, oracle_grads = _output_and_gradients(oracle, pix_feat.double(), masks.double(), "reference")

    verdict = judge(out, oracle_out, torch.bfloat16, device, same_dtype_ref=same_out)
    assert verdict.passed, f"vision_features: {verdict.describe()}"
    names = ["pix_feat", "masks"] + [name for name, _ in encoder.named_parameters()]
    errors = [(name, relative_error(got, ref), relative_error(same, ref), got.numel())
              for name, got, same, ref in zip(names, grads, same_grads, oracle_grads)]
    tiny_bound = 2 * max(same for _, _, same, size in errors if size < 64)
    for name, error, same, size in errors:
        bound = tiny_bound if size < 64 else max(1e-2, 1.25 * same)
        assert error < bound, f"{name} gradient: rel err {error:.3g} (bound {bound:.3g}, bf16 reference {same:.3g})"


def test_gradcheck_through_the_torch_backend():
    """Finite differences agree with the torch backend's autograd graph (float64; parameter gradients
    are compared with the reference in test_training_with_grad_matches_reference_gradients)."""
    encoder = mf.MemoryEncoder(
        4, mf.MaskDownSampler(embed_dim=8, kernel_size=3, stride=2, padding=1, total_stride=4),
        mf.Fuser(mf.CXBlock(8, kernel_size=3, padding=1), 1), mf.PositionEmbeddingSine(4), in_dim=8)
    mf.tools.presets.randomize_parameters(encoder, seed=27)
    encoder = encoder.double().eval()
    generator = torch.Generator().manual_seed(28)
    pix_feat = torch.randn(2, 8, 2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    masks = torch.randn(2, 1, 8, 12, dtype=torch.float64, generator=generator, requires_grad=True)

    def features(pf, mk):
        with mf.use_backend("torch"):
            return encoder(pf, mk)["vision_features"]

    assert torch.autograd.gradcheck(features, (pix_feat, masks))
    assert encoder.last_backend == "torch"
