"""The cohort job end to end on a real local Ray: synthetic and real slides, bad inputs, re-runs,
an interrupted run resumed, cached embeddings on a prompt change."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from _cohort import completed_results as _results, job_config, make_cohort
from zeus_ray.engine.driver import run_cohort

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local(s3_server):   # the S3 server first, so Ray workers inherit its endpoint
    import ray
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n=3)


def _mask(d: Path) -> np.ndarray:
    return np.array(Image.open(next(d.glob("mask_*mpp.png"))))


def _sims(d: Path) -> pd.DataFrame:
    return pq.read_table(d / "similarities.parquet").to_pandas().sort_values("tile_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def full_run(ray_local, cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = run_cohort(job_config(cohort, out), progress=False)
    return out, summary


def test_full_run_outputs(full_run):
    out, summary = full_run
    assert (summary.ok, summary.failed, summary.skipped) == (3, 0, 0)
    res = _results(out)
    assert sorted(res) == ["syn-0", "syn-1", "syn-2"]
    total = 0
    for sid, d in res.items():
        tiles = pq.read_table(next(out.glob(f"slides/{sid}/tiles/*/tiles.parquet")))
        emb = pq.read_table([str(p) for p in out.glob(f"slides/{sid}/embeddings/*/*/pass-*.parquet")])
        sims = _sims(d)
        assert len(tiles) == len(emb) == len(sims) > 20
        assert sorted(emb["tile_id"].to_pylist()) == sorted(tiles["tile_id"].to_pylist())
        assert {"sim_normal", "sim_tumor", "prompt_key", "model_key"} <= set(sims.columns)
        vec = np.stack(emb["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
        np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=2e-3)
        mask = _mask(d)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        for f in ("prediction.geojson", "mask.tiff", "overlay.jpg", "maps.npz", "metrics.json", "result.json"):
            assert (d / f).exists(), f
        total += len(tiles)
    assert summary.tiles_encoded == total
    table = pd.read_csv(next(out.glob("cohort/*/slides.csv")))
    assert set(table["status"]) == {"ok"} and table["dice"].between(0, 1).all()
    assert next(out.glob("cohort/*/table1.md")).read_text().count("±") >= 3


def test_split_shape_on_cpu_nodes_gives_the_same_results(full_run, cohort, tmp_path):
    """ray.fuse_read_encode=off on a 2-CPU local Ray: plan and reader tasks beside encoder actors on
    the same CPUs (the GPU shape). It completes (the pool grows from encoders_min rather than
    taking every CPU first) with the fused run's tiles, similarities and masks."""
    import logging
    ref_out, _ = full_run
    out = tmp_path / "out"

    class Seen(logging.Handler):   # Ray Data's console lines (its issue detector warned on our memory request)
        lines: list = []

        def emit(self, record):
            self.lines.append(f"{record.levelname} {record.getMessage()}")
    seen = Seen(logging.WARNING)
    logging.getLogger("ray.data").addHandler(seen)
    try:
        summary = run_cohort(job_config(cohort, out, "ray.fuse_read_encode=off"), progress=False)
    finally:
        logging.getLogger("ray.data").removeHandler(seen)
    assert (summary.ok, summary.failed) == (3, 0) and "reader tasks" in summary.pool
    assert not seen.lines, seen.lines
    ref, got = _results(ref_out), _results(out)
    assert sorted(got) == sorted(ref)
    for sid in ref:
        a, b = _sims(got[sid]), _sims(ref[sid])
        assert a["tile_id"].tolist() == b["tile_id"].tolist()
        np.testing.assert_allclose(a[["sim_normal", "sim_tumor"]], b[["sim_normal", "sim_tumor"]], atol=1e-4)
        assert np.array_equal(_mask(got[sid]), _mask(ref[sid])), sid


def test_rerun_skips_complete_slides(full_run, cohort):
    out, _ = full_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("slides/**/*") if p.is_file()}
    summary = run_cohort(job_config(cohort, out), progress=False)
    assert (summary.ok, summary.skipped, summary.tiles_encoded) == (3, 3, 0)
    after = {p: p.stat().st_mtime_ns for p in out.glob("slides/**/*") if p.is_file()}
    assert after == before   # nothing under slides/ rewritten


def test_prompt_change_reuses_embeddings(full_run, cohort):
    out, _ = full_run
    old = _results(out)
    old_masks = {sid: _mask(d) for sid, d in old.items()}
    summary = run_cohort(job_config(cohort, out, "prompts.file=prompts/multiclass-skin.yaml"), progress=False)
    assert (summary.ok, summary.skipped, summary.tiles_encoded) == (3, 0, 0)   # no image encoded
    new = {p.parents[3].name: p.parent for p in out.glob("slides/*/results/*/*/_COMPLETE.json")
           if p.parent != old.get(p.parents[3].name)}
    assert sorted(new) == ["syn-0", "syn-1", "syn-2"]
    for sid, d in new.items():
        assert {"sim_inflammation", "sim_stroma"} <= set(_sims(d).columns)
        assert np.array_equal(_mask(old[sid]), old_masks[sid])   # earlier results intact


def test_adaptive_overlap_in_the_pipeline(full_run, cohort, tmp_path):
    """margin = inf encodes every tile: the full-overlap masks exactly. The default margin encodes
    fewer tiles; a run cut inside a later pass resumes by encoding only that pass's tiles."""
    ref = _results(full_run[0])
    out_all = tmp_path / "all"
    s_all = run_cohort(job_config(cohort, out_all, "tiling.mode=adaptive", "tiling.adaptive_margin=.inf"),
                       progress=False)
    assert s_all.ok == 3 and s_all.tiles_stored == s_all.tiles_full == s_all.tiles_encoded
    for sid, d in _results(out_all).items():
        assert np.array_equal(_mask(d), _mask(ref[sid])), sid
        np.testing.assert_allclose(_sims(d)["sim_tumor"], _sims(ref[sid])["sim_tumor"], atol=1e-4)

    out = tmp_path / "adaptive"
    # This random encoder calls nearly all tissue tumour (no contour for margin 0 to refine): a
    # margin near its median tumour-minus-normal similarity makes several passes.
    cfg = job_config(cohort, out, "tiling.mode=adaptive", "tiling.adaptive_margin=0.085",
                     "ray.max_slides_in_flight=2")
    s1 = run_cohort(cfg, progress=False)   # at most 2 slides in flight
    assert s1.ok == 3 and s1.tiles_encoded == s1.tiles_stored < s1.tiles_full, [r.get("error") for r in s1.rows]
    assert "adaptive overlap" in s1.line()
    res = _results(out)
    rows = {sid: __import__("json").loads((d / "result.json").read_text()) for sid, d in res.items()}
    assert all(r["n_tiles"] <= r["n_tiles_full"] for r in rows.values())
    assert sum(r["n_tiles"] for r in rows.values()) == s1.tiles_stored
    # Cut slide syn-0 back to the middle of its last pass: results, marker and that pass's last part gone.
    emb_dir = next(out.glob("slides/syn-0/embeddings/*/*"))
    parts = sorted(emb_dir.glob("pass-*.parquet"))
    assert len({p.name[:7] for p in parts}) >= 2     # several passes
    lost = pq.read_table(parts[-1]).num_rows
    mask_before = _mask(res["syn-0"])
    import shutil
    shutil.rmtree(res["syn-0"])
    for f in [parts[-1], emb_dir / "_COMPLETE.json"]:
        f.unlink()
    s2 = run_cohort(cfg, progress=False)
    assert (s2.ok, s2.skipped, s2.tiles_encoded) == (3, 2, lost)
    assert np.array_equal(_mask(_results(out)["syn-0"]), mask_before)

    # Re-prompting: the new classes move the contours; only tiles not stored yet are encoded, in new
    # pass files, and the summary says how many (of the stored total against full overlap's).
    from zeus_ray.commands.reprompt import reprompt_config
    stored = {p: set(pq.read_table(p)["tile_id"].to_pylist()) for p in out.glob("slides/*/embeddings/*/*/pass-*.parquet")}
    s3 = run_cohort(reprompt_config(str(out), "prompts/multiclass-skin.yaml", None, [], None), progress=False,
                    reprompt=True)
    new = {p: set(pq.read_table(p)["tile_id"].to_pylist())
           for p in out.glob("slides/*/embeddings/*/*/pass-*.parquet") if p not in stored}
    n_new = sum(len(v) for v in new.values())
    assert s3.ok == 3 and s3.tiles_encoded == n_new == s3.tiles_stored - s1.tiles_stored > 0
    for p, ids in new.items():
        old_ids = set().union(*[v for q, v in stored.items() if q.parent == p.parent])
        assert not ids & old_ids, p
    assert f"{n_new} tiles encoded" in s3.line() and f"adaptive overlap: {s3.tiles_stored} of" in s3.line()
    s4 = run_cohort(reprompt_config(str(out), "prompts/multiclass-skin.yaml", None, [], None), progress=False,
                    reprompt=True)
    assert (s4.skipped, s4.tiles_encoded) == (3, 0)


def test_adaptive_mode_gives_bad_slides_error_rows(ray_local, slides_dir, tmp_path):
    """In adaptive mode too, a slide that fails (at open, or at its first pass's reads) gets one
    error row and the others complete; a re-run retries only the failed ones."""
    rows = [f"unreadable,{slides_dir / 'unreadable.svs'},,bad,Z,", f"missing,{tmp_path / 'nope.svs'},,bad,Z,"]
    manifest = make_cohort(tmp_path / "c", n=1, extra_rows=rows)
    cfg = job_config(manifest, tmp_path / "out", "tiling.mode=adaptive")
    s = run_cohort(cfg, progress=False)
    assert (s.ok, s.failed) == (1, 2) and s.tiles_stored < s.tiles_full
    errors = pd.read_csv(next((tmp_path / "out").glob("cohort/*/errors.csv"))).set_index("slide_id")
    assert sorted(errors.index) == ["missing", "unreadable"]
    assert all("\n" not in e and sid in e for sid, e in errors["error"].items())
    assert not list((tmp_path / "out").glob("slides/unreadable/embeddings/*/*/pass-*.parquet"))
    again = run_cohort(cfg, progress=False)
    assert (again.ok, again.skipped, again.failed, again.tiles_encoded) == (1, 1, 2, 0)


def test_bad_slides_get_error_rows_and_the_rest_completes(ray_local, slides_dir, tmp_path):
    rows = [f"cmu,{slides_dir / 'CMU-1-Small-Region.svs'},,real,X,",
            f"tcga-override,{slides_dir / 'TCGA-CR-7395-01A-01-TS1.svs'},,real,Y,0.25",
            f"tcga-nompp,{slides_dir / 'TCGA-CR-7395-01A-01-TS1.svs'},,real,Y,",
            f"broken,{slides_dir / 'broken.svs'},,bad,Z,",
            f"unreadable,{slides_dir / 'unreadable.svs'},,bad,Z,",
            f"missing,{tmp_path / 'nope.svs'},,bad,Z,"]
    manifest = make_cohort(tmp_path / "c", n=1, extra_rows=rows)
    out = tmp_path / "out"
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(f"input: {{manifest: {manifest}}}\noutput: {{root: {out}}}\n"
                        f"model: {{id: 'random:vit_tiny_patch16_224'}}\ncache: {{dir: {tmp_path / 'cache'}}}\n")
    p = subprocess.run([sys.executable, "-m", "zeus_ray", "run", str(cfg_file), "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert "3 slides ok" in last and "4 failed" in last, p.stdout
    # A quiet console: our lines only, even with failing slides (no Ray notices, no tracebacks).
    console = p.stdout + p.stderr
    for noise in ("Token authentication", "core_worker", "Traceback", "EncodeWorker pid", "progress bar",
                  "ERROR", "issue detector"):
        assert noise not in console, (noise, console[-3000:])
    assert all(ln.startswith(("INFO zeus_ray", "WARNING zeus_ray", "failed: ", "annotation classes of ", "zeus run: "))
               for ln in console.strip().splitlines()), console[-3000:]
    errors = pd.read_csv(next(out.glob("cohort/*/errors.csv"))).set_index("slide_id")
    assert sorted(errors.index) == ["broken", "missing", "tcga-nompp", "unreadable"]
    assert "mpp" in errors.loc["tcga-nompp", "error"] and "tcga-nompp" in errors.loc["tcga-nompp", "error"]
    assert "unsupported" in errors.loc["broken", "error"].lower() or "not a slide" in errors.loc["broken", "error"]
    assert all("\n" not in e for e in errors["error"])
    assert sorted(_results(out)) == ["cmu", "syn-0", "tcga-override"]


def test_interrupted_run_resumes_identically(ray_local, tmp_path):
    """A driver killed mid-run (on a cluster that stays up), then resumed, gives the outputs of an
    undisturbed run; slides finished before the kill are not recomputed."""
    import ray
    cohort = make_cohort(tmp_path / "cohort", n=6)
    ref_out = tmp_path / "ref"
    run_cohort(job_config(cohort, ref_out), progress=False)
    out = tmp_path / "out"
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(f"input: {{manifest: {cohort}}}\noutput: {{root: {out}}}\n"
                        f"model: {{id: 'random:vit_tiny_patch16_224', batch_size: 16}}\n"
                        f"cache: {{dir: {tmp_path / 'cache'}}}\n")
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "zeus_ray", "run", str(cfg_file), "--no-progress",
                             "--address", address], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not _results(out):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)      # the driver dies once its first slide is complete
    proc.wait(120)
    first, stable_since = _results(out), time.time()
    while time.time() - stable_since < 8:    # nothing the dead driver started may commit later
        time.sleep(0.5)
        if _results(out) != first:
            first, stable_since = _results(out), time.time()
    assert 1 <= len(first) < 6, "the kill came too late to test a resume"
    stamps = {sid: (d / "_COMPLETE.json").stat().st_mtime_ns for sid, d in first.items()}
    summary = run_cohort(job_config(cohort, out), progress=False)
    assert summary.ok == 6 and summary.skipped == len(first)
    res, ref = _results(out), _results(ref_out)
    assert sorted(res) == sorted(ref)
    for sid in ref:
        assert np.array_equal(_mask(res[sid]), _mask(ref[sid])), sid
        a, b = _sims(res[sid]), _sims(ref[sid])
        assert a["tile_id"].tolist() == b["tile_id"].tolist()
        np.testing.assert_allclose(a["sim_tumor"], b["sim_tumor"], atol=1e-4)
    for sid, t in stamps.items():   # finished slides were not recomputed
        assert (res[sid] / "_COMPLETE.json").stat().st_mtime_ns == t


def test_slides_and_outputs_in_s3(ray_local, s3_server, s3_bucket, slides_dir, tmp_path):
    import boto3
    import fsspec
    local = make_cohort(tmp_path / "c", n=1).parent
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for name in ("syn-0.svs", "syn-0.geojson"):
        s3.upload_file(str(local / name), s3_bucket, f"cohort/{name}")
    s3.upload_file(str(slides_dir / "CMU-1-Small-Region.svs"), s3_bucket, "cohort/cmu.svs")
    manifest = ("slide_id,uri,annotation_uri,dataset,center\n"
                "syn-0,syn-0.svs,syn-0.geojson,synthetic,A\n"   # relative to the manifest's folder
                f"cmu,s3://{s3_bucket}/cohort/cmu.svs,,real,B\n"
                f"gone,s3://{s3_bucket}/cohort/gone.svs,,real,B\n")
    s3.put_object(Bucket=s3_bucket, Key="cohort/manifest.csv", Body=manifest.encode())
    out = f"s3://{s3_bucket}/results"
    cfg = job_config(f"s3://{s3_bucket}/cohort/manifest.csv", out, cache=tmp_path / "cache")
    summary = run_cohort(cfg, progress=False)
    assert (summary.ok, summary.failed) == (2, 1)
    fs = fsspec.filesystem("s3")
    markers = fs.glob(f"{s3_bucket}/results/slides/*/results/*/*/_COMPLETE.json")
    assert sorted(m.split("/")[3] for m in markers) == ["cmu", "syn-0"]
    errors = pd.read_csv(io.BytesIO(fs.cat(fs.glob(f"{s3_bucket}/results/cohort/*/errors.csv")[0])))
    assert errors["slide_id"].tolist() == ["gone"] and "s3://" in errors["error"][0]
    emb = pq.read_table(io.BytesIO(fs.cat(fs.glob(f"{s3_bucket}/results/slides/cmu/embeddings/*/*/pass-*.parquet")[0])))
    assert emb.num_rows > 0
    again = run_cohort(cfg, progress=False)            # complete slides in the bucket are skipped
    assert again.skipped == 2 and again.tiles_encoded == 0


def test_prompt_ablation_from_cached_embeddings(full_run, cohort):
    from zeus_ray.commands.reprompt import reprompt_config
    from zeus_ray.encoders.registry import load_encoder
    from zeus_ray.engine.prompt_ablation import encode_prompts, run_ablation, variant_matrices, variants
    from zeus_ray.prompts import class_embeddings, load_prompt_set, parse_prompt_set
    out, _ = full_run
    cfg = reprompt_config(str(out), "prompts/ai4skin-leiomyoma.yaml", None, [], None)
    per_slide, table, where = run_ablation(cfg)
    ps = load_prompt_set("prompts/ai4skin-leiomyoma.yaml")
    assert per_slide["variant"].nunique() == 1 + 7 + 12 + 15 and per_slide["slide_id"].nunique() == 3
    # The full ensemble reproduces the run's Dice.
    run = pd.read_csv(Path(where).parent / "slides.csv")   # the run with the same prompt key
    full = per_slide[per_slide["variant"] == "full"].set_index("slide_id")["dice"]
    np.testing.assert_allclose(full.sort_index(), run.set_index("slide_id")["dice"].sort_index(), atol=1e-9)
    # A leave-one-template-out class matrix equals Eq. 1 on the prompt file without that template.
    enc = load_encoder(cfg.model)
    vs = variants(ps)
    mats = variant_matrices(encode_prompts(enc, ps), vs)
    t = ps.templates[3]
    v = [i for i, x in enumerate(vs) if x.name == "-template " + t.replace("CLASSNAME", "…")][0]
    data = ps.model_dump()
    data["templates"] = [x for x in data["templates"] if x != t]
    np.testing.assert_allclose(mats[v], class_embeddings(enc, parse_prompt_set(data)), atol=1e-5)
    assert (Path(where) / "summary.md").read_text().count("|") > 30
    report = (Path(where).parent / "report.html").read_text()
    assert 'id="ablation"' in report and report.count("-template ") >= 15


def test_reprompt_reads_no_slide(full_run, cohort, tmp_path):
    """With every slide file moved away, a re-prompt still completes from the stored embeddings."""
    from zeus_ray.commands.reprompt import reprompt_config
    out, _ = full_run
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    slides = sorted(cohort.parent.glob("*.svs"))
    for s in slides:
        s.rename(hidden / s.name)
    try:
        cfg = reprompt_config(str(out), "prompts/metastasis.yaml", "random:vit_tiny_patch16_224", [], None)
        summary = run_cohort(cfg, progress=False, reprompt=True)
        assert (summary.ok, summary.failed, summary.tiles_encoded) == (3, 0, 0)
        keys = {p.parent.name for p in out.glob("slides/syn-0/results/*/*/_COMPLETE.json")}
        assert summary.prompt_key in keys and len(keys) >= 2      # earlier results kept beside it
        # A slide with no stored embeddings is reported, not read.
        extra = cohort.parent / "manifest-extra.csv"
        extra.write_text(cohort.read_text() + f"newcomer,{hidden / slides[0].name},,synthetic,A,\n")
        cfg2 = reprompt_config(str(out), "prompts/metastasis.yaml", None, [f"input.manifest={extra}"], None)
        s2 = run_cohort(cfg2, progress=False, reprompt=True)
        assert (s2.ok, s2.failed, s2.skipped) == (3, 1, 3)
        assert "run `zeus run`" in [r for r in s2.rows if r["slide_id"] == "newcomer"][0]["error"]
    finally:
        for s in slides:
            (hidden / s.name).rename(s)


def test_unusable_model_or_cluster_is_one_line(tmp_path):
    """Weights that cannot be found, or a Ray address nobody listens on: exit 2 with one line
    naming the problem and the fix, no traceback."""
    import socket
    manifest = make_cohort(tmp_path / "c", n=1)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                   # closed once the block ends
    for extra, want in ((["--set", "model.id=keep"], "model 'keep': model files not found"),
                        (["--address", f"127.0.0.1:{port}"], f"cannot reach the Ray cluster at 127.0.0.1:{port}")):
        p = subprocess.run([sys.executable, "-m", "zeus_ray", "run", "--no-progress", "--set",
                            f"input.manifest={manifest}", "--set", f"output.root={tmp_path / 'out'}", *extra],
                           capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert p.returncode == 2, p.stderr[-2000:]
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and want in errors[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr and "EncodeWorker" not in p.stderr, p.stderr[-2000:]


def test_largest_slides_are_sent_first(ray_local, tmp_path, monkeypatch):
    """A slide is one worker's call: the largest files go first, so a cohort does not end on one
    worker busy with a big slide while the others idle. The manifest lists them smallest first; the
    execution's input (seen by wrapping the real pipeline.build_slides) is largest first. (The rows'
    order is not a test of it: Ray Data lets an actor run its queued calls out of order.)"""
    from zeus_ray.engine import pipeline
    sent: list = []
    real = pipeline.build_slides

    def spy(items, **kw):
        sent.extend(t.entry["slide_id"] for t in items)
        return real(items, **kw)
    monkeypatch.setattr(pipeline, "build_slides", spy)
    from zeus_ray.demo.synthetic import write_synthetic_slide
    folder = tmp_path / "cohort"
    folder.mkdir()
    rows = ["slide_id,uri,annotation_uri,dataset,center,mpp"]
    for sid, (w, h) in (("small", (2000, 1500)), ("mid", (2400, 1800)), ("big", (3000, 2250))):
        write_synthetic_slide(folder / f"{sid}.svs", w, h, 0.5, seed=10)
        rows.append(f"{sid},{sid}.svs,,synthetic,A,")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    sizes = {sid: (folder / f"{sid}.svs").stat().st_size for sid in ("small", "mid", "big")}
    assert sizes["small"] < sizes["mid"] < sizes["big"], sizes
    summary = run_cohort(job_config(folder / "manifest.csv", tmp_path / "out", "ray.num_encoders=1"), progress=False)
    assert summary.ok == 3, [r.get("error") for r in summary.rows]
    assert sent == ["big", "mid", "small"]
    assert sorted(r["slide_id"] for r in summary.rows) == ["big", "mid", "small"]
