"""`zeus tiles SLIDE_URI --out DIR`: tissue mask, tile grid and tiles.parquet for one slide, with
an annotated thumbnail to check them at a glance. Prints one summary line."""
from __future__ import annotations

import posixpath
import time
from pathlib import Path

from .options import add_set_option
from ..config import load_config
from ..errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("tiles", help="segment tissue and plan the tiles of one slide (local path or bucket URI)")
    p.add_argument("slide", metavar="SLIDE_URI", help="slide file or URI (s3://, gs://, http(s)://, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="outputs go to DIR/<slide_id>/")
    p.add_argument("--mpp", type=float, help="level-0 µm/px of this slide (overrides its metadata)")
    p.add_argument("--magnification", type=float, metavar="M", help="target magnification (10x = 1.0 µm/px)")
    p.add_argument("--target-mpp", type=float, metavar="U", help="target µm/px (instead of --magnification)")
    p.add_argument("--slide-id", help="output folder name (default: the file name without its extension)")
    p.add_argument("--config", metavar="FILE", help="job config YAML (its tiling/tissue/cache sections apply)")
    add_set_option(p)
    p.set_defaults(handler=_run)


# The annotated thumbnail's long side, px (readable on screen).
PREVIEW_LONG_SIDE = 1600


def slide_id_from_uri(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/").split("?", 1)[0])
    return Path(name).stem if "." in name else name


def _run(args) -> int:
    from ..storage.store import check_slide_id
    from ..slides.planning import NO_TILES, NO_TISSUE, plan_slide, read_preview, write_tiles_outputs

    if args.magnification is not None and args.target_mpp is not None:
        raise ConfigError("give --magnification or --target-mpp, not both")
    tiling = {}
    if args.magnification is not None:
        tiling = {"magnification": args.magnification, "target_mpp": None}
    elif args.target_mpp is not None:
        tiling = {"target_mpp": args.target_mpp}
    cfg = load_config(args.config, args.overrides, {"tiling": tiling} if tiling else None)
    slide_id = check_slide_id(args.slide_id or slide_id_from_uri(args.slide))

    t0 = time.perf_counter()
    plan = plan_slide(args.slide, slide_id, cfg, mpp_override=args.mpp, command="tiles")
    out_dir = Path(args.out) / slide_id
    if plan.status != NO_TISSUE:   # the annotated thumbnail is for reading: draw it on a finer picture
        rgb, mpp = read_preview(args.slide, slide_id, cfg.cache, plan.mpp0, PREVIEW_LONG_SIDE)
        if mpp < plan.display_mpp:
            plan.display, plan.display_mpp = rgb, mpp
    write_tiles_outputs(plan, out_dir)
    g = plan.grid
    line = (f"{slide_id}: level {g.level} ({g.level_mpp:.4g} µm/px; level 0 {plan.mpp0:.4g} µm/px from "
            f"{plan.mpp_source}), read {g.read_size} px -> {g.patch_size} px at {g.target_mpp:.4g} µm/px, "
            f"{plan.n_tiles} tiles, tissue {plan.tissue_area_mm2:.2f} mm², {time.perf_counter() - t0:.1f} s")
    if plan.status == NO_TISSUE:
        line += " | status no_tissue: no tissue found (check the thumbnail; lower tissue.saturation_threshold?)"
    elif plan.status == NO_TILES:
        line += (f" | status no_tiles: no tile has {cfg.tiling.min_tissue_fraction:g} tissue "
                 "(lower tiling.min_tissue_fraction?)")
    print(f"{line} -> {out_dir}", flush=True)
    return 0
