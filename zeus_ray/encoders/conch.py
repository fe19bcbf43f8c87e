"""CONCH (Lu et al., 2024; a CoCa model) defined here so that the official checkpoint loads strictly.

Our own modules whose `state_dict` names and shapes equal the official layout
(`tests/data/checkpoint-layouts/conch_ViT-B-16.json`), minus the captioning decoder:
- `visual.trunk`: timm ViT-B/16 at 448 px (dynamic image size), final LayerNorm, all tokens out;
- `visual.attn_pool_contrast`: CoCa attentional pooler, 1 learned query (512) cross-attending over
  the trunk tokens (8 heads) → `visual.ln_contrast` → `@ visual.proj_contrast` (512×512);
- `visual.attn_pool_caption` / `visual.ln_caption` (256 queries): kept only so checkpoints that carry
  them load; the contrastive embedding never uses them;
- `text`: causal transformer (width 768, 12 layers, 12 heads, 128 positions) that drops the last
  input position and appends a learned CLS embedding, pooled at the end → `ln_final` →
  `@ text_projection` (768→512).
Facts (sizes, pooler heads, pad id 0, the 127 + 1 pad token convention) come from the public config
and the layout file; no official code is used. The official weights and tokenizer are CC-BY-NC-ND.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsError
from .checkpoint import LoadReport, strict_load

# The public release deliberately leaves out the captioning decoder (CONCH README). A checkpoint
# that still carries it (a full training checkpoint) loads too: those keys are ignored by name.
CONCH_RELEASE_OMITS = ("text_decoder.",)
# Captioning-only visual modules: kept in our model so that they load when present; whether the
# release ships them is not known, so their absence is accepted (they never affect encode_image).
CONCH_OPTIONAL_PREFIXES = ("visual.attn_pool_caption.", "visual.ln_caption.")


@dataclass(frozen=True)
class ConchConfig:
    image_size: int = 448
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    embed_dim: int = 512          # contrastive embedding = attentional pooler width
    pool_heads: int = 8           # attn_pooler_heads in the public config
    caption_queries: int = 256    # 0 → no captioning pooler
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    context_length: int = 128     # token ids per prompt: 127 tokens + 1 pad (dropped for the CLS)
    vocab_size: int = 32007
    pad_id: int = 0
    logit_scale_init: float = math.log(1 / 0.07)


def conch_config(tiny: bool = False) -> ConchConfig:
    """The official sizes, or a tiny variant of the same classes for fast tests."""
    if not tiny:
        return ConchConfig()
    return replace(ConchConfig(), image_size=64, vision_width=64, vision_depth=2, vision_heads=4,
                   embed_dim=32, pool_heads=4, caption_queries=4, text_width=64, text_layers=2,
                   text_heads=4, vocab_size=512)


class _Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names (packed `in_proj_weight`
    when keys have the query width, else `q/k/v_proj_weight`), computed with SDPA, which stays fast
    under CPU bf16 autocast where nn.MultiheadAttention does not."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads, self.packed = heads, kv_dim == dim
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
            self.k_proj_weight = nn.Parameter(torch.empty(dim, kv_dim))
            self.v_proj_weight = nn.Parameter(torch.empty(dim, kv_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        for p in ([self.in_proj_weight] if self.packed else
                  [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]):
            nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q_in: Tensor, kv_in: Tensor, mask: Tensor | None = None) -> Tensor:
        n, lq, lk, h = q_in.shape[0], q_in.shape[1], kv_in.shape[1], self.heads
        if self.packed and q_in is kv_in:  # self-attention: one matmul for q, k and v
            q, k, v = F.linear(q_in, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            wq, wk, wv = (self.in_proj_weight.chunk(3) if self.packed else
                          (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
            bq, bk, bv = self.in_proj_bias.chunk(3)
            q, k, v = F.linear(q_in, wq, bq), F.linear(kv_in, wk, bk), F.linear(kv_in, wv, bv)
        q = q.reshape(n, lq, h, -1).transpose(1, 2)
        k = k.reshape(n, lk, h, -1).transpose(1, 2)
        v = v.reshape(n, lk, h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, -1))


class AttentionalPooler(nn.Module):
    """CoCa pooler: learned queries (after LayerNorm) cross-attend over LayerNorm-ed tokens."""

    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.attn = _Attention(dim, heads, kv_dim=context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: Tensor) -> Tensor:  # (N, T, C) → (N, n_queries, dim)
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, self.ln_k(tokens))


class ConchVisual(nn.Module):
    def __init__(self, cfg: ConchConfig):
        super().__init__()
        self.proj_contrast = nn.Parameter(torch.randn(cfg.embed_dim, cfg.embed_dim) * cfg.embed_dim ** -0.5)
        # global_pool='' and num_classes=0: the trunk returns every token after its final norm.
        self.trunk = timm.models.vision_transformer.VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width,
            depth=cfg.vision_depth, num_heads=cfg.vision_heads, num_classes=0, global_pool="",
            dynamic_img_size=True)
        self.attn_pool_contrast = AttentionalPooler(cfg.embed_dim, cfg.vision_width, cfg.pool_heads, 1)
        self.ln_contrast = nn.LayerNorm(cfg.embed_dim)
        if cfg.caption_queries:
            self.attn_pool_caption = AttentionalPooler(cfg.vision_width, cfg.vision_width, cfg.pool_heads,
                                                       cfg.caption_queries)
            self.ln_caption = nn.LayerNorm(cfg.vision_width)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.trunk.forward_features(x)              # (N, 1 + patches, width)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled @ self.proj_contrast


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.ln_2(x))


class _Resblocks(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))


class ConchText(nn.Module):
    def __init__(self, cfg: ConchConfig):
        super().__init__()
        w = cfg.text_width
        self.pad_id, self.context_length = cfg.pad_id, cfg.context_length
        # Registration order mirrors the layout's state_dict order.
        self.text_projection = nn.Parameter(torch.randn(w, cfg.embed_dim) * w ** -0.5)
        self.cls_emb = nn.Parameter(torch.randn(w) * 0.01)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, w) * 0.01)
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.transformer = _Resblocks(w, cfg.text_layers, cfg.text_heads)
        self.ln_final = nn.LayerNorm(w)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.ndim != 2 or not 2 <= ids.shape[1] <= self.context_length:
            raise ValueError(f"CONCH token ids must be (N, L) with 2 ≤ L ≤ {self.context_length}, got {tuple(ids.shape)}")
        tokens = ids[:, :-1]                 # the last position makes room for the CLS embedding
        n, cls_pos = tokens.shape
        # The CLS row is causal and also masks padding, with the one-position shift that CoCa's (and
        # so CONCH's) training code used: key j+1 is hidden when token j is padding, key 0 is always
        # visible (reproduced because the released weights were trained with it). Key `cls_pos` is
        # the CLS itself.
        key_keep = torch.cat([torch.ones_like(tokens[:, :1], dtype=torch.bool), tokens != self.pad_id], 1)
        # Only the CLS output is used and attention is causal, so token positions after the last key
        # any CLS can see change nothing: drop them (prompts are short; 128 positions are not).
        m = int(key_keep[:, :cls_pos].any(0).nonzero().max()) + 1
        x = torch.cat([self.token_embedding(tokens[:, :m]) + self.positional_embedding[:m],
                       (self.cls_emb + self.positional_embedding[cls_pos]).expand(n, 1, -1)], 1)
        mask = torch.ones(m + 1, m + 1, dtype=torch.bool, device=ids.device).tril().repeat(n, 1, 1, 1)
        mask[:, 0, -1, :] = torch.cat([key_keep[:, :m], key_keep[:, cls_pos:]], 1)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        return self.ln_final(x[:, -1]) @ self.text_projection


class ConchModel(nn.Module):
    """CONCH's contrastive towers. `encode_image` takes normalised (N, 3, H, W) images (448 px,
    OpenAI CLIP mean/std), `encode_text` token ids (N, 128) from ConchTokenizer; both return
    float32 (N, 512), L2-normalised. `logit_scale` is the learned log-temperature (not applied)."""

    def __init__(self, cfg: ConchConfig):
        super().__init__()
        self.config = cfg
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.text = ConchText(cfg)
        self.visual = ConchVisual(cfg)

    def encode_image(self, x: Tensor, normalize: bool = True) -> Tensor:
        out = self.visual(x).float()
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, ids: Tensor, normalize: bool = True) -> Tensor:
        out = self.text(ids).float()
        return F.normalize(out, dim=-1) if normalize else out


def build_conch(tiny: bool = False, config: ConchConfig | None = None) -> ConchModel:
    """A randomly initialised CONCH (or tiny variant); load weights with `load_conch_weights`."""
    return ConchModel(config or conch_config(tiny))


def load_conch_weights(model: ConchModel, state_dict: Mapping[str, Tensor], *, source: str | None = None,
                       assign: bool = False) -> LoadReport:
    """Strictly load a CONCH checkpoint: the release's omissions are the only tolerated deviations."""
    return strict_load(model, state_dict, model_name="conch", source=source, assign=assign,
                       allowed_missing_prefixes=CONCH_OPTIONAL_PREFIXES,
                       ignored_unexpected_prefixes=CONCH_RELEASE_OMITS)


class ConchTokenizer:
    """CONCH's byte-level BPE tokenizer, read with the `tokenizers` library from the JSON file of
    the official CONCH package (the user points to it: its licence forbids redistribution).

    Each prompt becomes `context_length - 1` (127) ids: `<start_of_text>`, the tokens,
    `<end_of_text>`, then `<pad>`; one more `<pad>` is appended (128), which the text tower drops to
    make room for its CLS embedding. A prompt too long for 127 ids keeps its first 125 tokens and
    still ends with `<end_of_text>` (the file's post-processor adds the special tokens after
    truncation, as the official `tokenize()` via transformers does). A file without a
    post-processor gets `<start_of_text> $A <end_of_text>`.

    `prefix_space`: the file's byte-level pre-tokenizer puts a space before the first word
    (add_prefix_space, "an" → "Ġan"), as CONCH was trained. False drops it, as transformers
    4.48–4.57 (ZEUS pins 4.53.0) do when they load the file into PreTrainedTokenizerFast: the
    published ZEUS numbers were computed with those ids (config model.conch_tokenization).
    """

    SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>", "<pad>")

    def __init__(self, path: str | Path, context_length: int = 128, expected_pad_id: int | None = 0,
                 vocab_size: int | None = None, prefix_space: bool = True):
        from tokenizers import Tokenizer
        from tokenizers.processors import TemplateProcessing

        file = find_tokenizer_file(Path(path).expanduser())
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:
            raise WeightsError(f"CONCH tokenizer {file} is not a `tokenizers` JSON file ({str(e)[:150]}); "
                               f"point model.tokenizer to conch_byte_level_bpe_uncased.json") from None
        ids = {t: tok.token_to_id(t) for t in self.SPECIAL_TOKENS}
        absent = [t for t, i in ids.items() if i is None]
        if absent:
            raise WeightsError(f"CONCH tokenizer {file} lacks the special token(s) {', '.join(absent)}; "
                               f"it is not CONCH's tokenizer")
        if expected_pad_id is not None and ids["<pad>"] != expected_pad_id:
            raise WeightsError(f"CONCH tokenizer {file}: <pad> has id {ids['<pad>']}, the model masks "
                               f"padding by id {expected_pad_id}; use CONCH's own tokenizer file")
        if vocab_size is not None and tok.get_vocab_size() > vocab_size:
            raise WeightsError(f"CONCH tokenizer {file} has {tok.get_vocab_size()} tokens, more than the "
                               f"model's {vocab_size}; use the tokenizer that matches the weights")
        if not prefix_space:
            tok = _without_prefix_space(tok)
        if tok.post_processor is None:
            sot, eot = self.SPECIAL_TOKENS[:2]
            tok.post_processor = TemplateProcessing(single=f"{sot} $A {eot}",
                                                    special_tokens=[(sot, ids[sot]), (eot, ids[eot])])
        tok.enable_truncation(max_length=context_length - 1)
        tok.enable_padding(direction="right", length=context_length - 1, pad_id=ids["<pad>"], pad_token="<pad>")
        self._tok, self.path, self.context_length = tok, file, context_length
        self.sot_id, self.eot_id, self.pad_id = ids["<start_of_text>"], ids["<end_of_text>"], ids["<pad>"]

    def __call__(self, texts: Sequence[str]) -> Tensor:
        """Prompts → int64 token ids (N, context_length)."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long).reshape(len(enc), self.context_length - 1)
        return F.pad(ids, (0, 1), value=self.pad_id)


def _without_prefix_space(tok):
    """The tokenizer with add_prefix_space off in every byte-level pre-tokenizer (a Sequence's too)."""
    import json

    from tokenizers import Tokenizer

    def clear(node):
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel" and "add_prefix_space" in node:
                node["add_prefix_space"] = False
            for v in node.values():
                clear(v)
        elif isinstance(node, list):
            for v in node:
                clear(v)

    spec = json.loads(tok.to_str())
    clear(spec.get("pre_tokenizer"))
    return Tokenizer.from_str(json.dumps(spec))


def find_tokenizer_file(path: Path) -> Path:
    """A JSON file, or a directory (e.g. the installed official package) holding exactly one
    `*bpe*.json` file."""
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.rglob("*bpe*.json"))
        if len(found) == 1:
            return found[0]
        what = "no" if not found else f"{len(found)}"
        raise WeightsError(f"CONCH tokenizer: {what} *bpe*.json file(s) under {path}; point "
                           f"model.tokenizer to conch_byte_level_bpe_uncased.json itself")
    raise WeightsError(f"CONCH tokenizer {path} does not exist; set model.tokenizer to the "
                       f"conch_byte_level_bpe_uncased.json file of the official CONCH package")
