"""`zeus doctor`: what a check returns (status, text lines) and what every check reads (Context)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

OK, WARN, FAIL = "ok", "warn", "fail"
Line = tuple[str, str]


@dataclass
class Context:
    config: str | None
    overrides: list[str]
    address: str | None = None
    sample_size: int = 5
    cfg: object = None                      # JobConfig once valid
    entries: list | None = None             # SlideEntry list once the cohort loads
    sizes: dict[str, int | None] = field(default_factory=dict)   # existing slide uri → bytes
    mpp0: dict[str, float] = field(default_factory=dict)         # sampled slide id → level-0 µm/px
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)   # sampled slide id → level-0 (w, h) px
    weight_roles: set[str] | None = None    # roles located beside the weights (tokenizer check)
    tumour_class: str | None = None         # the prompt set's, which annotations count as tumour too

    def cluster_address(self) -> str | None:
        return self.address or (self.cfg.ray.address if self.cfg else None) or os.environ.get("RAY_ADDRESS")


def redact(text: str) -> str:
    from ..storage import remote
    return remote.redact(text)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return redact(f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__)
