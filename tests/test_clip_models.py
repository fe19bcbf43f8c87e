"""PLIP / hf-clip (transformers CLIPModel) and QuiltNet / open_clip encoders, loaded through
load_encoder from random-initialised checkpoints in the official file layouts, compared with the
reference libraries' own loaders and PIL preprocessing."""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from zeus_ray.config import ModelConfig
from zeus_ray.encoders.checkpoint import strict_load
from zeus_ray.encoders.clip_models import open_clip_architecture
from zeus_ray.encoders.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from zeus_ray.encoders.registry import load_encoder
from zeus_ray.errors import ConfigError, WeightsError

from conftest import row_cosines  # noqa: E402

PROMPTS = ["An H&E stained image of leiomyoma.", "normal skin cells", "tumor growth"]
VIT_B_32_PARAMS = 151_277_313   # OpenAI CLIP ViT-B/32 layout (PLIP and QuiltNet-B-32)


@pytest.fixture(scope="module")
def tiles(cmu_tiles):
    return cmu_tiles[:3]   # one per prompt: some checks pair images with texts


def write_clip_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of the CLIP BPE, built from the vocabulary file bundled with
    open_clip: byte symbols (printable bytes first, the rest mapped past U+0100), the same with the
    end-of-word mark, one token per merge, then the two special tokens."""
    lines = gzip.open(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", "rt",
                      encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_tiny_hf_clip(folder: Path, seed: int = 0, fmt: str = "safetensors", stale_buffers: bool = False,
                       preprocessor: dict | None = None):
    """A random tiny transformers CLIPModel saved like vinid/plip (config.json, weights,
    CLIP tokenizer files, a CLIPImageProcessor preprocessor_config.json)."""
    from transformers import CLIPConfig, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    config.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if stale_buffers:   # what transformers < 4.31 saved
        sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    if fmt == "safetensors":
        save_file(sd, str(folder / "model.safetensors"))
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor or {
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "resample": 3, "size": 224}))
    write_clip_tokenizer(folder)
    return model


TINY_OPEN_CLIP = {
    "model_cfg": {"embed_dim": 16, "quick_gelu": True,
                  "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
    "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
}


def write_tiny_open_clip(folder: Path, seed: int = 0) -> Path:
    """A random tiny open_clip model saved like wisdomik/QuiltNet-B-32 (open_clip_config.json +
    open_clip_pytorch_model.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + str(folder), load_weights=False)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(50.0))
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path


# ---------------------------------------------------------------- PLIP / hf-clip

def test_plip_matches_transformers_reference(tmp_path, tiles):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    folder = tmp_path / "plip"
    write_tiny_hf_clip(folder)
    enc = load_encoder(ModelConfig(id="plip", weights=str(folder), batch_size=2))
    assert (enc.spec.input_size, enc.spec.resize_size, enc.spec.interpolation) == (224, 224, "bicubic")
    assert enc.spec.embed_dim == 16 and enc.spec.context_length == 77
    img = enc.encode_images(tiles)
    txt = enc.encode_texts(PROMPTS)
    assert img.shape == (3, 16) and txt.shape == (3, 16) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)

    # The reference: transformers' own loader, PIL image processor and tokenizer (PLIP's usage).
    ref = CLIPModel.from_pretrained(str(folder)).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(str(folder))(
        images=[Image.fromarray(t) for t in tiles], return_tensors="pt")["pixel_values"]
    tok = CLIPTokenizer.from_pretrained(str(folder))(PROMPTS, padding="max_length", max_length=77,
                                                     return_tensors="pt")
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=pixels).pooler_output
        ref_txt = ref.get_text_features(**tok).pooler_output
    assert row_cosines(img, ref_img).min() > 0.9999
    assert row_cosines(txt, ref_txt).min() > 0.99999
    # Token ids equal open_clip's CLIP tokenizer (the vocabulary files are built correctly).
    oc = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)
    assert torch.equal(tok["input_ids"][:, :20], oc[:, :20].masked_fill(oc[:, :20] == 0, 49407))
    assert enc.logit_scale == pytest.approx(ref.logit_scale.detach().exp().item(), rel=1e-6)


def test_plip_bin_with_stale_buffers_loads_and_model_key_tracks_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_tiny_hf_clip(a, seed=0, fmt="bin", stale_buffers=True)
    write_tiny_hf_clip(b, seed=1, fmt="bin")
    ea = load_encoder(ModelConfig(id="plip", weights=str(a)))
    eb = load_encoder(ModelConfig(id="plip", weights=str(b / "pytorch_model.bin")))   # a file: siblings used
    sha = hashlib.sha256((a / "pytorch_model.bin").read_bytes()).hexdigest()
    assert ea.model_key == f"plip@{sha[:12]}"
    assert eb.model_key.startswith("plip@") and eb.model_key != ea.model_key
    assert load_encoder(ModelConfig(id="plip", weights=str(a))).model_key == ea.model_key


@pytest.mark.parametrize("edit,expected", [
    (lambda sd: sd.__setitem__("vision_projection.weight", sd.pop("visual_projection.weight")),
     r"missing key\(s\): visual_projection\.weight; 1 unexpected key\(s\): vision_projection\.weight"),
    (lambda sd: sd.pop("logit_scale"), r"missing key\(s\): logit_scale"),
    (lambda sd: sd.__setitem__("text_projection.weight", torch.zeros(16, 8)), r"shape mismatch.*text_projection"),
])
def test_plip_strict_loading_names_bad_keys(tmp_path, edit, expected):
    folder = tmp_path / "plip"
    write_tiny_hf_clip(folder)
    from safetensors.torch import load_file
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=expected):
        load_encoder(ModelConfig(id="plip", weights=str(folder)))


def test_hf_clip_generic_takes_preprocessing_from_its_config(tmp_path, tiles):
    folder = tmp_path / "other"
    write_tiny_hf_clip(folder, preprocessor={
        "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "resample": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    enc = load_encoder(ModelConfig(id="hf-clip:someone/pathclip", weights=str(folder)))
    s = enc.spec
    assert (s.resize_size, s.input_size, s.interpolation, s.mean) == (256, 224, "bilinear", (0.5, 0.5, 0.5))
    assert s.weights_source == "someone/pathclip" and enc.model_key.startswith("hf-clip:someone/pathclip@")
    assert enc.encode_images(tiles[:1]).shape == (1, 16)


def test_hf_clip_rejects_other_architectures_and_missing_tokenizer(tmp_path):
    folder = tmp_path / "plip"
    write_tiny_hf_clip(folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(WeightsError, match="no CLIP tokenizer in .*model.tokenizer"):
        load_encoder(ModelConfig(id="plip", weights=str(folder)))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "siglip"}))
    with pytest.raises(WeightsError, match="model_type='siglip', not 'clip'"):
        load_encoder(ModelConfig(id="plip", weights=str(folder)))


def test_plip_full_size_layout_on_meta():
    from transformers import CLIPConfig, CLIPModel
    with torch.device("meta"):   # PLIP's config is CLIP ViT-B/32's: the defaults of CLIPConfig
        model = CLIPModel(CLIPConfig())
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == VIT_B_32_PARAMS
    assert sd["vision_model.embeddings.patch_embedding.weight"].shape == (768, 3, 32, 32)
    assert sd["text_model.embeddings.token_embedding.weight"].shape == (49408, 512)
    assert sd["visual_projection.weight"].shape == (512, 768)


# ---------------------------------------------------------------- QuiltNet / open_clip

def test_quiltnet_matches_open_clip_reference(tmp_path, tiles):
    folder = tmp_path / "quilt"
    path = write_tiny_open_clip(folder)
    enc = load_encoder(ModelConfig(id="quiltnet", weights=str(folder), batch_size=2))
    img, txt = enc.encode_images(tiles), enc.encode_texts(PROMPTS)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    assert enc.spec.embed_dim == 16 and enc.spec.context_length == 77
    assert enc.logit_scale == pytest.approx(50.0, rel=1e-5)
    assert enc.model_key == "quiltnet@" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    # Reference: open_clip's own loader and PIL transform for this folder.
    ref, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(folder))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(folder))
    with torch.no_grad():
        ref_img = ref.eval().encode_image(torch.stack([preprocess(Image.fromarray(t)) for t in tiles]))
        ref_txt = ref.encode_text(tokenizer(PROMPTS))
    assert row_cosines(img, ref_img).min() > 0.9999
    assert row_cosines(txt, ref_txt).min() > 0.99999


def test_quiltnet_needs_its_config_and_strict_weights(tmp_path):
    folder = tmp_path / "quilt"
    path = write_tiny_open_clip(folder)
    (folder / "open_clip_config.json").rename(tmp_path / "cfg.json")
    with pytest.raises(WeightsError, match="open_clip_config.json in .*quilt"):
        load_encoder(ModelConfig(id="quiltnet", weights=str(path)))
    (tmp_path / "cfg.json").rename(folder / "open_clip_config.json")
    sd = torch.load(path, weights_only=True)
    sd["visual.projection"] = sd.pop("visual.proj")
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"missing key\(s\): visual\.proj;.*unexpected key\(s\): visual\.projection"):
        load_encoder(ModelConfig(id="quiltnet", weights=str(folder)))


def test_open_clip_generic_builtin_name_with_weights_file(tmp_path, tiles, caplog):
    # A named open_clip architecture (registered like open_clip's built-in configs) + a weights
    # file with no config beside it.
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "ZeusTiny-B-32.json").write_text(json.dumps(TINY_OPEN_CLIP["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    torch.manual_seed(0)
    model = open_clip.create_model("ZeusTiny-B-32", pretrained=None)
    path = tmp_path / "weights" / "tiny.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fp32 = load_encoder(ModelConfig(id="open_clip:ZeusTiny-B-32", weights=str(path), batch_size=2))
    assert fp32.spec.embed_dim == 16 and fp32.spec.input_size == 224
    assert fp32.model_key.startswith("open_clip:ZeusTiny-B-32@")
    with caplog.at_level(logging.WARNING):
        bf16 = load_encoder(ModelConfig(id="open_clip:ZeusTiny-B-32", weights=str(path), dtype="bfloat16"))
    assert "MultiheadAttention" in caplog.text   # the CPU bf16 slowdown is pointed out
    a, b = fp32.encode_images(tiles), bf16.encode_images(tiles)
    assert a.shape == (3, 16) and row_cosines(a, b).min() > 0.99
    with pytest.raises(ConfigError, match="model.weights"):
        load_encoder(ModelConfig(id="open_clip:ZeusTiny-B-32"))


def test_quiltnet_full_size_layout_on_meta(tmp_path):
    cfg = {"model_cfg": {**open_clip.get_model_config("ViT-B-32"), "quick_gelu": True},
           "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    model, tokenizer = open_clip_architecture("quiltnet", "local-dir:" + str(tmp_path), device="meta")
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == VIT_B_32_PARAMS
    assert sd["visual.conv1.weight"].shape == (768, 3, 32, 32)
    assert sd["visual.proj"].shape == (768, 512) and sd["text_projection"].shape == (512, 512)
    assert sd["positional_embedding"].shape == (77, 512) and tokenizer.context_length == 77
    strict_load(model, sd, model_name="quiltnet", assign=True)   # the full layout loads strictly
    del sd["visual.ln_post.bias"]
    with pytest.raises(WeightsError, match=r"missing key\(s\): visual\.ln_post\.bias"):
        strict_load(model, sd, model_name="quiltnet", assign=True)


def test_plip_preprocessing_is_the_pil_clip_image_processor(tmp_path, tiles):
    """PLIP's pixels equal transformers' PIL-based CLIPImageProcessorPil exactly; transformers 5's
    default CLIP image processor (torchvision-based) differs (the project does not match it)."""
    from transformers import AutoImageProcessor, CLIPImageProcessorPil

    folder = tmp_path / "plip"
    write_tiny_hf_clip(folder)
    enc = load_encoder(ModelConfig(id="plip", weights=str(folder)))
    ours = np.asarray(enc.preprocess(tiles), dtype=np.float32)
    images = [Image.fromarray(t) for t in tiles]
    pil = CLIPImageProcessorPil.from_pretrained(str(folder))(images=images, return_tensors="np")["pixel_values"]
    default = AutoImageProcessor.from_pretrained(str(folder))(images=images, return_tensors="np")["pixel_values"]
    assert np.abs(ours - pil).max() < 1e-6
    assert np.abs(default - pil).max() > 1e-3
