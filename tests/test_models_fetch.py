"""`zeus models fetch`: a model's files copied from a source folder, the hub cache (offline) or a
bucket into a folder or a bucket with a sha256 manifest; loading from there checks every used file
against it. Random-initialised tiny CONCH/KEEP checkpoints in the official layouts stand in for the
hub (no weights can be downloaded here)."""
from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from _checkpoints import make_conch_tokenizer, make_keep_tokenizer_dir, write_conch_checkpoint, write_keep_checkpoint

from zeus_ray.cli import main as zeus_main
from zeus_ray.config import ModelConfig
from zeus_ray.encoders.fetch import fetch_model, model_files
from zeus_ray.encoders.registry import MODELS, load_encoder
from zeus_ray.encoders.weights import MANIFEST_NAME
from zeus_ray.errors import ConfigError, WeightsError

PROMPTS = ["An H&E stained image of leiomyoma.", "normal skin cells", "tumor growth"]


@pytest.fixture(scope="module")
def tiles():
    return np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _flip_byte(data: bytes, at: int | None = None) -> bytes:
    at = len(data) // 2 if at is None else at
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _hub_cache(root: Path, repo: str, files: dict[str, Path]) -> str:
    """A hub cache laid out as huggingface_hub writes it (blobs named by sha256, snapshot links)."""
    commit = uuid.uuid4().hex + "00000000"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    (base / "snapshots" / commit).mkdir(parents=True)
    for name, src in files.items():
        sha = _sha(src)
        (base / "blobs" / sha).write_bytes(src.read_bytes())
        (base / "snapshots" / commit / name).symlink_to(f"../../blobs/{sha}")
    return commit


@pytest.fixture
def conch_src(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path, _ = write_conch_checkpoint(src, seed=3)
    tok = make_conch_tokenizer(tmp_path / "conch_byte_level_bpe_uncased.json")
    return path, tok


def test_fetch_conch_into_a_folder_then_load_checks_the_hash(tmp_path, conch_src, tiles, capsys):
    weights, tok = conch_src
    dest = tmp_path / "shared" / "conch"
    assert zeus_main(["models", "fetch", "conch", "--weights", str(weights.parent), "--tokenizer", str(tok),
                      "--to", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"model.weights={dest}" in out and "tokenizer included" in out

    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest["model_id"] == "conch" and manifest["source"] == str(weights.parent)
    assert manifest["created"].endswith("+00:00")
    assert manifest["files"] == {
        "pytorch_model.bin": {"role": "weights", "size": weights.stat().st_size, "sha256": _sha(weights)},
        tok.name: {"role": "tokenizer", "size": tok.stat().st_size, "sha256": _sha(tok)}}
    assert sorted(p.name for p in dest.iterdir()) == sorted([MANIFEST_NAME, "pytorch_model.bin", tok.name])

    enc = load_encoder(ModelConfig(id="conch", weights=str(dest)), tiny=True)   # the tokenizer is found beside
    ref = load_encoder(ModelConfig(id="conch", weights=str(weights), tokenizer=str(tok)), tiny=True)
    assert enc.model_key == ref.model_key == f"conch@{_sha(weights)[:12]}"
    np.testing.assert_allclose(enc.encode_images(tiles), ref.encode_images(tiles), atol=1e-6)
    np.testing.assert_allclose(enc.encode_texts(PROMPTS), ref.encode_texts(PROMPTS), atol=1e-6)

    # A second fetch finds everything in place and rewrites nothing but the manifest.
    stamp = (dest / "pytorch_model.bin").stat().st_mtime_ns
    fetch_model("conch", str(dest), source=str(weights.parent), tokenizer=str(tok), echo=print)
    assert capsys.readouterr().out.count("already there") == 2
    assert (dest / "pytorch_model.bin").stat().st_mtime_ns == stamp

    # One flipped byte (same size): the load fails with one line naming the file and both hashes.
    target = dest / "pytorch_model.bin"
    target.write_bytes(_flip_byte(target.read_bytes()))
    for weights_arg in (dest, target):   # the folder, or the file itself (manifest beside it)
        with pytest.raises(WeightsError) as err:
            load_encoder(ModelConfig(id="conch", weights=str(weights_arg)), tiny=True)
        msg = str(err.value)
        assert "\n" not in msg and str(target) in msg
        assert f"sha256 expected {_sha(weights)}, found {_sha(target)}" in msg and "zeus models fetch conch" in msg


def test_fetch_keep_from_the_offline_hub_cache_into_a_bucket(tmp_path, s3_bucket, monkeypatch, tiles, capsys):
    import s3fs

    src = tmp_path / "src"
    src.mkdir()
    weights, _ = write_keep_checkpoint(src, seed=2)
    make_keep_tokenizer_dir(src)
    commit = _hub_cache(tmp_path / "hf", "Astaxanthin/KEEP",
                        {"model.safetensors": weights, "vocab.txt": src / "vocab.txt"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("ZEUS_WEIGHTS_CACHE", str(tmp_path / "cache"))
    dest = f"s3://{s3_bucket}/models/keep"
    assert zeus_main(["models", "fetch", "keep", "--to", dest]) == 0
    assert f"from hf://Astaxanthin/KEEP@{commit} to {dest}" in capsys.readouterr().out

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    manifest = json.loads(fs.cat_file(f"{s3_bucket}/models/keep/{MANIFEST_NAME}"))
    assert {n: (e["role"], e["sha256"]) for n, e in manifest["files"].items()} == {
        "model.safetensors": ("weights", _sha(weights)), "vocab.txt": ("vocab", _sha(src / "vocab.txt"))}
    assert fs.cat_file(f"{s3_bucket}/models/keep/model.safetensors") == weights.read_bytes()

    enc = load_encoder(ModelConfig(id="keep", weights=dest), tiny=True)
    ref = load_encoder(ModelConfig(id="keep", weights=str(src)), tiny=True)
    assert enc.model_key == ref.model_key
    np.testing.assert_allclose(enc.encode_texts(PROMPTS), ref.encode_texts(PROMPTS), atol=1e-6)
    np.testing.assert_allclose(enc.encode_images(tiles), ref.encode_images(tiles), atol=1e-6)

    # A damaged copy in the node's weights cache (same size) is fetched again, not used.
    cached = next((tmp_path / "cache").rglob("model.safetensors"))
    cached.write_bytes(_flip_byte(cached.read_bytes()))
    assert load_encoder(ModelConfig(id="keep", weights=dest), tiny=True).model_key == ref.model_key
    assert _sha(cached) == _sha(weights)

    # A damaged object in the bucket: a node with an empty cache refuses it, naming the object.
    bad = _flip_byte(weights.read_bytes(), at=len(weights.read_bytes()) - 10)
    fs.pipe_file(f"{s3_bucket}/models/keep/model.safetensors", bad)
    monkeypatch.setenv("ZEUS_WEIGHTS_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(WeightsError) as err:
        load_encoder(ModelConfig(id="keep", weights=dest), tiny=True)
    assert f"{dest}/model.safetensors does not match" in str(err.value)
    assert f"expected {_sha(weights)}, found {hashlib.sha256(bad).hexdigest()}" in str(err.value)


def test_fetch_from_a_bucket_into_a_folder(tmp_path, s3_bucket, monkeypatch, conch_src):
    import s3fs
    weights, _ = conch_src
    monkeypatch.setenv("ZEUS_WEIGHTS_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem(skip_instance_cache=True).put_file(str(weights), f"{s3_bucket}/conch/pytorch_model.bin")
    manifest = fetch_model("conch", str(tmp_path / "dest"), source=f"s3://{s3_bucket}/conch", echo=lambda _: None)
    assert manifest["source"] == f"s3://{s3_bucket}/conch" and list(manifest["files"]) == ["pytorch_model.bin"]
    assert (tmp_path / "dest" / "pytorch_model.bin").read_bytes() == weights.read_bytes()
    assert load_encoder(ModelConfig(id="conch", weights=str(tmp_path / "dest")), tiny=True).model_key \
        == f"conch@{_sha(weights)[:12]}"


def test_a_used_file_missing_from_the_manifest_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_keep_checkpoint(src)
    make_keep_tokenizer_dir(src)
    fetch_model("keep", str(tmp_path / "dest"), source=str(src), echo=lambda _: None)
    assert load_encoder(ModelConfig(id="keep", weights=str(tmp_path / "dest")), tiny=True)
    (tmp_path / "dest" / "tokenizer_config.json").write_text("{}")   # added by hand after the fetch
    with pytest.raises(WeightsError, match=r"tokenizer_config\.json is not listed in .*zeus_weights\.json"):
        load_encoder(ModelConfig(id="keep", weights=str(tmp_path / "dest")), tiny=True)


def test_fetch_errors_are_one_line(tmp_path, monkeypatch, conch_src, capsys):
    weights, tok = conch_src
    fetch_model("conch", str(tmp_path / "dest"), source=str(weights), echo=lambda _: None)
    # Another model into the same folder would mix their files.
    src = tmp_path / "keep"
    src.mkdir()
    write_keep_checkpoint(src)
    with pytest.raises(WeightsError, match="already holds model 'conch'"):
        fetch_model("keep", str(tmp_path / "dest"), source=str(src), echo=lambda _: None)
    # Not a CONCH tokenizer: no CONCH special tokens.
    (tmp_path / "other_bpe.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(WeightsError, match="other_bpe.json"):
        fetch_model("conch", str(tmp_path / "d2"), source=str(weights), tokenizer=str(tmp_path / "other_bpe.json"))
    # Nothing in the hub cache, offline: the CLI prints one line and exits 2; nothing is written.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    assert zeus_main(["models", "fetch", "keep", "--to", str(tmp_path / "d3")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Astaxanthin/KEEP" in err and "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "d3").exists()
    # Without --tokenizer and without the official package, the CONCH tokenizer is left out, with a hint.
    assert zeus_main(["models", "fetch", "conch", "--weights", str(weights), "--to", str(tmp_path / "d4")]) == 0
    assert "CONCH tokenizer not included" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "d4").iterdir()) == sorted([MANIFEST_NAME, "pytorch_model.bin"])
    with pytest.raises(ConfigError, match="built-in random weights"):
        fetch_model("random:vit_tiny_patch16_224", str(tmp_path / "d5"))


def test_model_files_cover_every_registered_id_and_the_generic_families():
    for mid in MODELS:
        mf = model_files(mid)
        assert mf.hub_repo == MODELS[mid].spec.weights_source and "weights" in mf.required
        assert mf.gated == MODELS[mid].spec.gated
    assert model_files("keep").optional["vocab"] == ("vocab.txt",)
    assert model_files("quiltnet").required["config"] == ("open_clip_config.json",)
    assert model_files("hf-clip:someone/pathclip").hub_repo == "someone/pathclip"
    assert model_files("open_clip:hf-hub:a/b").required["config"] == ("open_clip_config.json",)
    assert model_files("open_clip:ViT-B-32").hub_repo is None
    with pytest.raises(ConfigError, match="not registered"):
        model_files("nonsense")


def test_zeus_models_without_subcommand_still_lists(capsys):
    assert zeus_main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(mid in out for mid in MODELS) and "generic ids" in out
