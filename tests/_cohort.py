"""Small synthetic cohorts for pipeline tests: slides with known lesions + QuPath annotations."""
from __future__ import annotations

from pathlib import Path

from zeus_ray.demo.cohort import write_qupath_geojson
from zeus_ray.demo.synthetic import write_synthetic_slide


def make_cohort(folder: Path, n: int = 2, width: int = 2400, height: int = 1800, mpp: float = 0.5,
                extra_rows: list[str] | None = None) -> Path:
    """n synthetic 20x slides (about 60-100 tiles each at 10x) and manifest.csv; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,uri,annotation_uri,dataset,center,mpp"]
    for i in range(n):
        sid = f"syn-{i}"
        s = write_synthetic_slide(folder / f"{sid}.svs", width, height, mpp, seed=10 + i)
        write_qupath_geojson(folder / f"{sid}.geojson", s.lesions)
        rows.append(f"{sid},{sid}.svs,{sid}.geojson,synthetic,{'AB'[i % 2]},")
    rows += extra_rows or []
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def job_config(manifest, out, *more_sets: str, cache=None):
    from zeus_ray.config import load_config
    sets = [f"input.manifest={manifest}", f"output.root={out}", "model.id=random:vit_tiny_patch16_224",
            "model.batch_size=16", f"cache.dir={cache or Path(out).parent / 'cache'}"]
    sets += list(more_sets)
    return load_config(None, sets)


def completed_results(root: Path) -> dict[str, Path]:
    """slide_id → its complete result folder (one prompt key) under an output root."""
    return {p.parents[3].name: p.parent for p in Path(root).glob("slides/*/results/*/*/_COMPLETE.json")}


def mask_and_similarities(root: Path) -> dict:
    """slide_id → (mask array, similarities table sorted by tile_id) of each complete result."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image
    out = {}
    for sid, d in completed_results(root).items():
        sims = pq.read_table(d / "similarities.parquet").to_pandas().sort_values("tile_id")
        out[sid] = (np.array(Image.open(next(d.glob("mask_*mpp.png")))), sims)
    return out
