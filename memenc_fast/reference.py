"""Pure-PyTorch reference of SAM 2's memory encoder.

Same math, constructor arguments, defaults, submodule names and ``state_dict`` keys as
``sam2.modeling.memory_encoder`` and ``sam2.modeling.position_encoding``, so a SAM 2 checkpoint
loads strictly into it. Every backend of this package is validated against these modules; they
are deliberately written op by op, the way sam2 computes, with no fusion or caching.
"""

from __future__ import annotations

import copy
import math
from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LayerNorm2d",
    "MaskDownSampler",
    "CXBlock",
    "Fuser",
    "MemoryEncoder",
    "PositionEmbeddingSine",
    "DropPath",
    "resize_mask",
]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of an NCHW tensor (statistics per pixel)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        normalized = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * normalized + self.bias[:, None, None]


class DropPath(nn.Module):
    """Stochastic depth per sample; identity in eval mode or with ``drop_prob == 0``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = x.new_empty(mask_shape).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            keep.div_(keep_prob)
        return x * keep


class MaskDownSampler(nn.Module):
    """Downsamples a mask by ``total_stride`` in steps of ``stride``.

    Each step is conv(kernel_size, stride, padding) -> LayerNorm2d -> activation, multiplying the
    channels by ``stride**2`` (1 -> 4 -> 16 -> 64 -> 256 for SAM 2); a final 1x1 conv maps to
    ``embed_dim``. ``interpol_size`` (SAM 3's option) first resizes masks of another size to it
    (bilinear, antialiased, ``align_corners=False``).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 4,
        stride: int = 4,
        padding: int = 0,
        total_stride: int = 16,
        activation: Type[nn.Module] = nn.GELU,
        interpol_size: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        num_layers = int(math.log2(total_stride) // math.log2(stride))
        if stride**num_layers != total_stride:
            raise ValueError(
                f"MaskDownSampler: total_stride must be a power of stride; "
                f"got stride={stride}, total_stride={total_stride}"
            )
        self.interpol_size = _validate_interpol_size(interpol_size)
        self.encoder = nn.Sequential()
        in_chans = 1
        out_chans = 1
        for _ in range(num_layers):
            out_chans = in_chans * stride**2
            self.encoder.append(
                nn.Conv2d(in_chans, out_chans, kernel_size=kernel_size, stride=stride, padding=padding)
            )
            self.encoder.append(LayerNorm2d(out_chans))
            self.encoder.append(activation())
            in_chans = out_chans
        self.encoder.append(nn.Conv2d(out_chans, embed_dim, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpol_size is not None and list(x.shape[-2:]) != self.interpol_size:
            x = resize_mask(x, self.interpol_size)
        return self.encoder(x)


def resize_mask(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """sam3's mask resize: bilinear, antialiased, ``align_corners=False``, computed in float32
    and left in float32 (float64 stays float64, so the reference can serve as the oracle)."""
    source = x if x.dtype == torch.float64 else x.float()
    return F.interpolate(source, size=list(size), align_corners=False, mode="bilinear", antialias=True)


def _validate_interpol_size(interpol_size: Optional[Sequence[int]]) -> Optional[List[int]]:
    if interpol_size is None:
        return None
    if not isinstance(interpol_size, Sequence) or isinstance(interpol_size, str):
        raise ValueError(f"interpol_size must be a pair of positive ints (height, width); got {interpol_size!r}")
    size = list(interpol_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"interpol_size must be a pair of positive ints (height, width); got {interpol_size!r}")
    return size


class CXBlock(nn.Module):
    """ConvNeXt block: dwconv -> LayerNorm over channels -> Linear(4*dim) -> GELU -> Linear(dim),
    scaled by ``gamma`` and added to the input."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        use_dwconv: bool = True,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(
            dim, dim, kernel_size=kernel_size, padding=padding, groups=dim if use_dwconv else 1
        )
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.norm(self.dwconv(x))
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(x)))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return residual + self.drop_path(x)


class Fuser(nn.Module):
    """An optional 1x1 input projection followed by ``num_layers`` deep copies of ``layer``."""

    def __init__(
        self, layer: nn.Module, num_layers: int, dim: Optional[int] = None, input_projection: bool = False
    ) -> None:
        super().__init__()
        self.proj: nn.Module = nn.Identity()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        if input_projection:
            if dim is None:
                raise ValueError("Fuser: input_projection=True needs dim; got dim=None")
            self.proj = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine position encoding of a feature map's grid (DETR style), shape-only.

    Accepts sam3's ``precompute_resolution`` (its fifth argument) and sam2's keyword-only
    cache-warming arguments (``warmup_cache``, ``image_size``, ``strides``) so configs of either
    package construct it unchanged; the reference itself computes the encoding on every call.
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: int = 10000,
        normalize: bool = True,
        scale: Optional[float] = None,
        precompute_resolution: Optional[int] = None,
        *,
        warmup_cache: bool = True,
        image_size: int = 1024,
        strides: Tuple[int, ...] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even; got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: normalize must be True if scale is passed")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.warmup_cache = warmup_cache
        self.image_size = image_size
        self.strides = tuple(strides)
        self.precompute_resolution = precompute_resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = sine_position_encoding(
            x.shape[-2], x.shape[-1], self.num_pos_feats, self.temperature, self.normalize, self.scale, x.device
        )
        return pos[None].repeat(x.shape[0], 1, 1, 1)


def sine_position_encoding(
    height: int,
    width: int,
    num_pos_feats: int,
    temperature: float,
    normalize: bool,
    scale: float,
    device: torch.device,
) -> torch.Tensor:
    """The (2*num_pos_feats, height, width) float32 encoding, y features first then x."""
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device).view(-1, 1).expand(height, width)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device).view(1, -1).expand(height, width)
    if normalize:
        eps = 1e-6
        y_embed = y_embed / (y_embed[-1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, None] / dim_t
    pos_y = y_embed[:, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[:, :, 0::2].sin(), pos_y[:, :, 1::2].cos()), dim=3).flatten(2)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)


class MemoryEncoder(nn.Module):
    """Fuses a frame's features with a downsampled object mask into a memory feature map."""

    def __init__(
        self,
        out_dim: int,
        mask_downsampler: nn.Module,
        fuser: nn.Module,
        position_encoding: nn.Module,
        in_dim: int = 256,
    ) -> None:
        super().__init__()
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = fuser
        self.position_encoding = position_encoding
        self.out_proj: nn.Module = nn.Identity()
        if out_dim != in_dim:
            self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def forward(
        self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
    ) -> dict:
        if not skip_mask_sigmoid:
            masks = F.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        pix_feat = pix_feat.to(masks.device)
        x = self.pix_feat_proj(pix_feat) + masks
        x = self.out_proj(self.fuser(x))
        pos = self.position_encoding(x).to(x.dtype)
        return {"vision_features": x, "vision_pos_enc": [pos]}
