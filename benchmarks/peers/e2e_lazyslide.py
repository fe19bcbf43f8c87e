"""LazySlide end to end over the cohort: tissue, tiles, features with a random timm `test_vit`, written to
one zarr store per slide the way LazySlide writes them (`WSIData.write`) (issue #11).

Runs INSIDE the peers venv (benchmarks/_work/peers-venv, made by `benchmarks/bench_peers.py --setup`):
    benchmarks/_work/peers-venv/bin/python benchmarks/peers/e2e_lazyslide.py [--slides N] [--num-workers 0]
This process only watches: it starts the run as a child process and samples the PSS of the child and all
its descendants (psutil `memory_full_info().pss`, summed) every --interval s; bytes written are the run's
block-output count from wait4 (the kernel's write_bytes of the child and every descendant it reaped,
counted per page when pages are dirtied), the stores' file bytes and their disk usage (as du); CPU seconds
(user + sys, same rusage) are less sensitive than wall time to other jobs on the machine. Prints one JSON line.

Encoder: `lazyslide_models.TimmModel("test_vit", pretrained=False)`, which is
`timm.create_model("test_vit", pretrained=False, num_classes=0)` in LazySlide's own timm wrapper (the path
`feature_extraction(wsi, "<timm name>")` takes), created once and passed to
`lazyslide.tl.feature_extraction(wsi, model, model_name="test_vit", batch_size=64)`; its transform is
timm's for test_vit (resize 168 bicubic, centre crop 160, mean/std 0.5), fp32 (LazySlide's amp default off)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _peer_common import MIN_TISSUE, MPP, ROOT, STRIDE_PX, TILE_PX, emit, loadavg, parser, read_manifest

OUT = ROOT / "benchmarks" / "_work" / "peers-out"


def child(args) -> None:
    """The measured run: imports, model, then every slide; writes its own figures to --result."""
    t_start = time.perf_counter()
    import warnings

    import lazyslide as zs
    import timm
    import torch
    from lazyslide_models import TimmModel
    from wsidata import open_wsi

    model = TimmModel("test_vit", pretrained=False)
    t_ready = time.perf_counter()
    level = args.tissue_level if args.tissue_level == "auto" else int(args.tissue_level)
    per_slide, tiles = [], []
    for sid, uri in read_manifest(args.manifest, args.slides):
        t0 = time.perf_counter()
        wsi = open_wsi(uri, store=str(args.out))              # the store: <out>/<slide stem>.zarr
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zs.pp.find_tissues(wsi, level=level)
                zs.pp.tile_tissues(wsi, TILE_PX, stride_px=STRIDE_PX, mpp=MPP, background_fraction=1 - MIN_TISSUE)
                n = len(wsi.shapes["tiles"]) if "tiles" in wsi.shapes else 0
                if n:
                    zs.tl.feature_extraction(wsi, model, model_name="test_vit", batch_size=args.batch_size,
                                             num_workers=args.num_workers, device="cpu", pbar=False)
                wsi.write()
        finally:
            wsi.close()
        per_slide.append(round(time.perf_counter() - t0, 4))
        tiles.append(n)
    t_end = time.perf_counter()
    store0 = args.out / (Path(read_manifest(args.manifest, 1)[0][1]).stem + ".zarr")
    Path(args.result).write_text(json.dumps({
        "tiles": sum(tiles), "tiles_per_slide": tiles, "seconds_per_slide": per_slide,
        "startup_s": t_ready - t_start, "process_s": t_end - t_ready, "feature_key": "test_vit_tiles",
        "store_example": str(store0), "torch": torch.__version__, "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(), "embed_dim": model.model.num_features}))


def monitor(args) -> None:
    import psutil

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)                  # figures for this run only
    out.mkdir(parents=True)
    result = out.parent / f".{out.name}.child.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", "--manifest", str(args.manifest), "--out", str(out),
           "--result", str(result), "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
           "--tissue-level", str(args.tissue_level)] + (["--slides", str(args.slides)] if args.slides else [])
    load0 = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak_pss = peak_rss = peak_procs = samples = 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)     # wait4, not poll(): keeps the child's rusage
        if pid:
            break
        pss = rss = 0
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                m = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pss += m.pss
            rss += m.rss
        if procs:
            samples += 1
            peak_pss, peak_rss, peak_procs = max(peak_pss, pss), max(peak_rss, rss), max(peak_procs, len(procs))
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not result.exists():
        sys.exit(f"LazySlide run failed (exit {code}); its output is above")
    r = json.loads(result.read_text())
    result.unlink()
    entries = [f.stat() for f in out.rglob("*")]
    stored = sum(st.st_size for f, st in zip(out.rglob("*"), entries) if f.is_file())
    disk = sum(st.st_blocks * 512 for st in entries)        # as du: blocks of files and folders
    emit({"tool": "lazyslide", "version": __import__("lazyslide").__version__, "what": "end to end",
          "settings": {"tile_px": TILE_PX, "stride_px": STRIDE_PX, "mpp": MPP, "background_fraction": 1 - MIN_TISSUE,
                       "find_tissues_level": args.tissue_level, "model": "timm test_vit, random init (pretrained=False)",
                       "batch_size": args.batch_size, "num_workers": args.num_workers, "device": "cpu",
                       "amp": False, "torch": r["torch"], "timm": r["timm"], "torch_threads": r["torch_threads"],
                       "pss_interval_s": args.interval},
          "slides": len(r["tiles_per_slide"]), "tiles": r["tiles"], "tiles_per_slide": r["tiles_per_slide"],
          "seconds_per_slide": r["seconds_per_slide"], "wall_s": wall, "startup_s": r["startup_s"],
          "process_s": r["process_s"], "tiles_per_s": r["tiles"] / r["process_s"],
          "tiles_per_s_incl_startup": r["tiles"] / wall,
          "peak_pss_bytes": peak_pss, "peak_rss_sum_bytes": peak_rss, "peak_processes": peak_procs,
          "pss_samples": samples, "bytes_written": ru.ru_oublock * 512, "bytes_stored": stored, "disk_bytes": disk,
          "files_stored": sum(1 for f in out.rglob("*") if f.is_file()),
          "cpu_s": ru.ru_utime + ru.ru_stime,
          "store": str(out), "loadavg_start": load0, "loadavg_end": loadavg()})


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--out", type=Path, default=None, help="stores go here (emptied first); "
                    "default benchmarks/_work/peers-out/lazyslide-e2e-w<num-workers>")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (LazySlide's default 0)")
    ap.add_argument("--tissue-level", default="-1", help="find_tissues level (-1: 8 µm/px, as the planning row)")
    ap.add_argument("--interval", type=float, default=0.2, help="PSS sampling interval, s")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.out is None:
        args.out = OUT / f"lazyslide-e2e-w{args.num_workers}"
    (child if args.child else monitor)(args)


if __name__ == "__main__":
    main()
