"""Job configuration: YAML validated with pydantic, `--set key=value` overrides.

Every section forbids unknown keys so that a typo fails before any work, with the key's dotted
path in the message. Defaults are the paper's settings (448 px tiles at 10x, 75 % overlap).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from .errors import ConfigError

# µm/px assumed for a nominal objective magnification when a slide has no mpp in its metadata:
# the common scanner convention 40x = 0.25, 20x = 0.5, 10x = 1.0 µm/px.
MPP_AT_10X = 1.0
# Level-0 µm/px a microscopy scan can have: scanners write ~0.1–2 µm/px, and a value outside
# these bounds is a screen DPI in TIFF resolution tags (72 dpi = 352.8 µm/px) or a wrong unit.
# magnification.resolve_mpp treats such metadata as missing; overrides outside them are errors.
MIN_PLAUSIBLE_MPP = 0.05
MAX_PLAUSIBLE_MPP = 20.0

# The annotation-class vocabulary (truth/classes.py applies it; docs/annotations.md explains it).
DEFAULT_TUMOUR_TERMS: tuple[str, ...] = (
    "tumour", "tumours", "tumor", "tumors", "tumoral", "tumoural",
    "*oma", "*omas",                                   # carcinoma, adenocarcinoma, sarcoma, melanoma, leiomyoma, ...
    "neoplasm", "neoplasms", "neoplasia", "neoplastic",
    "cancer", "cancers", "cancerous", "malignant", "malignancy",
    "metastasis", "metastases", "metastatic",
    "micrometastasis", "micrometastases", "macrometastasis", "macrometastases",
    "lesion", "lesions", "invasive", "in situ", "dcis", "lcis", "idc", "ilc",
    "_0", "_1",                                        # CAMELYON16 metastasis groups
)
DEFAULT_EXCLUDE_TERMS: tuple[str, ...] = (
    "_2",                                              # CAMELYON16 exclusion group
    "exclusion", "exclusions", "exclude", "excluded",
    "normal",                                          # CAMELYON17 "normal" regions inside metastases
)


def mpp_for_magnification(magnification: float) -> float:
    return MPP_AT_10X * 10.0 / magnification


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    manifest: str | None = Field(None, description="CSV/Parquet with slide_id, uri [, annotation_uri, dataset, center, mpp]")
    glob: str | None = Field(None, description="glob over a folder or bucket, e.g. s3://bucket/slides/*.svs")
    default_mpp: float | None = Field(None, ge=MIN_PLAUSIBLE_MPP, le=MAX_PLAUSIBLE_MPP,
                                      description="level-0 µm/px for slides whose metadata gives none or an implausible one "
                                      "(after the objective power; a manifest `mpp` column beats it)")
    reader: Literal["auto", "openslide"] = Field("auto", description="auto: tile pixels of Aperio SVS and generic tiled TIFF levels are decoded straight from the file's tiles (the same pixels as OpenSlide, several times faster); openslide: every read through OpenSlide's read_region")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for every remote input read (manifest, glob, slides, annotations), e.g. {anon: true} for a public S3 bucket; {s3: {...}, gs: {...}} gives them per protocol. Credential values are never written to run.json")

    @model_validator(mode="after")
    def _one_source(self):
        if self.manifest and self.glob:
            raise ValueError("give either input.manifest or input.glob, not both")
        return self

    @field_serializer("storage_options")
    def _without_credentials(self, options: dict) -> dict:
        # Dumps end up in run.json and the output bucket: keep the settings, drop the secrets
        # (a re-run from a stored config takes credentials from the environment or a profile).
        return _strip_credentials(options)


_CREDENTIAL_WORDS = ("key", "secret", "token", "password", "credential", "sas", "connection_string")
_NON_SECRET_VALUES = ("anon", "google_default", "cloud", "cache", "browser")   # gcsfs token modes


def _strip_credentials(options):
    if not isinstance(options, dict):
        return options
    out = {}
    for k, v in options.items():
        secret = any(w in str(k).lower() for w in _CREDENTIAL_WORDS)
        if secret and not (v is None or isinstance(v, bool) or v in _NON_SECRET_VALUES):
            continue
        out[k] = _strip_credentials(v)
    return out


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
    odd_kernels: bool = Field(True, description="round the closing kernel up to an odd size (centred; true) or use the "
                              "size as given, as CLAM and the published ZEUS code do (false: its 12-px closing)")
    hole_outlines: bool = Field(True, description="a kept hole's outline pixels stay tissue (true) or are cleared "
                                "with the hole, as the published ZEUS code's tissue mask does (false)")


class TilingConfig(_Section):
    magnification: float | None = Field(10.0, gt=0, description="target magnification (10x = 1.0 µm/px)")
    target_mpp: float | None = Field(None, gt=0, description="target µm/px; overrides magnification when set")
    patch_size: int = Field(448, gt=0, description="tile side in px at the target resolution")
    overlap: float = Field(0.75, ge=0, lt=1, description="fraction of a tile shared with its neighbour")
    min_tissue_fraction: float = Field(0.25, ge=0, le=1, description="keep a tile when this fraction of it is tissue")
    anchor: Literal["slide", "tissue"] = Field("slide", description="where the tile grid starts: slide: at the slide's "
                                               "(0, 0), so tiles do not move with tissue detection; tissue: at the top-left "
                                               "of the tissue's bounding box, as the published ZEUS code (CLAM) does")
    selection: Literal["fraction", "four_point"] = Field("fraction", description="which tiles are kept: fraction: tissue "
                                                         "fraction ≥ min_tissue_fraction; four_point: CLAM's rule of the "
                                                         "published ZEUS code (one of the 4 points at ±¼ tile from the "
                                                         "centre inside a tissue contour, centre not in a hole, within "
                                                         "that contour's bounding box)")
    padding: Literal["white", "black"] = Field("white", description="pixels of a tile past the slide's edge: white "
                                               "(background); black, as OpenSlide's transparent area becomes through "
                                               "PIL convert('RGB') in the published ZEUS code")
    region_tiles: int = Field(8, ge=1, description="tiles per side of one decoded region (each pixel decoded about once)")
    # A 200k × 100k px 40x scan (about the largest WSIs) fully covered with tissue has 98,124 tile
    # positions at 10x/448/112 and 395,160 at 20x; 500,000 leaves 5× headroom at the defaults.
    max_tiles_per_slide: int = Field(500_000, gt=0, description="a slide needing more tiles fails (reason too_many_tiles): "
                                     "guards against wrong µm/px metadata; raise it for huge slides at high magnification")
    max_upsampling: float = Field(2.0, ge=1.0, description="a slide coarser than the target by more than this factor fails "
                                  "(reason upsampling): 2 lets a 5x scan be read at 10x, not a 2.5x one")
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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="autocast dtype of the encoder; auto: bfloat16 on a GPU that has it (else float16), float32 on CPU; float16 is GPU-only")
    batch_size: int | None = Field(None, gt=0, description="tiles per encoder call; default from the device")
    resize_on: Literal["auto", "cpu", "device"] = Field(
        "auto", description="where tiles are resized to the model's input, bit-exact either way: cpu: PIL, on the "
        "encoder's CPU cores; device: PIL's arithmetic as torch ops on the encode device; auto: device on a GPU, cpu otherwise")
    conch_tokenization: Literal["conch", "zeus-pinned"] = Field(
        "conch", description="CONCH prompts' byte-level BPE: conch: a space before the first word (the tokenizer "
        "file's add_prefix_space, as CONCH was trained and as transformers ≤ 4.47 and ≥ 5 give it); zeus-pinned: "
        "no such space, as ZEUS's pinned transformers 4.53 gives it (the published ZEUS numbers)")


class PromptsConfig(_Section):
    file: str = Field("prompts/ai4skin-leiomyoma.yaml", description="prompt ensemble YAML")


class OutputConfig(_Section):
    root: str = Field("zeus_output", description="output root, local path or bucket URI")
    embedding_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of the stored embedding parts")
    preview_px: int = Field(1024, ge=64, description="long side of the slide previews (overlay.jpg, heat-maps), px")
    heatmaps: bool = Field(False, description="also write heatmap_sim_<class>.jpg and heatmap_prob_<tumour>.jpg per slide")
    tiling_preview: bool = Field(False, description="also write the annotated tiling thumbnail (tiles/…/thumbnail.png), as `zeus tiles` does")
    # exclude: never in run.json (it lives in the output root it opens) nor in any dump or log
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True, description="fsspec options for every read and write of a bucket output.root, e.g. {client_kwargs: {endpoint_url: 'http://minio:9000'}} for an S3-compatible store, {profile: name}; {s3: {...}, gs: {...}} gives them per protocol (docs/buckets.md). Never written to run.json; zeus evaluate, reprompt and report take them with --set output.storage_options.KEY=VALUE")


class CacheConfig(_Section):
    dir: str = Field("~/.cache/zeus_ray/slides", description="local cache for remote slides")
    max_gb: float = Field(50.0, gt=0, description="cache size limit; least recently used slides are evicted")


class RayConfig(_Section):
    address: str | None = Field(None, description="existing cluster (or RAY_ADDRESS); default: a new local Ray")
    num_readers: int | None = Field(None, gt=0, description="split pools: concurrent CPU tasks (plans, region reads, reduces)")
    num_encoders: int | None = Field(None, gt=0, description="a fixed pool of this many encoder actors (same as encoders_min = encoders_max); default: an autoscaling pool")
    encoders_min: int = Field(1, gt=0, description="encoder actors the autoscaling pool keeps at least")
    encoders_max: int | None = Field(None, gt=0, description="encoder actors the pool grows to at most; default: as many as the cluster can hold, including nodes that join later (one per GPU, or per encoder_cpus CPUs)")
    encoder_cpus: float | None = Field(None, gt=0, description="CPUs per CPU encoder actor (default: 1 per 8 CPUs of the largest node, at least 1)")
    fuse_read_encode: Literal["auto", "on", "off"] = Field("auto", description="auto: CPU encoders read their own tiles (no pixels through the object store) unless reader_resources pins reads elsewhere")
    chunk_tiles: int = Field(256, gt=0, description="most tiles per encoder call and stored part (GPU encoders: a slide's pass is split smaller, down to a batch per actor, so every actor shares it)")
    max_slides_in_flight: int | None = Field(None, gt=0, description="GPU encoders, adaptive mode: slides whose passes run together (the driver holds their selection state between passes; default 512). CPU encoders run each slide's passes in one worker call")
    reader_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources a reader task needs, e.g. {cpu_pool: 0.01} to pin readers to a node group")
    encoder_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources an encoder actor needs, e.g. {gpu_pool: 0.01}")

    @field_validator("fuse_read_encode", mode="before")
    @classmethod
    def _on_off(cls, v):
        # YAML reads a bare on/off as a boolean (`--set ray.fuse_read_encode=off` too): take it as meant.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _pool_bounds(self):
        if self.num_encoders is not None and (self.encoders_min != 1 or self.encoders_max is not None):
            raise ValueError("set either num_encoders (a fixed pool) or encoders_min/encoders_max (an autoscaling "
                             "pool), not both")
        if self.encoders_max is not None and self.encoders_max < self.encoders_min:
            raise ValueError(f"encoders_max ({self.encoders_max}) is below encoders_min ({self.encoders_min}); "
                             f"raise encoders_max or leave it unset (no upper bound)")
        return self


class EvaluationConfig(_Section):
    tumour_classes: list[str] | None = Field(None, description="exact annotation class names counted as tumour (case-insensitive; mask images: label values); replaces tumour_terms; default: by tumour_terms")
    exclude_classes: list[str] | None = Field(None, description="exact annotation class names cut out of the tumour; replaces exclude_terms; default: by exclude_terms")
    tumour_terms: list[str] = Field(list(DEFAULT_TUMOUR_TERMS), description="words that make a class tumour (whole words, case-insensitive, negations such as non-/-free and tissue words such as stroma do not count; '*oma' = any word ending in oma; `_0` = that whole name); unclassified annotations and the prompt set's tumour class also count")
    exclude_terms: list[str] = Field(list(DEFAULT_EXCLUDE_TERMS), description="words that make a class an exclusion, cut out of the tumour (CAMELYON16 `_2`, exclusion, CAMELYON17 normal)")
    metric_mpp: float | None = Field(None, gt=0, description="µm/px of the metric grid; default: a quarter of the cell (stride) grid")
    mask_downsample: float | None = Field(None, gt=0, description="level-0 px per pixel of mask-image annotations")
    mask_mpp: float | None = Field(None, gt=0, description="µm/px of mask-image annotations (alternative to mask_downsample)")

    @model_validator(mode="after")
    def _terms_have_words(self):
        for key in ("tumour_terms", "exclude_terms"):
            bad = [t for t in getattr(self, key) if not any(c.isalnum() for c in t)]
            if bad:
                raise ValueError(f"{key}: {bad[0]!r} has no letter or digit; give words such as 'tumour' or names such as '_0'")
        return self


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
    postprocess: Literal["none", "reference"] = Field("none", description="none: the argmax mask as it is (default); reference: the published ZEUS code's smoothing in its order (the un-cut argmax on the pixel canvas, uint8 Gaussian blur of kernel 2×patch+1 px, > 10 %, then the tissue cut; mask written at the target µm/px) and its metric conventions (1e-6 smoothing term)")
    profile: Literal["default", "reference"] = Field("default", description="reference: reproduce the published ZEUS code (cvblab/ZEUS): sets tiling.anchor/selection/padding, the tissue parameters, model.conch_tokenization, postprocess and evaluation.metric_mpp as that code has them, except keys the config sets itself; see docs/reference-mode.md")

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("profile") == "reference":
            return apply_reference_profile(data)
        return data


# The published ZEUS code's settings (cvblab/ZEUS e7b7f89: main.py, preprocess/patching/
# extract_patches_features.py, wsi_core/WholeSlideImage.py; read, not copied). It works in pixels of
# level 0, which it takes to be the target resolution (AI4SKIN: single-level 10x images, so its
# "best level for downsample 64" is level 0): lengths are those pixels at the target µm/px.
REFERENCE_TISSUE_PX = {"median_blur": 7, "close": 12, "min_tissue_area_px2": 2 * 512 ** 2,
                       "min_hole_area_px2": 16 * 512 ** 2, "max_holes": 8}


def reference_settings(px_um: float) -> dict[str, Any]:
    """The keys `profile: reference` sets, for a target resolution of `px_um` µm/px."""
    t = REFERENCE_TISSUE_PX
    return {
        "tiling": {"anchor": "tissue", "selection": "four_point", "padding": "black"},
        "tissue": {"thumbnail_mpp": px_um, "use_otsu": True, "median_blur_um": t["median_blur"] * px_um,
                   "close_um": t["close"] * px_um, "min_tissue_area_um2": t["min_tissue_area_px2"] * px_um ** 2,
                   "min_hole_area_um2": t["min_hole_area_px2"] * px_um ** 2, "max_holes": t["max_holes"],
                   "odd_kernels": False, "hole_outlines": False},
        "model": {"conch_tokenization": "zeus-pinned"},
        "evaluation": {"metric_mpp": px_um},
        "postprocess": "reference",
    }


def apply_reference_profile(data: dict) -> dict:
    """`data` with the reference settings under every key it does not set itself."""
    try:
        px_um = TilingConfig.model_validate(data.get("tiling") or {}).mpp
    except (ValidationError, TypeError):
        return data            # the tiling section's own error is reported by the full validation
    return _merge(reference_settings(px_um), data)


def _at(tree: Any, loc: tuple[str, ...]) -> tuple[bool, bool]:
    """(a value is set at or above `loc`, some key is set at or under `loc`) in a nested dict."""
    node = tree
    for i, part in enumerate(loc):
        if not isinstance(node, dict):
            return i > 0, i > 0
        if part not in node:
            return False, False
        node = node[part]
    return (False, bool(node)) if isinstance(node, dict) else (True, True)


def _blame(loc: tuple[str, ...], layers: list[tuple[str, Any]], every: bool = False) -> str:
    """Where the setting behind an error came from. `layers` are (label, nested dict), highest
    priority first (CLI flags, each --set pair, the file): the first one that sets the value at or
    above `loc` decided it; an error about a whole section (a cross-key check), or about a key that
    is wrong wherever it is set (`every`: an unknown key), names every layer with keys there."""
    for label, tree in ([] if every else layers):
        if _at(tree, loc)[0]:
            return label
    under = [label for label, tree in reversed(layers) if _at(tree, loc)[1]]
    return " + ".join(under) if under else layers[-1][0]


def _format_validation_error(err: ValidationError, source: str,
                             layers: list[tuple[str, Any]] | None = None) -> str:
    """One line: each error prefixed by where its setting came from (see _blame; just `source`
    without layers), e.g. `--set tiling.foo=1: unknown key (...)` or `c.yaml: tiling.foo: ...`."""
    layers = list(layers or []) + [(source, {})]
    groups: dict[str, list[str]] = {}
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; `zeus config` lists the valid keys)"
        origin = _blame(loc, layers, every=e["type"] == "extra_forbidden")
        # `--set tiling.foo=1` already names the key
        named = origin.startswith("--set ") and origin[6:].split("=", 1)[0].strip() == key
        groups.setdefault(origin, []).append(msg if named else f"{key}: {msg}")
    return "; ".join(f"{origin}: " + "; ".join(parts) for origin, parts in groups.items())


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


def output_storage_options(overrides: list[str] | None) -> dict[str, Any]:
    """output.storage_options given as `--set output.storage_options.KEY=VALUE` to the commands that
    open an existing output root (they are never stored with the run)."""
    opts = (parse_overrides(overrides).get("output") or {}).get("storage_options") or {}
    if not isinstance(opts, dict):
        raise ConfigError("--set output.storage_options: expected KEY=VALUE pairs, e.g. "
                          "--set output.storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9000")
    return opts


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
    # Each origin kept apart so that an error names the one it came from (the file or the --set pair).
    layers = [("command-line options", extra or {})]
    layers += [(f"--set {pair}", parse_overrides([pair])) for pair in reversed(overrides or [])]
    layers.append((source, data))
    merged = _merge(data, parse_overrides(overrides))
    merged = _merge(merged, extra or {})
    try:
        return JobConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, layers)) from None


def config_reference() -> str:
    """Every key with its default and description, for `zeus config`."""
    lines = []
    for section, field in JobConfig.model_fields.items():
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            default = field.get_default(call_default_factory=True)   # a top-level scalar (postprocess)
            lines.append(f"{section}: {default!r}" + (f"  # {field.description}" if field.description else ""))
            continue
        lines.append(f"{section}:")
        for name, f in field.annotation.model_fields.items():
            default = f.get_default(call_default_factory=True)
            lines.append(f"  {name}: {default!r}" + (f"  # {f.description}" if f.description else ""))
    return "\n".join(lines)
