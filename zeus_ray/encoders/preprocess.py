"""Batched image preprocessing on the encode device, equal to each model's published transform.

The published transforms (CONCH, KEEP, PLIP's CLIPImageProcessor, open_clip) are all PIL
pipelines: Resize(shortest side, bicubic) → CenterCrop → ToTensor (/255) → Normalize. We do the
same on a uint8 batch already on the device: torchvision's antialiased tensor resize (PIL's filter
support, a = -0.5 cubic), rounded back to uint8 as PIL does, then crop, scale and normalise.
A tile whose shortest side already equals the resize size is not resampled (PIL returns a copy
in that case too), so CONCH's 448 → 448 is exact.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import ZeusError
from .base import ModelSpec

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def mean_std_name(mean, std) -> str:
    """A readable name for a (mean, std) pair, for `zeus models`."""
    pair = (tuple(round(v, 6) for v in mean), tuple(round(v, 6) for v in std))
    for name, (m, s) in {"openai-clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                         "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                         "0.5/0.5": ((0.5,) * 3, (0.5,) * 3)}.items():
        if pair == (tuple(round(v, 6) for v in m), tuple(round(v, 6) for v in s)):
            return name
    return "custom"


def resized_shape(h: int, w: int, shortest: int) -> tuple[int, int]:
    """Output (h, w) when the shortest side becomes `shortest` (torchvision's rule: the long
    side is truncated, as in transforms.Resize(int))."""
    if h <= w:
        return shortest, int(shortest * w / h)
    return int(shortest * h / w), shortest


class Preprocessor:
    """uint8 (N, H, W, 3) tensor on any device → float32 (N, 3, S, S) normalised tensor."""

    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu"):
        if spec.interpolation not in _INTERPOLATION:
            raise ZeusError(f"model {spec.id!r}: interpolation {spec.interpolation!r} is not supported "
                            f"(use one of {sorted(_INTERPOLATION)})")
        self.spec = spec
        self.interpolation = _INTERPOLATION[spec.interpolation]
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ZeusError(f"model {self.spec.id!r}: expected uint8 RGB tiles (N, H, W, 3), "
                            f"got {tuple(tiles.shape)} {tiles.dtype}")
        x = tiles.permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        size = self.spec.input_size
        if min(h, w) != self.spec.resize_size:
            x = TF.resize(x.contiguous(), list(resized_shape(h, w, self.spec.resize_size)),
                          interpolation=self.interpolation, antialias=True)
        if min(x.shape[-2:]) < size:
            raise ZeusError(f"model {self.spec.id!r}: tiles of {h}x{w} px are smaller than the "
                            f"{size}x{size} crop after resizing")
        if tuple(x.shape[-2:]) != (size, size):
            x = TF.center_crop(x, [size, size])
        return (x.float() / 255.0 - self.mean) / self.std


def as_uint8_batch(tiles: np.ndarray, model_id: str) -> np.ndarray:
    """Checks the encoder input contract and returns a C-contiguous uint8 array."""
    if not isinstance(tiles, np.ndarray) or tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        shape = getattr(tiles, "shape", None)
        dtype = getattr(tiles, "dtype", type(tiles).__name__)
        raise ZeusError(f"model {model_id!r}: encode_images needs a uint8 RGB array (N, H, W, 3), "
                        f"got shape {shape} dtype {dtype}")
    return np.ascontiguousarray(tiles)
