"""memenc-fast: a drop-in, kernel-accelerated memory encoder for SAM 2 / SAM 2.1 and SAM 3's tracker.

    import memenc_fast as mf
    enc = mf.MemoryEncoder(out_dim, mask_downsampler, fuser, position_encoding, in_dim=256)
    mf.patch_sam2(sam2_video_predictor)      # swap the memory encoder of a built sam2 model
    with mf.use_backend("torch"): ...        # or $MEMENC_FAST_BACKEND; default "auto"
"""

from .dispatch import BackendUnavailableError, available_backends, current_backend, use_backend
from .modules import CXBlock, Fuser, LayerNorm2d, MaskDownSampler, MemoryEncoder, PositionEmbeddingSine
from .sam2_compat import from_sam2, patch_sam2
from .sam3_compat import from_sam3, patch_sam3
from .transformers_compat import TransformersMemoryEncoder, memory_encoder_from_transformers, patch_transformers

__version__ = "0.1.0"

__all__ = [
    "MemoryEncoder",
    "MaskDownSampler",
    "CXBlock",
    "Fuser",
    "LayerNorm2d",
    "PositionEmbeddingSine",
    "available_backends",
    "use_backend",
    "current_backend",
    "BackendUnavailableError",
    "from_sam2",
    "patch_sam2",
    "from_sam3",
    "patch_sam3",
    "memory_encoder_from_transformers",
    "patch_transformers",
    "TransformersMemoryEncoder",
]
