"""Bad input raises ValueError/TypeError naming what was expected and what was given, on every backend."""

import pytest
import torch

import memenc_fast as mf

from helpers import TINY, backend_device_params, build_encoder, make_inputs


def _call(encoder, backend, pix_feat, masks):
    with torch.no_grad(), mf.use_backend(backend):
        return encoder(pix_feat, masks)


@pytest.mark.parametrize(("backend", "device"), backend_device_params())
def test_wrong_rank(backend, device):
    encoder = build_encoder(TINY, device=device)
    pix_feat, masks = make_inputs(TINY, 1, device=device)
    with pytest.raises(ValueError, match=r"masks must be 4-D .* got shape \(64, 64\)"):
        _call(encoder, backend, pix_feat, masks[0, 0])
    with pytest.raises(ValueError, match=r"pix_feat must be 4-D .* got shape \(32, 4, 4\)"):
        _call(encoder, backend, pix_feat[0], masks)


@pytest.mark.parametrize(("backend", "device"), backend_device_params())
def test_wrong_channels(backend, device):
    encoder = build_encoder(TINY, device=device)
    pix_feat, masks = make_inputs(TINY, 1, device=device)
    with pytest.raises(ValueError, match=r"pix_feat must have 32 channels .* got shape \(1, 31, 4, 4\)"):
        _call(encoder, backend, pix_feat[:, :31], masks)
    with pytest.raises(ValueError, match=r"masks must have 1 channel.* got shape \(1, 2, 64, 64\)"):
        _call(encoder, backend, pix_feat, masks.expand(1, 2, 64, 64))


@pytest.mark.parametrize(("backend", "device"), backend_device_params())
def test_mask_size_not_matching_features(backend, device):
    encoder = build_encoder(TINY, device=device)
    pix_feat, _ = make_inputs(TINY, 1, device=device)
    with pytest.raises(ValueError, match=r"masks of size 48x64 downsample to 3x4, but pix_feat is 4x4"):
        _call(encoder, backend, pix_feat, torch.randn(1, 1, 48, 64, device=device))


@pytest.mark.parametrize(("backend", "device"), backend_device_params())
def test_batch_mismatch(backend, device):
    encoder = build_encoder(TINY, device=device)
    pix_feat, masks = make_inputs(TINY, 3, device=device)
    with pytest.raises(ValueError, match="same batch size"):
        _call(encoder, backend, pix_feat[:2], masks)


@pytest.mark.parametrize(("backend", "device"), backend_device_params())
def test_unsupported_dtypes(backend, device):
    encoder = build_encoder(TINY, device=device)
    pix_feat, masks = make_inputs(TINY, 1, device=device)
    with pytest.raises(TypeError, match=r"masks must be a floating tensor .* got bool"):
        _call(encoder, backend, pix_feat, masks > 0)
    with pytest.raises(TypeError, match=r"pix_feat must be a floating tensor .* got int64"):
        _call(encoder, backend, pix_feat.long(), masks)
    with pytest.raises(TypeError, match=r"masks dtype float64 does not match the module's parameter dtype float32"):
        _call(encoder, backend, pix_feat, masks.double())
    with pytest.raises(TypeError, match=r"masks must be a torch.Tensor; got list"):
        _call(encoder, backend, pix_feat, [1.0])


@pytest.mark.parametrize(("backend", "device"), backend_device_params())
def test_mismatched_devices(backend, device):
    encoder = build_encoder(TINY, device=device)
    pix_feat, masks = make_inputs(TINY, 1, device=device)
    expected = f"mismatched devices: masks are on meta but the module's parameters are on {device}"
    with pytest.raises(ValueError, match=expected):
        _call(encoder, backend, pix_feat, masks.to("meta"))


def test_pix_feat_on_another_device_is_moved_like_sam2():
    """sam2 moves pix_feat to the masks' device; the meta device stands in for 'elsewhere' here."""
    pix_feat, masks = make_inputs(TINY, 1)
    encoder_meta = build_encoder(TINY).to("meta")
    with torch.no_grad(), mf.use_backend("torch"):
        out = encoder_meta(pix_feat, masks.to("meta"))["vision_features"]
    assert out.device.type == "meta" and out.shape == (1, TINY.out_dim, 4, 4)


def test_constructor_errors():
    with pytest.raises(ValueError, match="total_stride must be a power of stride"):
        mf.MaskDownSampler(stride=4, total_stride=8)
    with pytest.raises(ValueError, match="interpol_size must be a pair of positive ints"):
        mf.MaskDownSampler(interpol_size=[1152])
    with pytest.raises(ValueError, match="num_pos_feats must be even"):
        mf.PositionEmbeddingSine(63)
    with pytest.raises(ValueError, match="needs dim"):
        mf.Fuser(mf.CXBlock(8), 1, input_projection=True)
