"""Python overhead of one forward: the structure check (is anything the fused path rests on
changed?), input checks, backend choice and the position encoding, with the op pipeline stubbed
out. SAM 2.1's video predictor encodes one object per call (B=1), where on a GPU this overhead is a
share of every call that faster kernels cannot win back.

``extra_info`` records how many Python-level function calls one such forward makes
(``python_calls``) and how many calls into C (``c_calls``), counted with ``sys.setprofile``.
"""

import sys

import pytest
import torch

import memenc_fast as mf
from memenc_fast import pipeline
from memenc_fast.tools.presets import PRESETS, build_encoder, make_inputs

from bench_setup import BACKENDS, DEVICE


def _count_calls(fn):
    """(Python function calls, C function calls) made while ``fn()`` runs."""
    counts = {"call": 0, "c_call": 0}

    def profile(frame, event, arg):
        if event in counts:
            counts[event] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counts["call"], counts["c_call"]


@pytest.mark.parametrize("impl", BACKENDS)
def test_python_overhead(benchmark, impl, monkeypatch):
    benchmark.group = "python overhead per forward (ops stubbed, B=1)"
    encoder = build_encoder(PRESETS["small"], device=DEVICE)
    pix_feat, masks = make_inputs(PRESETS["small"], 1, device=DEVICE)
    with torch.no_grad(), mf.use_backend(impl):
        features = encoder(pix_feat, masks)["vision_features"]
    monkeypatch.setattr(pipeline, "run_ops", lambda *args: features)

    def call():
        with mf.use_backend(impl):
            return encoder(pix_feat, masks)

    with torch.no_grad():
        python_calls, c_calls = _count_calls(call)
        benchmark.extra_info.update(python_calls=python_calls, c_calls=c_calls)
        out = benchmark(call)
    assert out["vision_features"] is features and encoder.last_backend == impl
