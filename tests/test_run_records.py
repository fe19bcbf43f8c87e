"""What a run records and shows, through the real CLI: the annotation class decision (one console
line per distinct decision, each slide's result.json, the report's settings), and `zeus reprompt`
on a cohort with slides that failed or had no tissue (their recorded reasons; exit code 0 unless a
slide fails anew)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _cohort import make_cohort

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "tests" / "data" / "prompts-mixed.yaml"


def zeus(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeus_ray", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900, env=os.environ | {"PYTHONPATH": str(ROOT)})


def _add_stroma(path: Path) -> None:
    """A second, non-tumour class beside the lesions (a square in a corner)."""
    data = json.loads(path.read_text())
    square = [[[10, 10], [200, 10], [200, 200], [10, 200], [10, 10]]]
    data["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
                             "properties": {"objectType": "annotation", "classification": {"name": "Stroma"}}})
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def run(tmp_path_factory, slides_dir):
    tmp = tmp_path_factory.mktemp("records")
    manifest = make_cohort(tmp / "c", n=3, extra_rows=[f"broken,{slides_dir / 'broken.svs'},,bad,Z,",
                                                       f"blank,{tmp / 'c' / 'blank.svs'},,bad,Z,"])
    from shapely.geometry import MultiPolygon

    from zeus_ray.demo.synthetic import write_synthetic_slide
    write_synthetic_slide(tmp / "c" / "blank.svs", 2048, 2048, 0.5, tissue=MultiPolygon(), lesions=MultiPolygon(),
                          downsamples=(1, 4))
    _add_stroma(tmp / "c" / "syn-2.geojson")
    cfg = tmp / "job.yaml"
    cfg.write_text(f"input: {{manifest: {manifest}}}\noutput: {{root: {tmp / 'out'}}}\n"
                   f"model: {{id: 'random:vit_tiny_patch16_224'}}\ncache: {{dir: {tmp / 'cache'}}}\n")
    p = zeus("run", str(cfg), "--no-progress", cwd=tmp)
    return tmp, p


def test_class_decision_is_shown_once_per_decision_and_kept(run):
    tmp, p = run
    assert p.returncode == 1 and "3 slides ok" in p.stdout and "1 without tissue" in p.stdout, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("annotation classes")]
    assert sorted(lines) == [
        "annotation classes of 1 slide: tumour: Tumor; not counted as tumour: Stroma; cut out: none",
        "annotation classes of 2 slides: tumour: Tumor; not counted as tumour: none; cut out: none"], p.stdout
    result = json.loads(next((tmp / "out").glob("slides/syn-2/results/*/*/result.json")).read_text())
    assert (result["classes_tumour"], result["classes_left_out"], result["classes_cut_out"]) == ("Tumor", "Stroma", "")
    report = next((tmp / "out").glob("cohort/*/report.html")).read_text()
    assert "Annotation classes" in report and "not counted as tumour: Stroma" in report


def test_reprompt_keeps_the_recorded_reasons_and_fails_only_on_new_failures(run):
    tmp, _ = run
    out = tmp / "out"
    p = zeus("reprompt", "--results", str(out), "--prompts", str(PROMPTS), "--no-progress", cwd=tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "not re-prompted: slide 'blank' in the run: no tissue" in p.stdout
    broken = next(ln for ln in p.stdout.splitlines() if "slide 'broken'" in ln)
    assert broken.startswith("not re-prompted: slide 'broken' in the run: failed: ") and "OpenSlide" in broken
    assert "no stored embeddings" not in p.stdout
    assert sum(ln.startswith("annotation classes") for ln in p.stdout.splitlines()) == 2

    for marker in out.glob("slides/syn-0/embeddings/*/*/_COMPLETE.json"):   # syn-0 loses its embeddings
        marker.unlink()
    again = zeus("reprompt", "--results", str(out), "--prompts", str(ROOT / "prompts" / "multiclass-skin.yaml"),
                 "--no-progress", cwd=tmp)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "failed: slide 'syn-0': no stored embeddings" in again.stdout and "(ok in the run)" in again.stdout
    assert "not re-prompted: slide 'blank' in the run: no tissue" in again.stdout
