"""Prompt ensembles: schema validation, shipped files, Eq. 1 class embeddings, prompt key, and
`zeus prompts show`. Encoder-backed tests use the registry's built-in random ViT (a real model)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from zeus_ray.errors import PromptError
from zeus_ray.prompts import class_embeddings, load_prompt_set, parse_prompt_set, prompt_key, text_cosines

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "prompts"
RANDOM_MODEL = "random:vit_tiny_patch16_224"

BASE = {
    "name": "t",
    "description": "test ensemble",
    "templates": ["An image of CLASSNAME.", "CLASSNAME is shown."],
    "classes": [
        {"name": "normal", "classnames": ["normal tissue", "healthy tissue"]},
        {"name": "tumor", "classnames": ["tumor", "neoplasm", "cancer"], "templates": ["Dense CLASSNAME."]},
    ],
    "tumour_class": "tumor",
}


def _write(tmp_path, data, text=None) -> Path:
    p = tmp_path / "set.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    return p


def _edit(fn):
    d = copy.deepcopy(BASE)
    fn(d)
    return d


def _set(path, value):
    def fn(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return fn


def _del(path):
    def fn(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return fn


# (mutation, text the one-line message must contain: the field and the problem)
BAD = {
    "one_class": (_set(["classes"], BASE["classes"][:1]), ["classes:", "at least 2"]),
    "no_classes": (_set(["classes"], []), ["classes:", "at least 2"]),
    "empty_classnames": (_set(["classes", 1, "classnames"], []), ["classes[1] ('tumor').classnames", "empty"]),
    "empty_templates": (_set(["templates"], []), ["templates:", "empty"]),
    "empty_class_templates": (_set(["classes", 1, "templates"], []), ["classes[1] ('tumor').templates", "empty"]),
    "no_placeholder": (_set(["templates", 1], "This is tumour."), ["templates:", "'This is tumour.'", "CLASSNAME"]),
    "class_no_placeholder": (_set(["classes", 1, "templates"], ["Dense tissue."]),
                             ["classes[1] ('tumor').templates", "CLASSNAME"]),
    "lowercase_placeholder": (_set(["templates", 0], "An image of classname."), ["templates:", "CLASSNAME"]),
    "dup_class_name": (_set(["classes", 0, "name"], "tumor"), ["classes:", "duplicate class name 'tumor'"]),
    "dup_classname": (_set(["classes", 1, "classnames"], ["tumor", "neoplasm", "tumor"]),
                      ["classes[1] ('tumor').classnames", "duplicate classname 'tumor'"]),
    "classname_in_two_classes": (_set(["classes", 1, "classnames"], ["tumor", "normal tissue"]),
                                 ["classes:", "'normal tissue'", "'normal' and 'tumor'"]),
    "dup_template": (_set(["templates"], ["An image of CLASSNAME.", "An image of CLASSNAME."]),
                     ["templates:", "duplicate template"]),
    "dup_template_after_strip": (_set(["templates"], ["CLASSNAME.", "  CLASSNAME. "]), ["templates:", "duplicate"]),
    "class_repeats_shared": (_set(["classes", 1, "templates"], ["CLASSNAME is shown."]),
                             ["classes:", "repeats the shared template"]),
    "tumour_not_a_class": (_set(["tumour_class"], "tumour"), ["tumour_class:", "'tumour' is not one of"]),
    "missing_tumour": (_del(["tumour_class"]), ["tumour_class:", "missing"]),
    "missing_classnames": (_del(["classes", 0, "classnames"]), ["classes[0] ('normal').classnames", "missing"]),
    "extra_key": (_set(["tumor_class"], "tumor"), ["tumor_class:", "unknown key"]),
    "extra_class_key": (_set(["classes", 0, "colour"], "red"), ["classes[0] ('normal').colour", "unknown key"]),
    "number_classname": (_set(["classes", 0, "classnames"], ["normal", 5]), ["classes[0] ('normal').classnames[1]"]),
    "blank_classname": (_set(["classes", 0, "classnames"], ["normal", "  "]), ["classes[0] ('normal').classnames[1]"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors_are_one_line_naming_file_and_field(tmp_path, case):
    mutate, expected = BAD[case]
    path = _write(tmp_path, _edit(mutate))
    with pytest.raises(PromptError) as ei:
        load_prompt_set(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"prompt file {path}: ")
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
    ("", "found empty"),
    ("just a string\n", "found a str"),
])
def test_not_yaml_or_not_mapping(tmp_path, text, expected):
    path = _write(tmp_path, None, text)
    with pytest.raises(PromptError) as ei:
        load_prompt_set(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and expected in msg


def test_missing_file_names_path(tmp_path):
    with pytest.raises(PromptError, match=r"prompt file .*nope\.yaml: cannot read"):
        load_prompt_set(tmp_path / "nope.yaml")


def test_prompts_every_classname_times_every_template():
    ps = parse_prompt_set(copy.deepcopy(BASE))
    got = dict(ps.prompts())
    assert list(got) == ["normal", "tumor"] and ps.tumour_index == 1
    assert got["normal"] == ["An image of normal tissue.", "normal tissue is shown.",
                             "An image of healthy tissue.", "healthy tissue is shown."]
    # per-class templates come after the shared ones, for that class only
    assert len(got["tumor"]) == 3 * 3 and got["tumor"][:3] == ["An image of tumor.", "tumor is shown.", "Dense tumor."]
    assert not any("Dense" in p for p in got["normal"])


def test_shipped_files_load_with_stated_counts():
    ai = load_prompt_set(PROMPTS / "ai4skin-leiomyoma.yaml")
    assert ai.class_names == ["normal", "tumor"] and ai.tumour_class == "tumor"
    assert len(ai.templates) == 15 and [len(c.classnames) for c in ai.classes] == [7, 12]
    assert [len(p) for _, p in ai.prompts()] == [7 * 15, 12 * 15]
    assert "AI4SKIN" in ai.source and "reference" in ai.source
    assert "A histopathological image of leiomyoma." in dict(ai.prompts())["tumor"]

    met = load_prompt_set(PROMPTS / "metastasis.yaml")
    assert met.class_names == ["normal", "tumor"] and met.tumour_class == "tumor"
    assert sum(len(p) for _, p in met.prompts()) == sum(len(p) for _, p in ai.prompts()) == 285
    assert "own" in met.source
    tumour_names = " ".join(met.classes[1].classnames)
    assert "tumor" in met.classes[1].classnames and "cancerous tissue" in met.classes[1].classnames
    assert "leiomyoma" not in tumour_names  # no organ / primary-specific context

    mc = load_prompt_set(PROMPTS / "multiclass-skin.yaml")
    assert mc.class_names == ["tumor", "normal", "inflammation", "stroma"] and mc.tumour_index == 0
    assert "example" in mc.source


def test_relative_default_path_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_prompt_set("prompts/metastasis.yaml").name == "metastasis"
    assert load_prompt_set("multiclass-skin").name == "multiclass-skin"  # a built-in set by name


def test_load_from_bucket(s3_bucket):
    import fsspec
    uri = f"s3://{s3_bucket}/prompts/set.yaml"
    with fsspec.open(uri, "w") as f:
        f.write(yaml.safe_dump(BASE))
    ps = load_prompt_set(uri)
    assert ps.path == uri and ps.class_names == ["normal", "tumor"]
    with pytest.raises(PromptError, match=rf"prompt file s3://{s3_bucket}/prompts/missing.yaml: cannot read"):
        load_prompt_set(f"s3://{s3_bucket}/prompts/missing.yaml")


def test_prompt_key_changes_with_content_not_documentation():
    base = copy.deepcopy(BASE)
    k0 = prompt_key(parse_prompt_set(base), "model-a")
    same = [
        _set(["description"], "something else"), _set(["name"], "renamed"),
        _set(["source"], "a paper"), _set(["notes"], "a note"),
    ]
    for fn in same:
        assert prompt_key(parse_prompt_set(_edit(fn)), "model-a") == k0
    changed = [
        _set(["classes", 0, "classnames"], ["normal tissue", "healthy skin"]),      # a classname
        _set(["classes", 0, "classnames"], ["healthy tissue", "normal tissue"]),    # classname order
        _set(["templates"], ["An image of CLASSNAME!", "CLASSNAME is shown."]),     # a template
        _set(["templates"], ["CLASSNAME is shown.", "An image of CLASSNAME."]),     # template order
        _set(["classes", 1, "templates"], ["Dense CLASSNAME!"]),                    # a per-class template
        _set(["classes"], list(reversed(BASE["classes"]))),                         # class order
        _set(["classes", 0, "name"], "benign"),                                     # a class name
        _set(["tumour_class"], "normal"),                                           # the tumour class
    ]
    keys = {prompt_key(parse_prompt_set(_edit(fn)), "model-a") for fn in changed}
    assert len(keys) == len(changed) and k0 not in keys
    assert prompt_key(parse_prompt_set(base), "model-b") != k0


# --- encoder-backed tests -------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder():
    from zeus_ray.config import ModelConfig
    from zeus_ray.encoders.registry import load_encoder
    return load_encoder(ModelConfig(id=RANDOM_MODEL, device="cpu", dtype="float32"))


def test_class_embeddings_match_eq1(encoder):
    ps = load_prompt_set(PROMPTS / "multiclass-skin.yaml")
    w = class_embeddings(encoder, ps)
    assert w.dtype == np.float32 and w.shape == (4, encoder.spec.embed_dim)
    # independent computation: encode each class on its own, normalise, mean, renormalise
    for i, (_, prompts) in enumerate(ps.prompts()):
        e = np.asarray(encoder.encode_texts(prompts), dtype=np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(axis=0)
        np.testing.assert_allclose(w[i], m / np.linalg.norm(m), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-6)
    cos = text_cosines(w)
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-6)
    np.testing.assert_allclose(cos, cos.T, atol=1e-12)
    # different prompts give different class directions (a real text tower, not a constant)
    assert cos[0, 1] < 1 - 1e-4


def test_class_embeddings_follow_class_order(encoder):
    ps = parse_prompt_set(copy.deepcopy(BASE))
    rev = parse_prompt_set(_edit(_set(["classes"], list(reversed(BASE["classes"])))))
    np.testing.assert_allclose(class_embeddings(encoder, ps), class_embeddings(encoder, rev)[::-1], atol=1e-6)


def _zeus(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "zeus_ray", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_prompts_show_prints_counts_cosines_and_key(encoder):
    r = _zeus("prompts", "show", "prompts/ai4skin-leiomyoma.yaml", "--model", RANDOM_MODEL,
              "--set", "model.device=cpu", "--list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "  A histopathological image of leiomyoma." in lines and "  normal growth in a diagnostic slide." in lines
    assert any(l.split() == ["normal", "7", "15", "105"] for l in lines), r.stdout
    assert any(l.split() == ["tumor", "(tumour)", "12", "15", "180"] for l in lines), r.stdout
    assert any(l.split() == ["total", "285"] for l in lines), r.stdout
    i = lines.index("cosine between class embeddings:")
    assert lines[i + 1].split() == ["normal", "tumor"]
    ps = load_prompt_set(PROMPTS / "ai4skin-leiomyoma.yaml")
    cos = text_cosines(class_embeddings(encoder, ps))
    for row, (name, expected) in zip(lines[i + 2:i + 4], zip(ps.class_names, cos)):
        cells = row.split()
        assert cells[0] == name
        np.testing.assert_allclose([float(c) for c in cells[1:]], expected, atol=2e-4)
    assert lines[-1] == f"prompt key: {prompt_key(ps, encoder.model_key)}"


def test_cli_prompts_show_bad_file_is_one_line_error(tmp_path):
    bad = _write(tmp_path, _edit(_set(["tumour_class"], "tumour")))
    r = _zeus("prompts", "show", str(bad), "--model", RANDOM_MODEL)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "tumour_class" in r.stderr and str(bad) in r.stderr
