"""Model configurations and seeded inputs shared by ``check``, ``bench``, the benchmarks and tests.

Weights are drawn so that every part of the network matters: sam2's init leaves LayerNorm
weights at 1 and gamma at 1e-6, which would make the CXBlock MLPs invisible in any comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

__all__ = ["Preset", "PRESETS", "build_encoder", "randomize_parameters", "make_inputs", "flop_breakdown", "encoder_flops"]


@dataclass(frozen=True)
class Preset:
    """One memory-encoder configuration and its input size."""

    name: str
    mask_size: int
    feature_size: int
    in_dim: int = 256
    out_dim: int = 64
    kernel_size: int = 3
    stride: int = 2
    padding: int = 1
    total_stride: int = 16
    num_layers: int = 2
    interpol_size: Tuple[int, int] = None  # type: ignore[assignment]

    def module_kwargs(self) -> Dict[str, Any]:
        """Constructor arguments in the shape of a sam2 hydra config's memory_encoder section."""
        downsampler = dict(
            embed_dim=self.in_dim,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            total_stride=self.total_stride,
        )
        if self.interpol_size is not None:
            downsampler["interpol_size"] = list(self.interpol_size)
        return dict(
            out_dim=self.out_dim,
            in_dim=self.in_dim,
            downsampler=downsampler,
            block=dict(dim=self.in_dim, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True),
            num_layers=self.num_layers,
            position=dict(num_pos_feats=self.out_dim, normalize=True, scale=None, temperature=10000),
        )


PRESETS: Dict[str, Preset] = {
    "sam2": Preset("sam2", mask_size=1024, feature_size=64),
    "sam3": Preset("sam3", mask_size=1152, feature_size=72, interpol_size=(1152, 1152)),
    # SAM 2 run on 512-px frames, as real-time users do: 512² masks, 32² features.
    "sam2_512": Preset("sam2_512", mask_size=512, feature_size=32),
    "small": Preset("small", mask_size=128, feature_size=8),
}


def build_encoder(
    preset: Preset,
    namespace: Any = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Any = "cpu",
) -> nn.Module:
    """A MemoryEncoder for ``preset`` built from ``namespace``'s classes (default: memenc_fast),
    in eval mode with seeded, non-trivial weights."""
    if namespace is None:
        import memenc_fast as namespace
    kw = preset.module_kwargs()
    encoder = namespace.MemoryEncoder(
        out_dim=kw["out_dim"],
        mask_downsampler=namespace.MaskDownSampler(**kw["downsampler"]),
        fuser=namespace.Fuser(namespace.CXBlock(**kw["block"]), kw["num_layers"]),
        position_encoding=namespace.PositionEmbeddingSine(**kw["position"]),
        in_dim=kw["in_dim"],
    )
    randomize_parameters(encoder, seed)
    return encoder.to(device=device, dtype=dtype).eval()


def randomize_parameters(module: nn.Module, seed: int = 0) -> None:
    """Seeded weights at a scale that keeps activations O(1): LayerNorm weights around 1 with
    spread, biases nonzero, gamma O(0.1-1) so the MLP contributes."""
    generator = torch.Generator().manual_seed(seed)

    def draw(param: torch.Tensor, values: torch.Tensor) -> None:
        param.copy_(values.to(param.dtype))

    with torch.no_grad():
        for name, param in module.named_parameters():
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            leaf = name.rsplit(".", 1)[-1]
            shape = param.shape
            if leaf == "gamma":
                draw(param, 0.1 + 0.9 * torch.rand(shape, generator=generator))
            elif leaf == "bias":
                draw(param, 0.1 * torch.randn(shape, generator=generator))
            elif type(owner).__name__ == "LayerNorm2d":
                draw(param, 1.0 + 0.3 * torch.randn(shape, generator=generator))
            else:
                fan_in = param[0].numel()
                draw(param, torch.randn(shape, generator=generator) / fan_in**0.5)


def make_inputs(
    preset: Preset,
    batch: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Any = "cpu",
    mask_size: Tuple[int, int] = None,  # type: ignore[assignment]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(pix_feat, masks)``: features ~ N(0, 1), mask logits ~ N(0, 4) (a mix of confident
    and uncertain pixels, as SAM's decoder produces)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = mask_size if mask_size is not None else (preset.mask_size, preset.mask_size)
    feat = preset.feature_size
    pix_feat = torch.randn((batch, preset.in_dim, feat, feat), generator=generator)
    masks = 2.0 * torch.randn((batch, 1, height, width), generator=generator)
    return pix_feat.to(device=device, dtype=dtype), masks.to(device=device, dtype=dtype)


def flop_breakdown(preset: Preset, batch: int) -> Dict[str, int]:
    """Multiply-adds x 2 per op of one forward at ``preset``'s size; ``cxblock`` is per block."""
    size = preset.interpol_size[0] if preset.interpol_size else preset.mask_size
    in_ch, mask_flops = 1, 0
    stages = 0
    while preset.stride**stages < preset.total_stride:
        stages += 1
    for _ in range(stages):
        size = (size + 2 * preset.padding - preset.kernel_size) // preset.stride + 1
        out_ch = in_ch * preset.stride**2
        mask_flops += 2 * in_ch * out_ch * preset.kernel_size**2 * size * size
        in_ch = out_ch
    tokens = preset.feature_size**2
    c = preset.in_dim
    return {
        "mask_downsample": batch * mask_flops,
        "proj_add": batch * 2 * (in_ch + c) * c * tokens,
        "cxblock": batch * (2 * c * 49 + 2 * 2 * c * 4 * c) * tokens,
        "out_proj": batch * 2 * c * preset.out_dim * tokens if preset.out_dim != c else 0,
    }


def encoder_flops(preset: Preset, batch: int) -> int:
    """Multiply-adds x 2 of one whole forward at ``preset``'s size (the work the kernels must do)."""
    parts = flop_breakdown(preset, batch)
    return parts["mask_downsample"] + parts["proj_add"] + preset.num_layers * parts["cxblock"] + parts["out_proj"]
