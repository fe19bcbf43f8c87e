"""LazySlide: tissue segmentation + tile coordinates per slide, in process, timed per slide (issue #11).

Runs INSIDE the peers venv (benchmarks/_work/peers-venv, made by `benchmarks/bench_peers.py --setup`):
    benchmarks/_work/peers-venv/bin/python benchmarks/peers/plan_lazyslide.py [--slides N] [--tissue-level auto]
Prints one JSON line (the last line of stdout). API from the installed lazyslide 0.13 / wsidata source:
`wsidata.open_wsi(path, store=None)` (no zarr store: nothing is written), `lazyslide.pp.find_tissues(wsi,
level=...)` (reads one whole pyramid level), `lazyslide.pp.tile_tissues(wsi, tile_px, stride_px=, mpp=,
background_fraction=)` (tile polygons in wsi.shapes["tiles"]; a tile is kept when its tissue coverage is
≥ 1 - background_fraction)."""
from __future__ import annotations

import warnings

from _peer_common import MIN_TISSUE, MPP, STRIDE_PX, TILE_PX, emit, parser, read_manifest, time_slides


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--tissue-level", default="-1",
                    help="find_tissues level: -1 = the coarsest level (here 8 µm/px, as zeus and hs2p), "
                         "'auto' = LazySlide's default (the level nearest 4 µm/px that fits in memory; here 2 µm/px)")
    args = ap.parse_args()
    rows = read_manifest(args.manifest, args.slides)
    level = args.tissue_level if args.tissue_level == "auto" else int(args.tissue_level)

    import lazyslide as zs
    from wsidata import open_wsi

    info = {}

    def plan_one(sid: str, uri: str):
        wsi = open_wsi(uri, store=None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")      # "No tiles are found" etc. still count as a result
                zs.pp.find_tissues(wsi, level=level)
                zs.pp.tile_tissues(wsi, TILE_PX, stride_px=STRIDE_PX, mpp=MPP,
                                   background_fraction=1 - MIN_TISSUE)
            n = len(wsi.shapes["tiles"]) if "tiles" in wsi.shapes else 0
            pieces = len(wsi.shapes["tissues"]) if "tissues" in wsi.shapes else 0
            mpp0 = wsi.properties.mpp
            mm2 = (float(wsi.shapes["tissues"].geometry.area.sum()) * mpp0 ** 2 / 1e6
                   if "tissues" in wsi.shapes else 0.0)
            info.update(reader=type(wsi.reader).__name__, tile_spec=wsi.attrs.get("tile_spec", {}).get("tiles"))
            return n, mm2, pieces
        finally:
            wsi.close()

    res = time_slides(rows, plan_one)
    # Which level find_tissues read (not timed; the private helper is the one find_tissues calls).
    from lazyslide.preprocess._tissue import _decide_level
    wsi = open_wsi(rows[0][1], store=None)
    lv = _decide_level(wsi, level)
    info.update(tissue_level=int(lv), tissue_level_mpp=round(wsi.properties.mpp * wsi.properties.level_downsample[lv], 4))
    wsi.close()
    emit({"tool": "lazyslide", "version": zs.__version__,
          "what": "wsidata.open_wsi + lazyslide.pp.find_tissues + lazyslide.pp.tile_tissues",
          "settings": {"tile_px": TILE_PX, "stride_px": STRIDE_PX, "mpp": MPP,
                       "background_fraction": 1 - MIN_TISSUE, "edge": False,
                       "find_tissues": {"level": level, "method": "otsu (defaults: filter_artifacts, blur 7, "
                                                                  "threshold 7, close 7 x3)"},
                       **info},
          **res})


if __name__ == "__main__":
    main()
