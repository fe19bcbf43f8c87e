"""`zeus evaluate` and `zeus report` on the outputs of one real pipeline run (module-scoped): metrics
recomputed from stored masks only (slides moved away, no torch/openslide imported), changed and
malformed annotations, and the self-contained HTML report (checked as HTML; Chromium is only used
by scripts/check_report_in_browser.py)."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image
from shapely.geometry import Polygon

from _cohort import job_config, make_cohort
from zeus_ray.errors import ConfigError, ZeusError
from zeus_ray.results.evaluate import evaluate_results, resolve_prompt_key
from zeus_ray.truth.metrics import format_mean_std
from zeus_ray.results.report import build_report, write_report
from zeus_ray.storage.store import OutputStore

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_CENTRE = '<i>A&B</i>"'
MISSING_URI = "missing<script>alert(1)</script>&.svs"


class Page(HTMLParser):
    """Cell texts per table id, gallery cards, every src/href value."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.cards: list[dict] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self._table, self._cell = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.ids.add(a.get("id"))
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "table":
            self._table.append(a.get("id"))
            self.tables.setdefault(a.get("id"), [])
        elif tag == "tr":
            self.tables[self._table[-1]].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "div" and "card" in (a.get("class") or "").split():
            self.cards.append({"id": a["data-id"], "dice": a["data-dice"], "img": None, "text": ""})
        elif tag == "img" and self.cards:
            self.cards[-1]["img"] = a.get("src")

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self.cards:
            self.cards[-1]["text"] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table[-1]][-1].append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table.pop()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two synthetic slides (one with a hostile centre name) and one missing slide; one Ray run.
    Afterwards the slide files are moved away: nothing below may need them."""
    from zeus_ray.engine.driver import run_cohort
    base = tmp_path_factory.mktemp("evrep")
    manifest = make_cohort(base / "cohort", n=2, width=1600, height=1200, extra_rows=[f"bad-1,{MISSING_URI},,synthetic,A,"])
    text = manifest.read_text().replace("syn-1.geojson,synthetic,B,", f"syn-1.geojson,synthetic,\"{HOSTILE_CENTRE.replace(chr(34), chr(34) * 2)}\",")
    manifest.write_text(text)
    out = base / "out"
    summary = run_cohort(job_config(manifest, out), progress=False)
    assert (summary.ok, summary.failed) == (2, 1)
    moved = base / "moved"
    moved.mkdir()
    for svs in (base / "cohort").glob("*.svs"):
        shutil.move(svs, moved / svs.name)
    return out, summary.prompt_key, base


@pytest.fixture
def copy(run, tmp_path):
    """A private copy of the run's outputs."""
    out, pk, _ = run
    dst = tmp_path / "res"
    shutil.copytree(out, dst)
    return dst, pk


def _cohort(root: Path, pk: str) -> Path:
    return root / "cohort" / pk


def _res(root: Path, sid: str) -> Path:
    return next(root.glob(f"slides/{sid}/results/*/*/_COMPLETE.json")).parent


def _slides(root: Path, pk: str) -> pd.DataFrame:
    return pd.read_parquet(_cohort(root, pk) / "slides.parquet").set_index("slide_id")


def _no_external_refs(text: str, page: Page) -> None:
    assert not re.search(r"https?://", text)
    assert not re.search(r"<link\b|@import|url\(", text)
    assert all(v.startswith(("data:image/", "#")) for v in page.links), [v[:40] for v in page.links]


def test_run_writes_self_contained_report(run):
    out, pk, _ = run
    text = (_cohort(out, pk) / "report.html").read_text()
    page = Page(text)
    _no_external_refs(text, page)
    assert [p.name for p in _cohort(out, pk).glob("report*")] == ["report.html"]
    # Table 1 and Table 2 hold the numbers of the stored table CSVs
    for name in ("table1", "table2"):
        expected = pd.read_csv(_cohort(out, pk) / f"{name}.csv")
        rows = page.tables[name][1:]
        assert len(rows) == len(expected) >= 1
        head = page.tables[name][0]
        for row, (_, e) in zip(rows, expected.iterrows()):
            assert row[head.index("Slides")] == str(e["n_slides"])
            for label, m in (("DSC", "dice"), ("Precision", "precision"), ("Recall", "recall")):
                assert row[head.index(label)].startswith(format_mean_std(e[f"{m}_mean"], e[f"{m}_std"]))
    assert page.tables["table2"][0].index("Centre") >= 0 and any(HOSTILE_CENTRE in r for r in page.tables["table2"])
    # one card per ok slide, with its Dice and a small inline image
    slides = _slides(out, pk)
    assert sorted(c["id"] for c in page.cards) == ["syn-0", "syn-1"]
    for c in page.cards:
        assert float(c["dice"]) == pytest.approx(slides.loc[c["id"], "dice"], abs=0)
        assert f"Dice {slides.loc[c['id'], 'dice']:.3f}" in c["text"]
        img = Image.open(io.BytesIO(base64.b64decode(c["img"].split(",", 1)[1])))
        assert img.format == "JPEG" and img.width <= 400
    # the errors table names the missing slide; its hostile message and the centre are escaped
    errors = page.tables["errors-table"][1:]
    assert [r[:2] for r in errors] == [["bad-1", "failed"]] and "<script>" in errors[0][2]
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in text
    assert "<i>A&B</i>" not in text and "&lt;i&gt;A&amp;B&lt;/i&gt;&#34;" in text   # markupsafe writes " as &#34;
    assert "dice-plot" in page.ids and text.count('class="pt"') == 2 * 2   # per dataset + per centre
    for fact in ("random:vit_tiny_patch16_224", pk, "normal, tumor", "448 px tiles at 1 µm/px (10x), stride 112 px (75% overlap)"):
        assert fact in text


def test_evaluate_recomputes_run_metrics_without_slides_or_model(run, copy):
    out, pk, base = run
    root, _ = copy
    before = {sid: json.loads((_res(root, sid) / "metrics.json").read_text()) for sid in ("syn-0", "syn-1")}
    (_cohort(root, pk) / "report.html").unlink()
    code = ("import sys; from zeus_ray.cli import main; rc = main(['evaluate', sys.argv[1]]); "
            "bad = [m for m in ('torch', 'openslide', 'ray', 'timm') if m in sys.modules]; "
            "print('HEAVY', bad); sys.exit(rc or (3 if bad else 0))")
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "HEAVY []" in r.stdout
    assert "zeus evaluate: 2 slides evaluated, 0 with annotation errors" in r.stdout
    assert "| Dataset | Model | Slides | DSC |" in r.stdout
    assert not list((base / "cohort").glob("*.svs"))          # the slides really were not there
    new = _slides(root, pk)
    old = _slides(out, pk)
    for sid in ("syn-0", "syn-1"):
        assert json.loads((_res(root, sid) / "metrics.json").read_text()) == before[sid]
        for col in ("dice", "precision", "recall", "iou", "pred_area_mm2", "true_area_mm2", "metric_mpp"):
            assert new.loc[sid, col] == old.loc[sid, col], (sid, col)
    assert new.loc["bad-1", "status"] == "failed" and np.isnan(new.loc["bad-1", "dice"])
    pd.testing.assert_frame_equal(pd.read_csv(_cohort(root, pk) / "table1.csv"), pd.read_csv(_cohort(out, pk) / "table1.csv"))
    assert (_cohort(root, pk) / "report.html").exists()
    assert json.loads((_cohort(root, pk) / "run.json").read_text())["evaluate"]["annotations"].startswith("manifest ")


def _independent_dice(res: Path, polygon: Polygon) -> float:
    """Dice on the default metric grid (4 × finer than the cell grid), by shapely point-in-polygon."""
    with np.load(res / "maps.npz") as z:
        tissue, cell0 = z["tissue"], float(z["cell0"])
    pred = np.array(Image.open(next(res.glob("mask_*mpp.png")))) > 0
    f = 4
    up = lambda m: np.kron(m, np.ones((f, f), dtype=bool)).astype(bool)
    pred, valid = up(pred) & up(tissue), up(tissue)
    ys, xs = (np.mgrid[0:pred.shape[0], 0:pred.shape[1]] + 0.5) * (cell0 / f)
    truth = shapely.contains_xy(polygon, xs, ys) & valid
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    return 2 * tp / (2 * tp + fp + fn)


def test_evaluate_override_folder_changed_and_malformed(run, copy, tmp_path):
    out, pk, _ = run
    root, _ = copy
    folder = tmp_path / "ann"
    folder.mkdir()
    lesion = Polygon([(310.3, 250.7), (1700.1, 420.9), (1500.7, 1300.3), (420.9, 1150.1)])
    (folder / "syn-0.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(lesion),
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    (folder / "syn-1.geojson").write_text('{"type": "FeatureCollection", "features": [')   # truncated
    overlay_before = (_res(root, "syn-0") / "overlay.jpg").read_bytes()
    s = evaluate_results(str(root), annotations=str(folder))
    assert (s.evaluated, s.errors, s.unannotated, s.not_ok) == (1, 1, 0, 1)
    new, old = _slides(root, pk), _slides(out, pk)
    expected = _independent_dice(_res(root, "syn-0"), lesion)
    assert new.loc["syn-0", "dice"] == pytest.approx(expected, abs=1e-12)
    assert abs(expected - old.loc["syn-0", "dice"]) > 1e-3
    assert json.loads((_res(root, "syn-0") / "metrics.json").read_text())["dice"] == new.loc["syn-0", "dice"]
    assert json.loads((_res(root, "syn-0") / "_COMPLETE.json").read_text())["dice"] == new.loc["syn-0", "dice"]
    assert (_res(root, "syn-0") / "overlay.jpg").read_bytes() != overlay_before
    # the malformed file: that slide has no metrics and its error names the file
    err = new.loc["syn-1", "annotation_error"]
    assert np.isnan(new.loc["syn-1", "dice"]) and "syn-1.geojson" in err and "not valid JSON" in err
    assert not (_res(root, "syn-1") / "metrics.json").exists()
    t1 = pd.read_csv(_cohort(root, pk) / "table1.csv")
    assert (t1["n_slides"].sum(), t1["dice_n"].sum(), t1["dice_nan"].sum()) == (2, 1, 1)
    assert t1["dice_mean"].iloc[0] == pytest.approx(expected)
    page = Page((_cohort(root, pk) / "report.html").read_text())
    rows = {(r[0], r[1]): r[2] for r in page.tables["errors-table"][1:]}
    assert set(rows) == {("bad-1", "failed"), ("syn-1", "no metrics")} and "syn-1.geojson" in rows[("syn-1", "no metrics")]
    assert {c["id"]: c["dice"] for c in page.cards} == {"syn-0": repr(float(new.loc["syn-0", "dice"])), "syn-1": ""}


def test_evaluate_without_annotations_and_settings(run, copy, tmp_path):
    out, pk, _ = run
    root, _ = copy
    empty = tmp_path / "none.csv"
    empty.write_text("slide_id,annotation_uri\n")
    s = evaluate_results(str(root), annotations=str(empty))
    assert (s.evaluated, s.errors, s.unannotated) == (0, 0, 2) and s.table1_md == ""
    assert _slides(root, pk)["dice"].isna().all()
    assert not list(_cohort(root, pk).glob("table*")) and not (_res(root, "syn-0") / "metrics.json").exists()
    text = (_cohort(root, pk) / "report.html").read_text()
    page = Page(text)
    _no_external_refs(text, page)
    assert "no-dice" in page.ids and "table1" not in page.tables and "dice-plot" not in page.ids
    assert len(page.cards) == 2 and all(c["dice"] == "" and "Dice n/a" in c["text"] for c in page.cards)
    # --set: evaluation keys change the metric grid; other keys are refused
    cell_um = float(_slides(out, pk).loc["syn-0", "mask_mpp"])
    evaluate_results(str(root), overrides=[f"evaluation.metric_mpp={cell_um}"], report=False)
    assert _slides(root, pk).loc["syn-0", "metric_mpp"] == cell_um
    with pytest.raises(ConfigError, match="tiling.overlap.*only evaluation"):
        evaluate_results(str(root), overrides=["tiling.overlap=0.5"])
    with pytest.raises(ConfigError, match="evaluation.metric_mpp"):
        evaluate_results(str(root), overrides=["evaluation.metric_mpp=-1"])
    with pytest.raises(ConfigError, match="--annotations .*nowhere.*not found"):
        evaluate_results(str(root), annotations=str(tmp_path / "nowhere"))


def test_prompt_key_choice(copy):
    root, pk = copy
    store = OutputStore(str(root))
    assert resolve_prompt_key(store) == pk
    other = root / "cohort" / "0000older0000000"
    other.mkdir()
    shutil.copy(root / "cohort" / pk / "run.json", other / "run.json")
    os.utime(other / "run.json", (1e9, 1e9))
    assert resolve_prompt_key(store) == pk                      # the newest
    assert resolve_prompt_key(store, "0000older0000000") == "0000older0000000"
    with pytest.raises(ZeusError, match=f"no run with prompt key 'nope'; runs there: {pk}, 0000older0000000"):
        resolve_prompt_key(store, "nope")
    with pytest.raises(ZeusError, match="no cohort/<prompt_key>/run.json"):
        resolve_prompt_key(OutputStore(str(root / "slides")))


def test_report_all_failed_hostile_text(copy, tmp_path):
    """Every slide failed, ids and messages full of markup: escaped, no gallery, no tables."""
    root, pk = copy
    hostile = ['<img src=x onerror=alert(1)>', 'a"b\'c&d</td></table>', "<script>x</script>"]
    rows = [{"slide_id": h, "status": st, "error": f"slide {h!r}: {h} cannot be read", "n_tiles": 0,
             "dataset": h, "center": None, "tumour_area_mm2": None}
            for h, st in zip(hostile, ("failed", "no_tissue", "failed"))]
    cdir = tmp_path / "r" / "cohort" / "k1"
    cdir.mkdir(parents=True)
    shutil.copy(root / "cohort" / pk / "run.json", cdir / "run.json")
    pd.DataFrame(rows).to_parquet(cdir / "slides.parquet")
    path = write_report(OutputStore(str(tmp_path / "r")), "k1", out=str(tmp_path / "elsewhere" / "rep.html"))
    text = Path(path).read_text()
    page = Page(text)
    _no_external_refs(text, page)
    assert "<img src=x" not in text and "<script>x" not in text and "</td></table>" not in text
    assert [r[0] for r in page.tables["errors-table"][1:]] == hostile
    assert [r[1] for r in page.tables["errors-table"][1:]] == ["failed", "no_tissue", "failed"]
    assert "no-results" in page.ids and "no-dice" in page.ids and not page.cards
    assert "3 slides: 0 ok, 1 without tissue, 2 failed; 0 with Dice" in text
    with pytest.raises(ZeusError, match="no run.json"):
        build_report(OutputStore(str(tmp_path / "r")), "k2")


def test_evaluate_and_report_in_a_bucket(copy, s3_bucket):
    root, pk = copy
    uri = f"s3://{s3_bucket}/zeus"
    store = OutputStore(uri)
    store.upload_dir(root, store.root)
    s = evaluate_results(uri, workers=2)
    assert (s.evaluated, s.errors) == (2, 0)
    t = store.read_parquet(f"{store.root}/cohort/{pk}/slides.parquet").to_pandas().set_index("slide_id")
    local = _slides(root, pk)
    assert t.loc["syn-0", "dice"] == local.loc["syn-0", "dice"] and t.loc["syn-1", "dice"] == local.loc["syn-1", "dice"]
    page = Page(store.read_bytes(f"{store.root}/cohort/{pk}/report.html").decode())
    assert len(page.cards) == 2 and all(c["img"].startswith("data:image/jpeg;base64,") for c in page.cards)


def test_gallery_pages_large_cohorts(tmp_path):
    """Past one page of slides the gallery gets a pager and shows one page at a time (the script
    hides the other cards); every slide still has its card."""
    import pyarrow as pa

    from zeus_ray.results.report import PAGE_SIZE, build_report
    from zeus_ray.storage.store import OutputStore
    store = OutputStore(str(tmp_path))
    n = 2 * PAGE_SIZE + 7
    df = pd.DataFrame({"slide_id": [f"s{i:04d}" for i in range(n)], "status": "ok", "tiling_key": "k",
                       "dice": np.linspace(0, 1, n), "n_tiles": 10})
    store.write_parquet(store.path("cohort", "pk", "slides.parquet"), pa.Table.from_pandas(df))
    store.write_json(store.path("cohort", "pk", "run.json"), {"config": {}, "prompt_key": "pk"})
    text = build_report(store, "pk")
    page = Page(text)
    assert len(page.cards) == n and f'data-page-size="{PAGE_SIZE}"' in text
    assert {"prev", "next", "page"} <= page.ids and "showPage(0)" in text
    small = OutputStore(str(tmp_path / "small"))
    small.write_parquet(small.path("cohort", "pk", "slides.parquet"), pa.Table.from_pandas(df.head(3)))
    small.write_json(small.path("cohort", "pk", "run.json"), {"config": {}, "prompt_key": "pk"})
    assert 'id="next"' not in build_report(small, "pk")     # one page: no pager


def test_report_escapes_markup_in_ids_classes_and_names(tmp_path):
    """Slide ids, dataset/centre names, class names and messages holding markup reach the page as text
    in every section (settings, tables, plot, gallery, slides, ablation, errors): autoescape."""
    import pyarrow as pa
    evil = "<script>alert('x')</script>"
    store = OutputStore(str(tmp_path))
    ids = ["s0", f"s1{evil}", f"s2{evil}"]     # a stored slide's id is a safe folder name (s0 has an overlay)
    df = pd.DataFrame({"slide_id": ids, "status": ["ok", "ok", "failed"], "tiling_key": ["tk", None, None],
                       "dataset": [f"d{evil}"] * 3, "center": [f"c{evil}", None, None], "dice": [0.5, 0.75, None],
                       "precision": [0.5, 0.5, None], "recall": [1.0, 1.0, None], "n_tiles": [4, 4, 0],
                       "annotation_error": [f"bad class {evil}", None, None],
                       "error": [None, None, f"slide {ids[2]!r}: {evil} cannot be read"]})
    store.write_parquet(store.path("cohort", "pk", "slides.parquet"), pa.Table.from_pandas(df))
    table = pd.DataFrame({"dataset": [f"d{evil}"], "n_slides": [2], "dice_mean": [0.625], "dice_std": [0.125],
                          "precision_mean": [0.5], "precision_std": [0.0], "recall_mean": [1.0], "recall_std": [0.0]})
    store.write_bytes(store.path("cohort", "pk", "table1.csv"), table.to_csv(index=False).encode())
    store.write_json(store.path("cohort", "pk", "run.json"),
                     {"config": {"model": {"id": f"m{evil}"}}, "prompt_key": "pk", "classes": [f"tumour{evil}", "normal"]})
    ablation = pd.DataFrame({"dataset": [f"d{evil}"], "variant": [f"-{evil}"], "mean": [0.5], "delta_vs_full": [0.1],
                             "count": [2]})
    store.write_bytes(store.path("cohort", "pk", "ablation", "summary.csv"), ablation.to_csv(index=False).encode())
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 100, 50)).save(buf, format="JPEG")
    store.write_bytes(f"{store.slide_dir(ids[0], 'results', 'tk', 'pk')}/overlay.jpg", buf.getvalue())

    text = build_report(store, "pk", workers=1)
    page = Page(text)
    assert "<script>alert" not in text and text.count("<script>") == 1         # only the page's own script
    assert page.tables[None][5] == ["Classes", f"tumour{evil}, normal"]
    assert page.tables["table1"][1][0] == f"d{evil}"
    assert [r[0] for r in page.tables["slides-table"][1:]] == ids
    assert [c["id"] for c in page.cards] == ids[:2] and page.cards[0]["img"].startswith("data:image/jpeg;base64,")
    assert page.cards[1]["img"] is None and page.cards[1]["text"].startswith(f"no overlay image{ids[1]}")
    assert f"bad class {evil}" in page.cards[0]["text"] and f"c{evil}" in page.cards[0]["text"]
    assert page.tables["ablation-table"][1][:2] == [f"d{evil}", f"-{evil}"]
    assert page.tables["errors-table"][1:] == [[ids[2], "failed", f"slide {ids[2]!r}: {evil} cannot be read"],
                                               [ids[0], "no metrics", f"bad class {evil}"]]
    titles = re.findall(r"<title>(.*?)</title>", text)
    assert titles[0] == f"zeus_ray report: m{evil.replace('<', '&lt;').replace('>', '&gt;').replace(chr(39), '&#39;')} / pk"
    assert sum(f"{ids[1]}: Dice 0.750" == html.unescape(t) for t in titles) == 2    # one dot per plot row
