"""Each op of each backend alone, on the same live weights and inputs."""

import pytest
import torch

from memenc_fast.tools.bench import op_calls
from memenc_fast.dispatch import select_backend
from memenc_fast.structure import read_structure
from memenc_fast.tools.presets import build_encoder, make_inputs

from bench_setup import BACKENDS, DEVICE, PRESET, synchronized

OPS = ["mask_downsample", "proj_add", "cxblock", "out_proj"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_op(benchmark, backend, op, dtype, batch):
    benchmark.group = f"{op} {PRESET.name} {str(dtype).replace('torch.', '')} B={batch}"
    encoder = build_encoder(PRESET, dtype=dtype, device=DEVICE)
    structure = read_structure(encoder)
    ops = select_backend(DEVICE, dtype, structure, None, False, name=backend).ops
    pix_feat, masks = make_inputs(PRESET, batch, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        out = benchmark(synchronized(op_calls(ops, structure, pix_feat, masks)[op]))
    assert torch.isfinite(out).all()
