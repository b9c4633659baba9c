"""torch.compile(fullgraph=True) traces the drop-in on every backend that runs here."""

import pytest
import torch

import memenc_fast as mf
from memenc_fast.numerics import judge

from helpers import TINY, build_encoder, make_inputs, reference_outputs

CPU_BACKENDS = [b for b in mf.available_backends() if b in ("reference", "torch")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fullgraph_compile_matches_reference(backend):
    torch._dynamo.reset()
    encoder = build_encoder(TINY, seed=41)
    pix_feat, masks = make_inputs(TINY, 3, seed=42)
    compiled = torch.compile(encoder, fullgraph=True)
    with torch.no_grad(), mf.use_backend(backend):
        out = compiled(pix_feat, masks, skip_mask_sigmoid=True)
    assert encoder.last_backend == backend
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64, skip_mask_sigmoid=True)
    verdict = judge(out["vision_features"], oracle["vision_features"], torch.float32)
    assert verdict.passed, verdict.describe()
    torch.testing.assert_close(out["vision_pos_enc"][0], oracle["vision_pos_enc"][0].float(), rtol=0, atol=1e-5)
