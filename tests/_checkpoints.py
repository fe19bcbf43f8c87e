"""Test helpers: random-initialised CONCH/KEEP checkpoints in the official file formats, and small
tokenizers with the official special tokens (no weights or tokenizer files can be downloaded)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from zeus_ray.encoders.conch import build_conch
from zeus_ray.encoders.keep import build_keep

CORPUS = [
    "An H&E stained image of leiomyoma.", "A histopathological image of normal skin cells.",
    "tumor growth", "benign tumor", "cutaneous spindle cell neoplasm", "normal tissue",
    "There is skin cancer.", "Microscopic examination of neoplastic tissue.",
    "CLASSNAME at 40x magnification.", "tumoral spindle cells in a diagnostic slide.",
]


def layout(test_data: Path, name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every entry of a layout file in tests/data/checkpoint-layouts."""
    data = json.loads((test_data / "checkpoint-layouts" / name).read_text())
    return [(e["name"], tuple(e["shape"])) for e in data["entries"]]


def write_conch_checkpoint(folder: Path, seed: int = 0, tiny: bool = True):
    """A random tiny CONCH saved like the release: `pytorch_model.bin` (torch.save of the state dict)."""
    torch.manual_seed(seed)
    model = build_conch(tiny=tiny).eval()
    path = Path(folder) / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path, model


def write_keep_checkpoint(folder: Path, seed: int = 0, tiny: bool = True, layerscale: str = "weight"):
    """A random tiny KEEP saved like the hub release: `model.safetensors`, LayerScale tensors named
    `.weight` (hub) or `.gamma` (GitHub quick start)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = build_keep(tiny=tiny).eval()
    with torch.no_grad():  # LayerScale starts at 1e-5, which makes a fresh ViT ignore its input
        for name, p in model.visual.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.5, 1.0)
    sd = {re.sub(r"\.(ls[12])\.gamma$", rf".\1.{layerscale}", k): v.contiguous()
          for k, v in model.state_dict().items()}
    path = Path(folder) / "model.safetensors"
    save_file(sd, str(path))
    return path, model


def make_conch_tokenizer(path: Path, post_processor: bool = True, pad_first: bool = True,
                         prefix_space: bool = False) -> Path:
    """A small byte-level BPE (lower-casing) with CONCH's special tokens; `<pad>` is id 0 when
    `pad_first`; `prefix_space` saves the pre-tokenizer with add_prefix_space on, as CONCH's file."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<start_of_text>", "<end_of_text>"]
    if not pad_first:
        specials = specials[1:] + specials[:1]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<start_of_text> $A <end_of_text>",
            special_tokens=[(t, tok.token_to_id(t)) for t in ("<start_of_text>", "<end_of_text>")])
    if prefix_space:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.save(str(path))
    return Path(path)


def make_keep_tokenizer_dir(folder: Path) -> Path:
    """A small uncased BERT WordPiece vocabulary (vocab.txt) in `folder`."""
    words = sorted({w.strip(".&").lower() for line in CORPUS for w in line.split()} - {""})
    pieces = ["##s", "##oma", "##al", "##ic", "leio", "my"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "&", *words, *pieces]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder
