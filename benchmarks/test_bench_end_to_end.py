"""End to end: the pure reference module, and the drop-in under each backend."""

import pytest
import torch

import memenc_fast as mf
from memenc_fast import reference
from memenc_fast.tools.presets import build_encoder, make_inputs

from bench_setup import BACKENDS, DEVICE, PRESET, synchronized


@pytest.mark.parametrize("impl", ["reference"] + BACKENDS)
def test_forward(benchmark, impl, dtype, batch):
    benchmark.group = f"end-to-end {PRESET.name} {str(dtype).replace('torch.', '')} B={batch}"
    encoder = build_encoder(PRESET, dtype=dtype, device=DEVICE)
    pix_feat, masks = make_inputs(PRESET, batch, dtype=dtype, device=DEVICE)
    if impl == "reference":
        module = build_encoder(PRESET, namespace=reference, dtype=dtype, device=DEVICE)
        module.load_state_dict(encoder.state_dict())
        call = lambda: module(pix_feat, masks)  # noqa: E731
    else:
        def call():
            with mf.use_backend(impl):
                return encoder(pix_feat, masks)
    with torch.no_grad():
        out = benchmark(synchronized(call))
    assert out["vision_features"].shape == (batch, PRESET.out_dim, PRESET.feature_size, PRESET.feature_size)
