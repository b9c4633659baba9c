"""The torch backend's host-dependent CPU paths: decided by probes, refused paths never retried,
the portable ops serving with the reason in ``info`` and the log; and every dtype sam2 runs,
matching sam2's module on an emulated AVX2-only host (oneDNN refuses bf16/fp16 inner products
there)."""

import json
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

import memenc_fast as mf
from memenc_fast import dispatch
from memenc_fast.backends import torch_ops
from memenc_fast.structure import read_structure
from memenc_fast.tools import info
from memenc_fast.numerics import judge

from helpers import PRESETS, TINY, build_encoder, make_inputs, reference_outputs, requires_sam2

ONEDNN_ERROR = ("could not create a primitive descriptor for the inner product forward propagation primitive. "
                "Run workload with environment variable ONEDNN_VERBOSE=all to get additional diagnostic information.")
"""What oneDNN raises for a bf16 inner product on a CPU without AVX-512."""

AVX2_HOST = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
"""An AVX-512 host playing an AVX2-only one (read when torch is imported)."""

requires_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="this torch build has no oneDNN fused linear ops")


class FakeLinearPointwise:
    """Stands in for ``torch.ops.mkldnn._linear_pointwise`` (and its ``.binary``): raises as oneDNN
    does on inputs of at least ``refuse_from`` tokens, else runs the real op and adds ``offset``
    (a wrong result when not 0); counts the calls."""

    def __init__(self, refuse_from: int = 0, offset: float = 0.0) -> None:
        self.real = torch.ops.mkldnn._linear_pointwise
        self.refuse_from, self.offset, self.calls = refuse_from, offset, 0

    def _run(self, op, x, *args):
        self.calls += 1
        if x.shape[0] >= self.refuse_from:
            raise RuntimeError(ONEDNN_ERROR)
        return op(x, *args) + self.offset

    def __call__(self, x, *args):
        return self._run(self.real, x, *args)

    def binary(self, x, *args):
        return self._run(self.real.binary, x, *args)


@pytest.fixture
def fresh_probes(monkeypatch):
    """Empty probe caches and log memory, as in a new process."""
    monkeypatch.setattr(torch_ops, "_onednn_refusals", {})
    monkeypatch.setattr(torch_ops, "_mlp_choices", {})
    monkeypatch.setattr(dispatch, "_logged_reasons", set())


def _fake_onednn(monkeypatch, **kwargs) -> FakeLinearPointwise:
    fake = FakeLinearPointwise(**kwargs)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fake)
    return fake


def _check_forwards(encoder, pix_feat, masks, dtype):
    """Two forwards under each of ``torch`` and ``auto``, each judged against the float64
    reference (and, in bf16/fp16, the reference run in that dtype)."""
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)["vision_features"]
    with torch.no_grad(), mf.use_backend("reference"):
        same = encoder(pix_feat, masks)["vision_features"]
    for backend in ("torch", "auto", "torch", "auto"):
        with torch.no_grad(), mf.use_backend(backend):
            out = encoder(pix_feat, masks)["vision_features"]
        assert encoder.last_backend == "torch"
        verdict = judge(out, oracle, dtype, same_dtype_ref=same)
        assert verdict.passed, f"{backend}: {verdict.describe()}"


def _onednn_log_lines(caplog):
    return [r.getMessage() for r in caplog.records if "oneDNN" in r.getMessage()]


@requires_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refused_onednn_is_probed_once_and_the_torch_ops_serve(dtype, monkeypatch, fresh_probes, caplog):
    fake = _fake_onednn(monkeypatch)
    encoder = build_encoder(TINY, seed=51, dtype=dtype)
    pix_feat, masks = make_inputs(TINY, 2, seed=52, dtype=dtype)
    with caplog.at_level(logging.INFO, logger="memenc_fast"):
        _check_forwards(encoder, pix_feat, masks, dtype)
    assert fake.calls == 1  # the probe; never per call
    reason = torch_ops.onednn_mlp_refusal(dtype)
    assert reason == "oneDNN refuses them on this host: " + ONEDNN_ERROR.split(". ")[0]
    name = str(dtype).replace("torch.", "")
    logged = _onednn_log_lines(caplog)
    assert len(logged) == 1 and name in logged[0] and reason in logged[0]
    assert info.collect()["cpu fast paths"][f"oneDNN fused MLP, {name}"] == "no: " + reason
    assert fake.calls == len(torch_ops.ONEDNN_DTYPES)  # info probed the other dtypes, once each


@requires_onednn
def test_wrong_onednn_result_is_refused(monkeypatch, fresh_probes):
    fake = _fake_onednn(monkeypatch, refuse_from=1 << 30, offset=1.0)
    encoder = build_encoder(TINY, seed=53)
    pix_feat, masks = make_inputs(TINY, 2, seed=54)
    _check_forwards(encoder, pix_feat, masks, torch.float32)
    assert fake.calls == 4  # the probe's two GEMMs, without and with gamma apart
    assert torch_ops.onednn_mlp_refusal(torch.float32).startswith("their result is off on this host")


@requires_onednn
def test_size_refused_after_the_probe_passed_is_kept(monkeypatch, fresh_probes, caplog):
    """The probe's tiny inputs pass; the forward's larger MLP is refused: the torch ops serve and
    the refusal is kept (no further oneDNN calls), logged once."""
    fake = _fake_onednn(monkeypatch, refuse_from=64)
    encoder = build_encoder(PRESETS["small"], seed=55)
    pix_feat, masks = make_inputs(PRESETS["small"], 1, seed=56)
    with caplog.at_level(logging.INFO, logger="memenc_fast"):
        _check_forwards(encoder, pix_feat, masks, torch.float32)
    assert fake.calls == 5  # the probe's four GEMMs, then the refused one
    assert torch_ops.onednn_mlp_refusal(torch.float32).startswith("oneDNN refused a 64x256 MLP on this host: could not")
    assert len(_onednn_log_lines(caplog)) == 1


@requires_onednn
def test_mlp_formulation_is_measured_once_per_shape_class(monkeypatch, fresh_probes):
    """Each (dtype, widths, token class) is timed once; later forwards reuse the choice, and
    ``info`` shows it."""
    timed = []
    real = torch_ops._time_mlp_formulations

    def recording(normed, *args):
        timed.append(normed.shape[0])
        return real(normed, *args)

    monkeypatch.setattr(torch_ops, "_time_mlp_formulations", recording)
    encoder = build_encoder(TINY, seed=57)
    for batch in (1, 1, 3, 3):  # 16 then 48 tokens: two token classes
        pix_feat, masks = make_inputs(TINY, batch, seed=58)
        with torch.no_grad(), mf.use_backend("torch"):
            encoder(pix_feat, masks)
    assert timed == [16, 48]
    paths = torch_ops.cpu_fast_paths()
    for tokens in ("16-31", "32-63"):
        assert paths[f"CXBlock MLP, float32, 32->128, {tokens} tokens, gamma on the output"].startswith(
            ("oneDNN (measured", "addmm (measured"))


@requires_onednn
@pytest.mark.parametrize("onednn_faster", [True, False])
def test_measured_choice_is_followed(onednn_faster, monkeypatch, fresh_probes):
    """The formulation the probe measured faster is the one every later MLP of its class runs."""
    fake = _fake_onednn(monkeypatch, refuse_from=1 << 30)
    monkeypatch.setattr(torch_ops, "_time_mlp_formulations", lambda *args: (onednn_faster, 1.0, 1.0))
    encoder = build_encoder(TINY, seed=61)
    pix_feat, masks = make_inputs(TINY, 2, seed=62)
    _check_forwards(encoder, pix_feat, masks, torch.float32)
    # The refusal probe's four GEMMs; then, where oneDNN is chosen, two per block, two blocks, four forwards.
    assert fake.calls == 4 + (2 * 2 * 4 if onednn_faster else 0)


def test_no_probe_runs_while_tracing(monkeypatch, fresh_probes):
    """Compiled code takes the portable MLP: tracing a CXBlock (fullgraph) runs no probe and
    traces no oneDNN op."""

    def forbidden(*args):
        raise AssertionError("a probe ran while tracing")

    monkeypatch.setattr(torch_ops, "_probe_onednn_mlp", forbidden)
    monkeypatch.setattr(torch_ops, "_time_mlp_formulations", forbidden)
    torch._dynamo.reset()
    encoder = build_encoder(TINY, seed=59)
    block = read_structure(encoder).blocks[0]
    tokens = torch.randn(2, 4, 4, TINY.in_dim, generator=torch.Generator().manual_seed(60))
    with torch.no_grad():
        out = torch.compile(lambda x: torch_ops.cxblock(x, block), backend="eager", fullgraph=True)(tokens)
        oracle = encoder.fuser.layers[0].double()(tokens.double().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert judge(out, oracle, torch.float32).passed
    assert torch_ops._onednn_refusals == {} and torch_ops._mlp_choices == {}


# ---- every dtype sam2 runs, on an emulated AVX2-only host ------------------------------------------


def _sam2_cases() -> dict:
    """Runs in a child process (see the test below): bf16 and fp16 modules, bf16 autocast and a
    module moved to bf16 between calls, each under ``auto`` and ``torch`` against sam2's module;
    returns each check's relative error and bound, and the probes' verdicts."""
    import copy

    from sam2.modeling import memory_encoder, position_encoding

    sam2 = types.SimpleNamespace(MemoryEncoder=memory_encoder.MemoryEncoder, Fuser=memory_encoder.Fuser,
                                 MaskDownSampler=memory_encoder.MaskDownSampler, CXBlock=memory_encoder.CXBlock,
                                 PositionEmbeddingSine=position_encoding.PositionEmbeddingSine)
    preset = PRESETS["small"]
    theirs32 = build_encoder(preset, namespace=sam2, seed=61)
    pix_feat32, masks32 = make_inputs(preset, 2, seed=62)
    results = {}

    def compare(case, theirs, ours, dtype, autocast=None):
        pix_feat, masks = pix_feat32.to(dtype), masks32.to(dtype)
        oracle = reference_outputs(ours, pix_feat, masks, torch.float64)["vision_features"]
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            expected = theirs(pix_feat, masks)["vision_features"]
            for backend in ("auto", "torch"):
                with mf.use_backend(backend):
                    out = ours(pix_feat, masks)["vision_features"]
                verdict = judge(out, oracle, autocast or dtype, same_dtype_ref=expected)
                results[f"{case}, {backend}"] = dict(error=verdict.error, bound=verdict.bound, passed=verdict.passed,
                                                     ran=ours.last_backend, dtype=str(out.dtype))

    for dtype in (torch.bfloat16, torch.float16):
        theirs = copy.deepcopy(theirs32).to(dtype)
        compare(f"{dtype} module", theirs, mf.from_sam2(theirs), dtype)
    compare("bf16 autocast", theirs32, mf.from_sam2(theirs32), torch.float32, autocast=torch.bfloat16)
    moving = mf.from_sam2(theirs32)
    compare("before the move to bf16", theirs32, moving, torch.float32)
    moving.to(torch.bfloat16)
    compare("after the move to bf16", copy.deepcopy(theirs32).to(torch.bfloat16), moving, torch.bfloat16)
    return dict(results=results, capability=torch.backends.cpu.get_cpu_capability(),
                onednn={str(d): torch_ops.onednn_mlp_refusal(d) for d in torch_ops.ONEDNN_DTYPES})


@requires_sam2
def test_sam2_dtypes_on_an_avx2_host():
    """bf16/fp16 modules, bf16 autocast and a move to bf16 between calls match sam2's module under
    ``auto`` and ``torch`` on an AVX2-only host (emulated: oneDNN and ATen capped at AVX2 before
    torch is imported, in a child process; a no-op on a real AVX2 host)."""
    # One thread: the check is of numerics, and a busy 2-core machine slows OpenMP's threads 5-10x.
    env = dict(os.environ, OMP_NUM_THREADS="1", **AVX2_HOST)
    child = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=120,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
    assert child.returncode == 0, child.stderr[-4000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["capability"] in ("AVX2", "DEFAULT")
    failed = {case: r for case, r in report["results"].items() if not r["passed"] or r["ran"] != "torch"}
    assert not failed, f"{failed}; oneDNN refusals: {report['onednn']}"
    assert len(report["results"]) == 10


if __name__ == "__main__":
    print(json.dumps(_sam2_cases()))
