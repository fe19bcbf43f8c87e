"""PIL's 8-bit resampling (Image.resize with BICUBIC or BILINEAR) as torch integer ops, bit-exact, on
any device: the published transforms resize with PIL, and on a GPU encoder that resize is the CPU
work per tile that limits how many tiles a node's cores feed the GPU (benchmarks/RESULTS.md,
"Preprocessing on one core").

What PIL does (Pillow's libImaging Resample.c; the facts, reimplemented here): a separable filter,
the horizontal pass first, each pass storing 8-bit pixels. Per output position: a window of input
positions around the centre `(x + 0.5) * scale`, float64 weights from the filter (widened by the
scale when downsampling), normalised to sum 1, then rounded to fixed point with 22 fractional bits
(half away from zero). A pixel is `(2^21 + Σ pixel·weight) >> 22`, clamped to 0…255, in int32.
The float64 weights are computed here with the same operations in the same order, so the integer
weights, and so the pixels, are the same.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

PRECISION_BITS = 22   # 32 bits - 8 for the pixel - 2 for overshoot of negative lobes
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}


def _filter(kind: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if kind == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5   # Keys' cubic, as PIL: evaluated in the same order of operations
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=32)
def coefficients(in_size: int, out_size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(first input index (out,), int32 fixed-point weights (out, taps)) of one resampling pass over
    the whole input; weights past a window's end are 0."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[kind] * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) cast truncates toward zero; the clamps follow it.
    lo = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    count = hi - lo
    j = np.arange(taps)
    w = _filter(kind, ((lo[:, None] + j[None, :]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(j[None, :] < count[:, None], w, 0.0)
    total = np.zeros(out_size)
    for t in range(taps):   # summed tap by tap, as PIL does (numpy's pairwise sums differ in the last bit)
        total = total + w[:, t]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return lo, fixed


@lru_cache(maxsize=64)
def _on_device(in_size: int, out_size: int, kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input index (taps, out) int64, weight (taps, out) int32) on `device`, uploaded once: small
    synchronous copies per batch would stall a GPU's overlapped uploads."""
    lo, fixed = coefficients(in_size, out_size, kind)
    # A window's end clamps the index; its weight there is 0.
    idx = np.minimum(lo[None, :] + np.arange(fixed.shape[1])[:, None], in_size - 1)
    return torch.from_numpy(idx).to(device), torch.from_numpy(np.ascontiguousarray(fixed.T)).to(device)


def _pass(x: torch.Tensor, dim: int, out_size: int, kind: str) -> torch.Tensor:
    """One 8-bit pass along `dim` of an int32 tensor (values 0…255)."""
    idx, weight = _on_device(x.shape[dim], out_size, kind, x.device)
    shape = [1] * x.ndim
    shape[dim] = out_size
    acc = None
    for t in range(idx.shape[0]):
        term = x.index_select(dim, idx[t]) * weight[t].view(shape)
        acc = term.add_(1 << (PRECISION_BITS - 1)) if acc is None else acc.add_(term)
    return (acc >> PRECISION_BITS).clamp_(0, 255)


def pil_resize(tiles: torch.Tensor, height: int, width: int, kind: str = "bicubic") -> torch.Tensor:
    """uint8 (N, H, W, C) → uint8 (N, height, width, C), equal to PIL's `Image.resize((width, height),
    BICUBIC or BILINEAR)` of each tile. A side already at its size is not resampled (as PIL)."""
    if kind not in _SUPPORT:
        raise ValueError(f"pil_resize: {kind!r} is not one of {sorted(_SUPPORT)}")
    if tiles.shape[1:3] == (height, width):
        return tiles
    x = tiles.to(torch.int32)
    if x.shape[2] != width:
        x = _pass(x, 2, width, kind)
    if x.shape[1] != height:
        x = _pass(x, 1, height, kind)
    return x.to(torch.uint8)
