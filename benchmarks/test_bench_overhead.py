"""Python overhead of one forward: input checks, the structure and packed-weight cache checks,
backend choice and the position encoding, with the op pipeline stubbed out. SAM 2.1's video
predictor encodes one object per call (B=1), where on a GPU this overhead is a share of every
call that faster kernels cannot win back."""

import pytest
import torch

import memenc_fast as mf
from memenc_fast import pipeline
from memenc_fast.tools.presets import PRESETS, build_encoder, make_inputs

from bench_setup import BACKENDS, DEVICE


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
        out = benchmark(call)
    assert out["vision_features"] is features and encoder.last_backend == impl
