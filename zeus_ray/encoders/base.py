"""The one interface every encoder implements (CONCH, KEEP, PLIP, QuiltNet, generic CLIPs)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """What a user needs to know about a registered model (`zeus models` prints these)."""
    id: str
    weights_source: str          # hub repo id, or "built-in" for random demo models
    licence: str
    gated: bool
    input_size: int              # side of the square crop fed to the image tower
    resize_size: int             # shortest side after resize, before the center crop
    interpolation: str           # "bicubic" | "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    tokenizer: str
    context_length: int
    notes: str = ""
    extra: dict = field(default_factory=dict)


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
