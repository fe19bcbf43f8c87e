"""The encoder registry: `MODELS` (id → ModelSpec + builder) and `load_encoder(ModelConfig)`.

Registered ids: conch, keep, plip, quiltnet. Generic families: `open_clip:<model name | hf-hub:repo>`,
`hf-clip:<hub id>` and `random:<timm model>[:<seed>]` (seeded random weights, for the demo, tests
and benchmarks). Specs state the published facts (papers and model cards); CLIP-style loaders refine them
from the preprocessing config shipped with the weights.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from ..errors import ConfigError, WeightsError
from .base import TorchEncoder
from .spec import ModelSpec
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .weights import resolve_weights, weights_fingerprint

log = logging.getLogger(__name__)

HOW_TO_LOCAL = "give --set model.weights=/path/to/dir-or-file (a bucket URI works too)"

CONCH = ModelSpec(
    id="conch", weights_source="MahmoodLab/conch", licence="CC-BY-NC-ND-4.0", gated=True,
    input_size=448, resize_size=448, interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    embed_dim=512, tokenizer="CONCH BPE (user-supplied file)",
    context_length=128, notes="127 tokens + 1 pad; CoCa ViT-B/16 at 448 px",
    extra={"files": {"weights": ("pytorch_model.bin",)}})
KEEP = ModelSpec(
    id="keep", weights_source="Astaxanthin/KEEP", licence="MIT", gated=False,
    input_size=224, resize_size=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    embed_dim=768, tokenizer="BERT WordPiece", context_length=256,
    notes="timm ViT-L/16 + MLP head, BERT text tower",
    extra={"files": {"weights": ("model.safetensors", "pytorch_model.bin")}})
PLIP = ModelSpec(
    id="plip", weights_source="vinid/plip", licence="not stated (research use; see model card)", gated=False,
    input_size=224, resize_size=224, interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    embed_dim=512, tokenizer="CLIP BPE", context_length=77,
    notes="transformers CLIPModel ViT-B/32")
QUILTNET = ModelSpec(
    id="quiltnet", weights_source="wisdomik/QuiltNet-B-32", licence="MIT (model card)", gated=False,
    input_size=224, resize_size=224, interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    embed_dim=512, tokenizer="CLIP BPE (open_clip)", context_length=77, notes="open_clip ViT-B-32")

KEEP_TOKENIZER_FILES = {"vocab": ("vocab.txt",), "tokenizer": ("tokenizer.json",),
                        "tokenizer_config": ("tokenizer_config.json",),
                        "special_tokens": ("special_tokens_map.json",)}

GENERIC = {
    "open_clip:<model name | hf-hub:repo>": "open_clip architecture + weights (model.weights, or the hub repo)",
    "hf-clip:<hub id>": "transformers CLIPModel from a hub repo or model.weights directory",
    "random:<timm model>[:<seed>]": "timm image tower with seeded random weights + hashed-word text tower "
                                    "(random weights, masks carry no meaning); e.g. random:vit_tiny_patch16_224",
}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None   # None → plain float32
    batch_size: int
    tiny: bool = False              # the small test variant of the same classes (conch, keep)


@dataclass(frozen=True)
class RegistryEntry:
    spec: ModelSpec
    build: Callable[[ModelSpec, ModelConfig, Runtime], TorchEncoder]


def how_to_fetch(spec: ModelSpec) -> str:
    if spec.gated:
        return (f"log in with `hf auth login` (or `huggingface-cli login`, or set HF_TOKEN) after accepting "
                f"the terms at https://huggingface.co/{spec.weights_source}, or {HOW_TO_LOCAL}")
    return f"download hub repo {spec.weights_source} where there is internet (HF_HUB_OFFLINE=1 then uses the cache), or {HOW_TO_LOCAL}"


def _tiny_spec(spec: ModelSpec, image_size: int, embed_dim: int) -> ModelSpec:
    return dataclasses.replace(spec, input_size=image_size, resize_size=image_size, embed_dim=embed_dim,
                               notes="tiny test variant, random weights")


# Where the official CONCH package (github.com/mahmoodlab/CONCH; its MANIFEST.in ships the file)
# keeps its tokenizer, relative to the `conch` package folder.
CONCH_TOKENIZER_IN_PACKAGE = ("open_clip_custom", "tokenizers", "conch_byte_level_bpe_uncased.json")
# Beside the weights in a folder or bucket made by `zeus models fetch conch` (hash-checked there).
CONCH_TOKENIZER_NAMES = (CONCH_TOKENIZER_IN_PACKAGE[-1],)
CONCH_TOKENIZER_HELP = (
    "CONCH's tokenizer file conch_byte_level_bpe_uncased.json ships with the official CONCH code, not with "
    "the weights: take conch/" + "/".join(CONCH_TOKENIZER_IN_PACKAGE) + " from https://github.com/mahmoodlab/CONCH "
    "and give --set model.tokenizer=/path/to/conch_byte_level_bpe_uncased.json, or install that package "
    "in this environment (git clone https://github.com/mahmoodlab/CONCH.git, then pip install -e CONCH)")


def conch_tokenizer_path(cfg: ModelConfig) -> Path | None:
    """CONCH's tokenizer file: model.tokenizer, else the one inside the installed official package."""
    return _conch_tokenizer_lookup(cfg)[0]


def _conch_tokenizer_lookup(cfg: ModelConfig) -> tuple[Path | None, str]:
    """(tokenizer file or None, where it was looked for). The official package is located on
    sys.path without importing it: none of its code runs."""
    if cfg.tokenizer:
        return Path(cfg.tokenizer).expanduser(), cfg.tokenizer
    try:
        found = importlib.util.find_spec("conch")
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        return None, "no `conch` package is installed"
    tried = [Path(loc).joinpath(*CONCH_TOKENIZER_IN_PACKAGE) for loc in found.submodule_search_locations]
    for path in tried:
        if path.is_file():
            return path, str(path)
    return None, f"the installed `conch` package has no {tried[0]}"


def _is_tiny_conch(sd) -> bool:
    from .conch import conch_config
    t, key = conch_config(tiny=True), "text.token_embedding.weight"
    return key in sd and tuple(sd[key].shape) == (t.vocab_size, t.text_width)


def _build_conch(spec: ModelSpec, cfg: ModelConfig, rt: Runtime) -> TorchEncoder:
    from .checkpoint import build_loaded, load_state_dict_file
    from .conch import ConchTokenizer, build_conch, load_conch_weights

    # A weights folder or bucket may hold the tokenizer too (zeus models fetch puts it there); the
    # hub repo does not, so it is not asked for there.
    beside = {"tokenizer": CONCH_TOKENIZER_NAMES} if cfg.weights and not cfg.tokenizer else None
    files = resolve_weights(spec.id, cfg.weights, spec.weights_source, spec.extra["files"], beside,
                            how_to=how_to_fetch(spec))
    sd = load_state_dict_file(files["weights"])
    # The small test variant of the same classes is recognised by its shapes, so a test can run it
    # through `zeus run` (a full-size checkpoint never matches them).
    tiny = rt.tiny or _is_tiny_conch(sd)
    model = build_loaded(lambda: build_conch(tiny=tiny), load_conch_weights, sd, source=str(files["weights"]))
    if tiny:
        spec = _tiny_spec(spec, model.config.image_size, model.config.embed_dim)
    tok_path, tok_where = ((files.get("tokenizer"), str(files.get("tokenizer"))) if files.get("tokenizer")
                           else _conch_tokenizer_lookup(cfg))
    tokenizer: list = []   # loaded on first use: encoding images needs no tokenizer

    def text_fn(texts, dev):
        if not tokenizer:
            if tok_path is None:
                raise WeightsError(f"model 'conch': no tokenizer to encode prompts ({tok_where}, and "
                                   f"model.tokenizer is unset). {CONCH_TOKENIZER_HELP}")
            tokenizer.append(ConchTokenizer(tok_path, context_length=model.config.context_length,
                                            expected_pad_id=model.config.pad_id,
                                            vocab_size=model.config.vocab_size,
                                            prefix_space=cfg.conch_tokenization == "conch"))
        return model.encode_text(tokenizer[0](texts).to(dev), normalize=False)

    return TorchEncoder(spec, model, lambda x: model.encode_image(x, normalize=False), text_fn,
                        device=rt.device, amp_dtype=rt.amp_dtype, batch_size=rt.batch_size,
                        model_key=f"{spec.id}@{weights_fingerprint([files['weights']])}",
                        logit_scale=model.logit_scale.detach().exp().item())


def _build_keep(spec: ModelSpec, cfg: ModelConfig, rt: Runtime) -> TorchEncoder:
    from .checkpoint import build_loaded, load_state_dict_file
    from .keep import KeepTokenizer, build_keep, keep_buffers, load_keep_weights

    files = resolve_weights(spec.id, cfg.weights, spec.weights_source, spec.extra["files"],
                            KEEP_TOKENIZER_FILES, how_to=how_to_fetch(spec))
    model = build_loaded(lambda: build_keep(tiny=rt.tiny), load_keep_weights,
                         load_state_dict_file(files["weights"]), source=str(files["weights"]), buffers=keep_buffers)
    if rt.tiny:
        spec = _tiny_spec(spec, model.config.image_size, model.config.embed_dim)
    tok_files = [p for role, p in files.files.items() if role in KEEP_TOKENIZER_FILES]
    tok_dir = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else (tok_files[0].parent if tok_files else None)
    tokenizer: list = []

    def text_fn(texts, dev):
        if not tokenizer:
            if tok_dir is None:
                raise WeightsError(f"model 'keep': no vocab.txt or tokenizer.json beside the weights "
                                   f"({files['weights']}); copy the KEEP repo's tokenizer files there or "
                                   f"give --set model.tokenizer=/path/to/dir")
            tokenizer.append(KeepTokenizer(tok_dir, max_length=spec.context_length))
        enc = tokenizer[0](texts)
        return model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev), normalize=False)

    return TorchEncoder(spec, model, lambda x: model.encode_image(x, normalize=False), text_fn,
                        device=rt.device, amp_dtype=rt.amp_dtype, batch_size=rt.batch_size,
                        model_key=f"{spec.id}@{weights_fingerprint([files['weights']])}",
                        logit_scale=model.logit_scale.detach().exp().item())


def _build_plip(spec: ModelSpec, cfg: ModelConfig, rt: Runtime) -> TorchEncoder:
    from .clip_models import build_hf_clip
    return build_hf_clip(spec, cfg, device=rt.device, amp_dtype=rt.amp_dtype, batch_size=rt.batch_size,
                         how_to=how_to_fetch(spec))


def _build_quiltnet(spec: ModelSpec, cfg: ModelConfig, rt: Runtime) -> TorchEncoder:
    from .clip_models import build_open_clip
    # Architecture from the repo's open_clip_config.json (required: it states the activation).
    return build_open_clip(spec, cfg, None, spec.weights_source, device=rt.device, amp_dtype=rt.amp_dtype,
                           batch_size=rt.batch_size, how_to=how_to_fetch(spec))


MODELS: dict[str, RegistryEntry] = {
    "conch": RegistryEntry(CONCH, _build_conch),
    "keep": RegistryEntry(KEEP, _build_keep),
    "plip": RegistryEntry(PLIP, _build_plip),
    "quiltnet": RegistryEntry(QUILTNET, _build_quiltnet),
}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model.device={device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={device!r}: torch sees no CUDA device here; use --set model.device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ConfigError(f"model.device={device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_amp_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """auto → bf16 autocast on CUDA, float32 on CPU. float16 is GPU-only here."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else (
            "float16" if device.type == "cuda" else "float32")
    if dtype == "float32":
        return None
    if device.type == "cpu" and dtype == "float16":
        raise ConfigError("model.dtype=float16 is not supported on CPU; use bfloat16 or float32")
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype=bfloat16: this GPU has no bf16 support; use float16 or float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def default_batch_size(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 16


def load_encoder(cfg: ModelConfig, *, tiny: bool = False) -> TorchEncoder:
    """Build the encoder named by `cfg.id` with its weights, on `cfg.device`, ready to encode.

    `tiny` builds the small test variant of the same CONCH/KEEP classes (tests only).
    """
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp_dtype(cfg.dtype, device)
    rt = Runtime(device, amp_dtype, cfg.batch_size or default_batch_size(device), tiny)
    model_id = cfg.id.strip()
    if model_id in MODELS:
        entry = MODELS[model_id]
        encoder = entry.build(entry.spec, cfg, rt)
    elif model_id.startswith("random:"):
        from .random_model import build_random
        if cfg.weights:
            raise ConfigError(f"model.id={model_id!r} has built-in random weights; unset model.weights")
        encoder = build_random(model_id, device=device, amp_dtype=amp_dtype, batch_size=rt.batch_size)
        log.info("%s: %s", model_id, encoder.spec.notes)   # the job driver warns once
    elif model_id.startswith("open_clip:") and len(model_id) > len("open_clip:"):
        from .clip_models import build_open_clip, open_clip_spec
        target = model_id.removeprefix("open_clip:")
        repo = target.removeprefix("hf-hub:") if target.startswith("hf-hub:") else None
        spec = open_clip_spec(model_id, repo or "model.weights")
        if repo is None and not cfg.weights:
            raise ConfigError(f"model.id={model_id!r}: give the weights with --set model.weights=/path "
                              f"(or use open_clip:hf-hub:<repo>)")
        encoder = build_open_clip(spec, cfg, None if repo else target, repo, device=device, amp_dtype=amp_dtype,
                                  batch_size=rt.batch_size, how_to=HOW_TO_LOCAL)
    elif model_id.startswith("hf-clip:") and len(model_id) > len("hf-clip:"):
        from .clip_models import build_hf_clip, hf_clip_spec
        encoder = build_hf_clip(hf_clip_spec(model_id, model_id.removeprefix("hf-clip:")), cfg, device=device,
                                amp_dtype=amp_dtype, batch_size=rt.batch_size, how_to=HOW_TO_LOCAL)
    else:
        raise ConfigError(f"model.id={cfg.id!r} is not a registered encoder; use one of {', '.join(MODELS)}, "
                          f"open_clip:<name>, hf-clip:<hub id> or random:<timm vit name> (`zeus models` lists them)")
    # On a GPU the resize costs the node's CPU more than any other step per tile (benchmarks/RESULTS.md).
    encoder.preprocess.resize_on_device = cfg.resize_on == "device" or (cfg.resize_on == "auto" and device.type == "cuda")
    if device.type == "cpu" and amp_dtype is not None:
        encoder.warmup()
    log.info("loaded %r", encoder)
    return encoder
