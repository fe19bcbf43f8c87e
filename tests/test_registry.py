"""The encoder registry: load_encoder for every family, weights resolution (local dir/file, bucket,
Hugging Face cache offline), the encode contract (shape, L2 norm, determinism, batch-size
invariance, dtype), model_key, config errors and `zeus models`."""
from __future__ import annotations

import hashlib
import math
import sys
import uuid

import numpy as np
import pytest
import torch
from _checkpoints import make_conch_tokenizer, make_keep_tokenizer_dir, write_conch_checkpoint, write_keep_checkpoint
from PIL import Image
from torchvision import transforms as T

from zeus_ray.cli import main as zeus_main
from zeus_ray.config import ModelConfig
from zeus_ray.encoders.conch import ConchTokenizer
from zeus_ray.encoders.keep import KeepTokenizer
from zeus_ray.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from zeus_ray.encoders.base import run_in_batches
from zeus_ray.encoders.registry import MODELS, load_encoder
from zeus_ray.errors import ConfigError, WeightsError, ZeusError

from conftest import row_cosines  # noqa: E402

PROMPTS = ["An H&E stained image of leiomyoma.", "normal skin cells", "tumor growth", "benign tumor"]
TINY = "random:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def tiles(cmu_tiles):
    return cmu_tiles


@pytest.fixture(scope="module")
def tiny_random():
    return load_encoder(ModelConfig(id=TINY, batch_size=4))


def _reference_pixels(tiles, size, mean, std) -> torch.Tensor:
    ref = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                     T.ToTensor(), T.Normalize(mean, std)])
    return torch.stack([ref(Image.fromarray(t)) for t in tiles])


# ---------------------------------------------------------------- registry facts and the CLI

def test_registered_specs_state_the_published_facts():
    conch, keep, plip, quilt = (MODELS[k].spec for k in ("conch", "keep", "plip", "quiltnet"))
    assert (conch.weights_source, conch.gated, conch.licence) == ("MahmoodLab/conch", True, "CC-BY-NC-ND-4.0")
    assert (conch.input_size, conch.resize_size, conch.embed_dim, conch.context_length) == (448, 448, 512, 128)
    assert (conch.mean, conch.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert (keep.weights_source, keep.gated, keep.licence) == ("Astaxanthin/KEEP", False, "MIT")
    assert (keep.input_size, keep.embed_dim, keep.context_length, keep.mean) == (224, 768, 256, IMAGENET_MEAN)
    assert (plip.weights_source, plip.input_size, plip.embed_dim, plip.context_length) == ("vinid/plip", 224, 512, 77)
    assert (quilt.weights_source, quilt.input_size, quilt.embed_dim) == ("wisdomik/QuiltNet-B-32", 224, 512)
    assert all(MODELS[k].spec.interpolation == "bicubic" for k in MODELS)


def test_zeus_models_prints_the_table(capsys):
    assert zeus_main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in MODELS}
    assert set(rows) == set(MODELS)
    assert "MahmoodLab/conch" in rows["conch"] and "CC-BY-NC-ND-4.0" in rows["conch"] and " yes " in rows["conch"]
    assert "imagenet" in rows["keep"] and "768" in rows["keep"] and "256" in rows["keep"]
    assert "openai-clip" in rows["plip"] and "448 bicubic" in rows["conch"]
    assert "random:<timm model>" in out and "open_clip:" in out and "hf-clip:" in out


# ---------------------------------------------------------------- the encode contract (random family)

def test_random_encoder_contract(tiny_random, tiles):
    enc = tiny_random
    assert enc.model_key == f"{TINY}@seed0" and "masks carry no meaning" in enc.spec.notes
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    emb = enc.encode_images(tiles)
    assert emb.shape == (5, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    txt = enc.encode_texts(PROMPTS)
    assert txt.shape == (4, 512) and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    assert row_cosines(txt[:1], txt[1:2])[0] < 0.9   # different prompts, different embeddings
    assert enc.encode_images(np.zeros((0, 448, 448, 3), np.uint8)).shape == (0, 512)
    assert enc.encode_texts([]).shape == (0, 512)
    with pytest.raises(ZeusError, match="uint8 RGB"):
        enc.encode_images(tiles.astype(np.float32))
    with pytest.raises(ZeusError, match="list of strings"):
        enc.encode_texts([1, 2])


def test_random_encoder_determinism_batch_invariance_and_seed(tiny_random, tiles):
    ref = tiny_random.encode_images(tiles)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = load_encoder(ModelConfig(id=TINY, batch_size=1))   # a fresh build, one tile per batch
    assert torch.equal(torch.rand(3), before)                   # the global RNG was not disturbed
    np.testing.assert_allclose(again.encode_images(tiles), ref, atol=2e-6)
    np.testing.assert_allclose(again.encode_texts(PROMPTS), tiny_random.encode_texts(PROMPTS), atol=1e-6)
    other = load_encoder(ModelConfig(id=TINY + ":1"))
    assert other.model_key == f"{TINY}@seed1"
    assert row_cosines(other.encode_images(tiles[:1]), ref[:1])[0] < 0.99


def test_random_encoder_bf16_on_cpu(tiny_random, tiles):
    bf16 = load_encoder(ModelConfig(id=TINY, dtype="bfloat16", batch_size=4))
    assert bf16.amp_dtype == torch.bfloat16 and tiny_random.amp_dtype is None
    assert row_cosines(bf16.encode_images(tiles), tiny_random.encode_images(tiles)).min() > 0.99


@pytest.mark.parametrize("overrides,match", [
    ({"id": "nope"}, "not a registered encoder; use one of conch, keep, plip, quiltnet"),
    ({"id": TINY, "weights": "/x"}, "built-in random weights"),
    ({"id": "random:not_a_timm_model"}, "not a timm model name"),
    ({"id": TINY + ":x"}, r"random:<timm model name>\[:<seed>\]"),
    ({"id": TINY, "dtype": "float16", "device": "cpu"}, "float16 is not supported on CPU"),
    ({"id": TINY, "device": "tpu"}, "use auto, cpu, cuda or cuda:N"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_encoder(ModelConfig(**overrides))


def test_unavailable_cuda_device_is_a_config_error():
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ConfigError, match="model.device"):
        load_encoder(ModelConfig(id=TINY, device=device))


# ---------------------------------------------------------------- CONCH and KEEP through the registry

def test_conch_through_registry(tmp_path, tiles):
    path, model = write_conch_checkpoint(tmp_path)
    tok = make_conch_tokenizer(tmp_path / "conch_bpe.json")
    enc = load_encoder(ModelConfig(id="conch", weights=str(tmp_path), tokenizer=str(tok), batch_size=2), tiny=True)
    size = model.config.image_size
    assert enc.spec.input_size == size and enc.spec.embed_dim == model.config.embed_dim
    assert enc.model_key == "conch@" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    img = enc.encode_images(tiles)
    with torch.no_grad():
        ref_img = model.encode_image(_reference_pixels(tiles, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
        ref_txt = model.encode_text(ConchTokenizer(tok, vocab_size=model.config.vocab_size)(PROMPTS))
    assert row_cosines(img, ref_img).min() > 0.9999
    np.testing.assert_allclose(enc.encode_texts(PROMPTS), ref_txt.numpy(), atol=1e-5)
    # Batch-size invariance and the weights file given directly.
    one = load_encoder(ModelConfig(id="conch", weights=str(path), batch_size=1), tiny=True)
    np.testing.assert_allclose(one.encode_images(tiles), img, atol=1e-5)
    assert one.model_key == enc.model_key
    # No tokenizer: images still encode; texts say how to provide it.
    with pytest.raises(WeightsError, match="model.tokenizer=/path/to/conch_byte_level_bpe_uncased.json"):
        one.encode_texts(PROMPTS)
    bf16 = load_encoder(ModelConfig(id="conch", weights=str(path), dtype="bfloat16"), tiny=True)
    assert row_cosines(bf16.encode_images(tiles), img).min() > 0.99


def _fake_conch_package(site, with_tokenizer: bool = True):
    """A folder laid out like the installed official CONCH package (github.com/mahmoodlab/CONCH):
    `conch/__init__.py` and the tokenizer at conch/open_clip_custom/tokenizers/. Its __init__ raises,
    so the test also proves that finding the file runs none of the package's code."""
    pkg = site / "conch"
    (pkg / "open_clip_custom" / "tokenizers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the CONCH package must not be imported')\n")
    if with_tokenizer:
        make_conch_tokenizer(pkg / "open_clip_custom" / "tokenizers" / "conch_byte_level_bpe_uncased.json")
    return pkg


def test_conch_tokenizer_from_the_installed_package(tmp_path, monkeypatch):
    path, model = write_conch_checkpoint(tmp_path)
    pkg = _fake_conch_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    enc = load_encoder(ModelConfig(id="conch", weights=str(path)), tiny=True)   # no model.tokenizer
    tok = pkg / "open_clip_custom" / "tokenizers" / "conch_byte_level_bpe_uncased.json"
    with torch.no_grad():
        ref = model.encode_text(ConchTokenizer(tok, vocab_size=model.config.vocab_size)(PROMPTS))
    np.testing.assert_allclose(enc.encode_texts(PROMPTS), ref.numpy(), atol=1e-5)
    assert "conch" not in sys.modules


def test_conch_without_tokenizer_says_which_file_and_where(tmp_path, monkeypatch):
    path, _ = write_conch_checkpoint(tmp_path)
    enc = load_encoder(ModelConfig(id="conch", weights=str(path)), tiny=True)
    with pytest.raises(WeightsError) as err:
        enc.encode_texts(PROMPTS)
    msg = str(err.value)
    assert "\n" not in msg and "no `conch` package is installed" in msg
    for part in ("conch/open_clip_custom/tokenizers/conch_byte_level_bpe_uncased.json",
                 "https://github.com/mahmoodlab/CONCH", "pip install",
                 "--set model.tokenizer=/path/to/conch_byte_level_bpe_uncased.json"):
        assert part in msg
    # An installed package without the file: the message names the exact path it looked at.
    pkg = _fake_conch_package(tmp_path / "site", with_tokenizer=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    enc = load_encoder(ModelConfig(id="conch", weights=str(path)), tiny=True)
    with pytest.raises(WeightsError, match="installed `conch` package has no ") as err:
        enc.encode_texts(PROMPTS)
    assert str(pkg / "open_clip_custom" / "tokenizers" / "conch_byte_level_bpe_uncased.json") in str(err.value)
    assert enc.encode_images(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 32)   # images need no tokenizer


def test_keep_through_registry_hub_layout(tmp_path, tiles):
    path, model = write_keep_checkpoint(tmp_path, layerscale="weight")   # the hub's `.weight` spelling
    make_keep_tokenizer_dir(tmp_path)                                     # vocab.txt beside the weights
    enc = load_encoder(ModelConfig(id="keep", weights=str(tmp_path), batch_size=3), tiny=True)
    assert enc.model_key == "keep@" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert enc.logit_scale == pytest.approx(25.0, rel=1e-5)
    size = model.config.image_size
    with torch.no_grad():
        ref_img = model.encode_image(_reference_pixels(tiles, size, IMAGENET_MEAN, IMAGENET_STD))
        t = KeepTokenizer(tmp_path)(PROMPTS)
        ref_txt = model.encode_text(t["input_ids"], t["attention_mask"])
    assert row_cosines(enc.encode_images(tiles), ref_img).min() > 0.9999
    np.testing.assert_allclose(enc.encode_texts(PROMPTS), ref_txt.numpy(), atol=1e-5)


def test_changed_weights_change_model_key(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = write_conch_checkpoint(tmp_path / "a", seed=0)
    b, _ = write_conch_checkpoint(tmp_path / "b", seed=1)
    ka = load_encoder(ModelConfig(id="conch", weights=str(a)), tiny=True).model_key
    kb = load_encoder(ModelConfig(id="conch", weights=str(b)), tiny=True).model_key
    assert ka != kb and ka.startswith("conch@") and len(ka) == len("conch@") + 12


# ---------------------------------------------------------------- weights resolution

def test_local_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_encoder(ModelConfig(id="conch", weights=str(tmp_path / "nope")), tiny=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"looked for weights: pytorch_model\.bin in .*empty"):
        load_encoder(ModelConfig(id="conch", weights=str(tmp_path / "empty")), tiny=True)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.bin"):
        load_encoder(ModelConfig(id="conch", weights=str(tmp_path / "junk.bin")), tiny=True)


def test_weights_from_a_bucket_are_fetched_once(tmp_path, s3_bucket, monkeypatch):
    import s3fs
    monkeypatch.setenv("ZEUS_WEIGHTS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    path, _ = write_conch_checkpoint(src)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put_file(str(path), f"{s3_bucket}/models/conch/pytorch_model.bin")
    local_key = "conch@" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    enc = load_encoder(ModelConfig(id="conch", weights=f"s3://{s3_bucket}/models/conch"), tiny=True)
    assert enc.model_key == local_key
    cached = list((tmp_path / "cache").rglob("pytorch_model.bin"))
    assert len(cached) == 1 and cached[0].read_bytes() == path.read_bytes()
    stamp = cached[0].stat().st_mtime_ns
    again = load_encoder(ModelConfig(id="conch", weights=f"s3://{s3_bucket}/models/conch"), tiny=True)
    assert again.model_key == local_key and cached[0].stat().st_mtime_ns == stamp   # reused, not re-fetched
    by_file = load_encoder(ModelConfig(id="conch", weights=f"s3://{s3_bucket}/models/conch/pytorch_model.bin"),
                           tiny=True)
    assert by_file.model_key == local_key
    with pytest.raises(WeightsError, match="does not exist in the bucket"):
        load_encoder(ModelConfig(id="conch", weights=f"s3://{s3_bucket}/models/missing"), tiny=True)


def test_keep_from_a_bucket_brings_its_vocabulary(tmp_path, s3_bucket, monkeypatch):
    import s3fs
    monkeypatch.setenv("ZEUS_WEIGHTS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    write_keep_checkpoint(src)
    make_keep_tokenizer_dir(src)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for name in ("model.safetensors", "vocab.txt"):
        fs.put_file(str(src / name), f"{s3_bucket}/keep/{name}")
    enc = load_encoder(ModelConfig(id="keep", weights=f"s3://{s3_bucket}/keep"), tiny=True)
    local = load_encoder(ModelConfig(id="keep", weights=str(src)), tiny=True)
    np.testing.assert_allclose(enc.encode_texts(PROMPTS), local.encode_texts(PROMPTS), atol=1e-6)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_offline_with_empty_hf_cache_is_a_clear_error(tmp_path, monkeypatch, model_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    spec = MODELS[model_id].spec
    with pytest.raises(WeightsError) as err:
        load_encoder(ModelConfig(id=model_id), tiny=True)
    msg = str(err.value)
    assert "\n" not in msg and spec.weights_source in msg and "HF_HUB_OFFLINE=1" in msg
    assert str(tmp_path / "hf") in msg and "--set model.weights=" in msg
    if spec.gated:
        assert "hf auth login" in msg and f"https://huggingface.co/{spec.weights_source}" in msg


def test_offline_hf_cache_hit(tmp_path, monkeypatch, tiles):
    """A hub cache laid out as huggingface_hub writes it (blob named by sha256, snapshot link)."""
    src = tmp_path / "src"
    src.mkdir()
    path, _ = write_conch_checkpoint(src)
    data = path.read_bytes()
    sha, commit = hashlib.sha256(data).hexdigest(), uuid.uuid4().hex + "00000000"
    repo = tmp_path / "hf" / "models--MahmoodLab--conch"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / sha).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "pytorch_model.bin").symlink_to(f"../../blobs/{sha}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    enc = load_encoder(ModelConfig(id="conch"), tiny=True)
    assert enc.model_key == f"conch@{sha[:12]}"
    assert enc.encode_images(tiles[:2]).shape == (2, 32)
    assert math.isclose(enc.logit_scale, 1 / 0.07, rel_tol=1e-5)


# ---------------------------------------------------------------- batch halving on GPU out-of-memory

def test_out_of_memory_halves_the_batch_and_keeps_every_result():
    """The retry loop of the CUDA encode path, driven by a step that runs out of memory above 10
    tiles the way torch does (torch.cuda.OutOfMemoryError)."""
    done, calls, halvings = np.full(37, -1), [], []

    def step(start, stop):
        calls.append((start, stop))
        if stop - start > 10:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {stop - start} tiles")
        done[start:stop] = np.arange(start, stop)

    assert run_in_batches(37, 64, step, on_oom=halvings.append) == 9
    assert halvings == [18, 9]
    assert calls == [(0, 37), (0, 18), (0, 9), (9, 18), (18, 27), (27, 36), (36, 37)]
    assert (done == np.arange(37)).all()
    calls.clear()
    assert run_in_batches(37, 9, step) == 9 and calls[0] == (0, 9)   # the size that worked, reused
    assert run_in_batches(0, 64, step) == 64


def test_out_of_memory_on_one_tile_and_other_errors_propagate():
    calls = []

    def never_fits(start, stop):
        calls.append(stop - start)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_in_batches(5, 4, never_fits)
    assert calls == [4, 2, 1]

    def broken(start, stop):
        calls.append("broken")
        raise ValueError("not a memory problem")

    calls.clear()
    with pytest.raises(ValueError):
        run_in_batches(5, 4, broken)
    assert calls == ["broken"]   # no retry
