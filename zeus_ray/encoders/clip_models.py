"""CLIP-style encoders: PLIP and `hf-clip:<hub id>` through transformers' CLIPModel, QuiltNet and
`open_clip:<model name | hf-hub:repo>` through open_clip.

Architectures come from the config files that ship with the weights (config.json,
open_clip_config.json) or from open_clip's built-in model configs; no downloaded code runs.
Weights are read by checkpoint.load_state_dict_file and loaded strictly (every key named on a
mismatch). Preprocessing facts are taken from the shipped preprocessor config when present.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from .base import TorchEncoder
from .spec import ModelSpec
from .checkpoint import load_state_dict_file, strict_load
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .weights import resolve_weights, weights_fingerprint

log = logging.getLogger(__name__)

HF_CLIP_FILES = {"weights": ("model.safetensors", "pytorch_model.bin"), "config": ("config.json",)}
HF_CLIP_OPTIONAL = {"vocab": ("vocab.json",), "merges": ("merges.txt",), "tokenizer": ("tokenizer.json",),
                    "tokenizer_config": ("tokenizer_config.json",),
                    "special_tokens": ("special_tokens_map.json",),
                    "preprocessor": ("preprocessor_config.json",)}
# transformers < 4.31 saved these non-persistent buffers; older releases (PLIP) may carry them.
HF_CLIP_STALE_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Same stale buffer in open_clip models with a transformers text tower (e.g. BiomedCLIP).
OPEN_CLIP_STALE_BUFFERS = ("text.transformer.embeddings.position_ids",)

_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _features(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding;
    # transformers 4 returned the tensor itself.
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _hf_preprocess_facts(path: Path | None, spec: ModelSpec) -> ModelSpec:
    """Resize/crop/mean/std from a CLIPImageProcessor preprocessor_config.json."""
    if path is None:
        return spec
    cfg = json.loads(path.read_text())
    size, crop = cfg.get("size", spec.resize_size), cfg.get("crop_size", spec.input_size)
    if isinstance(size, dict):
        if "shortest_edge" not in size:
            raise WeightsError(f"model {spec.id!r}: {path} resizes to {size}; only shortest-edge "
                               f"resizing (CLIPImageProcessor) is supported")
        size = size["shortest_edge"]
    if isinstance(crop, dict):
        crop = crop.get("height", spec.input_size)
    resample = cfg.get("resample", 3)
    if resample not in _PIL_RESAMPLE:
        raise WeightsError(f"model {spec.id!r}: {path} asks for PIL resample={resample}; "
                           f"only bilinear (2) and bicubic (3) are supported")
    if cfg.get("do_center_crop", True) is False or cfg.get("do_resize", True) is False:
        raise WeightsError(f"model {spec.id!r}: {path} turns off resizing or center cropping; "
                           f"not supported")
    return dataclasses.replace(spec, resize_size=int(size), input_size=int(crop),
                               interpolation=_PIL_RESAMPLE[resample],
                               mean=tuple(cfg.get("image_mean", spec.mean)),
                               std=tuple(cfg.get("image_std", spec.std)))


def hf_clip_spec(model_id: str, repo: str) -> ModelSpec:
    """A starting spec for an unregistered transformers CLIP (facts refined from its files)."""
    return ModelSpec(id=model_id, weights_source=repo, licence="see the model card", gated=False,
                     input_size=224, resize_size=224, interpolation="bicubic", mean=OPENAI_CLIP_MEAN,
                     std=OPENAI_CLIP_STD, embed_dim=512, tokenizer="CLIP BPE (transformers)", context_length=77)


def build_hf_clip(spec: ModelSpec, cfg, *, device, amp_dtype, batch_size: int, how_to: str = "") -> TorchEncoder:
    """transformers CLIPModel from config.json + weights (+ tokenizer files beside them)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    files = resolve_weights(spec.id, cfg.weights, spec.weights_source, HF_CLIP_FILES, HF_CLIP_OPTIONAL, how_to)
    raw = json.loads(files["config"].read_text())
    if raw.get("model_type") != "clip":
        raise WeightsError(f"model {spec.id!r}: {files['config']} has model_type={raw.get('model_type')!r}, "
                           f"not 'clip'; use the id matching this model's architecture")
    config = CLIPConfig.from_dict(raw)
    model = CLIPModel(config)
    sd = load_state_dict_file(files["weights"])
    strict_load(model, sd, model_name=spec.id, ignored_unexpected_prefixes=HF_CLIP_STALE_BUFFERS,
                source=str(files["weights"]))
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else files["config"].parent
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:  # missing vocab/merges/tokenizer.json
        raise WeightsError(f"model {spec.id!r}: no CLIP tokenizer in {tok_dir} (vocab.json + merges.txt or "
                           f"tokenizer.json; {type(e).__name__}); put the repo's tokenizer files beside "
                           f"the weights or give --set model.tokenizer=/path/to/dir") from None
    ctx = int(config.text_config.max_position_embeddings)
    spec = dataclasses.replace(_hf_preprocess_facts(files.get("preprocessor"), spec),
                               embed_dim=int(config.projection_dim), context_length=ctx)

    def image_fn(pixels):
        return _features(model.get_image_features(pixel_values=pixels))

    def text_fn(texts, dev):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=ctx, return_tensors="pt")
        return _features(model.get_text_features(input_ids=enc["input_ids"].to(dev),
                                                 attention_mask=enc["attention_mask"].to(dev)))

    return TorchEncoder(spec, model, image_fn, text_fn, device=device, amp_dtype=amp_dtype,
                        batch_size=batch_size,
                        model_key=f"{spec.id}@{weights_fingerprint([files['weights']])}",
                        logit_scale=model.logit_scale.detach().exp().item())


def open_clip_spec(model_id: str, source: str) -> ModelSpec:
    """A starting spec for an unregistered open_clip model (facts refined from its config)."""
    return ModelSpec(id=model_id, weights_source=source, licence="see the model card", gated=False,
                     input_size=224, resize_size=224, interpolation="bicubic", mean=OPENAI_CLIP_MEAN,
                     std=OPENAI_CLIP_STD, embed_dim=512, tokenizer="open_clip", context_length=77)


def _uses_mha(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def open_clip_architecture(model_id: str, arch: str, device: str = "cpu"):
    """A randomly initialised open_clip model and its tokenizer, from a built-in model name or
    `local-dir:<folder with open_clip_config.json>`; no weights are fetched (device "meta" gives
    the full-size layout for free)."""
    import open_clip
    try:
        kwargs = {"load_weights": False} if arch.startswith("local-dir:") else {"pretrained": None}
        with torch.device(device):   # on "meta" nothing is allocated or initialised
            model = open_clip.create_model(arch, pretrained_text=False, device=device, **kwargs)
        return model, open_clip.get_tokenizer(arch)
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        raise WeightsError(f"model {model_id!r}: open_clip cannot build {arch!r} "
                           f"({str(e).splitlines()[0][:200]})") from None


def build_open_clip(spec: ModelSpec, cfg, name: str | None, hub_repo: str | None, *, device, amp_dtype,
                    batch_size: int, how_to: str = "") -> TorchEncoder:
    """open_clip model: architecture from open_clip_config.json beside the weights (hub repos and
    exported folders) or, when `name` is given, open_clip's built-in config of that name."""
    required = {"weights": OPEN_CLIP_WEIGHTS, "config": ("open_clip_config.json",)}
    if name is not None:   # a built-in architecture name: a config beside the weights is optional
        del required["config"]
    # Models with a transformers text tower (e.g. BiomedCLIP) read their tokenizer from the folder.
    optional = {"config": ("open_clip_config.json",), **{k: v for k, v in HF_CLIP_OPTIONAL.items()
                                                          if k != "preprocessor"}}
    files = resolve_weights(spec.id, cfg.weights, hub_repo, required, optional, how_to)
    config_path = files.get("config")
    arch = "local-dir:" + str(config_path.parent) if config_path is not None else name
    model, tokenizer = open_clip_architecture(spec.id, arch)
    sd = load_state_dict_file(files["weights"])
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    strict_load(model, sd, model_name=spec.id, ignored_unexpected_prefixes=OPEN_CLIP_STALE_BUFFERS,
                source=str(files["weights"]))
    pp = model.visual.preprocess_cfg
    if pp.get("resize_mode", "shortest") != "shortest" or pp.get("interpolation") not in ("bicubic", "bilinear"):
        raise WeightsError(f"model {spec.id!r}: preprocessing {pp} is not supported "
                           f"(shortest-side resize with bicubic/bilinear only)")
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    spec = dataclasses.replace(spec, input_size=int(size), resize_size=int(size),
                               interpolation=pp["interpolation"], mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                               embed_dim=int(getattr(model.visual, "output_dim", spec.embed_dim)),
                               context_length=int(getattr(tokenizer, "context_length", spec.context_length)))
    if (device.type if isinstance(device, torch.device) else str(device)).startswith("cpu") \
            and amp_dtype is not None and _uses_mha(model):
        log.warning("%s: open_clip's nn.MultiheadAttention runs about 6x slower under CPU %s autocast "
                    "at batch >= 8; --set model.dtype=float32 is faster on CPU", spec.id, amp_dtype)

    def text_fn(texts, dev):
        return model.encode_text(tokenizer(texts).to(dev))

    return TorchEncoder(spec, model, model.encode_image, text_fn, device=device, amp_dtype=amp_dtype,
                        batch_size=batch_size,
                        model_key=f"{spec.id}@{weights_fingerprint([files['weights']])}",
                        logit_scale=model.logit_scale.detach().exp().item())
