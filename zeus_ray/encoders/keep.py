"""KEEP (Zhou et al., 2024) defined here so that the official checkpoint loads strictly, without the
hub's remote code (`trust_remote_code` stays off).

Layout (`tests/data/checkpoint-layouts/keep.json`): `visual` = timm `vit_large_patch16_224`
(LayerScale init 1e-5, no classifier, dynamic image size, CLS-token output after the final norm);
`visual_head` = Linear(1024→768), GELU, Linear(768→768); `text` = transformers BertModel with
pooler (PubMedBERT-base sizes, from the published config.json); `logit_scale` (not applied).
Both embeddings are L2-normalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsError
from .checkpoint import LoadReport, regex_renamer, strict_load

# The GitHub quick-start's checkpoint names LayerScale tensors `ls1.gamma`/`ls2.gamma` (timm's own
# name, used by our model); the Hugging Face release names the same tensors `.weight`.
KEEP_RENAMES = regex_renamer((r"^(visual\.blocks\.\d+\.ls[12])\.weight$", r"\1.gamma"))
# A checkpoint saved with transformers < 4.31 may carry this (then persistent) buffer; BertModel
# rebuilds it, so it is ignored by name.
KEEP_IGNORED_KEYS = ("text.embeddings.position_ids",)


@dataclass(frozen=True)
class KeepConfig:
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    init_values: float = 1e-5
    embed_dim: int = 768
    vocab_size: int = 30522
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    logit_scale_init: float = math.log(1 / 0.04)


def keep_config(tiny: bool = False) -> KeepConfig:
    """The official sizes, or a tiny variant of the same classes for fast tests (256 positions, so
    that KeepTokenizer's default output fits)."""
    if not tiny:
        return KeepConfig()
    return replace(KeepConfig(), image_size=32, vision_width=64, vision_depth=2, vision_heads=2,
                   embed_dim=32, vocab_size=256, text_width=32, text_layers=2, text_heads=2,
                   text_intermediate=64, max_positions=256)


class KeepModel(nn.Module):
    """`encode_image(x)`: normalised (N, 3, H, W) images (224 px, ImageNet mean/std; any multiple of
    16 works) → float32 (N, 768); `encode_text(input_ids, attention_mask)` (N, L ≤ 512) → float32
    (N, 768); both L2-normalised."""

    def __init__(self, cfg: KeepConfig):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = cfg
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.visual = timm.create_model(
            "vit_large_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
            init_values=cfg.init_values, img_size=cfg.image_size, patch_size=cfg.patch_size,
            embed_dim=cfg.vision_width, depth=cfg.vision_depth, num_heads=cfg.vision_heads)
        self.visual_head = nn.Sequential(nn.Linear(cfg.vision_width, cfg.embed_dim), nn.GELU(),
                                         nn.Linear(cfg.embed_dim, cfg.embed_dim))
        self.text = BertModel(BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
            hidden_act="gelu", max_position_embeddings=cfg.max_positions,
            type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps),
            add_pooling_layer=True)

    def encode_image(self, x: Tensor, normalize: bool = True) -> Tensor:
        out = self.visual_head(self.visual(x)).float()
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    normalize: bool = True) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output.float()
        return F.normalize(out, dim=-1) if normalize else out


def build_keep(tiny: bool = False, config: KeepConfig | None = None) -> KeepModel:
    """A randomly initialised KEEP (or tiny variant); load weights with `load_keep_weights`."""
    return KeepModel(config or keep_config(tiny))


def keep_buffers(model: KeepModel) -> None:
    """The text tower's non-persistent buffers as transformers' BertEmbeddings makes them (position
    ids 0..n-1, zero token types), for a KEEP built on the meta device (checkpoint.build_loaded)."""
    emb = model.text.embeddings
    ids = torch.arange(emb.position_embeddings.num_embeddings).expand((1, -1))
    emb.register_buffer("position_ids", ids, persistent=False)
    emb.register_buffer("token_type_ids", torch.zeros(ids.size(), dtype=torch.long), persistent=False)


def load_keep_weights(model: KeepModel, state_dict: Mapping[str, Tensor], *, source: str | None = None,
                      assign: bool = False) -> LoadReport:
    """Strictly load a KEEP checkpoint (either LayerScale spelling; an old `position_ids` buffer)."""
    return strict_load(model, state_dict, model_name="keep", source=source, assign=assign,
                       renames=KEEP_RENAMES, ignored_unexpected_prefixes=KEEP_IGNORED_KEYS)


class KeepTokenizer:
    """KEEP's BERT WordPiece tokenizer from a local directory holding `vocab.txt` and/or
    `tokenizer.json` (KEEP ships them with its weights), or the path of one of those files.
    `__call__` pads and truncates to `max_length` (256, as KEEP's quick start)."""

    def __init__(self, path: str | Path, max_length: int = 256):
        from transformers import BertTokenizerFast

        path = Path(path).expanduser()
        folder = path.parent if path.is_file() else path
        if not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
            raise WeightsError(f"KEEP tokenizer: no vocab.txt or tokenizer.json in {folder}; point "
                               f"model.tokenizer (or model.weights) to the KEEP model directory")
        try:
            # A concrete class, never AutoTokenizer + remote code; local files only.
            self._tok = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise WeightsError(f"KEEP tokenizer in {folder} could not be loaded ({str(e)[:150]}); "
                               f"check vocab.txt/tokenizer.json") from None
        self.path, self.max_length = folder, max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Prompts → {"input_ids", "attention_mask"}, int64 (N, max_length)."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self._tok(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
