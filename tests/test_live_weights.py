"""The fused path computes what the module's own forward computes with its state now, whatever a
user did to the module since the last call; or the reference runs and says why.

Each test is one way users change a module (numbered as in the live-weights issue): weights
changed without a version bump, reloads racing forwards, changed settings, hooks,
parametrizations, replaced or overridden submodules, inference-mode position encodings, in-place
writes to outputs, empty batches, huge features. Kernel backends run under Triton's interpreter
or on the GPU (``backend_device_params``).
"""

import concurrent.futures
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from torch.nn.utils import prune

import memenc_fast as mf
from memenc_fast.numerics import judge

from helpers import TINY, backend_device_params, build_encoder, make_inputs, reference_outputs, requires_sam2

FUSED = backend_device_params(fused_only=True)


def _fused(encoder, pix_feat, masks, backend, **kwargs):
    with torch.no_grad(), mf.use_backend(backend):
        return encoder(pix_feat, masks, **kwargs)


def _assert_matches_own_forward(encoder, pix_feat, masks, backend, **kwargs):
    """The fused forward ran (on ``backend``) and equals the reference forward of the module as it
    is now, judged against float64."""
    out = _fused(encoder, pix_feat, masks, backend, **kwargs)["vision_features"]
    assert encoder.last_backend == backend, encoder.last_backend_reason
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64, **kwargs)["vision_features"]
    verdict = judge(out, oracle, torch.float32, pix_feat.device)
    assert verdict.passed, verdict.describe()


def _assert_reference_ran(encoder, pix_feat, masks, backend, reason):
    """The reference forward ran instead of ``backend``, said why, and gave the reference's result
    (both seeded alike, for drop paths)."""
    with torch.no_grad(), mf.use_backend("reference"):
        torch.manual_seed(1)
        expected = encoder(pix_feat, masks)["vision_features"]
    with torch.no_grad():
        torch.manual_seed(1)
        out = encoder(pix_feat, masks)["vision_features"]
    assert encoder.last_backend == "reference" and reason in encoder.last_backend_reason
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(mf.BackendUnavailableError, match=reason):
        _fused(encoder, pix_feat, masks, backend)


def _setup(device, seed=101, batch=2):
    encoder = build_encoder(TINY, seed=seed, device=device)
    pix_feat, masks = make_inputs(TINY, batch, seed=seed + 1, device=device)
    return encoder, pix_feat, masks


# 1. Weights changed without a version-counter bump, and every other way weights change.

def _fused_adam_step(encoder):
    generator = torch.Generator().manual_seed(5)
    for p in encoder.parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(p.device)
    torch.optim.Adam(encoder.parameters(), lr=0.05, fused=True).step()


def _write_through_numpy(encoder):
    for p in encoder.parameters():
        p.detach().numpy()[...] *= 1.5


UPDATES = {
    "data_add": lambda e: [p.data.add_(0.1 * torch.randn_like(p)) for p in e.parameters()],
    "data_copy": lambda e: [p.data.copy_(torch.randn_like(p)) for p in e.fuser.parameters()],
    "numpy_write": _write_through_numpy,
    "fused_adam": _fused_adam_step,
    "load_state_dict": lambda e: e.load_state_dict(build_encoder(TINY, seed=7, device=e.pix_feat_proj.weight.device)
                                                   .state_dict()),
    "data_swap": lambda e: setattr(e.fuser.layers[0].pwconv1.weight, "data",
                                   e.fuser.layers[0].pwconv1.weight.data * 3),
    "parameter_replaced": lambda e: setattr(e.fuser.layers[1], "gamma",
                                            nn.Parameter(torch.randn_like(e.fuser.layers[1].gamma))),
    "gamma_removed": lambda e: setattr(e.fuser.layers[1], "gamma", None),
}


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("update", sorted(UPDATES))
def test_weight_updates_reach_the_next_forward(backend, device, update):
    if update == "numpy_write" and device != "cpu":
        pytest.skip("numpy views CPU memory only")
    encoder, pix_feat, masks = _setup(device)
    _fused(encoder, pix_feat, masks, backend)  # whatever can be cached is, now
    with torch.no_grad():
        UPDATES[update](encoder)
    _assert_matches_own_forward(encoder, pix_feat, masks, backend)


@requires_sam2
def test_fused_adam_step_then_eval_matches_sam2_with_the_same_update():
    from sam2.modeling import memory_encoder, position_encoding
    from sam2.modeling.sam2_utils import LayerNorm2d  # noqa: F401  (sam2's own submodules)

    ours = build_encoder(TINY, seed=9)
    theirs = build_encoder(TINY, namespace=_sam2_namespace(memory_encoder, position_encoding), seed=9)
    pix_feat, masks = make_inputs(TINY, 2, seed=10)
    _fused(ours, pix_feat, masks, "torch")
    for module in (ours, theirs):
        _fused_adam_step(module)
    with torch.no_grad():
        expected = theirs(pix_feat, masks)["vision_features"]
    out = _fused(ours, pix_feat, masks, "torch")["vision_features"]
    assert ours.last_backend == "torch"
    verdict = judge(out, expected.double(), torch.float32)
    assert verdict.passed, verdict.describe()


def _sam2_namespace(memory_encoder, position_encoding):
    class Namespace:
        MemoryEncoder = memory_encoder.MemoryEncoder
        MaskDownSampler = memory_encoder.MaskDownSampler
        Fuser = memory_encoder.Fuser
        CXBlock = memory_encoder.CXBlock
        PositionEmbeddingSine = position_encoding.PositionEmbeddingSine

    return Namespace


# 2. A reload racing forwards in other threads.

@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_reload_racing_forwards_leaves_no_stale_weights(backend, device):
    encoder, pix_feat, masks = _setup(device)
    states = [build_encoder(TINY, seed=s, device=device).state_dict() for s in (11, 12, 13)]

    def forward(_):
        return _fused(encoder, pix_feat, masks, backend)["vision_features"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        running = [pool.submit(forward, i) for i in range(6)]
        for state in states:
            encoder.load_state_dict(state)
        for future in running:
            future.result()
    _assert_matches_own_forward(encoder, pix_feat, masks, backend)


# 3. Settings changed after the first forward.

@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_changed_settings_are_read_on_the_next_forward(backend, device):
    encoder, pix_feat, masks = _setup(device)
    _fused(encoder, pix_feat, masks, backend)
    encoder.fuser.layers[0].norm.eps = 0.5
    encoder.mask_downsampler.encoder[4].eps = 2.0
    _assert_matches_own_forward(encoder, pix_feat, masks, backend)
    # 64 -> 31 -> 16 -> 8 -> 4: the same feature size from other mask pixels.
    encoder.mask_downsampler.encoder[0].padding = (0, 0)
    _assert_matches_own_forward(encoder, pix_feat, masks, backend)
    # Stride 1 in the first stage takes masks of half the size to the same features.
    encoder.mask_downsampler.encoder[0].stride = (1, 1)
    encoder.mask_downsampler.encoder[0].padding = (1, 1)
    _assert_matches_own_forward(encoder, pix_feat, masks[..., ::2, ::2].contiguous(), backend)


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_drop_path_follows_train_and_eval(backend, device):
    encoder, pix_feat, masks = _setup(device)
    encoder.fuser.layers[0].drop_path = mf.reference.DropPath(0.5)
    _assert_reference_ran(encoder, pix_feat, masks, backend, "drop_path is active")  # built in training mode
    encoder.eval()
    _assert_matches_own_forward(encoder, pix_feat, masks, backend)
    encoder.train()
    _assert_reference_ran(encoder, pix_feat, masks, backend, "drop_path is active")
    encoder.eval()
    _assert_matches_own_forward(encoder, pix_feat, masks, backend)


# 4. Hooks, on submodules and global.

@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "global_forward"])
def test_hooks_run(backend, device, kind):
    encoder, pix_feat, masks = _setup(device)
    _fused(encoder, pix_feat, masks, backend)
    calls = []
    target = encoder.fuser.layers[1].pwconv1
    if kind == "forward":
        handle = target.register_forward_hook(lambda m, args, out: calls.append(m) or out * 2)
    elif kind == "forward_pre":
        handle = target.register_forward_pre_hook(lambda m, args: calls.append(m) or (args[0] * 2,))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: calls.append(m))
    try:
        _assert_reference_ran(encoder, pix_feat, masks, backend, "hooks")
        assert target in calls
    finally:
        handle.remove()
    _assert_matches_own_forward(encoder, pix_feat, masks, backend)


# 5. Parametrized submodules.

class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


PARAMETRIZATIONS = {
    "parametrize": lambda e: parametrize.register_parametrization(e.fuser.layers[0].pwconv1, "weight", _Doubled()),
    "weight_norm": lambda e: nn.utils.parametrizations.weight_norm(e.mask_downsampler.encoder[3]),
    "old_weight_norm": lambda e: nn.utils.weight_norm(e.pix_feat_proj),
    "spectral_norm": lambda e: nn.utils.spectral_norm(e.fuser.layers[1].pwconv2),
    "prune": lambda e: prune.random_unstructured(e.fuser.layers[0].pwconv2, "weight", amount=0.5),
}


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("kind", sorted(PARAMETRIZATIONS))
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_parametrized_submodules_run_the_reference(backend, device, kind):
    encoder, pix_feat, masks = _setup(device)
    _fused(encoder, pix_feat, masks, backend)
    PARAMETRIZATIONS[kind](encoder)
    reason = "hooks" if kind in ("old_weight_norm", "spectral_norm", "prune") else "Parametrized"
    _assert_reference_ran(encoder, pix_feat, masks, backend, reason)


# 6. Submodules the fused ops do not compute: other convs, subclasses, overrides, lookalikes.

class _OwnConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1


class LayerNorm2d(nn.Module):  # the same name as sam2's, other math (RMS norm)
    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight[:, None, None]


def _instance_forward(encoder):
    conv = encoder.out_proj
    conv.forward = lambda x: nn.Conv2d.forward(conv, x) * 3


REPLACEMENTS = {
    "conv3x3": (lambda e: setattr(e, "pix_feat_proj", nn.Conv2d(TINY.in_dim, TINY.in_dim, 3, padding=1)),
                "pix_feat_proj is not a 1x1 conv"),
    "grouped": (lambda e: setattr(e, "pix_feat_proj", nn.Conv2d(TINY.in_dim, TINY.in_dim, 1, groups=2)),
                "pix_feat_proj is not a 1x1 conv"),
    "bias_free": (lambda e: setattr(e, "pix_feat_proj", nn.Conv2d(TINY.in_dim, TINY.in_dim, 1, bias=False)),
                  "pix_feat_proj.bias is not a registered parameter"),
    "subclass": (lambda e: setattr(e, "out_proj", _OwnConv(TINY.in_dim, TINY.out_dim, 1)),
                 "out_proj is a test_live_weights._OwnConv"),
    "instance_forward": (_instance_forward, "out_proj has its own forward"),
    "lookalike_layer_norm": (lambda e: setattr(e.fuser.layers[0], "norm", LayerNorm2d(TINY.in_dim)),
                             "fuser.layers.0.norm is a test_live_weights.LayerNorm2d"),
    "tanh_gelu": (lambda e: setattr(e.fuser.layers[1], "act", nn.Tanh()), "fuser.layers.1.act is a torch.nn"),
}


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("kind", sorted(REPLACEMENTS))
def test_replaced_submodules_run_the_reference(backend, device, kind):
    encoder, pix_feat, masks = _setup(device)
    _fused(encoder, pix_feat, masks, backend)
    change, reason = REPLACEMENTS[kind]
    change(encoder)
    encoder.to(device)
    _assert_reference_ran(encoder, pix_feat, masks, backend, reason)


# 7 and 8. Position encodings: usable by autograd after inference mode, never shared.

@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_position_encoding_from_inference_mode_works_with_autograd_later(backend, device):
    encoder, pix_feat, masks = _setup(device)
    with torch.inference_mode(), mf.use_backend(backend):
        encoder(pix_feat, masks)
    pos = _fused(encoder, pix_feat, masks, backend)["vision_pos_enc"][0]
    scale = torch.ones_like(pos, requires_grad=True)
    (pos * scale).sum().backward()
    torch.testing.assert_close(scale.grad, pos)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("batch", [1, 3])
def test_writing_into_a_returned_position_encoding_reaches_no_other_call(backend, device, batch):
    encoder, pix_feat, masks = _setup(device, batch=batch)
    other = build_encoder(TINY, seed=3, device=device)
    expected = reference_outputs(encoder, pix_feat, masks, torch.float32)["vision_pos_enc"][0]
    first = _fused(encoder, pix_feat, masks, backend)["vision_pos_enc"][0]
    kept = _fused(encoder, pix_feat, masks, backend)["vision_pos_enc"][0]
    first.add_(1.0)
    for enc in (encoder, other):
        torch.testing.assert_close(_fused(enc, pix_feat, masks, backend)["vision_pos_enc"][0], expected,
                                   rtol=0, atol=0)
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)


# 9. Batch 0 against batch 1, as sam2's broadcasting add gives.

@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_empty_batch_broadcast_against_one_gives_an_empty_result(backend, device):
    encoder, pix_feat, masks = _setup(device, batch=1)
    for pf, mk in ((pix_feat[:0], masks), (pix_feat, masks[:0])):
        out = _fused(encoder, pf, mk, backend)
        assert encoder.last_backend == backend
        assert out["vision_features"].shape == (0, TINY.out_dim, 4, 4)
        assert out["vision_pos_enc"][0].shape == (0, TINY.out_dim, 4, 4)


# 10. Huge features: finite wherever sam2's fp32 math is.

@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_huge_features_stay_finite_like_the_reference(backend, device):
    encoder, pix_feat, masks = _setup(device)
    pix_feat = pix_feat * 1e20
    with torch.no_grad(), mf.use_backend("reference"):
        expected = encoder(pix_feat, masks)["vision_features"]
    assert torch.isfinite(expected).all()
    out = _fused(encoder, pix_feat, masks, backend)["vision_features"]
    assert encoder.last_backend == backend and torch.isfinite(out).all()


def test_copies_read_their_own_weights():
    encoder, pix_feat, masks = _setup("cpu")
    _fused(encoder, pix_feat, masks, "torch")
    clone = copy.deepcopy(encoder)
    with torch.no_grad():
        clone.fuser.layers[0].pwconv2.weight.mul_(5)
    _assert_matches_own_forward(clone, pix_feat, masks, "torch")
    _assert_matches_own_forward(encoder, pix_feat, masks, "torch")
