"""input.default_mpp touches only the slides that use it: adding it to a finished cohort (real
`zeus run` twice on the real slides) recomputes the slide without µm/px and skips the one with its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def zeus(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeus_ray", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900, env=os.environ | {"PYTHONPATH": str(ROOT)})


def _tile_keys(out: Path) -> dict[str, set[str]]:
    return {d.name: {k.name for k in (d / "tiles").iterdir()} for d in (out / "slides").iterdir()}


def test_adding_default_mpp_recomputes_only_the_slide_without_mpp(tmp_path, slides_dir):
    (tmp_path / "m.csv").write_text("slide_id,uri\n"
                                    f"cmu,{slides_dir / 'CMU-1-Small-Region.svs'}\n"            # 0.499 µm/px
                                    f"tcga,{slides_dir / 'TCGA-CR-7395-01A-01-TS1.svs'}\n")     # no µm/px
    out = tmp_path / "out"
    (tmp_path / "job.yaml").write_text(f"input: {{manifest: {tmp_path / 'm.csv'}}}\noutput: {{root: {out}}}\n"
                                       f"model: {{id: 'random:vit_tiny_patch16_224'}}\ncache: {{dir: {tmp_path / 'c'}}}\n")
    first = zeus("run", "job.yaml", "--no-progress", cwd=tmp_path)
    assert first.returncode == 1 and "1 slides ok (0 already complete)" in first.stdout, first.stdout + first.stderr
    assert "slide 'tcga': no µm/px" in first.stdout
    cmu_done = next(out.glob("slides/cmu/results/*/*/_COMPLETE.json")).read_bytes()

    second = zeus("run", "job.yaml", "--no-progress", "--set", "input.default_mpp=0.5", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 slides ok (1 already complete), 0 without tissue, 0 failed" in second.stdout
    assert "used by 1 slide(s) without their own (tcga)" in second.stderr
    keys = _tile_keys(out)
    assert len(keys["cmu"]) == 1 and len(keys["tcga"]) == 1        # no second tiling of cmu beside the first
    assert next(out.glob("slides/cmu/results/*/*/_COMPLETE.json")).read_bytes() == cmu_done   # not rewritten
    plans = {sid: json.loads(next(out.glob(f"slides/{sid}/tiles/*/tiles.json")).read_text()) for sid in keys}
    assert (plans["tcga"]["mpp_source"], plans["tcga"]["mpp0"]) == ("input.default_mpp", 0.5)
    assert plans["cmu"]["mpp_source"] == "metadata"
    assert set(pd.read_csv(next(out.glob("cohort/*/slides.csv")))["status"]) == {"ok"}

    third = zeus("run", "job.yaml", "--no-progress", "--set", "input.default_mpp=0.5", cwd=tmp_path)
    assert "2 slides ok (2 already complete)" in third.stdout and " 0 tiles encoded" in third.stdout
    assert _tile_keys(out) == keys


def test_the_fallback_is_in_the_key_of_the_slides_that_use_it_only():
    from zeus_ray.config import load_config
    from zeus_ray.storage.keys import slide_keys, tiling_key
    from zeus_ray.storage.store import OutputStore
    store = OutputStore("/tmp/unused")
    plain, with_default = load_config(None, []), load_config(None, ["input.default_mpp=0.5"])
    assert tiling_key(plain) == tiling_key(with_default)          # the cohort-wide key does not move
    own = slide_keys(store, "s", None, tiling_key(plain), "m", "p", "src")
    assert slide_keys(store, "s", None, tiling_key(plain), "m", "p", "src", default_mpp=0.5) != own
    assert slide_keys(store, "s", None, tiling_key(plain), "m", "p", "src", default_mpp=0.25) != \
        slide_keys(store, "s", None, tiling_key(plain), "m", "p", "src", default_mpp=0.5)
