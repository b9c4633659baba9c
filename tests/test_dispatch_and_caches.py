"""Backend selection, the env var, per-op fallback, and the weight / position-encoding caches."""

import copy
import dataclasses
import logging
import pickle

import pytest
import torch

import memenc_fast as mf
from memenc_fast import dispatch
from memenc_fast.backends import triton_interpreted
from memenc_fast.tools.numerics import judge

from helpers import TINY, build_encoder, make_inputs, reference_outputs


def _features(encoder, pix_feat, masks, backend="torch"):
    with torch.no_grad(), mf.use_backend(backend):
        return encoder(pix_feat, masks)["vision_features"]


def test_available_backends_and_context_manager(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    names = mf.available_backends()
    assert names[0] == "reference" and "torch" in names
    assert set(names) <= {"reference", "torch", "triton", "cuda"}
    on_cpu = mf.available_backends("cpu")
    assert on_cpu == mf.available_backends(torch.device("cpu")) and on_cpu[0] == "reference" and "torch" in on_cpu
    assert "cuda" not in on_cpu and set(on_cpu) <= set(names)
    assert ("triton" in on_cpu) == ("triton" in names and triton_interpreted())
    assert mf.current_backend() == "auto"
    with mf.use_backend("reference"):
        assert mf.current_backend() == "reference"
        with mf.use_backend("torch"):
            assert mf.current_backend() == "torch"
        assert mf.current_backend() == "reference"
    assert mf.current_backend() == "auto"
    with pytest.raises(ValueError, match="unknown memenc_fast backend 'nope'"):
        with mf.use_backend("nope"):
            pass


def test_env_var_selects_backend(monkeypatch):
    encoder = build_encoder(TINY)
    pix_feat, masks = make_inputs(TINY, 1)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    with torch.no_grad():
        encoder(pix_feat, masks)
    assert encoder.last_backend == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    with torch.no_grad():
        encoder(pix_feat, masks)
    assert encoder.last_backend == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="MEMENC_FAST_BACKEND"):
        encoder(pix_feat, masks)


def test_auto_uses_torch_on_cpu_and_reference_for_training(monkeypatch, caplog):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    encoder = build_encoder(TINY)
    pix_feat, masks = make_inputs(TINY, 1)
    with torch.no_grad():
        encoder(pix_feat, masks)
    assert encoder.last_backend == "torch"
    dispatch._logged_reasons.clear()
    with caplog.at_level(logging.INFO, logger="memenc_fast"):
        encoder(pix_feat, masks)  # grad enabled, parameters require grad
        encoder(pix_feat, masks)
    assert encoder.last_backend == "reference"
    assert sum("training" in r.message for r in caplog.records) == 1  # logged once


def test_named_backend_that_cannot_serve_raises():
    encoder = build_encoder(TINY)
    pix_feat, masks = make_inputs(TINY, 1)
    unavailable = [name for name in dispatch.registered_backends() if name not in mf.available_backends()]
    for name in unavailable:
        with pytest.raises(mf.BackendUnavailableError, match=name):
            _features(encoder, pix_feat, masks, name)
    encoder.fuser.layers[0].drop_path = mf.reference.DropPath(0.5)
    encoder.train()
    with pytest.raises(mf.BackendUnavailableError, match="drop_path"):
        with mf.use_backend("torch"):
            encoder(pix_feat, masks)


def test_auto_falls_back_to_reference_for_unknown_structure(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    encoder = build_encoder(TINY)
    encoder.out_proj = torch.nn.Sequential(encoder.out_proj)
    pix_feat, masks = make_inputs(TINY, 1)
    with torch.no_grad():
        encoder(pix_feat, masks)
    assert encoder.last_backend == "reference"


def test_per_op_fallback_to_torch(monkeypatch):
    """A backend implementing one op gets the torch backend's others."""
    calls = []
    from memenc_fast.backends import torch_ops

    def recording_out_proj(x, packed):
        calls.append(x.shape)
        return torch_ops.out_proj(x, packed)

    partial = dispatch.Backend(
        name="partial", priority=-1, device_types=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
        ops_module=".backends.torch_ops", unavailable_reason=lambda: None)
    object.__setattr__(partial, "_ops", {"out_proj": recording_out_proj})
    monkeypatch.setitem(dispatch._registry, "partial", partial)
    encoder = build_encoder(TINY)
    pix_feat, masks = make_inputs(TINY, 2)
    out = _features(encoder, pix_feat, masks, "partial")
    assert calls and encoder.last_backend == "partial"
    torch.testing.assert_close(out, _features(encoder, pix_feat, masks, "torch"))


def _packed_id(encoder):
    return id(encoder._pack_cache._entries.get((torch.float32, torch.device("cpu"))).packed)


def test_pack_cache_reused_and_rebuilt_on_load_state_dict_and_in_place_updates():
    encoder = build_encoder(TINY, seed=1)
    pix_feat, masks = make_inputs(TINY, 2)
    first = _features(encoder, pix_feat, masks)
    packed = _packed_id(encoder)
    _features(encoder, pix_feat, masks)
    assert _packed_id(encoder) == packed  # reused

    other = build_encoder(TINY, seed=2)
    encoder.load_state_dict(other.state_dict())
    after_load = _features(encoder, pix_feat, masks)
    torch.testing.assert_close(after_load, _features(other, pix_feat, masks))
    assert not torch.allclose(after_load, first)

    with torch.no_grad():
        encoder.fuser.layers[1].gamma.mul_(3.0)
        encoder.mask_downsampler.encoder[1].weight.add_(0.5)
    after_update = _features(encoder, pix_feat, masks)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    assert judge(after_update, oracle, torch.float32).passed

    with torch.no_grad():
        encoder.pix_feat_proj.weight.data = encoder.pix_feat_proj.weight.data * 2
    after_data = _features(encoder, pix_feat, masks)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    assert judge(after_data, oracle, torch.float32).passed


@pytest.mark.parametrize("convert", ["to_double", "half", "round_trip"])
def test_pack_cache_follows_dtype_conversions(convert):
    encoder = build_encoder(TINY, seed=3)
    pix_feat, masks = make_inputs(TINY, 2)
    _features(encoder, pix_feat, masks)
    if convert == "to_double":
        encoder.to(torch.float64)
        dtype = torch.float64
    elif convert == "half":
        encoder.half()
        dtype = torch.float16
    else:
        encoder.to(torch.float64)
        with torch.no_grad():
            for p in encoder.parameters():
                p.mul_(1.5)
        encoder.to(torch.float32)
        dtype = torch.float32
    out = _features(encoder, pix_feat.to(dtype), masks.to(dtype))
    assert out.dtype == dtype
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    same = reference_outputs(encoder, pix_feat, masks, dtype)["vision_features"]
    verdict = judge(out, oracle, dtype, same_dtype_ref=same if dtype == torch.float16 else None)
    assert verdict.passed, verdict.describe()


def test_replacing_a_submodule_is_seen():
    encoder = build_encoder(TINY, seed=4)
    pix_feat, masks = make_inputs(TINY, 2)
    _features(encoder, pix_feat, masks)
    fresh = mf.CXBlock(TINY.in_dim)
    mf.tools.presets.randomize_parameters(fresh, seed=5)
    encoder.fuser.layers[0] = fresh
    out = _features(encoder, pix_feat, masks)
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    assert judge(out, oracle, torch.float32).passed

    # Deeper down, an added layer, and an activation the kernels do not fuse.
    conv = encoder.mask_downsampler.encoder[0]
    encoder.mask_downsampler.encoder[0] = torch.nn.Conv2d(1, conv.out_channels, 3, stride=2, padding=1)
    encoder.fuser.layers.append(copy.deepcopy(fresh))
    encoder.fuser.layers[1].act = torch.nn.GELU(approximate="tanh")
    with torch.no_grad(), mf.use_backend("torch"):
        out = encoder(pix_feat, masks)["vision_features"]
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    assert judge(out, oracle, torch.float32).passed


def test_deepcopy_and_pickle_keep_working():
    encoder = build_encoder(TINY, seed=6)
    pix_feat, masks = make_inputs(TINY, 2)
    expected = _features(encoder, pix_feat, masks)
    for clone in (copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
        torch.testing.assert_close(_features(clone, pix_feat, masks), expected)
        assert not clone._pack_cache._entries or clone._pack_cache is not encoder._pack_cache


def test_position_encoding_is_cached_and_expanded():
    pe = mf.PositionEmbeddingSine(16, warmup_cache=False)
    x = torch.randn(3, 16, 5, 7)
    first, second = pe(x), pe(x)
    assert first.shape == (3, 16, 5, 7) and first.dtype == torch.float32
    assert first.data_ptr() == second.data_ptr() and first.stride(0) == 0
    expected = mf.reference.PositionEmbeddingSine(16)(x)
    assert torch.equal(first, expected)


def test_judge_applies_the_same_dtype_rule_only_to_large_outputs():
    from memenc_fast.tools.numerics import SAME_DTYPE_MIN_ELEMENTS

    generator = torch.Generator().manual_seed(7)
    for numel, expect_pass in ((SAME_DTYPE_MIN_ELEMENTS, False), (8, True)):
        ref = torch.randn(numel, generator=generator, dtype=torch.float64)
        noise = torch.randn(numel, generator=generator, dtype=torch.float64)
        same = ref + 1e-3 * ref.norm() / numel**0.5 * noise / noise.norm() * numel**0.5
        worse = ref + 4e-3 * ref.norm() / numel**0.5 * noise / noise.norm() * numel**0.5
        verdict = judge(worse, ref, torch.bfloat16, same_dtype_ref=same)
        assert verdict.passed == expect_pass, verdict.describe()
    nan = torch.full((4,), float("nan"))
    assert not judge(nan, torch.ones(4, dtype=torch.float64), torch.float32).passed


@pytest.mark.parametrize("preset", ["tiny", "sam3"])
@pytest.mark.parametrize("identity_out_proj", [False, True])
def test_packed_weights_flatten_and_unflatten_to_the_same_encoder(preset, identity_out_proj):
    from memenc_fast.packing import flatten_packed, pack_weights, read_structure, unflatten_packed

    encoder = build_encoder(TINY if preset == "tiny" else mf.tools.presets.PRESETS["sam3"], seed=71)
    if identity_out_proj:
        encoder.out_proj = torch.nn.Identity()
    packed = pack_weights(read_structure(encoder), torch.float32, torch.device("cpu"))
    rebuilt = unflatten_packed(*flatten_packed(packed))
    for field in dataclasses.fields(packed):
        ours, theirs = getattr(packed, field.name), getattr(rebuilt, field.name)
        if field.name in ("stages", "blocks"):
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                for sub in dataclasses.fields(a):
                    x, y = getattr(a, sub.name), getattr(b, sub.name)
                    if sub.name == "activation":
                        assert mf.packing.is_exact_gelu(x) and mf.packing.is_exact_gelu(y)
                    else:
                        assert x is y if isinstance(x, torch.Tensor) else x == y, (field.name, sub.name)
        else:
            assert ours is theirs if isinstance(ours, torch.Tensor) else ours == theirs, field.name
