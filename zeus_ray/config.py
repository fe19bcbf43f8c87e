"""Job configuration: YAML validated with pydantic, `--set key=value` overrides.

Every section forbids unknown keys so that a typo fails before any work, with the key's dotted
path in the message. Defaults are the paper's settings (448 px tiles at 10x, 75 % overlap).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

# µm/px assumed for a nominal objective magnification when a slide has no mpp in its metadata:
# the common scanner convention 40x = 0.25, 20x = 0.5, 10x = 1.0 µm/px.
MPP_AT_10X = 1.0


def mpp_for_magnification(magnification: float) -> float:
    return MPP_AT_10X * 10.0 / magnification


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    manifest: str | None = Field(None, description="CSV/Parquet with slide_id, uri [, annotation_uri, dataset, center, mpp]")
    glob: str | None = Field(None, description="glob over a folder or bucket, e.g. s3://bucket/slides/*.svs")

    @model_validator(mode="after")
    def _one_source(self):
        if self.manifest and self.glob:
            raise ValueError("give either input.manifest or input.glob, not both")
        return self


class TissueConfig(_Section):
    """CLAM-style tissue segmentation on a low-resolution thumbnail. Lengths in µm, areas in µm²,
    so that the parameters mean the same at any thumbnail resolution."""
    thumbnail_mpp: float = Field(8.0, gt=0, description="µm/px of the segmentation thumbnail")
    saturation_threshold: int = Field(8, ge=0, le=255, description="fixed HSV-saturation threshold (ignored when use_otsu)")
    use_otsu: bool = Field(False, description="Otsu threshold on the blurred saturation instead of the fixed one")
    median_blur_um: float = Field(56.0, ge=0, description="median-blur kernel width")
    close_um: float = Field(32.0, ge=0, description="morphological closing kernel width")
    min_tissue_area_um2: float = Field(100_000.0, ge=0, description="tissue contours smaller than this are dropped")
    min_hole_area_um2: float = Field(50_000.0, ge=0, description="holes smaller than this are filled")
    max_holes: int = Field(8, ge=0, description="largest holes kept per tissue contour")


class TilingConfig(_Section):
    magnification: float | None = Field(10.0, gt=0, description="target magnification (10x = 1.0 µm/px)")
    target_mpp: float | None = Field(None, gt=0, description="target µm/px; overrides magnification when set")
    patch_size: int = Field(448, gt=0, description="tile side in px at the target resolution")
    overlap: float = Field(0.75, ge=0, lt=1, description="fraction of a tile shared with its neighbour")
    min_tissue_fraction: float = Field(0.25, ge=0, le=1, description="keep a tile when this fraction of it is tissue")
    region_tiles: int = Field(8, ge=1, description="tiles per side of one decoded region (each pixel decoded about once)")
    mode: Literal["full", "adaptive"] = Field("full", description="full: encode every overlapping tile (the paper); "
                                              "adaptive: non-overlapping grid first, overlap only where the decision can change")
    # Defaults from the measured curve (benchmarks/RESULTS.md, issue #7): margin 0 refines only the
    # contour and uncovered tissue. The margin is in cosine units and depends on the model.
    adaptive_margin: float = Field(0.0, ge=0, description="adaptive: also refine cells whose best-minus-second class similarity is below this (inf = full overlap)")
    adaptive_dilation: int = Field(0, ge=0, description="adaptive: grow the refined area by this many tile positions")
    adaptive_disagreement: bool = Field(False, description="adaptive: also refine cells whose covering encoded tiles disagree on the class (more tiles, same Dice in benchmarks/RESULTS.md)")
    adaptive_coarse_first: bool = Field(True, description="adaptive: locate contours with half-overlapping tiles before fully-overlapping ones (fewer tiles, see benchmarks/RESULTS.md)")

    @model_validator(mode="after")
    def _check(self):
        if self.magnification is None and self.target_mpp is None:
            raise ValueError("set tiling.magnification or tiling.target_mpp")
        stride = self.patch_size * (1 - self.overlap)
        if abs(stride - round(stride)) > 1e-6 or round(stride) < 1:
            raise ValueError(
                f"tiling.patch_size × (1 - tiling.overlap) = {stride:g} must be a whole number of pixels ≥ 1")
        return self

    @property
    def mpp(self) -> float:
        return self.target_mpp if self.target_mpp is not None else mpp_for_magnification(self.magnification)

    @property
    def stride(self) -> int:
        return int(round(self.patch_size * (1 - self.overlap)))


class ModelConfig(_Section):
    id: str = Field("conch", description="registered encoder id (zeus models), open_clip:<name>, hf-clip:<hub id>")
    weights: str | None = Field(None, description="local dir/file or bucket URI; default: the hub repo of the model")
    tokenizer: str | None = Field(None, description="tokenizer file/dir where the weights do not ship one (CONCH)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int | None = Field(None, gt=0, description="tiles per encoder call; default from the device")


class PromptsConfig(_Section):
    file: str = Field("prompts/ai4skin-leiomyoma.yaml", description="prompt ensemble YAML")


class OutputConfig(_Section):
    root: str = Field("zeus_output", description="output root, local path or bucket URI")
    embedding_dtype: Literal["float16", "float32"] = "float16"


class CacheConfig(_Section):
    dir: str = Field("~/.cache/zeus_ray/slides", description="local cache for remote slides")
    max_gb: float = Field(50.0, gt=0, description="cache size limit; least recently used slides are evicted")


class RayConfig(_Section):
    address: str | None = Field(None, description="existing cluster (or RAY_ADDRESS); default: a local Ray")
    num_readers: int | None = Field(None, gt=0, description="concurrent tile-reading tasks")
    num_encoders: int | None = Field(None, gt=0, description="encoder actors (default: one per GPU, else 1)")
    encoder_cpus: float | None = Field(None, gt=0, description="CPUs per CPU encoder actor")
    reader_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources a reader task needs, e.g. {cpu_pool: 0.01} to pin readers to a node group")
    encoder_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources an encoder actor needs, e.g. {gpu_pool: 0.01}")
    adaptive_wave: int = Field(256, gt=0, description="tiling.mode adaptive: slides whose passes run together (the driver holds their scores; each wave pays the per-pass start-up once)")


class EvaluationConfig(_Section):
    tumour_classes: list[str] | None = Field(None, description="annotation class names counted as tumour; default: any")
    exclude_classes: list[str] | None = Field(None, description="annotation class names cut out of the tumour (e.g. ASAP exclusion groups)")
    metric_mpp: float | None = Field(None, gt=0, description="µm/px of the metric grid; default: a quarter of the cell (stride) grid")
    mask_downsample: float | None = Field(None, gt=0, description="level-0 px per pixel of mask-image annotations")
    mask_mpp: float | None = Field(None, gt=0, description="µm/px of mask-image annotations (alternative to mask_downsample)")


class JobConfig(_Section):
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    tiling: TilingConfig = TilingConfig()
    tissue: TissueConfig = TissueConfig()
    model: ModelConfig = ModelConfig()
    prompts: PromptsConfig = PromptsConfig()
    cache: CacheConfig = CacheConfig()
    ray: RayConfig = RayConfig()
    evaluation: EvaluationConfig = EvaluationConfig()


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; `zeus config` lists the valid keys)"
        parts.append(f"{key}: {msg}")
    return f"{source}: " + "; ".join(parts)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["tiling.overlap=0.5", "model.id=keep"]` → nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set tiling.overlap=0.5")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {pair!r}: empty key segment")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {p} is both a value and a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> JobConfig:
    """Load and validate a job config. `extra` (from CLI flags) beats `overrides` beats the file
    (or `base`, an already-parsed config such as the one stored with a run's results)."""
    data: dict[str, Any] = dict(base or {})
    source = "config" if base is None else "stored run config"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"config {path}: cannot read ({e.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides))
    data = _merge(data, extra or {})
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def config_reference() -> str:
    """Every key with its default and description, for `zeus config`."""
    lines = []
    for section, field in JobConfig.model_fields.items():
        lines.append(f"{section}:")
        for name, f in field.annotation.model_fields.items():
            default = f.default
            lines.append(f"  {name}: {default!r}" + (f"  # {f.description}" if f.description else ""))
    return "\n".join(lines)
