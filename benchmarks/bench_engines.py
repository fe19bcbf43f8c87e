"""Issue #19: the Ray Data engine against the engine it replaced and a plain process pool, side by side.

Each pair runs `zeus run` (the CLI users run, in a fresh process: Python start, Ray start, plan, read,
encode, write parts, reduce with every default output, cohort tables, report) once from this tree
and once from a baseline tree (a git worktree of the commit before the change), alternating which
goes first, plus the plain `multiprocessing` pool of bench_overhead.py (same planning, reads and
encodes, no Ray, no writes). Same encoder (`random:test_vit`), batch, reader, slides. Ratios are
tiles/s over tiles/s of the same repeat; the table gives each repeat and the median.

    git worktree add --detach /tmp/zeus-baseline eb195db   # the engine before Ray Data
    .venv/bin/python benchmarks/bench_engines.py --baseline /tmp/zeus-baseline --cohort large --repeat 3 --write
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_overhead as bo  # noqa: E402
from _overhead_cohort import make_overhead_cohort  # noqa: E402
from _results import machine, replace_section  # noqa: E402


def zeus_cli(tree: Path, manifest: Path, out: Path) -> tuple[float, int, int, int]:
    """(wall s, tiles written, peak PSS bytes of the whole process tree, peak RSS bytes of the
    driver process) of one `zeus run`."""
    import pyarrow.parquet as pq
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"input.manifest={manifest}", f"output.root={out}", f"model.id={bo.MODEL}",
            f"model.batch_size={bo.BATCH}", "model.device=cpu", f"cache.dir={out.parent / 'cache'}",
            "input.reader=auto"]
    cmd = [sys.executable, "-m", "zeus_ray", "run", "--no-progress"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = driver = 0
    while proc.poll() is None:
        peak = max(peak, bo.tree_pss(proc))
        try:
            driver = max(driver, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"zeus run in {tree} failed ({proc.returncode}):\n{log[-3000:]}")
    table = pq.read_table(next(out.glob("cohort/*/slides.parquet")))
    return wall, int(sum(table.column("n_tiles").to_pylist())), peak, driver


def pair(name: str, baseline: Path, repeat: int, limit: int | None = None) -> list[str]:
    n, w, h, folder = bo.COHORTS[name]
    n = min(n, limit or n)
    paths = make_overhead_cohort(n, w, h, folder)
    rows = [(p.stem, str(p)) for p in paths]
    manifest = folder / f"manifest-{n}.csv"
    manifest.write_text("\n".join((folder / "manifest.csv").read_text().splitlines()[:n + 1]) + "\n")
    lines, new_old, new_pool = [], [], []
    for i in range(repeat):
        order = [("new", ROOT), ("old", baseline)] if i % 2 == 0 else [("old", baseline), ("new", ROOT)]
        res = {}
        for label, tree in order:
            res[label] = zeus_cli(tree, manifest, HERE / "_work" / f"engines-out-{label}")
        tiles_p, wall_p = bo.plain_pool(rows, os.cpu_count())
        assert res["new"][1] == res["old"][1] == tiles_p, (res, tiles_p)
        tps = {k: v[1] / v[0] for k, v in res.items()}
        new_old.append(tps["new"] / tps["old"])
        new_pool.append(tps["new"] / (tiles_p / wall_p))
        lines.append(f"| {i + 1} ({order[0][0]} first) | {tiles_p} | {wall_p:.1f} s | {res['old'][0]:.1f} s | "
                     f"{res['new'][0]:.1f} s | **{new_old[-1]:.2f}** | **{new_pool[-1]:.2f}** | "
                     f"{res['new'][2] / 2**30:.2f} GiB | {res['old'][2] / 2**30:.2f} GiB | "
                     f"{res['new'][3] / 2**20:.0f} MiB |")
        print(lines[-1], flush=True)
    head = [f"Cohort `{name}`: {n} synthetic 20x slides of {w} × {h} px; encoder `{bo.MODEL}`, batch {bo.BATCH}, "
            f"CPU, direct TIFF reads; plain pool: {os.cpu_count()} processes.", "",
            "| repeat | tiles | plain pool | old engine (zeus run) | Ray Data engine (zeus run) | new ÷ old "
            "throughput | new ÷ plain pool | new peak PSS | old peak PSS | new driver peak RSS |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    foot = ["", f"Median over {repeat}: new ÷ old **{statistics.median(new_old):.2f}**, new ÷ plain pool "
                f"**{statistics.median(new_pool):.2f}**.", ""]
    return head + lines + foot


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="a worktree of the commit before the Ray Data engine")
    ap.add_argument("--cohort", choices=sorted(bo.COHORTS), action="append", default=[])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slides", type=int, help="only the first N slides of a cohort (smoke checks)")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    base = Path(a.baseline).resolve()
    rev = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = open("/proc/loadavg").read().split()[:3]
    text = ["## Ray Data engine against the engine it replaced (issue #19)", "",
            f"Machine: {machine()}; load average at start {' '.join(load)}. New: {head}; old: {rev}. Wall times are "
            "whole `zeus run` processes (Python and Ray start included on both sides).", ""]
    for name in a.cohort:
        text += [f"Command: `.venv/bin/python benchmarks/bench_engines.py --baseline <worktree of {rev}> "
                 f"--cohort {name} --repeat {a.repeat}`", ""]
        text += pair(name, base, a.repeat, a.slides)
    print("\n".join(text))
    if a.write:
        replace_section(text[0], "\n".join(text))


if __name__ == "__main__":
    main()
