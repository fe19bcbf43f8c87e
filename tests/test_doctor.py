"""`zeus doctor`: preflight checks against real components (synthetic slides opened with
OpenSlide, a moto S3 server, tiny random CONCH/KEEP checkpoints, the Hugging Face cache layout),
one line per item and the exit status."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _checkpoints import make_conch_tokenizer, make_keep_tokenizer_dir, write_conch_checkpoint, write_keep_checkpoint
from _cohort import make_cohort

from zeus_ray.config import load_config
from zeus_ray.doctor.checks import cluster_lines, run_doctor, sample
from zeus_ray.encoders.fetch import fetch_model
from zeus_ray.demo.synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]
TINY = "model.id=random:vit_tiny_patch16_224"


def doctor(config=None, *sets, address=None, n=5):
    lines: list[str] = []
    counts = run_doctor(config, list(sets), address, n, echo=lines.append)
    assert lines[-1] == f"zeus doctor: {counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failures"
    assert all(ln[:5] in ("ok   ", "warn ", "fail ") and "\n" not in ln for ln in lines[:-1])
    return lines[:-1], counts


def fails(lines):
    return [ln[5:] for ln in lines if ln.startswith("fail")]


def line(lines, start):
    hits = [ln for ln in lines if ln[5:].startswith(start)]
    assert len(hits) == 1, (start, lines)
    return hits[0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n=3)


@pytest.fixture
def clean_hub(tmp_path, monkeypatch):
    """No Hugging Face token and an empty hub cache (HF_HOME in a fresh folder)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def test_a_good_local_setup_passes(cohort, tmp_path):
    out = tmp_path / "new" / "out"
    lines, counts = doctor(None, f"input.manifest={cohort}", f"output.root={out}", TINY,
                           f"cache.dir={tmp_path / 'cache'}")
    assert counts["fail"] == 0 and counts["warn"] == 0, lines
    assert line(lines, "slides: all 3 exist").startswith("ok")
    assert line(lines, "annotation files: all 3 exist").startswith("ok")
    for sid in ("syn-0", "syn-1", "syn-2"):
        assert "0.5 µm/px (metadata)" in line(lines, f"slide {sid}: opens (2400 × 1800 px, 3 levels)")
        assert line(lines, f"annotation of slide {sid}: polygons").startswith("ok")
    assert "built-in random weights" in line(lines, "weights:")
    assert line(lines, "output.root").startswith("ok")
    assert not (tmp_path / "new").exists()   # the probe and the folders it needed are gone again
    line(lines, "devices:")
    line(lines, "ray: no cluster address")
    assert "not used" in line(lines, "slide cache")


def test_sample_is_deterministic_and_spread():
    assert sample(list(range(10)), 3) == [0, 4, 9]
    assert sample(list(range(10)), 3) == sample(list(range(10)), 3)
    assert sample(list(range(4)), 9) == [0, 1, 2, 3] and sample(list(range(4)), 1) == [0]
    assert sample(list(range(4)), 0) == []


def test_slides_in_s3_with_one_missing_key(cohort, s3_bucket, tmp_path):
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    rows = cohort.read_text().splitlines() + ["ghost,ghost.svs,,synthetic,A,"]
    for name in ("syn-0.svs", "syn-1.svs", "syn-2.svs", "syn-0.geojson", "syn-1.geojson", "syn-2.geojson"):
        fs.put_file(str(cohort.parent / name), f"{s3_bucket}/cohort/{name}")
    fs.pipe_file(f"{s3_bucket}/cohort/manifest.csv", ("\n".join(rows) + "\n").encode())
    lines, counts = doctor(None, f"input.manifest=s3://{s3_bucket}/cohort/manifest.csv", TINY,
                           f"output.root=s3://{s3_bucket}/out", f"cache.dir={tmp_path / 'cache'}",
                           "cache.max_gb=1000000", n=2)
    assert fails(lines) == [f"slides: 1 of 4 missing: ghost (s3://{s3_bucket}/cohort/ghost.svs); fix the uris in "
                            f"the manifest or upload the files"]
    assert counts["fail"] == 1
    # The sample is taken from the slides that exist; they open from the bucket through the cache.
    assert "0.5 µm/px (metadata)" in line(lines, "slide syn-0: opens")
    assert "0.5 µm/px (metadata)" in line(lines, "slide syn-2: opens")
    assert line(lines, "annotation files: all 3 exist").startswith("ok")
    assert line(lines, f"output.root s3://{s3_bucket}/out: writable").startswith("ok")
    assert not fs.exists(f"{s3_bucket}/out")   # the probe object is removed
    # A million-GB cache limit cannot fit on this disk: a warning, not a failure.
    assert line(lines, f"slide cache {tmp_path / 'cache'}").startswith("warn")
    assert "lower cache.max_gb" in line(lines, "slide cache")


def test_missing_mpp_and_objective_power_only(tmp_path):
    for sid, meta in (("nompp", "none"), ("power", "objective-power")):
        write_synthetic_slide(tmp_path / f"{sid}.svs", 1200, 900, 0.5, metadata=meta, seed=1)
    (tmp_path / "m.csv").write_text("slide_id,uri,mpp\nnompp,nompp.svs,\npower,power.svs,\nfixed,nompp.svs,0.5\n")
    lines, counts = doctor(None, f"input.manifest={tmp_path / 'm.csv'}", TINY, f"output.root={tmp_path / 'o'}")
    assert counts["fail"] == 1
    assert fails(lines)[0].startswith("slide 'nompp': no µm/px") and "mpp" in fails(lines)[0]
    assert "assumed from the objective power" in line(lines, "slide power: opens")
    assert line(lines, "slide power: opens").startswith("warn")
    assert "0.5 µm/px (override)" in line(lines, "slide fixed: opens")


def test_annotations_of_the_sample_parse(cohort, tmp_path):
    import json
    d = cohort.parent
    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    square = {"type": "Polygon", "coordinates": [[[0, 0], [500, 0], [500, 500], [0, 500], [0, 0]]]}
    (tmp_path / "stroma.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": square, "properties": {"classification": {"name": "Stroma"}}}]}))
    (tmp_path / "m.csv").write_text(f"slide_id,uri,annotation_uri\na,{d / 'syn-0.svs'},{tmp_path / 'broken.geojson'}\n"
                                    f"b,{d / 'syn-1.svs'},{tmp_path / 'stroma.geojson'}\n"
                                    f"c,{d / 'syn-2.svs'},{d / 'syn-2.geojson'}\n")
    lines, counts = doctor(None, f"input.manifest={tmp_path / 'm.csv'}", TINY, f"output.root={tmp_path / 'o'}")
    bad = line(lines, "annotation of slide a:")
    assert bad.startswith("fail") and str(tmp_path / "broken.geojson") in bad
    assert line(lines, "annotation of slide b: no region counts as tumour (classes in the file: Stroma)").startswith("warn")
    assert line(lines, "annotation of slide c: polygons").startswith("ok")
    assert counts["fail"] == 1


def test_gated_model_without_a_token_says_how_to_log_in(cohort, tmp_path, clean_hub, monkeypatch):
    sets = [f"input.manifest={cohort}", "model.id=conch", f"output.root={tmp_path / 'o'}"]
    lines, counts = doctor(None, *sets, n=0)
    token = line(lines, "hub token:")
    assert token.startswith("fail") and "hf auth login" in token and "HF_TOKEN" in token
    assert "https://huggingface.co/MahmoodLab/conch" in token and "zeus models fetch conch" in token
    assert line(lines, "weights: hub repo MahmoodLab/conch is not cached here and is gated").startswith("fail")
    assert counts["fail"] >= 2
    # With a token (never printed) and offline: the token is reported present, the cache is empty.
    secret = "hf_doctor_test_secret_token_value"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines, _ = doctor(None, *sets, n=0)
    assert not any(secret in ln for ln in lines)
    assert line(lines, "hub token:") == "ok   hub token: present, from HF_TOKEN"
    assert "HF_HUB_OFFLINE=1" in line(lines, "weights:") and line(lines, "weights:").startswith("fail")
    # A token file from `hf auth login` in HF_HOME counts too.
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(secret)
    assert "token file" in line(doctor(None, *sets, n=0)[0], "hub token:")


def test_conch_weights_and_tokenizer(cohort, tmp_path, clean_hub):
    src = tmp_path / "src"
    src.mkdir()
    write_conch_checkpoint(src)
    fetch_model("conch", str(tmp_path / "conch"), source=str(src), echo=lambda _: None)
    sets = [f"input.manifest={cohort}", "model.id=conch", f"model.weights={tmp_path / 'conch'}",
            f"output.root={tmp_path / 'o'}"]
    missing = tmp_path / "nowhere" / "conch_byte_level_bpe_uncased.json"
    lines, _ = doctor(None, *sets, f"model.tokenizer={missing}", n=0)
    assert "sizes match zeus_weights.json" in line(lines, "weights: 1 file(s)")
    assert not any(ln[5:].startswith("hub token") for ln in lines)   # weights do not come from the hub
    assert fails(lines) == [f"CONCH tokenizer {missing} does not exist; set model.tokenizer to the "
                            f"conch_byte_level_bpe_uncased.json file of the official CONCH package"]
    # No tokenizer at all (and no official package installed): the file to give is named.
    lines, _ = doctor(None, *sets, n=0)
    assert "model.tokenizer=/path/to/conch_byte_level_bpe_uncased.json" in line(lines, "tokenizer:")
    tok = make_conch_tokenizer(tmp_path / "conch_bpe.json")
    lines, counts = doctor(None, *sets, f"model.tokenizer={tok}", n=0)
    assert line(lines, "tokenizer:") == f"ok   tokenizer: CONCH BPE file {tok}" and counts["fail"] == 0
    # A truncated copy (size differs from the manifest) is caught without hashing.
    w = tmp_path / "conch" / "pytorch_model.bin"
    w.write_bytes(w.read_bytes()[:-100])
    lines, _ = doctor(None, *sets, f"model.tokenizer={tok}", n=0)
    assert fails(lines)[0].startswith(f"model 'conch': {w} has ") and "zeus_weights.json lists" in fails(lines)[0]


def test_keep_weights_in_a_bucket_need_their_vocabulary(cohort, tmp_path, s3_bucket):
    import s3fs
    src = tmp_path / "keep"
    src.mkdir()
    write_keep_checkpoint(src)
    s3fs.S3FileSystem(skip_instance_cache=True).put_file(str(src / "model.safetensors"),
                                                         f"{s3_bucket}/keep/model.safetensors")
    sets = [f"input.manifest={cohort}", "model.id=keep", f"model.weights=s3://{s3_bucket}/keep",
            f"output.root={tmp_path / 'o'}"]
    lines, _ = doctor(None, *sets, n=0)
    assert "not checked by hash" in line(lines, "weights: 1 file(s)")
    assert fails(lines) == ["tokenizer: no vocab.txt/vocab.json or tokenizer.json beside the weights of keep; copy "
                            "the repo's tokenizer files there or give --set model.tokenizer=/path/to/dir"]
    make_keep_tokenizer_dir(src)
    s3fs.S3FileSystem(skip_instance_cache=True).put_file(str(src / "vocab.txt"), f"{s3_bucket}/keep/vocab.txt")
    lines, counts = doctor(None, *sets, n=0)
    assert counts["fail"] == 0 and line(lines, "tokenizer:").startswith("ok")
    lines, _ = doctor(None, *sets[:2], f"model.weights=s3://{s3_bucket}/nope", sets[3], n=0)
    assert "does not exist in the bucket" in fails(lines)[0]


def test_unwritable_output_roots_fail(cohort, tmp_path, s3_server):
    # Tests run as root, where a chmod-ed folder stays writable: a path under a regular file cannot
    # be created by anyone, and a bucket that does not exist cannot be written either.
    (tmp_path / "plain-file").write_text("x")
    roots = [str(tmp_path / "plain-file" / "out"), "s3://zeus-no-such-bucket-doctor/out"]
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o500)
        roots.append(str(ro))
    for root in roots:
        lines, counts = doctor(None, f"input.manifest={cohort}", TINY, f"output.root={root}", n=0)
        out = line(lines, f"output.root {root} is not writable")
        assert out.startswith("fail") and "set output.root to a folder or bucket" in out
        assert counts["fail"] == 1


def test_bad_config_and_bad_manifest_do_not_hide_the_rest(tmp_path, cohort):
    lines, counts = doctor(None, "tiling.overlapp=0.5")
    assert len(lines) == 1 and counts["fail"] == 1   # nothing else can be checked without a config
    assert lines[0].startswith("fail ") and "tiling.overlapp" in lines[0] and "unknown key" in lines[0]
    lines, counts = doctor(None, f"input.manifest={tmp_path / 'none.csv'}", TINY, f"output.root={tmp_path / 'o'}")
    assert fails(lines) == [f"input.manifest {tmp_path / 'none.csv'}: file not found"]
    for later in ("weights:", "tokenizer:", "output.root", "devices:", "ray:", "slide cache"):
        line(lines, later)   # every check that does not need the slides still ran


def test_ray_address_checks(cohort, tmp_path):
    import socket
    with socket.socket() as s:   # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines, counts = doctor(None, f"input.manifest={cohort}", TINY, f"output.root={tmp_path / 'o'}",
                           address=f"127.0.0.1:{port}", n=0)
    assert line(lines, f"ray: cannot reach the Ray cluster at 127.0.0.1:{port}").startswith("fail")
    cfg = load_config(None, [TINY, "model.device=cuda", "ray.reader_resources={cpu_pool: 0.01}",
                             "ray.encoder_resources={gpu_pool: 0.01}"])
    got = cluster_lines("head:6379", {"resources": {"CPU": 64.0, "GPU": 0.0, "cpu_pool": 4.0}, "nodes": 4}, cfg)
    assert got[0] == ("ok", "ray cluster at head:6379: 4 node(s), 64 CPUs, 0 GPUs")
    assert [s for s, _ in got[1:]] == ["warn", "ok", "warn"]
    assert "'gpu_pool' (ray.encoder_resources) is not in the cluster now" in got[3][1]


def test_cli_exit_status_and_summary(cohort, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(f"input:\n  manifest: {cohort}\noutput:\n  root: {tmp_path / 'o'}\n"
                    f"model:\n  id: random:vit_tiny_patch16_224\n")
    run = subprocess.run([sys.executable, "-m", "zeus_ray", "doctor", str(good), "--sample", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("zeus doctor: ") and last.endswith(" ok, 0 warnings, 0 failures")
    (tmp_path / "plain").write_text("a file, not a folder")
    run = subprocess.run([sys.executable, "-m", "zeus_ray", "doctor", str(good), "--sample", "0",
                          "--set", f"output.root={tmp_path / 'plain' / 'x'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    out = run.stdout.strip().splitlines()
    assert out[-1].endswith(" ok, 1 warnings, 1 failures")   # the warning: --sample 0
    assert any(ln.startswith(f"fail output.root {tmp_path / 'plain' / 'x'} is not writable") for ln in out)
