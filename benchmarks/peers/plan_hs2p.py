"""hs2p: tissue segmentation + tile coordinates per slide, in process, timed per slide (issue #11).

Runs INSIDE the peers venv (benchmarks/_work/peers-venv, made by `benchmarks/bench_peers.py --setup`):
    benchmarks/_work/peers-venv/bin/python benchmarks/peers/plan_hs2p.py [--slides N]
Prints one JSON line (the last line of stdout). API from the installed hs2p 6.1 source:
`hs2p.tile_slide(SlideSpec, tiling=TilingConfig, segmentation=SegmentationConfig, filtering=FilterConfig,
masks=MaskSamplingConfig)` returns a TilingResult (x, y level-0 tile origins, tissue_fractions); it reads
only the segmentation level's pixels (pixel QC filters stay off, hs2p's default)."""
from __future__ import annotations

from pathlib import Path

from _peer_common import MIN_TISSUE, MPP, STRIDE_PX, TILE_PX, emit, parser, read_manifest, time_slides


def main() -> None:
    args = parser(__doc__).parse_args()
    rows = read_manifest(args.manifest, args.slides)

    import hs2p
    from hs2p import (DEFAULT_MASK_SAMPLING, FilterConfig, MaskSamplingConfig, SegmentationConfig, SlideSpec,
                      TilingConfig, tile_slide)

    overlap = 1 - STRIDE_PX / TILE_PX                      # 0.75: hs2p takes a fraction, not a stride
    tiling = TilingConfig(requested_spacing_um=MPP, requested_tile_size_px=TILE_PX, tolerance=0.05,
                          overlap=overlap)
    # hs2p's shipped defaults (configs/default.yaml): HSV segmentation on the pyramid level closest to
    # downsample 64 (here level 2, downsample 16 = 8 µm/px, as zeus's 8 µm/px thumbnail), closing 4 px.
    segmentation = SegmentationConfig(method="hsv")
    filtering = FilterConfig()
    # The shipped {background, tissue} vocabulary is binary tissue tiling; only the threshold changes.
    masks = MaskSamplingConfig(pixel_mapping=dict(DEFAULT_MASK_SAMPLING.pixel_mapping),
                               colors=DEFAULT_MASK_SAMPLING.colors, min_coverage={"tissue": MIN_TISSUE})
    info = {}

    def plan_one(sid: str, uri: str):
        r = tile_slide(SlideSpec(sample_id=sid, image_path=Path(uri)), tiling=tiling, segmentation=segmentation,
                       filtering=filtering, masks=masks)
        mask = r.tiles.tissue_mask
        info.update(backend=r.backend, read_level=r.read_level, read_tile_size_px=r.read_tile_size_px,
                    tile_size_lv0=r.tile_size_lv0, step_px_lv0=r.step_px_lv0, seg_level=r.seg_level,
                    seg_spacing_um=round(r.seg_spacing_um, 4))
        mm2 = float((mask > 0).sum()) * r.seg_spacing_um ** 2 / 1e6 if mask is not None else float("nan")
        return r.num_tiles, mm2, len(r.contours.contours) if r.contours is not None else 0

    res = time_slides(rows, plan_one)
    emit({"tool": "hs2p", "version": hs2p.__version__, "what": "hs2p.tile_slide (tissue + coordinates)",
          "settings": {"requested_spacing_um": MPP, "requested_tile_size_px": TILE_PX, "overlap": overlap,
                       "min_coverage.tissue": MIN_TISSUE, "tolerance": 0.05,
                       "seg": {"method": segmentation.method, "downsample": segmentation.downsample,
                               "close": segmentation.close},
                       "filter": {"a_t": filtering.a_t, "a_h": filtering.a_h,
                                  "ref_tile_size": filtering.ref_tile_size, "pixel_qc": False},
                       "num_workers": 1, **info},
          **res})


if __name__ == "__main__":
    main()
