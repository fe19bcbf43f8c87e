"""A new user's path, end to end through the CLI: a folder of slides (dataset/centre folders) and a
folder of annotation files → `zeus manifest` → `zeus doctor` → `zeus run` → Table 1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from zeus_ray.demo.cohort import write_qupath_geojson
from zeus_ray.demo.synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]


def zeus(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeus_ray", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)})


def test_folder_to_table1(tmp_path):
    slides, notes = tmp_path / "slides", tmp_path / "annotations"
    layout = [("skin", "HCUV", "a1", 1), ("skin", "HUSC", "b1", 2), ("skin", "HUSC", "b2", 3)]
    for dataset, centre, sid, seed in layout:
        s = write_synthetic_slide(slides / dataset / centre / f"{sid}.svs", 2400, 1800, 0.5, seed=seed)
        notes.mkdir(exist_ok=True)
        write_qupath_geojson(notes / f"{sid}.geojson", s.lesions)
    manifest = tmp_path / "cohort.csv"

    p = zeus("manifest", str(slides), "--annotations", str(notes), "--dataset-from", "part:0",
             "--center-from", "part:1", "--out", str(manifest), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = pd.read_csv(manifest).set_index("slide_id")
    assert sorted(rows.index) == ["a1", "b1", "b2"] and rows["annotation_uri"].notna().all()
    assert rows.loc["b2", "center"] == "HUSC" and set(rows["dataset"]) == {"skin"}

    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {{manifest: {manifest}}}\noutput: {{root: {tmp_path / 'out'}}}\n"
                   f"model: {{id: 'random:vit_tiny_patch16_224'}}\ncache: {{dir: {tmp_path / 'cache'}}}\n")
    p = zeus("doctor", str(cfg), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 failures" in p.stdout.strip().splitlines()[-1]

    p = zeus("run", str(cfg), "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 slides ok" in p.stdout
    table1 = pd.read_csv(next((tmp_path / "out").glob("cohort/*/table1.csv")))
    assert table1["n_slides"].tolist() == [3] and table1["dataset"].tolist() == ["skin"]
    table2 = pd.read_csv(next((tmp_path / "out").glob("cohort/*/table2.csv")))
    assert sorted(zip(table2["center"], table2["n_slides"])) == [("HCUV", 1), ("HUSC", 2)]
    assert table1["dice_mean"].between(0, 1).all()


def test_the_demo_runs_from_any_folder(tmp_path):
    """`make run`'s command, started elsewhere than the repository (configs/demo.yaml's relative
    paths once made it look for the manifest in the current folder)."""
    where = tmp_path / "elsewhere"
    where.mkdir()
    p = subprocess.run([sys.executable, "-m", "zeus_ray.demo", "--out", str(tmp_path / "demo")], capture_output=True,
                       text=True, cwd=where, timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 slides ok" in p.stdout + p.stderr and "Traceback" not in p.stderr and "ERROR" not in p.stderr
    assert len(list((tmp_path / "demo" / "results").glob("slides/*/results/*/*/_COMPLETE.json"))) == 3
    assert not list(where.iterdir())   # nothing written where it was started
