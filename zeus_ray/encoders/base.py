"""The one interface every encoder implements (CONCH, KEEP, PLIP, QuiltNet, generic CLIPs)."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np

from .spec import ModelSpec

log = logging.getLogger(__name__)


def run_in_batches(n: int, batch_size: int, step: Callable[[int, int], None], *,
                   on_oom: Callable[[int], None] | None = None) -> int:
    """Calls `step(start, stop)` over [0, n) in batches of at most `batch_size`. When a call raises
    torch.cuda.OutOfMemoryError, the batch that failed is halved and the same range retried (so
    `step` must be safe to repeat: it writes its results by index); a single tile that does not fit
    re-raises. Returns the batch size in use at the end; `on_oom(new_size)` runs after each halving."""
    import torch
    start = 0
    while start < n:
        stop = min(n, start + batch_size)
        try:
            step(start, stop)
            start = stop
            continue
        except torch.cuda.OutOfMemoryError:
            if stop - start == 1:
                raise
        batch_size = (stop - start) // 2   # out of the `except`: the traceback's tensors are freed
        if on_oom is not None:
            on_oom(batch_size)
    return batch_size


class Encoder(ABC):
    """A frozen image/text encoder. Implementations set `spec`, `model_key`, `logit_scale`."""

    spec: ModelSpec
    model_key: str       # encoder id + weights fingerprint; part of embedding and prompt keys
    logit_scale: float   # exp(learned logit scale), for softmax probability maps

    @abstractmethod
    def encode_images(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 RGB tiles (N, H, W, 3) → float32 (N, D), each row L2-normalised."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Prompts → float32 (N, D), each row L2-normalised."""


class TorchEncoder(Encoder):
    """The shared torch machinery behind every registered model: tiles are resized/cropped on the
    CPU and normalised on the device (`Preprocessor`), run in batches under inference_mode (with
    autocast when `amp_dtype` is set) and come back as float32 L2-normalised numpy rows.

    On CUDA, uint8 batches go through two reused pinned host buffers (the CPU fills one while the
    GPU works on the other), and a batch that runs out of GPU memory is halved and retried; the
    size that worked is kept for later calls.

    `image_fn(pixels) -> (N, D)` and `text_fn(texts, device) -> (N, D)` are the model-specific
    parts (tokenising included); `module` is the nn.Module that owns the parameters.
    """

    def __init__(self, spec: ModelSpec, module, image_fn, text_fn, *, device, amp_dtype,
                 batch_size: int, model_key: str, logit_scale: float, text_amp: bool = False):
        import torch

        from .preprocess import Preprocessor
        self.spec = spec
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.batch_size = int(batch_size)
        self.model_key = model_key
        self.logit_scale = float(min(logit_scale, 100.0))  # CLIP clamps exp(scale) at 100
        self.module = module.eval().to(self.device)
        self.module.requires_grad_(False)
        self.preprocess = Preprocessor(spec, self.device)
        self._pinned: list = [None, None]   # CUDA only: (pinned uint8 buffer, upload event) pairs
        self._image_fn = image_fn
        self._text_fn = text_fn
        # Prompts are few: fp32 by default gives class embeddings that do not depend on the
        # image dtype.
        self._text_amp = text_amp

    def _autocast(self, enabled: bool = True):
        import torch
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=enabled and self.amp_dtype is not None)

    def encode_images(self, tiles: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from .preprocess import as_uint8_batch
        tiles = as_uint8_batch(tiles, self.spec.id)
        if self.device.type == "cuda":
            return self._encode_images_cuda(tiles)
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(tiles), self.batch_size):
                emb = self._image_fn(self.preprocess(tiles[i:i + self.batch_size]))
                out.append(F.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.spec.embed_dim), np.float32)

    def _pinned_slot(self, k: int, n: int, h: int, w: int):
        """Reused pinned uint8 host buffer `k` (of 2) with room for `n` h × w tiles, and the CUDA event
        recorded after its last upload."""
        import torch
        slots = self._pinned
        if slots[k] is None or slots[k][0].shape[0] < n or slots[k][0].shape[1:3] != (h, w):
            if slots[k] is not None:
                slots[k][1].synchronize()   # never drop a buffer while its upload is in flight
            cap = max(n, self.batch_size)
            slots[k] = (torch.empty((cap, h, w, 3), dtype=torch.uint8, pin_memory=True), torch.cuda.Event())
        return slots[k]

    def _encode_images_cuda(self, tiles: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out: list = []   # the (N, D) device result, allocated at the first batch
        turn = [0]

        pre = self.preprocess
        size = self.spec.input_size
        # Resized on the GPU (bit-exact): the tiles go up as they are, and the CPU only copies them.
        h, w = tiles.shape[1:3] if pre.resize_on_device else (size, size)

        def step(start: int, stop: int) -> None:
            n = stop - start
            host, uploaded = self._pinned_slot(turn[0] % 2, n, h, w)
            turn[0] += 1
            uploaded.synchronize()   # the GPU has finished reading this buffer's previous batch
            if pre.resize_on_device:
                np.copyto(host[:n].numpy(), tiles[start:stop])
            else:
                pre.resize_crop(tiles[start:stop], out=host.numpy())   # PIL resize on the CPU
            x = host[:n].to(self.device, non_blocking=True)
            uploaded.record()
            if pre.resize_on_device:
                x = pre.resize_crop_tensor(x)
            emb = F.normalize(self._image_fn(pre.normalise(x)).float(), dim=-1)
            if not out:
                out.append(torch.empty((len(tiles), emb.shape[1]), dtype=torch.float32, device=self.device))
            out[0][start:stop] = emb

        # torch.cuda.device: events and streams below belong to this encoder's GPU, not the current one.
        with torch.cuda.device(self.device), torch.inference_mode(), self._autocast():
            used = run_in_batches(len(tiles), self.batch_size, step, on_oom=lambda _: torch.cuda.empty_cache())
        if used < self.batch_size:
            log.info("%s on %s: out of GPU memory at batch %d; using batch %d from now on",
                     self.spec.id, self.device, self.batch_size, used)
            self.batch_size = used
        return out[0].cpu().numpy() if out else np.zeros((0, self.spec.embed_dim), np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            from ..errors import ZeusError
            raise ZeusError(f"model {self.spec.id!r}: encode_texts needs a list of strings")
        out = []
        with torch.inference_mode(), self._autocast(self._text_amp):
            for i in range(0, len(texts), self.batch_size):
                emb = self._text_fn(texts[i:i + self.batch_size], self.device)
                out.append(F.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.spec.embed_dim), np.float32)

    def warmup(self, calls: int = 2, batch: int = 1) -> None:
        """CPU bf16 autocast is slow for its first calls (oneDNN primitive set-up)."""
        size = self.spec.input_size
        for _ in range(calls):
            self.encode_images(np.zeros((batch, size, size, 3), np.uint8))

    def __repr__(self) -> str:
        dtype = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype is not None else "float32"
        return f"<{type(self).__name__} {self.model_key} on {self.device} {dtype} batch {self.batch_size}>"
