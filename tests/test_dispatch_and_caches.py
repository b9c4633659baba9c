"""Backend selection (the env var, per-op fallback, decided once per structure), dtype conversions,
copies, and the position-encoding cache."""

import copy
import logging
import pickle

import pytest
import torch

import memenc_fast as mf
from memenc_fast import dispatch
from memenc_fast.backends import triton_interpreted
from memenc_fast.numerics import judge

from helpers import TINY, build_encoder, make_inputs, reference_outputs, stub_backend


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


def test_auto_runs_the_reference_where_it_is_faster(monkeypatch):
    """The torch backend's measured cost rule: on the CPU in float64 the reference is faster."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    encoder = build_encoder(TINY, dtype=torch.float64)
    pix_feat, masks = make_inputs(TINY, 1, dtype=torch.float64)
    with torch.no_grad():
        encoder(pix_feat, masks)
    assert encoder.last_backend == "reference" and "float64" in encoder.last_backend_reason
    _features(encoder, pix_feat, masks, "torch")  # still runs when asked for by name
    assert encoder.last_backend == "torch"


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
    """A backend implementing one op gets the torch backend's others; one that refuses an op for a
    structure (``unsupported_ops``) gets the torch op for it, decided once per structure."""
    from memenc_fast.backends import torch_ops

    calls, decisions = [], []

    def recording_out_proj(x, layer):
        calls.append(x.shape)
        return torch_ops.out_proj(x, layer)

    partial = stub_backend("partial", {"out_proj": recording_out_proj, "cxblock": torch_ops.cxblock},
                           {"cxblock": "not in this test's backend"})
    refusals = partial.module().unsupported_ops
    partial.module().unsupported_ops = lambda *args: decisions.append(args) or refusals(*args)
    monkeypatch.setitem(dispatch._registry, "partial", partial)
    encoder = build_encoder(TINY)
    pix_feat, masks = make_inputs(TINY, 2)
    out = _features(encoder, pix_feat, masks, "partial")
    _features(encoder, pix_feat, masks, "partial")
    assert len(calls) == 2 and len(decisions) == 1 and encoder.last_backend == "partial"
    assert encoder.last_backend_reason == "cxblock runs the torch op: not in this test's backend"
    torch.testing.assert_close(out, _features(encoder, pix_feat, masks, "torch"))


def test_auto_passes_over_a_backend_slower_on_this_device(monkeypatch):
    from memenc_fast.backends import torch_ops

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    pix_feat, masks = make_inputs(TINY, 2)
    for skip, chosen in (("slower than torch here", "torch"), (None, "preferred")):
        encoder = build_encoder(TINY)
        preferred = stub_backend("preferred", {"out_proj": torch_ops.out_proj}, priority=15, auto_skip=skip)
        monkeypatch.setitem(dispatch._registry, "preferred", preferred)
        _features(encoder, pix_feat, masks, "auto")
        assert encoder.last_backend == chosen
        _features(encoder, pix_feat, masks, "preferred")  # asked for by name: it runs
        assert encoder.last_backend == "preferred"


def test_a_device_wide_refusal_is_said_once(monkeypatch):
    from memenc_fast.backends import torch_ops

    why = "bf16 needs sm_80; this is sm_75 (T4)"
    ops = {op: getattr(torch_ops, op) for op in ("mask_downsample", "proj_add", "cxblock")}
    monkeypatch.setitem(dispatch._registry, "old", stub_backend("old", ops, {op: why for op in ops}))
    encoder = build_encoder(TINY)
    pix_feat, masks = make_inputs(TINY, 2)
    with pytest.raises(mf.BackendUnavailableError) as raised:
        _features(encoder, pix_feat, masks, "old")
    assert str(raised.value) == f"memenc_fast backend 'old' cannot run this forward: {why}"


def test_a_backend_this_install_lacks_says_where_to_look(monkeypatch):
    import dataclasses

    missing = dataclasses.replace(stub_backend("missing", {}), unavailable_reason=lambda: "the library was not built")
    monkeypatch.setitem(dispatch._registry, "missing", missing)
    pix_feat, masks = make_inputs(TINY, 1)
    with pytest.raises(mf.BackendUnavailableError) as raised:
        _features(build_encoder(TINY), pix_feat, masks, "missing")
    assert str(raised.value) == ("memenc_fast backend 'missing' cannot run this forward: the library was not built "
                                 "(`python -m memenc_fast info` says what this install can run)")


def test_selection_is_decided_once_per_structure_and_redecided_after_a_change(monkeypatch):
    encoder = build_encoder(TINY)
    pix_feat, masks = make_inputs(TINY, 2)
    decided = []
    real = dispatch.select_backend
    monkeypatch.setattr(dispatch, "select_backend", lambda *args: decided.append(args) or real(*args))
    for _ in range(3):
        _features(encoder, pix_feat, masks)
    assert len(decided) == 1
    encoder.fuser.layers[0].norm.eps = 1e-3
    _features(encoder, pix_feat, masks)
    _features(encoder, pix_feat, masks, "reference")
    assert len(decided) == 3


@pytest.mark.parametrize("convert", ["to_double", "half", "round_trip"])
def test_dtype_conversions_of_the_module_are_followed(convert):
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
        assert clone._structure is None  # it held references into the original's dicts
        torch.testing.assert_close(_features(clone, pix_feat, masks), expected)
        assert clone._structure is not encoder._structure


def test_position_encoding_is_computed_once_and_returned_fresh(monkeypatch):
    from memenc_fast import position

    computed = []
    real = position.sine_position_encoding
    monkeypatch.setattr(position, "sine_position_encoding", lambda *a, **k: computed.append(a) or real(*a, **k))
    pe = mf.PositionEmbeddingSine(16, temperature=777, warmup_cache=False)
    x = torch.randn(3, 16, 5, 7)
    first, second = pe(x), pe(x)
    assert len(computed) == 1
    assert first.shape == (3, 16, 5, 7) and first.dtype == torch.float32 and first.is_contiguous()
    assert first.data_ptr() != second.data_ptr()
    expected = mf.reference.PositionEmbeddingSine(16, temperature=777)(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_judge_applies_the_same_dtype_rule_only_to_large_outputs():
    from memenc_fast.numerics import SAME_DTYPE_MIN_ELEMENTS

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
