"""`make run`: generate a small demo cohort and run the cohort job on it with embedded defaults.

The demo cohort is a few synthetic pyramidal slides (H&E-like textures, known lesion polygons
saved as QuPath GeoJSON annotations) listed in a manifest with `dataset` and `center` columns.
No model weights can be downloaded on the demo machine, so it uses a small built-in random-weight
encoder: the masks show that the system works end to end, they carry no meaning.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from shapely.geometry import mapping

from .synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[2]
DEMO_SLIDES = [  # slide_id, dataset, center, seed
    ("demo-A-1", "demo-leiomyoma", "centre-A", 1),
    ("demo-A-2", "demo-leiomyoma", "centre-A", 2),
    ("demo-B-1", "demo-leiomyoma", "centre-B", 3),
]


def write_qupath_geojson(path: Path, geom, class_name: str = "Tumor") -> None:
    feats = [{"type": "Feature", "geometry": mapping(g),
              "properties": {"objectType": "annotation", "classification": {"name": class_name}}}
             for g in getattr(geom, "geoms", [geom])]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def make_demo_cohort(out: Path, width: int = 6000, height: int = 4500, mpp: float = 0.5) -> Path:
    """Write the demo slides, their annotations and manifest.csv under `out`; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,uri,annotation_uri,dataset,center"]
    for sid, dataset, center, seed in DEMO_SLIDES:
        slide_path = out / f"{sid}.svs"
        ann_path = out / f"{sid}.geojson"
        if not slide_path.exists():
            s = write_synthetic_slide(slide_path, width, height, mpp, seed=seed)
            write_qupath_geojson(ann_path, s.lesions)
        rows.append(f"{sid},{slide_path.name},{ann_path.name},{dataset},{center}")
    manifest = out / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="default: configs/demo.yaml, its paths under the repository")
    ap.add_argument("--out", default=str(ROOT / "demo_output"), help="the demo's folder (default: demo_output/ "
                    "in the repository, wherever the demo is started from)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    run_args = ["run", args.config]
    if args.config is None:   # configs/demo.yaml's paths, anchored where they belong
        run_args = ["run", str(ROOT / "configs" / "demo.yaml")]
        for key, path in (("input.manifest", out / "cohort" / "manifest.csv"), ("output.root", out / "results"),
                          ("prompts.file", ROOT / "prompts" / "ai4skin-leiomyoma.yaml"), ("cache.dir", out / "cache")):
            run_args += ["--set", f"{key}={path}"]
    print(f"zeus_ray demo: generating a synthetic cohort in {out / 'cohort'} ...", flush=True)
    make_demo_cohort(out / "cohort")
    print("NOTE: the demo uses a built-in RANDOM-WEIGHT encoder (no weights can be downloaded here):\n"
          "      its masks carry no meaning. For real masks run e.g.\n"
          "        zeus run configs/ai4skin-keep.yaml --set input.manifest=YOUR_MANIFEST.csv\n"
          "      (KEEP, MIT licence) or configs/ai4skin-conch.yaml after `huggingface-cli login` and\n"
          "      accepting CONCH's terms on the hub.", flush=True)
    from ..cli import main as zeus
    rc = zeus(run_args)
    print(f"outputs: {out / 'results'} (slides/<id>/results/... and cohort/<prompt key>/)")
    if rc == 0:
        print("look at them on the slides, and try other prompts live:\n"
              f"  zeus studio {out / 'results'}   (or: python -m zeus_ray studio ...)", flush=True)
    return rc


