"""Resume is keyed on the slide file: a slide whose file was replaced (same slide id, other content)
is planned and encoded again through `zeus run`, its old outputs are never read (they stay on
disk), and stored embeddings that do not fit its grid fail that slide alone."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from _cohort import job_config, make_cohort
from zeus_ray.demo.synthetic import default_shapes, write_synthetic_slide
from zeus_ray.engine.driver import run_cohort

ROOT = Path(__file__).resolve().parents[1]
W, H = 2400, 1800   # make_cohort's slides: syn-i is drawn with seed 10 + i


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module: `zeus run --address` joins it (quicker than a Ray per run)."""
    import ray
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _zeus_run(manifest: Path, out: Path, address: str) -> subprocess.CompletedProcess:
    sets = [f"input.manifest={manifest}", f"output.root={out}", "model.id=random:vit_tiny_patch16_224",
            "model.batch_size=16", f"cache.dir={out.parent / 'cache'}"]
    cmd = [sys.executable, "-m", "zeus_ray", "run", "--no-progress", "--address", address]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def _result_dirs(out: Path, sid: str) -> set[Path]:
    return {p.parent for p in out.glob(f"slides/{sid}/results/*/*/_COMPLETE.json")}


def _sims(d: Path) -> pd.DataFrame:
    return pq.read_table(d / "similarities.parquet").to_pandas().sort_values("tile_id").reset_index(drop=True)


def _mask(d: Path) -> np.ndarray:
    return np.array(Image.open(next(d.glob("mask_*mpp.png"))))


def _rerun_after_replacing(tmp_path: Path, address: str, replace) -> tuple[Path, dict, Path]:
    """Run a 2-slide cohort, replace syn-1's file (`replace(path)`), run again; both through
    `zeus run`. Returns (output root, {"old": old result dir, "new": new one}, manifest)."""
    manifest = make_cohort(tmp_path / "cohort", n=2)
    out = tmp_path / "out"
    first = _zeus_run(manifest, out, address)
    assert first.returncode == 0, first.stderr[-3000:]
    (old,) = _result_dirs(out, "syn-1")
    syn0 = _result_dirs(out, "syn-0")
    stamp = (next(iter(syn0)) / "_COMPLETE.json").stat().st_mtime_ns
    replace(manifest.parent / "syn-1.svs")
    second = _zeus_run(manifest, out, address)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
    assert "2 slides ok (1 already complete)" in second.stdout, second.stdout
    assert _result_dirs(out, "syn-0") == syn0                                   # untouched slide reused
    assert (next(iter(syn0)) / "_COMPLETE.json").stat().st_mtime_ns == stamp
    table = pd.read_csv(next(out.glob("cohort/*/slides.csv"))).set_index("slide_id")
    return out, {"old": old, "new": Path(table.loc["syn-1", "results_uri"])}, manifest


def _fresh_reference(tmp_path: Path, slide: Path) -> Path:
    """Results of the replacing file alone in a new output root: what the re-run must equal."""
    folder = tmp_path / "ref"
    folder.mkdir()
    shutil.copy(slide, folder / "syn-1.svs")
    shutil.copy(slide.with_suffix(".geojson"), folder / "syn-1.geojson")
    manifest = folder / "manifest.csv"
    manifest.write_text("slide_id,uri,annotation_uri,dataset,center,mpp\nsyn-1,syn-1.svs,syn-1.geojson,synthetic,B,\n")
    out = folder / "out"
    summary = run_cohort(job_config(manifest, out), progress=False)
    assert summary.ok == 1
    (d,) = _result_dirs(out, "syn-1")
    return d


def _old_outputs_kept_apart(out: Path, dirs: dict) -> None:
    """The new file's outputs are in new key folders; the old file's stay complete beside them."""
    assert dirs["new"] != dirs["old"] and _result_dirs(out, "syn-1") == {dirs["old"], dirs["new"]}
    for unit in ("tiles", "embeddings"):
        assert len(list(out.glob(f"slides/syn-1/{unit}/**/_COMPLETE.json"))) == 2, unit


def _same_results(a: Path, b: Path) -> None:
    sa, sb = _sims(a), _sims(b)
    assert sa["tile_id"].tolist() == sb["tile_id"].tolist()
    np.testing.assert_allclose(sa["sim_tumor"], sb["sim_tumor"], atol=1e-4)
    assert np.array_equal(_mask(a), _mask(b))


def test_replaced_file_on_the_same_grid_is_encoded_again(ray_address, tmp_path):
    """Same size and tissue, other pixels (another texture seed): before, the old embeddings were
    reused silently. Now the slide is encoded again and equals a fresh run of the new file."""
    tissue, lesions = default_shapes(W, H, seed=11)

    def replace(path: Path) -> None:
        write_synthetic_slide(path, W, H, 0.5, tissue=tissue, lesions=lesions, seed=77)

    out, dirs, manifest = _rerun_after_replacing(tmp_path, ray_address, replace)
    _same_results(dirs["new"], _fresh_reference(tmp_path, manifest.parent / "syn-1.svs"))
    _old_outputs_kept_apart(out, dirs)
    # A re-prompt reads no slide: it takes the newest stored embeddings, the replacing file's.
    from zeus_ray.commands.reprompt import reprompt_config
    summary = run_cohort(reprompt_config(str(out), "prompts/metastasis.yaml", None, [], None), progress=False,
                         reprompt=True)
    assert (summary.ok, summary.tiles_encoded) == (2, 0)
    row = next(r for r in summary.rows if r["slide_id"] == "syn-1")
    assert row["tiling_key"] == dirs["new"].parent.name


def test_replaced_file_on_another_grid_and_stale_parts(ray_address, tmp_path):
    """Another size (another grid): before, `ValueError: a stored tile is not a kept position`
    stopped the whole cohort. Now the slide is planned and encoded anew. And parts of another grid
    put into its embeddings folder by hand fail that slide alone, in one line."""
    def replace(path: Path) -> None:
        write_synthetic_slide(path, 3000, 1500, 0.5, seed=99)

    out, dirs, manifest = _rerun_after_replacing(tmp_path, ray_address, replace)
    _same_results(dirs["new"], _fresh_reference(tmp_path, manifest.parent / "syn-1.svs"))
    _old_outputs_kept_apart(out, dirs)

    # The old file's parts copied into the new file's embeddings folder, its units reopened.
    old_emb = next(out.glob(f"slides/syn-1/embeddings/{dirs['old'].parent.name}/*"))
    new_emb = next(out.glob(f"slides/syn-1/embeddings/{dirs['new'].parent.name}/*"))
    old_ids = np.concatenate([pq.read_table(p)["tile_id"].to_numpy() for p in old_emb.glob("pass-*.parquet")])
    new_ids = pq.read_table(next(out.glob(f"slides/syn-1/tiles/{dirs['new'].parent.name}/tiles.parquet")))["tile_id"]
    assert not np.isin(old_ids, new_ids.to_numpy()).all(), "the old parts must not fit the new grid"
    for p in new_emb.glob("pass-*.parquet"):
        p.unlink()
    for p in old_emb.glob("pass-*.parquet"):
        shutil.copy(p, new_emb / p.name)
    (new_emb / "_COMPLETE.json").unlink()
    (dirs["new"] / "_COMPLETE.json").unlink()
    third = _zeus_run(manifest, out, ray_address)
    assert third.returncode == 1, third.stderr[-3000:]
    assert "Traceback" not in third.stderr and "ValueError" not in third.stderr, third.stderr[-3000:]
    failed = [ln for ln in third.stdout.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 1 and "'syn-1'" in failed[0] and str(new_emb) in failed[0], third.stdout
    assert "delete that folder" in failed[0]
    assert "1 slides ok (1 already complete)" in third.stdout and "1 failed" in third.stdout, third.stdout
