"""Make the README's pictures from the demo cohort: docs/img/demo_overlays.jpg (the three demo slides'
overlay.jpg side by side) and docs/img/report.jpg (the top of the cohort report, rendered by headless
Chromium).

    python scripts/make_readme_images.py [--results demo_output/results] [--run-demo]

Uses the demo's results when they exist (`make run` writes them); --run-demo (or missing results)
runs `python -m zeus_ray.demo` first. Needs Debian's `chromium` (apt-get install -y chromium), driven
as scripts/check_report_in_browser.py drives it: headless, no network.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
from check_report_in_browser import chromium, screenshot_stats  # noqa: E402

OUT = ROOT / "docs" / "img"
REPORT_WINDOW = (1280, 1560)      # px: header, settings, tables, Dice plot and the gallery's first row
REPORT_WIDTH = 900                # px in the README


def overlays_strip(root: Path, prompt_key: str, gap: int = 8) -> Image.Image:
    """Every ok slide's overlay.jpg, in slide order, side by side on white."""
    paths = sorted(root.glob(f"slides/*/results/*/{prompt_key}/overlay.jpg"))
    if not paths:
        raise SystemExit(f"no overlay.jpg under {root}/slides/*/results/*/{prompt_key}: run the demo first (--run-demo)")
    imgs = [Image.open(p).convert("RGB") for p in paths]
    h = max(i.height for i in imgs)
    strip = Image.new("RGB", (sum(i.width for i in imgs) + gap * (len(imgs) - 1), h), "white")
    x = 0
    for i in imgs:
        strip.paste(i, (x, 0))
        x += i.width + gap
    return strip


def report_shot(root: Path, prompt_key: str, binary: str) -> Image.Image:
    from zeus_ray.results.report import write_report
    from zeus_ray.storage.store import OutputStore
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "report.html"
        write_report(OutputStore(str(root)), prompt_key, out=str(html))
        shot = Path(tmp) / "shot.png"
        r = chromium(binary, html.as_uri(), f"--screenshot={shot}", f"--window-size={REPORT_WINDOW[0]},{REPORT_WINDOW[1]}",
                     "--hide-scrollbars")
        if not shot.exists():
            raise SystemExit(f"chromium made no screenshot (exit {r.returncode}): {r.stderr.strip()[-300:]}")
        std, ink = screenshot_stats(shot)
        if std < 10 or ink < 0.05:
            raise SystemExit(f"the report screenshot looks blank (grey std {std:.1f}, non-white {ink:.3f})")
        img = Image.open(shot).convert("RGB")
    h = round(img.height * REPORT_WIDTH / img.width)
    return img.resize((REPORT_WIDTH, h), Image.Resampling.LANCZOS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "demo_output" / "results"), help="output.root of the demo run")
    ap.add_argument("--run-demo", action="store_true", help="run the demo cohort first")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    root = Path(args.results)
    if args.run_demo or not any(root.glob("cohort/*/run.json")):
        subprocess.run([sys.executable, "-m", "zeus_ray.demo"], cwd=ROOT, check=True)
    if not Path(args.chromium).exists():
        print(f"error: {args.chromium} not found; install it with `apt-get install -y chromium`", file=sys.stderr)
        return 2
    from zeus_ray.results.evaluate import resolve_prompt_key
    from zeus_ray.storage.store import OutputStore
    pk = resolve_prompt_key(OutputStore(str(root)))
    OUT.mkdir(parents=True, exist_ok=True)
    strip = overlays_strip(root, pk)
    strip.save(OUT / "demo_overlays.jpg", quality=85, optimize=True)
    shot = report_shot(root, pk, args.chromium)
    shot.save(OUT / "report.jpg", quality=88, optimize=True)   # a palette PNG loses the plot's light colours
    for name in ("demo_overlays.jpg", "report.jpg"):
        p = OUT / name
        print(f"{p.relative_to(ROOT)}: {Image.open(p).size[0]} × {Image.open(p).size[1]} px, {p.stat().st_size / 1024:.0f} KiB")
    assert np.asarray(strip).std() > 10
    return 0


if __name__ == "__main__":
    sys.exit(main())
