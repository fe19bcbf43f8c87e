"""`random:<timm model>[:<seed>]`: a built-in encoder with seeded random weights.

For the demo, tests and benchmarks only: the image tower is a real timm architecture (so its cost
is the real cost), the text tower a hashed bag of words with a linear projection. The weights
carry no knowledge, so masks made with it carry no meaning. Same name and seed → same weights in
every process (the global torch RNG is forked, not disturbed).
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import TorchEncoder
from .spec import ModelSpec

EMBED_DIM = 512
TEXT_BUCKETS = 1 << 15
TEXT_WIDTH = 256
CONTEXT_LENGTH = 77   # words (and word pairs) kept per prompt
NOTE = "random weights, masks carry no meaning"


def parse_random_id(model_id: str) -> tuple[str, int]:
    """'random:vit_tiny_patch16_224' → (name, 0); 'random:vit_tiny_patch16_224:7' → (name, 7)."""
    rest = model_id.removeprefix("random:")
    name, _, seed = rest.partition(":")
    if not name or (seed and not seed.isdigit()):
        raise ConfigError(f"model.id={model_id!r}: expected random:<timm model name>[:<seed>], "
                          f"e.g. random:vit_tiny_patch16_224")
    return name, int(seed or 0)


def _word_ids(text: str) -> list[int]:
    # blake2b, not hash(): Python's str hash is salted per process.
    words = re.findall(r"[a-z0-9]+", text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    grams = grams[:CONTEXT_LENGTH] or ["<empty>"]
    return [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") % TEXT_BUCKETS
            for g in grams]


class RandomCLIP(nn.Module):
    """timm image tower + hashed-word text tower, both projected to EMBED_DIM."""

    def __init__(self, timm_name: str, seed: int = 0, embed_dim: int = EMBED_DIM):
        super().__init__()
        import timm
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.visual = timm.create_model(timm_name, pretrained=False, num_classes=0)
            self.visual_proj = nn.Linear(self.visual.num_features, embed_dim, bias=False)
            self.token_embed = nn.EmbeddingBag(TEXT_BUCKETS, TEXT_WIDTH, mode="mean")
            self.text_proj = nn.Linear(TEXT_WIDTH, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_proj(self.visual(pixels))

    def encode_text(self, texts: Sequence[str], device) -> torch.Tensor:
        ids = [_word_ids(t) for t in texts]
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=device)
        offsets = torch.tensor([0] + [len(r) for r in ids[:-1]], dtype=torch.long, device=device).cumsum(0)
        return self.text_proj(self.token_embed(flat, offsets))


def random_spec(model_id: str, timm_name: str) -> ModelSpec:
    import timm
    if not timm.is_model(timm_name):
        raise ConfigError(f"model.id={model_id!r}: {timm_name!r} is not a timm model name "
                          f"(e.g. random:vit_tiny_patch16_224, random:vit_base_patch16_224)")
    cfg = timm.models.get_pretrained_cfg(timm_name)
    size = int(cfg.input_size[-1]) if cfg is not None else 224
    return ModelSpec(
        id=model_id, weights_source="built-in (seeded random)", licence="n/a", gated=False,
        input_size=size, resize_size=size,
        interpolation=(cfg.interpolation if cfg is not None and cfg.interpolation in ("bicubic", "bilinear")
                       else "bicubic"),
        mean=tuple(cfg.mean) if cfg is not None else (0.5, 0.5, 0.5),
        std=tuple(cfg.std) if cfg is not None else (0.5, 0.5, 0.5),
        embed_dim=EMBED_DIM, tokenizer="hashed words + word pairs (built-in)", context_length=CONTEXT_LENGTH,
        notes=NOTE)


def build_random(model_id: str, *, device, amp_dtype, batch_size: int) -> TorchEncoder:
    name, seed = parse_random_id(model_id)
    spec = random_spec(model_id, name)
    model = RandomCLIP(name, seed)
    return TorchEncoder(spec, model, model.encode_image, model.encode_text, device=device,
                        amp_dtype=amp_dtype, batch_size=batch_size,
                        model_key=f"random:{name}@seed{seed}",
                        logit_scale=model.logit_scale.detach().exp().item())
