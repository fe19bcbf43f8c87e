"""CONCH and KEEP: official layouts (full size on the meta device), strict loading of checkpoints in
the official file formats (tiny variants of the same classes), encoding properties, tokenizers,
and numerical agreement with open_clip's CoCa building blocks."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from _checkpoints import (layout, make_conch_tokenizer, make_keep_tokenizer_dir, write_conch_checkpoint,
                          write_keep_checkpoint)

from zeus_ray.encoders.checkpoint import build_loaded, load_state_dict_file, strict_load
from zeus_ray.encoders.conch import (CONCH_OPTIONAL_PREFIXES, CONCH_RELEASE_OMITS, ConchTokenizer, build_conch,
                                     load_conch_weights)
from zeus_ray.encoders.keep import KeepTokenizer, build_keep, keep_buffers, load_keep_weights
from zeus_ray.errors import WeightsError


def _meta_state(entries):
    return {name: torch.empty(shape, device="meta") for name, shape in entries}


def _shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


# --- (a) full-size layouts, on the meta device -------------------------------------------------

def test_conch_full_size_matches_official_layout(test_data):
    entries = layout(test_data, "conch_ViT-B-16.json")
    release = [e for e in entries if not e[0].startswith(CONCH_RELEASE_OMITS)]
    assert len(entries) - len(release) == 315  # the captioning decoder, the only thing we leave out
    with torch.device("meta"):
        model = build_conch()
    assert _shapes(model) == release  # names, shapes and order
    # The release (no text_decoder) loads strictly; so does the full layout (decoder ignored by
    # name) and a release without the captioning pooler (absence accepted by name).
    load_conch_weights(model, _meta_state(release), assign=True)
    report = load_conch_weights(model, _meta_state(entries), assign=True)
    assert len(report.ignored_unexpected) == 315
    no_caption = [e for e in release if not e[0].startswith(CONCH_OPTIONAL_PREFIXES)]
    report = load_conch_weights(model, _meta_state(no_caption), assign=True)
    assert len(report.absent_allowed) == 11 and all(k.startswith(CONCH_OPTIONAL_PREFIXES) for k in report.absent_allowed)


def test_keep_full_size_matches_official_layout_both_layerscale_names(test_data):
    entries = layout(test_data, "keep.json")
    with torch.device("meta"):
        model = build_keep()
    assert _shapes(model) == entries
    hub = [(re.sub(r"\.gamma$", ".weight", n), s) for n, s in entries]
    assert sum(a != b for a, b in zip(entries, hub)) == 48
    for variant in (entries, hub, entries + [("text.embeddings.position_ids", (1, 512))]):
        report = load_keep_weights(model, _meta_state(variant), assign=True)
    assert report.ignored_unexpected == ["text.embeddings.position_ids"]
    assert len(load_keep_weights(model, _meta_state(hub), assign=True).renamed) == 48


# --- (b) tiny checkpoints in the official formats round-trip through the user's code path -------

@pytest.fixture(scope="module")
def conch_ckpt(tmp_path_factory):
    return write_conch_checkpoint(tmp_path_factory.mktemp("conch"), seed=1)


@pytest.fixture(scope="module")
def keep_ckpt(tmp_path_factory):
    return write_keep_checkpoint(tmp_path_factory.mktemp("keep"), seed=1)


def _images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ids(n, length, vocab, seed=0, real=(5, 30)):
    """Token-id rows: `real` tokens (ids ≥ 1), then pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(real[0], real[1], (1,), generator=g))
        ids[i, :k] = torch.randint(1, vocab, (k,), generator=g)
    return ids


@torch.no_grad()
def test_conch_bin_round_trip(conch_ckpt):
    path, original = conch_ckpt
    torch.manual_seed(99)
    fresh = build_conch(tiny=True).eval()
    x, ids = _images(2, 64), _ids(2, 128, 512)
    assert not torch.equal(fresh.encode_image(x), original.encode_image(x))
    report = load_conch_weights(fresh, load_state_dict_file(path), source=str(path))
    assert report.absent_allowed == [] and report.ignored_unexpected == []
    assert torch.equal(fresh.encode_image(x), original.encode_image(x))
    assert torch.equal(fresh.encode_text(ids), original.encode_text(ids))
    assert torch.equal(fresh.logit_scale, original.logit_scale)


@torch.no_grad()
@pytest.mark.parametrize("layerscale", ["weight", "gamma"])
def test_keep_safetensors_round_trip(tmp_path, layerscale):
    path, original = write_keep_checkpoint(tmp_path, seed=2, layerscale=layerscale)
    sd = load_state_dict_file(path)
    assert any(k.endswith(f".ls1.{layerscale}") for k in sd)
    torch.manual_seed(98)
    fresh = build_keep(tiny=True).eval()
    load_keep_weights(fresh, sd, source=str(path))
    x, ids = _images(2, 32), _ids(2, 256, 256)
    mask = (ids != 0).long()
    assert torch.equal(fresh.encode_image(x), original.encode_image(x))
    assert torch.equal(fresh.encode_text(ids, mask), original.encode_text(ids, mask))


def _no_meta(model):
    return not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
@pytest.mark.parametrize("variant", ["release", "no_caption", "float16"])
def test_conch_built_without_random_init(conch_ckpt, variant):
    """build_loaded (what `zeus run` uses) takes the checkpoint's tensors without a random init
    first, and encodes exactly as a model initialised and then loaded."""
    path, original = conch_ckpt
    sd = load_state_dict_file(path)
    if variant == "no_caption":
        sd = {k: v for k, v in sd.items() if not k.startswith(CONCH_OPTIONAL_PREFIXES)}
    if variant == "float16":
        sd = {k: v.half() for k, v in sd.items()}
    want = build_conch(tiny=True).eval()
    load_conch_weights(want, sd)
    got = build_loaded(lambda: build_conch(tiny=True), load_conch_weights, sd, source=str(path)).eval()
    assert _no_meta(got) and all(p.dtype == torch.float32 for p in got.parameters())
    if variant == "release":   # the checkpoint's own tensors, not copies: no fallback build ran
        assert got.visual.trunk.norm.weight.data_ptr() == sd["visual.trunk.norm.weight"].data_ptr()
    if variant == "no_caption":
        assert all(not v.any() for k, v in got.state_dict().items() if k.startswith(CONCH_OPTIONAL_PREFIXES))
    x, ids = _images(2, 64), _ids(2, 128, 512)
    assert torch.equal(got.encode_image(x), want.encode_image(x))
    assert torch.equal(got.encode_text(ids), want.encode_text(ids))
    if variant != "float16":
        assert torch.equal(got.encode_image(x), original.encode_image(x))


@torch.no_grad()
def test_keep_built_without_random_init(keep_ckpt):
    path, original = keep_ckpt
    sd = load_state_dict_file(path)
    got = build_loaded(lambda: build_keep(tiny=True), load_keep_weights, sd, source=str(path),
                       buffers=keep_buffers).eval()
    assert _no_meta(got)
    ref = dict(original.text.embeddings.named_buffers())
    for name, buf in got.text.embeddings.named_buffers():   # BERT's non-persistent buffers
        assert torch.equal(buf, ref[name]) and buf.dtype == ref[name].dtype
    key = "visual.blocks.0.attn.qkv.weight"
    assert got.visual.blocks[0].attn.qkv.weight.data_ptr() == sd[key].data_ptr()
    x, ids = _images(2, 32), _ids(2, 256, 256)
    mask = (ids != 0).long()
    assert torch.equal(got.encode_image(x), original.encode_image(x))
    assert torch.equal(got.encode_text(ids, mask), original.encode_text(ids, mask))
    assert torch.equal(got.encode_text(ids), original.encode_text(ids))   # default token types
    # Without the buffers the model cannot be used on the meta device: built the ordinary way.
    plain = build_loaded(lambda: build_keep(tiny=True), load_keep_weights, sd).eval()
    assert _no_meta(plain) and plain.visual.blocks[0].attn.qkv.weight.data_ptr() != sd[key].data_ptr()
    assert torch.equal(plain.encode_text(ids, mask), original.encode_text(ids, mask))


# --- (c) bad checkpoints are rejected with the key named ---------------------------------------

def _conch_sd(conch_ckpt):
    return dict(load_state_dict_file(conch_ckpt[0]))


@pytest.mark.parametrize("case", ["renamed", "missing", "unexpected", "shape"])
def test_bad_conch_checkpoint_names_the_key(conch_ckpt, case):
    sd = _conch_sd(conch_ckpt)
    key = "visual.attn_pool_contrast.ln_q.weight"
    if case == "renamed":
        sd["visual.attn_pool_contrast.ln_q.gamma"] = sd.pop(key)
        expected = [key, "visual.attn_pool_contrast.ln_q.gamma", "1 missing", "1 unexpected"]
    elif case == "missing":
        del sd[key]
        expected = ["1 missing key(s): " + key]
    elif case == "unexpected":
        sd["visual.extra_head.weight"] = torch.zeros(3)
        expected = ["1 unexpected key(s): visual.extra_head.weight"]
    else:
        sd[key] = torch.zeros(7)
        expected = [f"{key} (checkpoint [7], model [32])"]
    with pytest.raises(WeightsError) as err:
        load_conch_weights(build_conch(tiny=True), sd, source="ckpt.bin")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("conch: checkpoint ckpt.bin does not match")
    for part in expected:
        assert part in msg


def test_conch_release_variants(conch_ckpt):
    sd = _conch_sd(conch_ckpt)
    # A full training checkpoint with the captioning decoder: the decoder keys are ignored.
    sd_full = dict(sd, **{"text_decoder.ln_final.weight": torch.ones(64),
                          "text_decoder.text_projection": torch.zeros(64, 512)})
    report = load_conch_weights(build_conch(tiny=True), sd_full)
    assert sorted(report.ignored_unexpected) == ["text_decoder.ln_final.weight", "text_decoder.text_projection"]
    # A release without the captioning pooler loads; encode_image is unaffected by it.
    model = build_conch(tiny=True).eval()
    sd_nocap = {k: v for k, v in sd.items() if not k.startswith(CONCH_OPTIONAL_PREFIXES)}
    load_conch_weights(model, sd_nocap)
    with torch.no_grad():
        assert torch.equal(model.encode_image(_images(1, 64)), conch_ckpt[1].encode_image(_images(1, 64)))
    # Only the named prefixes are tolerated: a missing trunk key still fails.
    del sd_nocap["visual.trunk.norm.bias"]
    with pytest.raises(WeightsError, match=r"visual\.trunk\.norm\.bias"):
        load_conch_weights(build_conch(tiny=True), sd_nocap)


def test_keep_rejects_missing_text_key(keep_ckpt):
    sd = dict(load_state_dict_file(keep_ckpt[0]))
    del sd["text.pooler.dense.weight"]
    with pytest.raises(WeightsError, match=r"keep: .*missing key\(s\): text\.pooler\.dense\.weight"):
        load_keep_weights(build_keep(tiny=True), sd)


def test_strict_load_lists_at_most_ten_keys():
    with pytest.raises(WeightsError) as err:
        strict_load(torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(8)]), {}, model_name="toy")
    assert "16 missing key(s)" in str(err.value) and "(6 more)" in str(err.value)


def test_state_dict_files(tmp_path, conch_ckpt):
    sd = _conch_sd(conch_ckpt)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, wrapped)
    assert list(load_state_dict_file(wrapped)) == list(sd)
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "fake.bin").write_text("not weights either")
    torch.save({"w": torch.zeros(1), "step": 3}, tmp_path / "mixed.pth")

    class Evil:  # a pickle that would run code
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"w": Evil()}, tmp_path / "evil.bin")
    for name, pattern in [("missing.bin", "does not exist"), ("notes.txt", "neither safetensors nor"),
                          ("fake.bin", "could not be read as torch"), ("mixed.pth", "not tensors: step"),
                          ("evil.bin", "could not be read as torch")]:
        with pytest.raises(WeightsError, match=re.escape(str(tmp_path / name)) + ".*" + pattern):
            load_state_dict_file(tmp_path / name)


# --- (d) encoding properties --------------------------------------------------------------------

def _check_embeddings(fn, inputs, dim):
    with torch.no_grad():
        batch = fn(*inputs)
        again = fn(*inputs)
        single = torch.cat([fn(*(t[i:i + 1] for t in inputs)) for i in range(batch.shape[0])])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fn(*inputs)
    assert batch.shape == (inputs[0].shape[0], dim) and batch.dtype == torch.float32
    assert torch.allclose(batch.norm(dim=-1), torch.ones(batch.shape[0]), atol=1e-5)
    assert torch.equal(batch, again)
    assert torch.allclose(single, batch, atol=1e-5)
    assert low.dtype == torch.float32 and F.cosine_similarity(low, batch).min() > 0.99
    assert F.cosine_similarity(batch[:1], batch[1:]).max() < 0.9999  # inputs are told apart


def test_conch_encoding_properties(conch_ckpt):
    model = conch_ckpt[1]
    _check_embeddings(model.encode_image, (_images(4, 64),), 32)
    _check_embeddings(model.encode_text, (_ids(4, 128, 512),), 32)
    with torch.no_grad():  # dynamic image size: another multiple of the patch size works
        assert model.encode_image(_images(2, 96)).shape == (2, 32)


def test_keep_encoding_properties(keep_ckpt):
    model = keep_ckpt[1]
    ids = _ids(4, 256, 256)
    _check_embeddings(model.encode_image, (_images(4, 32),), 32)
    _check_embeddings(model.encode_text, (ids, (ids != 0).long()), 32)
    with torch.no_grad():
        assert model.encode_image(_images(2, 64)).shape == (2, 32)


@torch.no_grad()
def test_conch_text_padding_is_masked(conch_ckpt):
    """The CLS embedding sees the prompt and the first pad position only (CoCa's shifted CLS mask),
    and the last input position is dropped to make room for it."""
    import copy

    model = copy.deepcopy(conch_ckpt[1])
    ids = _ids(2, 128, 512, real=(10, 11))  # 10 tokens, then padding
    base = model.encode_text(ids)
    changed_last = ids.clone()
    changed_last[:, 127] = 5
    assert torch.equal(model.encode_text(changed_last), base)
    pos = model.text.positional_embedding
    pos[11:127] += torch.randn(116, pos.shape[1])  # positions the CLS row cannot see
    assert torch.allclose(model.encode_text(ids), base, atol=1e-6)
    pos[10] += torch.randn(pos.shape[1])  # the first pad position is visible (as in training)
    assert not torch.allclose(model.encode_text(ids), base, atol=1e-3)


@torch.no_grad()
def test_conch_matches_open_clip_coca_blocks(conch_ckpt):
    """Our text tower and pooler equal open_clip's CoCa TextTransformer (legacy CLS mask, the one
    CoCa/CONCH weights were trained with) and AttentionalPooler given the same weights."""
    from open_clip.transformer import AttentionalPooler, TextTransformer

    model = conch_ckpt[1]
    cfg = model.config
    ref = TextTransformer(context_length=cfg.context_length - 1, vocab_size=cfg.vocab_size, width=cfg.text_width,
                          heads=cfg.text_heads, layers=cfg.text_layers, output_dim=cfg.embed_dim, embed_cls=True,
                          pad_id=cfg.pad_id).eval()
    ref.load_state_dict(model.text.state_dict(), strict=True)
    ids = _ids(4, 128, 512)
    ids[3, :127] = torch.arange(1, 128)  # a prompt filling all 127 positions (the CLS sees itself)
    # (Prompts are padded at the end only: open_clip 3.x also hides padding from the non-CLS rows,
    # which CONCH's code did not; the CLS output is the same when padding only follows the prompt.)
    for rows in (slice(0, 3), slice(0, 4)):
        assert torch.allclose(model.encode_text(ids[rows], normalize=False), ref(ids[rows, :-1]), atol=1e-5)

    pool = AttentionalPooler(cfg.embed_dim, cfg.vision_width, n_head=cfg.pool_heads, n_queries=1).eval()
    pool.load_state_dict(model.visual.attn_pool_contrast.state_dict(), strict=True)
    tokens = torch.randn(2, 17, cfg.vision_width)
    assert torch.allclose(model.visual.attn_pool_contrast(tokens), pool(tokens), atol=1e-5)


# --- (e) tokenizers -----------------------------------------------------------------------------

def test_conch_tokenizer(tmp_path, conch_ckpt):
    tok = ConchTokenizer(make_conch_tokenizer(tmp_path / "bpe.json"), vocab_size=512)
    long_prompt = " ".join(["cutaneous spindle cell neoplasm"] * 100)
    ids = tok(["tumor growth", "TUMOR GROWTH", long_prompt])
    assert ids.shape == (3, 128) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.sot_id).all() and (ids[:, -1] == tok.pad_id).all()
    assert torch.equal(ids[0], ids[1])  # the file's normaliser lower-cases
    n = int((ids[0] == tok.eot_id).nonzero()[0])
    assert n > 1 and (ids[0, n + 1:] == tok.pad_id).all() and (ids[0, 1:n] != tok.pad_id).all()
    # Truncation keeps 125 tokens and the end-of-text token at position 126.
    assert ids[2, 126] == tok.eot_id and (ids[2, :126] != tok.pad_id).all()
    emb = conch_ckpt[1].encode_text(ids)
    assert emb.shape == (3, 32) and torch.allclose(emb[0], emb[1])
    # A directory holding one *bpe*.json works; a file without post-processor gets SOT/EOT added.
    assert ConchTokenizer(tmp_path).path == tmp_path / "bpe.json"
    bare = ConchTokenizer(make_conch_tokenizer(tmp_path / "bare.json", post_processor=False))
    assert torch.equal(bare(["tumor growth"]), ids[:1])


def test_conch_tokenizer_errors(tmp_path):
    make_conch_tokenizer(tmp_path / "wrong_pad.json", pad_first=False)
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "nospecial.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    for path, pattern in [(tmp_path / "absent.json", "does not exist"),
                          (tmp_path / "garbage.json", "not a `tokenizers` JSON"),
                          (tmp_path / "nospecial.json", "lacks the special token"),
                          (tmp_path / "wrong_pad.json", "<pad> has id 2"),
                          (tmp_path, "no \\*bpe\\*.json file")]:
        with pytest.raises(WeightsError, match=pattern):
            ConchTokenizer(path)
    with pytest.raises(WeightsError, match="more than the model's 100"):
        ConchTokenizer(make_conch_tokenizer(tmp_path / "x_bpe.json"), vocab_size=100)


def test_keep_tokenizer(tmp_path, keep_ckpt):
    folder = make_keep_tokenizer_dir(tmp_path / "keep")
    tok = KeepTokenizer(folder)
    batch = tok(["Benign TUMOR growth.", "normal tissue", " ".join(["neoplasm"] * 400)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vocab = (folder / "vocab.txt").read_text().split()
    cls, sep, pad = vocab.index("[CLS]"), vocab.index("[SEP]"), vocab.index("[PAD]")
    assert ids.shape == mask.shape == (3, 256)
    assert (ids[:, 0] == cls).all()
    assert ids[0, :6].tolist() == [cls, vocab.index("benign"), vocab.index("tumor"), vocab.index("growth"),
                                   vocab.index("."), sep]
    assert mask[0].sum() == 6 and (ids[0, 6:] == pad).all()
    assert ids[2, 255] == sep and mask[2].all()  # truncated to 256
    emb = keep_ckpt[1].encode_text(ids, mask)
    assert emb.shape == (3, 32)
    assert KeepTokenizer(folder / "vocab.txt").path == folder
    # A hub-style folder: tokenizer.json only, next to a config.json that names remote code
    # (never used: the tokenizer class is fixed).
    tok._tok.save_pretrained(tmp_path / "hub")
    (tmp_path / "hub" / "vocab.txt").unlink(missing_ok=True)
    (tmp_path / "hub" / "config.json").write_text('{"model_type": "keep", "auto_map": {"AutoModel": "modeling_keep.KEEPModel"}}')
    assert torch.equal(KeepTokenizer(tmp_path / "hub")(["Benign TUMOR growth."])["input_ids"], ids[:1])
    with pytest.raises(WeightsError, match="no vocab.txt or tokenizer.json in"):
        KeepTokenizer(tmp_path)
