"""What a registered model is: the facts `zeus models` prints and preprocessing follows."""
from __future__ import annotations

from dataclasses import dataclass, field


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
