"""Image preprocessing whose output is bit-identical to each model's published transform.

The published transforms (CONCH, KEEP, QuiltNet/open_clip, and PLIP's CLIPImageProcessor for square
tiles) are PIL pipelines: torchvision `Resize(size, BICUBIC)` on a PIL image (= PIL
`Image.resize(..., BICUBIC)`, shortest side → size, long side truncated) → `CenterCrop(size)` →
`ToTensor()` (/255) → `Normalize(mean, std)`. We do the same:
- on the CPU (uint8 tiles arrive there): PIL resize per tile, in a small thread pool (PIL releases
  the GIL while resampling), skipped when the shortest side already equals the size (torchvision
  returns the image untouched then), then CenterCrop's offsets `int(round((h - s) / 2.0))`;
- or, with `resize_on_device` (the default on a GPU: `model.resize_on`), the same resize and crop on
  the encode device, as PIL's integer arithmetic in torch (encoders/resample.py), same bits;
- on the encode device: uint8 → float through a 3 × 256 lookup table computed once on the CPU with
  ToTensor's and Normalize's exact float32 ops, so every device gives the same bits.
One known difference: transformers' CLIPImageProcessor crops at `(h - s) // 2`, which differs from
CenterCrop by one pixel on a non-square tile whose resized long side exceeds the crop by 3 mod 4.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..errors import ZeusError
from .spec import ModelSpec

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PIL_FILTER = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
_POOL: ThreadPoolExecutor | None = None


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
    if w <= h:
        return int(shortest * h / w), shortest
    return shortest, int(shortest * w / h)


def crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop(size) on an h × w image (Python's round: ties to even)."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def normalise_table(mean, std) -> torch.Tensor:
    """float32 (3 * 256,): entry c * 256 + v is ToTensor + Normalize of value v in channel c, computed
    with their ops (float32 v / 255, then - mean, then / std, on the CPU)."""
    v = torch.arange(256, dtype=torch.float32).div(255).expand(3, 256).clone()
    mean, std = (torch.as_tensor(t, dtype=torch.float32)[:, None] for t in (mean, std))
    return v.sub_(mean).div_(std).reshape(-1).contiguous()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="zeus-resize")
    return _POOL


class Preprocessor:
    """uint8 (N, H, W, 3) tiles → float32 (N, 3, S, S) normalised tensor on `device`.

    `resize_crop` (CPU, uint8) and `normalise` (device) are the two halves; calling the object does
    both, or, with `resize_on_device`, `resize_crop_tensor` (device, uint8) and `normalise`. `threads`
    caps the PIL resize workers (default: torch's intra-op thread count, which Ray sets from the
    actor's CPUs; at most 8)."""

    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu", threads: int | None = None,
                 resize_on_device: bool = False):
        if spec.interpolation not in _PIL_FILTER:
            raise ZeusError(f"model {spec.id!r}: interpolation {spec.interpolation!r} is not supported "
                            f"(use one of {sorted(_PIL_FILTER)})")
        self.spec = spec
        self.filter = _PIL_FILTER[spec.interpolation]
        self.threads = max(1, min(8, threads or torch.get_num_threads()))
        self.table = normalise_table(spec.mean, spec.std).to(device)
        self.offsets = (torch.arange(3, dtype=torch.int32) * 256).to(device)
        self.resize_on_device = resize_on_device

    def _check(self, tiles) -> None:
        if tiles.dtype not in (np.uint8, torch.uint8) or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ZeusError(f"model {self.spec.id!r}: expected uint8 RGB tiles (N, H, W, 3), "
                            f"got {tuple(tiles.shape)} {tiles.dtype}")

    def _geometry(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(resized h, resized w, crop top, crop left) for h × w tiles."""
        size = self.spec.input_size
        rh, rw = (h, w) if min(h, w) == self.spec.resize_size else resized_shape(h, w, self.spec.resize_size)
        if min(rh, rw) < size:
            raise ZeusError(f"model {self.spec.id!r}: tiles of {h}x{w} px are smaller than the "
                            f"{size}x{size} crop after resizing")
        return (rh, rw, *crop_offsets(rh, rw, size))

    def resize_crop_tensor(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tensor (N, H, W, 3) → uint8 (N, S, S, 3) on its own device: the same pixels as
        `resize_crop` (PIL's resampling as integer tensor ops, encoders/resample.py)."""
        from .resample import pil_resize
        self._check(tiles)
        size = self.spec.input_size
        rh, rw, top, left = self._geometry(*tiles.shape[1:3])
        return pil_resize(tiles, rh, rw, self.spec.interpolation)[:, top:top + size, left:left + size]

    def resize_crop(self, tiles: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) → uint8 (N, S, S, 3): PIL resize + CenterCrop, on the CPU. Writes into
        `out` when given (e.g. a pinned buffer); otherwise may return a view of `tiles`."""
        self._check(tiles)
        n, h, w, _ = tiles.shape
        size = self.spec.input_size
        rh, rw, top, left = self._geometry(h, w)
        if (rh, rw) == (h, w):
            view = tiles[:, top:top + size, left:left + size]
            if out is None:
                return view
            np.copyto(out[:n], view)
            return out[:n]
        if out is None:
            out = np.empty((n, size, size, 3), np.uint8)
        box = (left, top, left + size, top + size)

        def one(i: int) -> None:
            img = Image.fromarray(tiles[i]).resize((rw, rh), self.filter)
            out[i] = np.asarray(img.crop(box) if box != (0, 0, rw, rh) else img)

        def some(idx) -> None:
            for i in idx:
                one(i)

        parts = np.array_split(np.arange(n), min(n, self.threads))
        if len(parts) > 1:
            for f in [_pool().submit(some, part) for part in parts]:
                f.result()
        else:
            some(range(n))
        return out[:n]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) on the table's device → float32 (N, 3, S, S) (channels-last strides)."""
        idx = x.to(torch.int32, memory_format=torch.contiguous_format).add_(self.offsets)
        return torch.index_select(self.table, 0, idx.view(-1)).view(x.shape).permute(0, 3, 1, 2)

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self.resize_on_device:
            x = tiles if isinstance(tiles, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(tiles))
            return self.normalise(self.resize_crop_tensor(x.to(self.table.device)))
        if isinstance(tiles, torch.Tensor):
            self._check(tiles)
            tiles = tiles.cpu().numpy()
        return self.normalise(torch.from_numpy(self.resize_crop(tiles)).to(self.table.device))


def as_uint8_batch(tiles: np.ndarray, model_id: str) -> np.ndarray:
    """Checks the encoder input contract and returns a C-contiguous uint8 array."""
    if not isinstance(tiles, np.ndarray) or tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        shape = getattr(tiles, "shape", None)
        dtype = getattr(tiles, "dtype", type(tiles).__name__)
        raise ZeusError(f"model {model_id!r}: encode_images needs a uint8 RGB array (N, H, W, 3), "
                        f"got shape {shape} dtype {dtype}")
    return np.ascontiguousarray(tiles)
