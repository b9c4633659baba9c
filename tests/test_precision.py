"""``memenc_fast.precision``: torch's TF32 permission per op, through the legacy flags and the
per-op API, including a mix of both that makes torch's own legacy getter raise."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from memenc_fast import precision

# Every setting the readers resolve through, as torch stores it.
_KEYS = [("cuda", "conv"), ("cuda", "rnn"), ("cuda", "matmul"), ("cuda", "all"), ("generic", "all")]


@pytest.fixture(autouse=True)
def _restored_flags() -> Iterator[None]:
    """Each test starts from torch's defaults and leaves the flags as they were."""
    if not hasattr(torch._C, "_get_fp32_precision_getter"):
        pytest.skip("this torch has no per-op fp32 precision API")
    saved = [torch._C._get_fp32_precision_getter(*key) for key in _KEYS]
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("highest")
    for key in _KEYS[2:]:
        torch._C._set_fp32_precision_setter(*key, "none")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(matmul)
        for key, value in zip(_KEYS, saved):
            torch._C._set_fp32_precision_setter(*key, value)


def test_defaults_are_torchs_convs_tf32_matmuls_ieee() -> None:
    assert precision.tf32_flags() == (True, False)


def test_legacy_flags_are_followed_per_op() -> None:
    torch.backends.cudnn.allow_tf32 = False
    assert precision.tf32_flags() == (False, False)
    torch.backends.cuda.matmul.allow_tf32 = True
    assert precision.tf32_flags() == (False, True)
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("highest")
    assert precision.tf32_flags() == (True, False)
    torch.set_float32_matmul_precision("high")
    assert precision.tf32_flags() == (True, True)


def test_per_op_api_and_its_fallbacks() -> None:
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert precision.tf32_flags() == (False, True)
    # An op left at "none" takes the CUDA backend's setting, then the generic one.
    torch.backends.cudnn.conv.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "none"
    assert precision.tf32_flags() == (False, False)
    torch.backends.fp32_precision = "tf32"
    assert precision.tf32_flags() == (True, True)
    torch.backends.cudnn.fp32_precision = "ieee"  # the CUDA backend's, before the generic one
    assert precision.tf32_flags() == (False, False)


def test_a_mix_of_both_apis_reads_without_torchs_error() -> None:
    """conv set through the new API and rnn left by the legacy one: torch's legacy getter raises,
    the conv's own setting still answers."""
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cudnn.allow_tf32
    assert precision.conv_tf32() is False
