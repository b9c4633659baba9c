"""The reference and the drop-in against the real sam2 package, for every shipped config."""

import pytest
import torch

import memenc_fast as mf
from memenc_fast.numerics import judge

from helpers import (PRESETS, make_inputs, memory_encoder_config, randomize_parameters, reference_outputs,
                     requires_sam2, retarget_to_memenc_fast, sam2_config_files)

pytestmark = requires_sam2


def _config_params():
    try:
        return [pytest.param(path, id=name) for name, path in sam2_config_files()]
    except ImportError:
        return [pytest.param(None, id="sam2-missing")]


def _instantiate_pair(path):
    from hydra.utils import instantiate

    section = memory_encoder_config(path)
    theirs = instantiate(section).eval()
    ours = instantiate(retarget_to_memenc_fast(section)).eval()
    return theirs, ours


@pytest.mark.parametrize("path", _config_params())
def test_every_config_builds_loads_strictly_and_matches(path):
    theirs, ours = _instantiate_pair(path)
    assert type(ours) is mf.MemoryEncoder
    assert list(theirs.state_dict()) == list(ours.state_dict())
    randomize_parameters(theirs, seed=1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)

    pix_feat, masks = make_inputs(PRESETS["sam2"], batch=1, seed=2)
    with torch.no_grad():
        expected = theirs(pix_feat, masks)
        with mf.use_backend("reference"):
            same = ours(pix_feat, masks)
        with mf.use_backend("torch"):
            fused = ours(pix_feat, masks)
    # The reference does sam2's ops in sam2's order: bit-identical.
    assert torch.equal(same["vision_features"], expected["vision_features"])
    assert torch.equal(same["vision_pos_enc"][0], expected["vision_pos_enc"][0])
    oracle = reference_outputs(ours, pix_feat, masks, torch.float64)
    verdict = judge(fused["vision_features"], oracle["vision_features"], torch.float32)
    assert verdict.passed, verdict.describe()
    assert torch.equal(fused["vision_pos_enc"][0], expected["vision_pos_enc"][0])


@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mask_hw, feat_hw", [((64, 64), (4, 4)), ((96, 160), (6, 10)), ((100, 60), (7, 4))])
def test_sam2_classes_and_ours_agree_on_odd_sizes(skip_mask_sigmoid, batch, mask_hw, feat_hw):
    from sam2.modeling import memory_encoder as sam2_me
    from sam2.modeling import position_encoding as sam2_pe

    def build(ns_me, ns_pe):
        return ns_me.MemoryEncoder(
            16, ns_me.MaskDownSampler(embed_dim=32, kernel_size=3, stride=2, padding=1),
            ns_me.Fuser(ns_me.CXBlock(32), 2), ns_pe.PositionEmbeddingSine(16), in_dim=32).eval()

    theirs = build(sam2_me, sam2_pe)
    randomize_parameters(theirs, seed=3)
    ours = build(mf, mf)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(4)
    pix_feat = torch.randn((batch, 32) + feat_hw, generator=generator)
    masks = 3 * torch.randn((batch, 1) + mask_hw, generator=generator)
    with torch.no_grad():
        expected = theirs(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
        with mf.use_backend("reference"):
            same = ours(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
        with mf.use_backend("torch"):
            fused = ours(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
    assert torch.equal(same["vision_features"], expected["vision_features"])
    oracle = reference_outputs(ours, pix_feat, masks, torch.float64, skip_mask_sigmoid=skip_mask_sigmoid)
    verdict = judge(fused["vision_features"], oracle["vision_features"], torch.float32)
    assert verdict.passed, verdict.describe()
    assert fused["vision_features"].shape == expected["vision_features"].shape
    assert torch.equal(fused["vision_pos_enc"][0], expected["vision_pos_enc"][0])


def test_hydra_target_memenc_fast_builds_with_sam2_submodules_too():
    """A config that swaps only the top-level _target_ keeps sam2's submodules; it still runs fused."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = sam2_config_files()[0][1]
    section = memory_encoder_config(path)
    theirs = instantiate(section).eval()
    mixed_section = OmegaConf.create(OmegaConf.to_container(section))
    mixed_section["_target_"] = "memenc_fast.MemoryEncoder"
    mixed = instantiate(mixed_section).eval()
    assert type(mixed.fuser).__module__ == "sam2.modeling.memory_encoder"
    randomize_parameters(theirs, seed=5)
    mixed.load_state_dict(theirs.state_dict(), strict=True)
    pix_feat, masks = make_inputs(PRESETS["small"], batch=2, seed=6)
    with torch.no_grad():
        expected = theirs(pix_feat, masks)["vision_features"]
        with mf.use_backend("torch"):
            fused = mixed(pix_feat, masks)["vision_features"]
    assert mixed.last_backend == "torch"
    oracle = reference_outputs(mixed, pix_feat, masks, torch.float64)["vision_features"]
    assert judge(fused, oracle, torch.float32).passed
    assert judge(expected, oracle, torch.float32).passed


def test_from_sam2_shares_parameters_and_patch_sam2_swaps_in_place():
    from sam2.modeling import memory_encoder as sam2_me
    from sam2.modeling import position_encoding as sam2_pe

    theirs = sam2_me.MemoryEncoder(
        16, sam2_me.MaskDownSampler(embed_dim=32, kernel_size=3, stride=2, padding=1),
        sam2_me.Fuser(sam2_me.CXBlock(32), 2), sam2_pe.PositionEmbeddingSine(16), in_dim=32).eval()
    randomize_parameters(theirs, seed=7)
    theirs = theirs.to(torch.float64)

    class Holder:
        pass

    holder = Holder()
    holder.memory_encoder = theirs
    patched = mf.patch_sam2(holder)
    assert holder.memory_encoder is patched and isinstance(patched, mf.MemoryEncoder)
    assert mf.patch_sam2(holder) is patched  # idempotent
    assert patched.pix_feat_proj.weight is theirs.pix_feat_proj.weight
    assert patched.pix_feat_proj.weight.dtype == torch.float64
    assert list(patched.state_dict()) == list(theirs.state_dict())
    assert not patched.training

    pix_feat = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    masks = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = theirs(pix_feat, masks)["vision_features"]
        with mf.use_backend("torch"):
            fused = patched(pix_feat, masks)["vision_features"]
    assert judge(fused, expected, torch.float64).passed

    with pytest.raises(TypeError, match="sam2.modeling.memory_encoder.MemoryEncoder"):
        mf.from_sam2(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="memory_encoder"):
        mf.patch_sam2(object())


def test_patch_sam2_moves_the_callers_mask_transform_into_the_encoder():
    from sam2.modeling import memory_encoder as sam2_me
    from sam2.modeling import position_encoding as sam2_pe

    original = sam2_me.MemoryEncoder(
        16, sam2_me.MaskDownSampler(embed_dim=32, kernel_size=3, stride=2, padding=1),
        sam2_me.Fuser(sam2_me.CXBlock(32), 2), sam2_pe.PositionEmbeddingSine(16), in_dim=32).eval()
    randomize_parameters(original, seed=8)

    class Model:  # what SAM2Base keeps: the encoder and the transform applied before calling it
        sigmoid_scale_for_mem_enc = 20.0
        sigmoid_bias_for_mem_enc = -10.0

    model = Model()
    model.memory_encoder = original
    probabilities = torch.sigmoid(3 * torch.randn(2, 1, 64, 64))
    pix_feat = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        expected = original(pix_feat, probabilities * 20.0 - 10.0, skip_mask_sigmoid=True)["vision_features"]
    patched = mf.patch_sam2(model)
    assert (model.sigmoid_scale_for_mem_enc, model.sigmoid_bias_for_mem_enc) == (1.0, 0.0)
    assert (patched.mask_scale, patched.mask_bias) == (20.0, -10.0)
    mf.patch_sam2(model)  # idempotent: the transform is not applied twice
    assert (patched.mask_scale, patched.mask_bias) == (20.0, -10.0)
    for backend in mf.available_backends("cpu"):
        with torch.no_grad(), mf.use_backend(backend):
            out = patched(pix_feat, probabilities, skip_mask_sigmoid=True)["vision_features"]
        assert judge(out, expected.double(), torch.float32).passed, backend
    unfused = Model()
    unfused.memory_encoder = original
    assert mf.patch_sam2(unfused, fuse_mask_transform=False).mask_scale == 1.0
    assert unfused.sigmoid_scale_for_mem_enc == 20.0