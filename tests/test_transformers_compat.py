"""The drop-in against Hugging Face transformers' SAM 2 video memory encoder (and its two twins).

Everything is built from configs with random weights: nothing is downloaded.
"""

import copy
import importlib
import inspect
import pickle

import pytest
import torch

import memenc_fast as mf
from memenc_fast.numerics import judge, relative_error
from memenc_fast.transformers_compat import (
    TransformersMemoryEncoder,
    memory_encoder_from_transformers,
    patch_transformers,
    state_dict_from_transformers,
    state_dict_to_transformers,
)

from helpers import PRESETS, build_encoder, randomize_parameters

sam2_video = pytest.importorskip(
    "transformers.models.sam2_video.modeling_sam2_video",
    reason="transformers (with its SAM 2 video model) is not importable: pip install transformers",
    exc_type=ImportError,
)

# (config class, memory encoder class) per transformers model sharing this memory encoder.
FAMILIES = {
    "sam2_video": ("Sam2VideoConfig", "Sam2VideoMemoryEncoder"),
    "sam3_tracker_video": ("Sam3TrackerVideoConfig", "Sam3TrackerVideoMemoryEncoder"),
    "edgetam_video": ("EdgeTamVideoConfig", "EdgeTamVideoMemoryEncoder"),
}


def _memory_encoder(family="sam2_video", hidden=32, out=16, seed=0, **config):
    """A transformers memory encoder built from its model's config (128² masks -> 8² features),
    with seeded weights that make every LayerNorm and layer scale matter."""
    try:
        modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        config_class = getattr(importlib.import_module("transformers"), FAMILIES[family][0])
    except (ImportError, AttributeError):
        pytest.skip(f"this transformers has no {family} model")
    sizes = dict(memory_encoder_hidden_size=hidden, memory_encoder_output_channels=out,
                 mask_downsampler_embed_dim=hidden, memory_fuser_embed_dim=hidden,
                 memory_fuser_intermediate_dim=4 * hidden)
    cfg = config_class(**{**sizes, **config})
    encoder = getattr(modeling, FAMILIES[family][1])(cfg).eval()
    randomize_parameters(encoder, seed)
    return encoder


def _inputs(batch, channels, mask_hw=(128, 128), seed=1, binarized=False):
    """(pix_feat, masks) as Sam2VideoModel._encode_new_memory passes them: sigmoid(logits) * 20 - 10,
    or the binarized mask scaled the same way for masks from clicks."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, 1, *mask_hw, generator=generator)
    probs = (logits > 0).float() if binarized else torch.sigmoid(logits)
    feat_hw = (mask_hw[0] // 16, mask_hw[1] // 16)
    return torch.randn(batch, channels, *feat_hw, generator=generator), probs * 20 - 10


@pytest.mark.parametrize("hidden, out", [(32, 16), (32, 32)])  # out == hidden: sam2 would drop out_proj
def test_weights_map_both_ways(hidden, out):
    theirs = _memory_encoder(hidden=hidden, out=out)
    ours = memory_encoder_from_transformers(theirs)
    assert type(ours) is mf.MemoryEncoder and not ours.training

    converted = state_dict_from_transformers(theirs.state_dict())
    assert list(converted) == list(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, converted[key]), key
        assert value.data_ptr() != converted[key].data_ptr(), f"{key} should be a copy"
    back = state_dict_to_transformers(ours.state_dict())
    assert list(back) == list(theirs.state_dict())
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())

    fresh = _memory_encoder(hidden=hidden, out=out, seed=99)
    fresh.load_state_dict(back, strict=True)
    pix_feat, masks = _inputs(2, hidden)
    with torch.no_grad():
        expected = theirs(pix_feat, masks)[0]
        assert torch.equal(fresh(pix_feat, masks)[0], expected)
        with mf.use_backend("torch"):
            assert relative_error(ours(pix_feat, masks, skip_mask_sigmoid=True)["vision_features"], expected) < 1e-5

    shared = memory_encoder_from_transformers(theirs, share_parameters=True)
    assert shared.fuser.layers[1].gamma is theirs.memory_fuser.layers[1].scale
    assert shared.mask_downsampler.encoder[4].weight is theirs.mask_downsampler.layers[1].layer_norm.weight


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("batch, mask_hw, binarized", [(1, (128, 128), False), (3, (96, 160), True)])
def test_outputs_match_transformers(family, backend, batch, mask_hw, binarized):
    theirs = _memory_encoder(family, seed=2)
    ours = memory_encoder_from_transformers(theirs)
    pix_feat, masks = _inputs(batch, 32, mask_hw, seed=3, binarized=binarized)
    with torch.no_grad():
        oracle, _ = copy.deepcopy(theirs).double()(pix_feat.double(), masks.double())
        expected, expected_pos = theirs(pix_feat, masks)
        with mf.use_backend(backend):
            out = ours(pix_feat, masks, skip_mask_sigmoid=True)
    assert ours.last_backend == backend
    features = out["vision_features"]
    verdict = judge(features, oracle, torch.float32)
    assert verdict.passed, verdict.describe()
    assert judge(expected, oracle, torch.float32).passed  # transformers itself, as a yardstick
    assert relative_error(features, expected) < 1e-5
    # float32 is the one dtype where sam2's and transformers' position encodings agree bit for bit.
    assert torch.equal(out["vision_pos_enc"][0], expected_pos)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_module_reproduces_transformers_in_float64_and_bfloat16(family):
    theirs = _memory_encoder(family, seed=4)
    pix_feat, masks = _inputs(2, 32, seed=5)
    with torch.no_grad():
        oracle, _ = copy.deepcopy(theirs).double()(pix_feat.double(), masks.double())
        for dtype in (torch.float64, torch.bfloat16):
            twin = copy.deepcopy(theirs).to(dtype)
            expected, expected_pos = twin(pix_feat.to(dtype), masks.to(dtype))
            fused = patch_transformers(twin)
            assert fused is twin and isinstance(fused, type(theirs)) and isinstance(fused, TransformersMemoryEncoder)
            assert list(inspect.signature(type(fused).forward).parameters) == list(
                inspect.signature(type(theirs).forward).parameters)
            with mf.use_backend("torch"):  # auto runs the reference in float64 on the CPU
                result = fused(pix_feat.to(dtype), masks.to(dtype))
            assert isinstance(result, tuple) and len(result) == 2
            features, pos = result
            assert fused.last_backend == "torch", fused.last_backend_reason
            assert features.dtype == dtype and features.shape == expected.shape
            verdict = judge(features, oracle, dtype, same_dtype_ref=expected)
            assert verdict.passed, f"{dtype}: {verdict.describe()}"
            # transformers computes the encoding in the features' dtype: its own module runs.
            assert pos.dtype == dtype and torch.equal(pos, expected_pos)


def test_patched_module_refuses_what_it_cannot_prove_equal():
    theirs = _memory_encoder(seed=15, memory_fuser_hidden_act="gelu_new")
    pix_feat, masks = _inputs(2, 32, seed=16)
    with torch.no_grad():
        expected, _ = theirs(pix_feat, masks)
        fused = patch_transformers(theirs)
        features, _ = fused(pix_feat, masks)
    assert fused.last_backend == "reference" and "GELU" in fused.last_backend_reason
    assert torch.equal(features, expected)


def test_a_patched_module_is_still_a_transformers_memory_encoder():
    theirs = _memory_encoder(seed=21)
    pix_feat, masks = _inputs(2, 32, seed=22)
    fused = patch_transformers(theirs)
    assert patch_transformers(fused) is fused  # the module itself, patched again: unchanged
    standalone = memory_encoder_from_transformers(fused)
    with torch.no_grad():
        expected, _ = fused(pix_feat, masks)
        features = standalone(pix_feat, masks, skip_mask_sigmoid=True)["vision_features"]
    assert relative_error(features, expected) < 1e-5


def test_patched_module_trains_the_original_parameters():
    theirs = _memory_encoder(seed=6).train()
    twin = copy.deepcopy(theirs)
    adapter = patch_transformers(theirs)
    assert adapter.training
    pix_feat, masks = _inputs(2, 32, seed=7)
    weights = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(8))
    (adapter(pix_feat, masks)[0] * weights).sum().backward()
    (twin(pix_feat, masks)[0] * weights).sum().backward()
    assert adapter.last_backend == "reference"  # training with grad
    for (name, param), twin_param in zip(theirs.named_parameters(), twin.parameters()):
        assert param.grad is not None, name
        assert relative_error(param.grad, twin_param.grad) < 1e-5, name


_SHRUNKEN_TRACKING = dict(
    mask_decoder_config=dict(hidden_size=128, mlp_dim=256, num_attention_heads=2, iou_head_hidden_dim=64),
    memory_attention_hidden_size=128, memory_attention_num_layers=1,
    memory_attention_feed_forward_hidden_size=256, memory_attention_rope_feat_sizes=[8, 8],
    memory_encoder_hidden_size=128, memory_encoder_output_channels=64, mask_downsampler_embed_dim=128,
    memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=512,
)
"""The mask decoder, memory attention and memory encoder of the shrunken SAM 2 / SAM 3 tracker configs."""


def _small_video_model():
    """A Sam2VideoModel from a shrunken config (128² frames, 8² top-level features, hidden 128:
    transformers hard-codes 64 memory channels in its memory attention), with random weights."""
    from transformers import Sam2VideoConfig, Sam2VideoModel

    hiera = dict(model_type="sam2_hiera_det_model", hidden_size=16, image_size=[128, 128],
                 blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                 num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[4, 4, 4, 4],
                 global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2])
    vision = dict(model_type="sam2_vision_model", backbone_config=hiera, backbone_channel_list=[128, 64, 32, 16],
                  backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=128)
    config = Sam2VideoConfig(
        vision_config=vision, image_size=128,
        prompt_encoder_config=dict(hidden_size=128, image_size=128, patch_size=16), **_SHRUNKEN_TRACKING,
    )
    model = Sam2VideoModel(config).eval()
    randomize_parameters(model.memory_encoder, seed=9)
    with torch.no_grad():
        # Random init scores every object as absent (masks all -1024, memories unused): make it present.
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    return model


def _small_tracker_model():
    """A Sam3TrackerVideoModel from a shrunken config (112² frames, a 2-layer ViT), random weights."""
    from transformers import Sam3TrackerVideoConfig, Sam3TrackerVideoModel

    vit = dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, image_size=112, patch_size=14, window_size=4, global_attn_indexes=[1],
               pretrain_image_size=112)
    vision = dict(model_type="sam3_vision_model", backbone_config=vit, fpn_hidden_size=128,
                  backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]])
    config = Sam3TrackerVideoConfig(
        vision_config=vision, image_size=112,
        prompt_encoder_config=dict(hidden_size=128, image_size=112, patch_size=14), **_SHRUNKEN_TRACKING,
    )
    model = Sam3TrackerVideoModel(config).eval()
    randomize_parameters(model.memory_encoder, seed=18)
    return model


@pytest.mark.parametrize("build", [_small_video_model, _small_tracker_model], ids=["sam2_video", "sam3_tracker_video"])
def test_model_patched_in_its_init_loads_and_saves_like_the_unpatched_one(build, tmp_path):
    model = build()
    model.save_pretrained(tmp_path / "original")
    model_class = type(model)

    class PatchedAtBirth(model_class):
        def __init__(self, config):
            super().__init__(config)
            patch_transformers(self)

    born = PatchedAtBirth.from_pretrained(tmp_path / "original").eval()
    plain = model_class.from_pretrained(tmp_path / "original").eval()
    assert isinstance(born.memory_encoder, TransformersMemoryEncoder)
    assert type(plain.memory_encoder).__name__ == type(model.memory_encoder).__name__
    theirs = {k: v for k, v in model.state_dict().items() if k.startswith("memory_encoder.")}
    for loaded in (born, plain):
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in theirs.items())
    pix_feat, masks = _inputs(2, 128, seed=17)
    with torch.no_grad():
        expected, expected_pos = plain.memory_encoder(pix_feat, masks)
        features, pos = born.memory_encoder(pix_feat, masks)
    assert born.memory_encoder.last_backend == "torch" and relative_error(features, expected) < 1e-5
    assert torch.equal(pos, expected_pos)

    born.save_pretrained(tmp_path / "patched")
    again = model_class.from_pretrained(tmp_path / "patched")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in theirs.items())
    assert pickle.loads(pickle.dumps(born.memory_encoder)).last_backend == "torch"


def _track(model, video):
    """Every frame's mask logits for two objects clicked on frame 0, tracked through ``video``."""
    session = sam2_video.Sam2VideoInferenceSession(video=video, video_height=128, video_width=128,
                                                   dtype=torch.float32)
    for obj_id, point in ((1, [40.0, 50.0]), (2, [90.0, 70.0])):
        session.add_point_inputs(session.obj_id_to_idx(obj_id), 0, {
            "point_coords": torch.tensor([[[point]]]), "point_labels": torch.tensor([[[1]]], dtype=torch.int32)})
    session.obj_with_new_inputs = [1, 2]
    with torch.no_grad():
        return [out.pred_masks for out in model.propagate_in_video_iterator(session, start_frame_idx=0)]


def test_patched_video_model_tracks_the_same():
    model = _small_video_model()
    original = model.memory_encoder
    video = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(10))
    pix_feat, masks = _inputs(2, 128, seed=11)
    generator = torch.Generator().manual_seed(12)
    vision_feats = torch.randn(64, 2, 128, generator=generator)  # (HW, B, C), as the model keeps them
    high_res = 2 * torch.randn(2, 1, 128, 128, generator=generator)
    scores = torch.tensor([[[1.0]], [[-1.0]]])  # (B, 1, 1); the second object occluded: adds its embedding
    with torch.no_grad():
        oracle, _ = copy.deepcopy(original).double()(pix_feat.double(), masks.double())
        memories_before = [model._encode_new_memory(vision_feats, high_res, scores, from_clicks)
                           for from_clicks in (True, False)]
    tracked_before = _track(model, video)

    adapter = patch_transformers(model)
    assert model.memory_encoder is adapter is original and isinstance(adapter, TransformersMemoryEncoder)
    assert patch_transformers(model) is adapter and model.memory_encoder is adapter

    with torch.no_grad():
        features, pos = model.memory_encoder(pix_feat, masks)
        memories_after = [model._encode_new_memory(vision_feats, high_res, scores, from_clicks)
                          for from_clicks in (True, False)]
    assert adapter.last_backend == "torch"
    verdict = judge(features, oracle, torch.float32)
    assert verdict.passed, verdict.describe()
    for (feat_b, pos_b), (feat_a, pos_a) in zip(memories_before, memories_after):
        assert torch.equal(pos_a, pos_b)
        # transformers stores memories in bfloat16: our ~1e-7 differences flip an odd last bit.
        assert feat_a.dtype == torch.bfloat16 and relative_error(feat_a, feat_b) < 1e-3

    tracked_after = _track(model, video)
    assert len(tracked_after) == len(video)
    for frame, (before, after) in enumerate(zip(tracked_before, tracked_after)):
        assert relative_error(after, before) < 1e-4, frame
    # The comparison means something: later frames really read the memories.
    with torch.no_grad():
        adapter.projection.weight.mul_(2.0)
    assert relative_error(_track(model, video)[-1], tracked_before[-1]) > 1e-2


def test_patched_model_keeps_transformers_checkpoints(tmp_path):
    from transformers import Sam2VideoModel

    model = _small_video_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    patch_transformers(model)
    patched_state = model.state_dict()
    assert list(patched_state) == list(state)
    assert all(torch.equal(patched_state[k], v) for k, v in state.items())

    with torch.no_grad():
        model.memory_encoder.memory_fuser.layers[0].scale.zero_()
    model.load_state_dict(state, strict=True)  # a transformers checkpoint loads into the patched model
    scale = model.memory_encoder.memory_fuser.layers[0].scale
    assert torch.equal(scale, state["memory_encoder.memory_fuser.layers.0.scale"])

    model.save_pretrained(tmp_path)
    reloaded = Sam2VideoModel.from_pretrained(tmp_path)
    assert type(reloaded.memory_encoder) is sam2_video.Sam2VideoMemoryEncoder
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())


def test_patch_reaches_the_tracker_of_a_sam3_video_model():
    original = _memory_encoder("sam3_tracker_video", seed=13)
    tracker, video_model = torch.nn.Module(), torch.nn.Module()  # stand-ins: Sam3VideoModel is large
    tracker.memory_encoder = original
    video_model.tracker_model = tracker
    adapter = patch_transformers(video_model)
    assert tracker.memory_encoder is adapter and patch_transformers(tracker) is adapter
    pix_feat, masks = _inputs(2, 32, seed=14)
    with torch.no_grad():
        oracle, _ = copy.deepcopy(original).double()(pix_feat.double(), masks.double())
        features, pos = adapter(pix_feat, masks)
    assert judge(features, oracle, torch.float32).passed
    assert torch.equal(pos, original(pix_feat, masks)[1])


def test_rejects_what_it_cannot_map():
    with pytest.raises(TypeError, match="Sam2VideoMemoryEncoder"):
        memory_encoder_from_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"expects a transformers Sam2VideoModel.*got builtins\.object"):
        patch_transformers(object())

    class Holder:  # sam2-style: a memory encoder, but not transformers'
        memory_encoder = mf.MemoryEncoder(64, mf.MaskDownSampler(), mf.Fuser(mf.CXBlock(256), 1),
                                          mf.PositionEmbeddingSine(64))

    with pytest.raises(TypeError, match=r"whose \.memory_encoder is memenc_fast\.modules\.MemoryEncoder"):
        patch_transformers(Holder())

    with pytest.raises(ValueError, match="4 x dim wide"):
        memory_encoder_from_transformers(_memory_encoder(memory_fuser_intermediate_dim=64))
    with pytest.raises(ValueError, match="exact \\(erf\\) GELU"):
        memory_encoder_from_transformers(_memory_encoder(memory_fuser_hidden_act="gelu_new"))

    theirs = _memory_encoder()
    theirs.memory_fuser.layers[1].scale = torch.nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match=r"memory_fuser\.layers\.1\.scale \(5,\) vs fuser\.layers\.1\.gamma \(32,\)"):
        memory_encoder_from_transformers(theirs)
    theirs = _memory_encoder()
    theirs.mask_downsampler.layers[2].conv.padding = (0, 0)
    with pytest.raises(ValueError, match=r"mask_downsampler\.layers\.2\.conv differs .* in \['padding'\]"):
        memory_encoder_from_transformers(theirs)
    theirs = _memory_encoder()
    theirs.memory_fuser.layers[0].extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"no memenc_fast counterpart \['memory_fuser\.layers\.0\.extra\.weight'"):
        memory_encoder_from_transformers(theirs)

    state = _memory_encoder().state_dict()
    del state["projection.bias"]
    with pytest.raises(ValueError, match=r"expected keys missing \['projection\.bias'\]"):
        state_dict_from_transformers(state)
    with pytest.raises(ValueError, match=r"no counterpart \['bogus'\]"):
        state_dict_to_transformers({**build_encoder(PRESETS["small"]).state_dict(), "bogus": 0})
