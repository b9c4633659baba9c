"""The drop-in against sam3's tracker memory encoder (SimpleMaskEncoder) at SAM 3's shapes."""

import pytest
import torch

import memenc_fast as mf
from memenc_fast.numerics import judge
from memenc_fast.tools.presets import Preset

from helpers import load_sam3_modules, randomize_parameters, reference_outputs


def _tracker_encoder(memory, position, dim=256, interpol=(1152, 1152), out_dim=64):
    """sam3's tracker memory encoder as model_builder builds it (precompute needs CUDA in sam3)."""
    return memory.SimpleMaskEncoder(
        out_dim=out_dim,
        position_encoding=position.PositionEmbeddingSine(num_pos_feats=out_dim, normalize=True, scale=None,
                                                         temperature=10000),
        mask_downsampler=memory.SimpleMaskDownSampler(embed_dim=dim, kernel_size=3, stride=2, padding=1,
                                                      interpol_size=list(interpol)),
        fuser=memory.SimpleFuser(memory.CXBlock(dim=dim, kernel_size=7, padding=3,
                                                layer_scale_init_value=1e-6, use_dwconv=True), num_layers=2),
        in_dim=dim,
    ).eval()


def _ours(dim=256, interpol=(1152, 1152), out_dim=64):
    return mf.MemoryEncoder(
        out_dim=out_dim,
        position_encoding=mf.PositionEmbeddingSine(num_pos_feats=out_dim, normalize=True, scale=None,
                                                   temperature=10000, precompute_resolution=1008),
        mask_downsampler=mf.MaskDownSampler(embed_dim=dim, kernel_size=3, stride=2, padding=1,
                                            interpol_size=list(interpol)),
        fuser=mf.Fuser(mf.CXBlock(dim=dim, kernel_size=7, padding=3, layer_scale_init_value=1e-6,
                                  use_dwconv=True), num_layers=2),
        in_dim=dim,
    ).eval()


@pytest.mark.parametrize("mask_size", [1152, 1008])
def test_tracker_config_loads_strictly_and_matches(mask_size):
    memory, position = load_sam3_modules()
    theirs = _tracker_encoder(memory, position)
    randomize_parameters(theirs, seed=31)
    ours = _ours()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(32)
    pix_feat = torch.randn(1, 256, 72, 72, generator=generator)
    masks = 3 * torch.randn(1, 1, mask_size, mask_size, generator=generator)
    with torch.no_grad():
        expected = theirs(pix_feat, masks, skip_mask_sigmoid=True)
        with mf.use_backend("reference"):
            same = ours(pix_feat, masks, skip_mask_sigmoid=True)
        with mf.use_backend("torch"):
            fused = ours(pix_feat, masks, skip_mask_sigmoid=True)
    assert torch.equal(same["vision_features"], expected["vision_features"])
    assert torch.equal(fused["vision_pos_enc"][0], expected["vision_pos_enc"][0])
    oracle = reference_outputs(ours, pix_feat, masks, torch.float64, skip_mask_sigmoid=True)
    verdict = judge(fused["vision_features"], oracle["vision_features"], torch.float32)
    assert verdict.passed, verdict.describe()


@pytest.mark.parametrize("backend", [b for b in mf.available_backends("cpu") if b != "reference"])
@pytest.mark.parametrize("mask_size", [48, 40])
def test_every_backend_at_a_small_sam3_like_shape(backend, mask_size):
    """interpol_size 48 -> 3x3 features (not a power of two); mask 40 triggers the resize."""
    ours = _ours(dim=32, interpol=(48, 48), out_dim=16)
    randomize_parameters(ours, seed=33)
    generator = torch.Generator().manual_seed(34)
    pix_feat = torch.randn(3, 32, 3, 3, generator=generator)
    masks = 3 * torch.randn(3, 1, mask_size, mask_size, generator=generator)
    with torch.no_grad(), mf.use_backend(backend):
        out = ours(pix_feat, masks, skip_mask_sigmoid=True)["vision_features"]
    oracle = reference_outputs(ours, pix_feat, masks, torch.float64, skip_mask_sigmoid=True)["vision_features"]
    verdict = judge(out, oracle, torch.float32)
    assert verdict.passed, verdict.describe()


def test_patch_sam3_passes_the_trackers_isinstance_check():
    memory, position = load_sam3_modules()
    original = _tracker_encoder(memory, position, dim=32, interpol=(48, 48), out_dim=16)
    randomize_parameters(original, seed=35)

    class Tracker:  # stands in for sam3's Sam3TrackerBase: .maskmem_backbone and the mask transform
        sigmoid_scale_for_mem_enc = 20.0
        sigmoid_bias_for_mem_enc = -10.0

    class VideoModel:
        pass

    tracker = Tracker()
    tracker.maskmem_backbone = original
    video_model = VideoModel()
    video_model.tracker = tracker
    patched = mf.patch_sam3(video_model)
    assert tracker.maskmem_backbone is patched
    assert isinstance(patched, memory.SimpleMaskEncoder) and isinstance(patched, mf.MemoryEncoder)
    assert mf.patch_sam3(tracker) is patched
    assert patched.pix_feat_proj.weight is original.pix_feat_proj.weight
    assert list(patched.state_dict()) == list(original.state_dict())

    assert (tracker.sigmoid_scale_for_mem_enc, tracker.sigmoid_bias_for_mem_enc) == (1.0, 0.0)
    assert (patched.mask_scale, patched.mask_bias) == (20.0, -10.0)
    pix_feat, probabilities = torch.randn(2, 32, 3, 3), torch.sigmoid(torch.randn(2, 1, 40, 40))
    with torch.no_grad():
        expected = original(pix_feat, probabilities * 20.0 - 10.0, skip_mask_sigmoid=True)["vision_features"]
        with mf.use_backend("torch"):
            out = patched(pix_feat, probabilities, skip_mask_sigmoid=True)["vision_features"]
    assert patched.last_backend == "torch"
    # sam3 itself resizes in float32 only, so its float32 run is the yardstick here.
    assert judge(out, expected.double(), torch.float32).passed
    with pytest.raises(TypeError, match="SimpleMaskEncoder"):
        mf.from_sam3(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="maskmem_backbone"):
        mf.patch_sam3(object())


def test_bad_interpol_size_and_mismatched_features():
    for bad in ([1152], (0, 4), "ab", [1.5, 2], 7):
        with pytest.raises(ValueError, match="interpol_size must be a pair of positive ints"):
            mf.MaskDownSampler(kernel_size=3, stride=2, padding=1, interpol_size=bad)
    ours = _ours(dim=32, interpol=(48, 48), out_dim=16)
    with torch.no_grad(), pytest.raises(ValueError, match=r"masks of size 40x40 downsample to 3x3, but pix_feat is 4x4"):
        ours(torch.randn(1, 32, 4, 4), torch.randn(1, 1, 40, 40))


def test_precompute_resolution_warms_without_cuda():
    pe = mf.PositionEmbeddingSine(64, precompute_resolution=1008)
    from memenc_fast import position

    key = (1008 // 16, 1008 // 16, 32, 10000, True, pe.scale, torch.float32, torch.get_default_device())
    assert key in position._cache
    assert mf.PositionEmbeddingSine(64, 10000, True, None, 1008).precompute_resolution == 1008


def test_sam3_preset_shapes():
    preset: Preset = mf.tools.presets.PRESETS["sam3"]
    assert (preset.mask_size, preset.feature_size, preset.interpol_size) == (1152, 72, (1152, 1152))
