"""Preprocessing is bit-identical (torch.equal) to each model's published transform, rebuilt here
with torchvision on PIL images (Resize(BICUBIC) → CenterCrop → ToTensor → Normalize), for real H&E
tiles and random noise at 448 px, larger, odd and non-square sizes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torchvision import transforms as T

from zeus_ray.encoders.preprocess import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                          Preprocessor, as_uint8_batch, crop_offsets, mean_std_name,
                                          resized_shape)
from zeus_ray.encoders.registry import MODELS
from zeus_ray.errors import ZeusError

# The published pipelines: (resize = crop size, mean, std); all bicubic on PIL images.
OFFICIAL = {"conch": (448, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "keep": (224, IMAGENET_MEAN, IMAGENET_STD),
            "plip": (224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "quiltnet": (224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}
# (height, width): the 448-px tile size, larger, odd, smaller than CONCH's 448, non-square both ways,
# and sizes whose shortest side equals 224 (no resampling, crop only).
SIZES = [(448, 448), (512, 512), (449, 449), (333, 333), (300, 451), (451, 300), (224, 224), (224, 231)]


def official(size, mean, std, interpolation=T.InterpolationMode.BICUBIC, crop=None) -> T.Compose:
    return T.Compose([T.Resize(size, interpolation=interpolation), T.CenterCrop(crop or size),
                      T.ToTensor(), T.Normalize(mean, std)])


def apply(transform, tiles: np.ndarray) -> torch.Tensor:
    return torch.stack([transform(Image.fromarray(t)) for t in tiles])


def inputs(cmu_tiles: np.ndarray, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Real tissue brought to h × w with PIL (a crop when it fits in 448 px, else a Lanczos
    resize, so the reference and ours see the same input) plus two tiles of random noise."""
    if h <= 448 and w <= 448:
        real = cmu_tiles[:, :h, :w]
    else:
        real = np.stack([np.asarray(Image.fromarray(t).resize((w, h), Image.LANCZOS)) for t in cmu_tiles])
    noise = np.random.default_rng(seed).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([real, noise]))


@pytest.mark.parametrize("model_id", sorted(OFFICIAL))
@pytest.mark.parametrize("h,w", SIZES)
def test_registered_models_match_their_official_transform_bit_for_bit(cmu_tiles, model_id, h, w):
    spec = MODELS[model_id].spec
    size, mean, std = OFFICIAL[model_id]
    tiles = inputs(cmu_tiles, h, w)
    ref = apply(official(size, mean, std), tiles)
    ours = Preprocessor(spec)(tiles)
    assert ours.shape == ref.shape == (len(tiles), 3, size, size) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    if (h, w) == (300, 451):
        assert torch.equal(Preprocessor(spec, threads=1)(tiles), ref)        # with or without the thread pool
        assert torch.equal(Preprocessor(spec, threads=3)(torch.from_numpy(tiles)), ref)   # a CPU tensor too
    # Resized as tensor ops (what a GPU encoder does by default): the same bits.
    assert torch.equal(Preprocessor(spec, resize_on_device=True)(tiles), ref)


@pytest.mark.parametrize("h,w", [(448, 448), (512, 512), (449, 449), (333, 333)])
def test_plip_matches_clip_image_processor_on_square_tiles(cmu_tiles, h, w):
    """PLIP's own preprocessing is transformers' PIL CLIPImageProcessor (CLIPImageProcessorPil in
    transformers 5); it crops at (h - s) // 2, which equals CenterCrop on square tiles."""
    processor = (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor)()
    tiles = inputs(cmu_tiles, h, w)
    ref = processor([Image.fromarray(t) for t in tiles], return_tensors="pt")["pixel_values"]
    assert torch.equal(Preprocessor(MODELS["plip"].spec)(tiles), ref)


@pytest.mark.parametrize("interpolation,resize,crop", [("bicubic", 256, 224), ("bilinear", 224, 224),
                                                       ("bilinear", 256, 224), ("bicubic", 224, 192)])
@pytest.mark.parametrize("h,w", [(448, 600), (451, 300), (333, 333)])
def test_other_resize_and_crop_settings(cmu_tiles, interpolation, resize, crop, h, w):
    spec = dataclasses.replace(MODELS["keep"].spec, interpolation=interpolation, resize_size=resize,
                               input_size=crop)
    tiles = inputs(cmu_tiles, h, w, seed=1)
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    ref = apply(official(resize, spec.mean, spec.std, interpolation=mode, crop=crop), tiles)
    ours = Preprocessor(spec)(tiles)
    assert ours.shape == (len(tiles), 3, crop, crop)
    assert torch.equal(ours, ref)
    assert torch.equal(Preprocessor(spec, resize_on_device=True)(torch.from_numpy(tiles)), ref)


def test_tiles_already_at_size_are_not_resampled(cmu_tiles):
    """PIL returns the pixels unchanged when asked for the size it has (so skipping is exact), and
    a tile at the crop size comes out as its own pixels, only scaled and normalised."""
    for t in (cmu_tiles[0], cmu_tiles[1, :448, :300]):
        img = Image.fromarray(np.ascontiguousarray(t))
        assert np.array_equal(np.asarray(img.resize(img.size, Image.BICUBIC)), t)
    pre = Preprocessor(MODELS["conch"].spec)
    assert np.shares_memory(pre.resize_crop(cmu_tiles), cmu_tiles)   # no copy at all
    out = pre(cmu_tiles)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert torch.equal(out, (torch.from_numpy(cmu_tiles).permute(0, 3, 1, 2).float() / 255 - mean) / std)


def test_resize_into_a_given_buffer(cmu_tiles):
    """The encoder's CUDA path writes each batch into a reused (pinned) buffer: same pixels."""
    pre = Preprocessor(MODELS["keep"].spec)
    buf = np.full((8, 224, 224, 3), 7, np.uint8)
    got = pre.resize_crop(cmu_tiles, out=buf)
    assert got.shape == (5, 224, 224, 3) and np.shares_memory(got, buf)
    assert np.array_equal(got, pre.resize_crop(cmu_tiles)) and (buf[5:] == 7).all()
    conch = Preprocessor(MODELS["conch"].spec)
    buf = np.zeros((5, 448, 448, 3), np.uint8)
    got = conch.resize_crop(cmu_tiles, out=buf)   # nothing to resample: a plain copy into the buffer
    assert np.array_equal(got, cmu_tiles) and np.shares_memory(got, buf)


def test_resized_shape_and_crop_offsets_follow_torchvision():
    assert resized_shape(448, 448, 224) == (224, 224)
    assert resized_shape(448, 600, 224) == (224, 300)
    assert resized_shape(601, 448, 224) == (300, 224)
    assert resized_shape(300, 451, 448) == (448, 673)          # long side truncated, not rounded
    assert crop_offsets(227, 224, 224) == (2, 0)               # round(1.5) = 2 (the // 2 rule gives 1)
    assert crop_offsets(225, 229, 224) == (0, 2)               # round(0.5) = 0, round(2.5) = 2: ties to even
    img = torch.arange(227 * 229).view(1, 227, 229)
    top, left = crop_offsets(227, 229, 224)
    assert torch.equal(T.CenterCrop(224)(img), img[:, top:top + 224, left:left + 224])


def test_bad_inputs_are_one_line_errors():
    pre = Preprocessor(MODELS["plip"].spec)
    with pytest.raises(ZeusError, match="uint8 RGB"):
        pre(torch.zeros(2, 224, 224, 3))
    with pytest.raises(ZeusError, match="uint8 RGB"):
        pre(np.zeros((2, 224, 224), np.uint8))
    small = Preprocessor(dataclasses.replace(MODELS["plip"].spec, resize_size=200))
    with pytest.raises(ZeusError, match="smaller than the 224x224 crop"):
        small(np.zeros((1, 448, 448, 3), np.uint8))
    with pytest.raises(ZeusError, match=r"\(N, H, W, 3\)"):
        as_uint8_batch(np.zeros((2, 8, 8, 4), np.uint8), "plip")
    with pytest.raises(ZeusError, match="float32"):
        as_uint8_batch(np.zeros((2, 8, 8, 3), np.float32), "plip")
    with pytest.raises(ZeusError, match="interpolation"):
        Preprocessor(dataclasses.replace(MODELS["plip"].spec, interpolation="lanczos"))


def test_mean_std_names():
    assert mean_std_name(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) == "openai-clip"
    assert mean_std_name(IMAGENET_MEAN, IMAGENET_STD) == "imagenet"
    assert mean_std_name((0.1, 0.2, 0.3), (1, 1, 1)) == "custom"


@pytest.mark.parametrize("kind", ["bicubic", "bilinear"])
def test_tensor_resampling_is_pils_bit_for_bit(cmu_tiles, kind):
    """encoders/resample.pil_resize against PIL's Image.resize itself: down and up, by odd factors,
    one side only, on tissue, noise and a full-range ramp (the clamps at 0 and 255)."""
    from zeus_ray.encoders.resample import pil_resize
    pil = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[kind]
    ramp = (np.indices((448, 448)).sum(0) * 37 % 256).astype(np.uint8)
    base = np.concatenate([cmu_tiles, inputs(cmu_tiles, 448, 448, seed=2)[-2:], np.repeat(ramp[None, ..., None], 3, -1)])
    for oh, ow in [(224, 224), (256, 342), (336, 224), (448, 97), (500, 613), (31, 17)]:
        ref = np.stack([np.asarray(Image.fromarray(t).resize((ow, oh), pil)) for t in base])
        got = pil_resize(torch.from_numpy(base), oh, ow, kind)
        assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), ref), (oh, ow)
    with pytest.raises(ValueError, match="lanczos"):
        pil_resize(torch.from_numpy(base), 224, 224, "lanczos")


def test_resize_on_from_the_config_keeps_the_embeddings():
    """model.resize_on: auto is PIL on a CPU encoder; device gives the same embeddings bit for bit."""
    from zeus_ray.config import load_config
    from zeus_ray.encoders.registry import load_encoder
    tiles = np.random.default_rng(3).integers(0, 256, (4, 448, 448, 3), dtype=np.uint8)
    out = {}
    for where in ("auto", "device"):
        enc = load_encoder(load_config(None, ["model.id=random:test_vit", f"model.resize_on={where}"]).model)
        assert enc.preprocess.resize_on_device == (where == "device")
        out[where] = enc.encode_images(tiles)
    assert np.array_equal(out["auto"], out["device"])
