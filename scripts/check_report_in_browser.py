"""Render a zeus_ray cohort report in headless Chromium and check what a person would see.

    python scripts/check_report_in_browser.py RESULTS_DIR_OR_REPORT_HTML [--prompt-key K] [--screenshot PNG]

Given a results folder it (re)writes <root>/cohort/<prompt_key>/report.html first and knows how
many gallery cards and error rows to expect. Checks: the screenshot is not blank (grey-level std
and non-white fraction), and the DOM Chromium built (--dump-dom) holds the settings, Table 1/2 (or
the "no annotations" note), the Dice plot, one gallery card per ok slide with an inline image,
the errors table, and that opening it as report.html#sort=dice-asc sorts the cards by Dice.
Network access is blocked (host resolver maps every name to nothing): the report must render
offline. Needs Debian's `chromium` (apt-get install chromium); not a test-suite dependency.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND"]


class _Dom(HTMLParser):
    """Ids present, gallery cards (data-dice, has an inline image), rows per table id."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.cards: list[dict] = []
        self.rows: dict[str, int] = {}
        self._table: list[str | None] = []
        self._in_card = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "table":
            self._table.append(a.get("id"))
        elif tag == "tr" and self._table and self._table[-1]:
            self.rows[self._table[-1]] = self.rows.get(self._table[-1], 0) + 1
        elif tag == "div" and "card" in (a.get("class") or "").split():
            self.cards.append({"id": a.get("data-id"), "dice": a.get("data-dice"), "img": False})
        elif tag == "img" and self.cards and (a.get("src") or "").startswith("data:image/"):
            self.cards[-1]["img"] = True

    def handle_endtag(self, tag):
        if tag == "table" and self._table:
            self._table.pop()


def chromium(binary: str, url: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *extra, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def screenshot_stats(png: Path) -> tuple[float, float]:
    grey = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    return float(grey.std()), float((grey < 245).mean())


def expected_counts(root: str, prompt_key: str) -> tuple[int, int]:
    """(ok slides, error rows) from the stored slides table."""
    from zeus_ray.storage.keys import ERROR_STATUSES
    from zeus_ray.storage.store import OutputStore
    store = OutputStore(root)
    df = store.read_parquet(f"{store.cohort_dir(prompt_key)}/slides.parquet").to_pandas()
    ann = df["annotation_error"].fillna("").astype(str).str.len().gt(0).sum() if "annotation_error" in df else 0
    return int((df["status"] == "ok").sum()), int(df["status"].isin(ERROR_STATUSES).sum() + ann)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help="results folder (output.root of a run) or a report.html")
    ap.add_argument("--prompt-key", help="which run, for a results folder")
    ap.add_argument("--screenshot", default="report_screenshot.png", help="where to save the screenshot")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    if not Path(args.chromium).exists():
        print(f"error: {args.chromium} not found; install it with `apt-get install -y chromium`", file=sys.stderr)
        return 2

    expect = None
    target = Path(args.target)
    if target.is_dir():
        from zeus_ray.results.evaluate import resolve_prompt_key
        from zeus_ray.results.report import write_report
        from zeus_ray.storage.store import OutputStore
        store = OutputStore(str(target))
        pk = resolve_prompt_key(store, args.prompt_key)
        report = Path(write_report(store, pk))
        expect = expected_counts(str(target), pk)
    else:
        report = target
    url = report.resolve().as_uri()
    print(f"report: {report} ({report.stat().st_size / 1024:.0f} KiB)")

    shot = Path(args.screenshot).resolve()
    r = chromium(args.chromium, url, f"--screenshot={shot}", "--window-size=1400,2000")
    if not shot.exists():
        print(f"FAIL: no screenshot (chromium exit {r.returncode}): {r.stderr.strip()[-500:]}")
        return 1
    std, ink = screenshot_stats(shot)
    problems = []
    if std < 10 or ink < 0.05:
        problems.append(f"screenshot looks blank (grey std {std:.1f}, non-white fraction {ink:.3f})")
    print(f"screenshot: {shot} {Image.open(shot).size}, grey std {std:.1f}, non-white fraction {ink:.3f}")

    dom = _Dom()
    dump = chromium(args.chromium, url + "#sort=dice-asc", "--dump-dom")
    dom.feed(dump.stdout)
    print(f"DOM: {len(dump.stdout)} chars; ids {sorted(dom.ids)}")
    for needed in ("settings", "tables", "distribution", "overlays", "slides-table", "errors"):
        if needed not in dom.ids:
            problems.append(f"section #{needed} missing from the rendered DOM")
    if "table1" in dom.ids:
        print(f"tables: table1 {dom.rows.get('table1', 0) - 1} rows, table2 {dom.rows.get('table2', 0) - 1} rows, "
              f"dice plot {'present' if 'dice-plot' in dom.ids else 'MISSING'}")
        if "dice-plot" not in dom.ids:
            problems.append("Table 1 present but no Dice plot")
    elif "no-dice" in dom.ids:
        print("tables: none (the report says no annotations were evaluated)")
    else:
        problems.append("neither Table 1 nor the no-annotation note is in the DOM")
    with_img = sum(c["img"] for c in dom.cards)
    print(f"gallery: {len(dom.cards)} cards, {with_img} with an inline image")
    if expect is not None and len(dom.cards) != expect[0]:
        problems.append(f"gallery has {len(dom.cards)} cards, slides table has {expect[0]} ok slides")
    dice = [float(c["dice"]) for c in dom.cards if c["dice"]]
    if dice != sorted(dice) or any(c["dice"] for c in dom.cards[len(dice):]):
        problems.append(f"#sort=dice-asc did not sort the gallery by Dice: {[c['dice'] for c in dom.cards]}")
    else:
        print(f"gallery after #sort=dice-asc: {[c['id'] for c in dom.cards]} (Dice {[round(d, 3) for d in dice]})")
    n_err = dom.rows.get("errors-table", 1) - 1
    print(f"errors table: {n_err} rows" if "errors-table" in dom.ids else "errors: none reported")
    if expect is not None and n_err != expect[1]:
        problems.append(f"errors table has {n_err} rows, expected {expect[1]}")
    for p in problems:
        print(f"FAIL: {p}")
    print("OK: report renders offline in Chromium" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
