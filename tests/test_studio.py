"""`zeus studio` over a small real run (synthetic slides, random model, local Ray): the HTTP API with
Starlette's test client, the CLI as a real server, and a real headless Chromium driven by Playwright."""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import yaml
from PIL import Image
from starlette.testclient import TestClient

from _cohort import job_config, make_cohort
from zeus_ray.prompts import load_prompt_set
from zeus_ray.studio.app import Studio, build_app
from zeus_ray.studio.run_data import StudioRun, query_slides

ROOT = Path(__file__).resolve().parents[1]
W = {"X-Zeus-Studio": "1"}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two synthetic slides with annotations and one missing slide (failed); its files' hashes."""
    from zeus_ray.engine.driver import run_cohort
    base = tmp_path_factory.mktemp("studio")
    manifest = make_cohort(base / "cohort", n=2, extra_rows=["bad-1,missing.svs,,synthetic,A,"])
    out = base / "out"
    summary = run_cohort(job_config(manifest, out), progress=False)
    assert (summary.ok, summary.failed) == (2, 1)
    return out, summary.prompt_key, _snapshot(out), base


@pytest.fixture(scope="module")
def client(run):
    return TestClient(build_app(Studio(StudioRun(str(run[0]))), allowed_hosts=["testserver"]))


def _res(out: Path, sid: str, pk: str) -> Path:
    return next(out.glob(f"slides/{sid}/results/*/{pk}"))


def _png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def _swapped(ps: dict) -> dict:
    """The run's prompts with the two classes' classnames exchanged: every argmax flips."""
    ps = json.loads(json.dumps(ps))
    a, b = ps["classes"]
    a["classnames"], b["classnames"] = b["classnames"], a["classnames"]
    ps["name"] = "swapped"
    return ps


def test_cohort_table_sorts_filters_pages(client, run):
    out, pk, _, _ = run
    info = client.get("/api/run").json()
    assert (info["prompt_key"], info["n_slides"], info["classes"]) == (pk, 3, ["normal", "tumor"])
    assert "zeus studio" in client.get("/").text and "openseadragon" in client.get("/slide?id=syn-0").text
    table = pd.read_csv(out / "cohort" / pk / "slides.csv")
    got = client.get("/api/slides?sort=dice&order=asc").json()
    expect = table.sort_values("dice", na_position="last")["slide_id"].tolist()
    assert [r["slide_id"] for r in got["rows"]] == expect and got["total"] == 3
    ok = table.set_index("slide_id").loc["syn-0"]
    row = next(r for r in got["rows"] if r["slide_id"] == "syn-0")
    for k in ("dice", "precision", "recall", "tumour_area_mm2"):
        assert row[k] == pytest.approx(ok[k])
    failed = client.get("/api/slides?status=failed").json()
    assert [r["slide_id"] for r in failed["rows"]] == ["bad-1"] and "missing" in failed["rows"][0]["error"]
    assert [r["slide_id"] for r in client.get("/api/slides?center=B").json()["rows"]] == ["syn-1"]
    page = client.get("/api/slides?sort=slide_id&order=desc&per_page=1&page=1").json()
    assert (page["total"], [r["slide_id"] for r in page["rows"]]) == (3, ["syn-0"])
    thumb = client.get("/api/slides/syn-0/thumbnail.jpg")
    assert thumb.headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(thumb.content)).size) <= 192
    assert client.get("/api/slides?sort=error").status_code == 400


def test_query_slides_large_cohort_pages():
    rng = np.random.default_rng(0)
    n = 5000
    df = pd.DataFrame({"slide_id": [f"s{i:05d}" for i in range(n)], "status": rng.choice(["ok", "failed"], n, p=[.9, .1]),
                       "dice": rng.random(n), "dataset": rng.choice(["d1", "d2"], n), "center": rng.choice(["A", "B"], n)})
    df.loc[df.status == "failed", "dice"] = np.nan
    for c in ("precision", "recall", "tumour_area_mm2", "n_tiles", "error", "iou", "tissue_area_mm2"):
        df[c] = np.nan
    page = query_slides(df, status="ok", dataset="d2", sort="dice", page=3, per_page=25)
    sel = df[(df.status == "ok") & (df.dataset == "d2")].sort_values("dice")
    assert page["total"] == len(sel)
    assert [r["slide_id"] for r in page["rows"]] == sel["slide_id"].iloc[75:100].tolist()
    worst_last = query_slides(df, sort="dice", descending=True, per_page=500, page=9)["rows"]
    assert all(r["dice"] is None for r in worst_last[-10:])   # missing values last, also descending


def test_deep_zoom_tiles_are_the_slide(client, run):
    _, _, _, base = run
    slide = openslide.OpenSlide(str(base / "cohort" / "syn-0.svs"))
    dzi = client.get("/api/slides/syn-0/dzi.dzi").text
    w, h = slide.dimensions
    assert f'Width="{w}"' in dzi and f'Height="{h}"' in dzi and 'TileSize="256"' in dzi
    top = int(np.ceil(np.log2(max(w, h))))
    tile = _png(client.get(f"/api/slides/syn-0/dzi_files/{top}/1_2.jpeg").content).astype(float)
    ref = np.asarray(slide.read_region((256, 512), 0, (256, 256)).convert("RGB"), float)
    assert tile.shape == ref.shape and np.abs(tile - ref).mean() < 4
    assert client.get(f"/api/slides/syn-0/dzi_files/{top + 1}/0_0.jpeg").status_code == 404
    assert client.get(f"/api/slides/syn-0/dzi_files/{top}/99_0.jpeg").status_code == 404


def test_overlays_are_the_stored_maps(client, run):
    out, pk, _, _ = run
    res = _res(out, "syn-0", pk)
    info = client.get("/api/slides/syn-0").json()
    assert info["overlays"] == ["mask", "heat-0", "heat-1", "tissue", "truth"]
    z = np.load(res / "maps.npz")
    mask = _png(client.get("/api/slides/syn-0/overlays/mask.png").content)
    stored = _png(next(res.glob("mask_*mpp.png")).read_bytes()) > 0
    np.testing.assert_array_equal(mask[..., 3] > 0, stored)
    assert tuple(mask[stored][0]) == (0, 70, 255, 255)   # the report's prediction colour
    meta = client.get("/api/slides/syn-0/overlays/mask.json").json()
    assert meta["px0"] == pytest.approx(float(z["cell0"])) and meta["legend"]["color"] == "#0046ff"
    heat = _png(client.get("/api/slides/syn-0/overlays/heat-1.png").content)
    np.testing.assert_array_equal(heat[..., 3] > 0, z["tissue"])
    hm = client.get("/api/slides/syn-0/overlays/heat-1.json").json()["legend"]
    inside = z["maps"][1][z["tissue"]]
    assert (hm["min"], hm["max"]) == (pytest.approx(inside.min()), pytest.approx(inside.max()))
    truth = _png(client.get("/api/slides/syn-0/overlays/truth.png").content)
    assert (truth[..., 3] > 0).any() and tuple(truth[truth[..., 3] > 0][0][:3]) == (0, 190, 0)
    assert client.get("/api/slides/syn-0/overlays/heat-7.png").status_code == 404


def test_apply_reproduces_the_run_then_an_edit_flips_the_mask(client, run):
    out, pk, _, _ = run
    res = _res(out, "syn-0", pk)
    ps = client.get("/api/prompts").json()["prompts"]
    same = client.post("/api/slides/syn-0/apply", json={"prompts": ps}, headers=W).json()
    stored = json.loads((res / "metrics.json").read_text())
    assert same["key"] == pk and same["same_as_run"]
    assert same["after"]["dice"] == pytest.approx(stored["dice"]) and same["before"]["dice"] == pytest.approx(stored["dice"])
    mask = _png(client.get(f"/api/slides/syn-0/overlays/mask.png?draft={pk}").content)[..., 3] > 0
    np.testing.assert_array_equal(mask, _png(next(res.glob("mask_*mpp.png")).read_bytes()) > 0)
    flipped = client.post("/api/slides/syn-0/apply", json={"prompts": _swapped(ps)}, headers=W).json()
    assert flipped["key"] != pk and flipped["encoded_prompts"] == 0   # every prompt was cached
    new = _png(client.get(f"/api/slides/syn-0/overlays/mask.png?draft={flipped['key']}").content)[..., 3] > 0
    labels = _png(next(res.glob("labels_*mpp.png")).read_bytes())   # 0 outside, 1 + class index inside
    np.testing.assert_array_equal(new, labels == 1)   # what was "normal" is now the tumour class
    assert flipped["after"]["dice"] != pytest.approx(stored["dice"])
    bad = _swapped(ps)
    bad["templates"] = ["no placeholder here"]
    r = client.post("/api/slides/syn-0/apply", json={"prompts": bad}, headers=W)
    assert r.status_code == 400 and "CLASSNAME" in r.json()["error"] and "\n" not in r.json()["error"]


def test_save_writes_a_valid_prompt_file(client, run):
    out, pk, _, _ = run
    ps = _swapped(client.get("/api/prompts").json()["prompts"])
    saved = client.post("/api/prompts/save", json={"prompts": ps | {"name": "../../evil name"}}, headers=W).json()
    path = Path(saved["saved"])
    assert path.parent == out / "studio" / "prompts" and path.name.startswith("evil-name-")
    loaded = load_prompt_set(str(path))
    assert [c.classnames for c in loaded.classes] == [c["classnames"] for c in ps["classes"]]
    parsed = client.post("/api/prompts/parse", json={"yaml": path.read_text()}, headers=W).json()["prompts"]
    assert parsed["classes"] == ps["classes"]
    r = client.post("/api/prompts/parse", json={"yaml": "name: x\ntemplates: [a]\n"}, headers=W)
    assert r.status_code == 400 and "prompt file" in r.json()["error"]
    r = client.post("/api/prompts/parse", json={"yaml": "x" * (2 << 20)}, headers=W)
    assert r.status_code == 400 and "KiB" in r.json()["error"]


def test_paths_from_the_browser_are_checked(client, run):
    for url in ("/api/slides/..%2F..%2Fetc%2Fpasswd", "/api/slides/..%2Fcohort/thumbnail.jpg",
                "/api/slides/%2E%2E/dzi.dzi", "/api/slides/syn-0/overlays/..%2F..%2Fmaps.png",
                "/api/slides/nope/dzi_files/0/0_0.jpeg", "/static/../run_data.py", "/static/%2e%2e/app.py",
                "/api/slides/syn-0/overlays/mask.png?draft=../../x"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "root:" not in r.text and "import" not in r.text
    assert client.get("/api/slides/bad-1/overlays/mask.png").status_code == 404   # failed: no results
    r = client.get("/api/slides/bad-1/dzi.dzi")   # a failed slide whose file is missing: one line, no trace
    assert r.status_code == 400 and "bad-1" in r.json()["error"] and "\n" not in r.json()["error"]
    assert client.post("/api/slides/syn-0/apply", json={}).status_code == 403   # no write header
    evil = TestClient(client.app, base_url="http://evil.example")
    assert evil.get("/api/run").status_code == 400


def test_token_is_required_on_a_shared_host(run):
    app = build_app(Studio(StudioRun(str(run[0]))), token="s3cret-token", allowed_hosts=["testserver"])
    c = TestClient(app, follow_redirects=False)
    assert c.get("/api/run").status_code == 401 and c.get("/?token=wrong").status_code == 401
    r = c.get("/?token=s3cret-token")
    assert r.status_code == 303 and r.headers["location"] == "/" and "httponly" in r.headers["set-cookie"].lower()
    assert c.get("/api/run").status_code == 200   # the cookie now
    r = TestClient(app, follow_redirects=False).get("/slide?id=syn-0&token=s3cret-token")
    assert r.headers["location"] == "/slide?id=syn-0"   # the rest of the address is kept
    assert TestClient(app).get("/api/run", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def _start_cli(out: Path, *extra: str):
    proc = subprocess.Popen([sys.executable, "-m", "zeus_ray", "studio", str(out), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "open http" in line:
            return proc, re.search(r"(http://\S+)", line).group(1), lines
    proc.kill()
    raise AssertionError("zeus studio did not start: " + "".join(lines))


def test_cli_serves_and_requires_a_token_off_loopback(run):
    import httpx
    proc, url, _ = _start_cli(run[0], "--prompt-key", run[1])
    try:
        assert httpx.get(url + "api/run").json()["n_slides"] == 3 and url.startswith("http://127.0.0.1:")
    finally:
        proc.terminate()
        proc.wait(30)
    proc, url, lines = _start_cli(run[0], "--host", "0.0.0.0", "--prompt-key", run[1])
    try:
        port = re.search(r":(\d+)/", url).group(1)
        token = re.search(r"token=(\S+)", url).group(1)
        assert httpx.get(f"http://127.0.0.1:{port}/api/run").status_code == 401
        ok = httpx.get(f"http://127.0.0.1:{port}/api/run", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and "".join(lines).count(token) == 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_run_in_a_bucket(run, s3_bucket):
    """The same run copied to a (moto) S3 bucket: the studio reads everything from there."""
    from zeus_ray.storage.store import OutputStore
    out, pk, before, _ = run
    uri = f"s3://{s3_bucket}/zeus"
    store = OutputStore(uri)
    for rel in before:
        store.write_bytes(f"{store.root}/{rel}", (out / rel).read_bytes())
    c = TestClient(build_app(Studio(StudioRun(uri)), allowed_hosts=["testserver"]))
    assert c.get("/api/run").json()["root"] == uri
    assert [r["slide_id"] for r in c.get("/api/slides?status=ok").json()["rows"]] == ["syn-0", "syn-1"]
    assert c.get("/api/slides/syn-1/thumbnail.jpg").status_code == 200
    mask = _png(c.get("/api/slides/syn-1/overlays/mask.png").content)[..., 3] > 0
    np.testing.assert_array_equal(mask, _png(next(_res(out, "syn-1", pk).glob("mask_*mpp.png")).read_bytes()) > 0)
    same = c.post("/api/slides/syn-1/apply", json={"prompts": c.get("/api/prompts").json()["prompts"]}, headers=W).json()
    stored = json.loads((_res(out, "syn-1", pk) / "metrics.json").read_text())
    assert same["key"] == pk and same["after"]["dice"] == pytest.approx(stored["dice"])
    assert c.get("/api/slides/syn-1/dzi_files/8/0_0.jpeg").headers["content-type"] == "image/jpeg"


def test_cli_bad_root_and_options_are_one_line_errors(tmp_path, capsys):
    from zeus_ray.cli import main
    assert main(["studio", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "run.json" in err and "\n" not in err
    assert main(["studio", str(tmp_path), "--set", "tiling.mpp=2"]) == 2
    assert "model.<key>" in capsys.readouterr().err


def test_apply_to_cohort_is_zeus_reprompt(client, run):
    out, pk, _, _ = run
    ps = _swapped(client.get("/api/prompts").json()["prompts"])
    st = client.post("/api/cohort/apply", json={"prompts": ps}, headers=W).json()
    assert st["total"] == 2 and st["prompt_key"] != pk
    deadline = time.time() + 600
    while st["state"] == "running" and time.time() < deadline:
        time.sleep(1)
        st = client.get(f"/api/cohort/jobs/{st['prompt_key']}").json()
    assert st["state"] == "done" and st["done"] == 2, st
    assert "2 slides ok" in st["summary"] and any("bad-1" in e for e in st["errors"])   # still failed, named
    for sid in ("syn-0", "syn-1"):
        old, new = _res(out, sid, pk), _res(out, sid, st["prompt_key"])
        labels = _png(next(old.glob("labels_*mpp.png")).read_bytes())
        np.testing.assert_array_equal(_png(next(new.glob("mask_*mpp.png")).read_bytes()) > 0, labels == 1)
    draft = client.post("/api/slides/syn-1/apply", json={"prompts": ps}, headers=W).json()
    cohort = json.loads((_res(out, "syn-1", st["prompt_key"]) / "metrics.json").read_text())
    assert draft["key"] == st["prompt_key"] and draft["after"]["dice"] == pytest.approx(cohort["dice"])
    assert yaml.safe_load(Path(st["prompt_file"]).read_text())["name"] == "swapped"


READY = "() => window.studio && window.studio.ready && window.studio.fullyLoaded()"
CANVAS = """() => { const c = window.studio.viewer.drawer.canvas, d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let sum = 0, blue = 0;
  for (let i = 0; i < d.length; i += 4) { sum += d[i] * 3 + d[i + 1] * 5 + d[i + 2] * 7; if (d[i + 2] > d[i] + 40 && d[i + 2] > d[i + 1] + 40) blue++; }
  return [sum, blue]; }"""


def _settled(page) -> list[int]:
    """The canvas signature once the viewer is loaded and two reads 300 ms apart agree (the
    viewer animates zooms and fades tiles in)."""
    page.wait_for_function(READY, timeout=60_000)
    last = page.evaluate(CANVAS)
    for _ in range(100):
        page.wait_for_timeout(300)
        now = page.evaluate(CANVAS)
        if now == last and page.evaluate(READY):
            return now
        last = now
    raise AssertionError("the viewer never settled")


def _levels(urls: list[str]) -> int:
    return max(int(u.split("/dzi_files/")[1].split("/")[0]) for u in urls)


def test_browser_cohort_slide_zoom_overlay_reprompt(client, run, tmp_path):
    """Headless Chromium on `zeus studio`: cohort page → slide → zoom → mask off/on → edit, apply."""
    from playwright.sync_api import sync_playwright
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is required (apt-get install -y chromium; .ci/run installs it)"
    ps = client.get("/api/prompts").json()["prompts"]
    expected = client.post("/api/slides/syn-0/apply", json={"prompts": _swapped(ps)}, headers=W).json()["after"]
    proc, url, _ = _start_cli(run[0], "--prompt-key", run[1])   # not the newer re-prompt's run
    tiles: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: tiles.append(r.url) if "/dzi_files/" in r.url else None)
            page.goto(url)
            page.wait_for_selector("tr[data-slide='syn-0'] img.thumb")
            assert page.locator("#slides tbody tr").count() == 3
            page.click("#b-failed")
            page.wait_for_function("document.querySelectorAll('#slides tbody tr').length === 1")
            assert page.inner_text("#slides tbody").startswith("bad-1") or "bad-1" in page.inner_text("#slides tbody")
            page.click("#b-failed")
            page.wait_for_selector("a:text-is('syn-0')")
            page.click("a:text-is('syn-0')")
            page.wait_for_function(READY, timeout=60_000)
            shallow = _levels(tiles)
            page.evaluate("() => { const v = window.studio.viewer.viewport; v.zoomBy(6); v.applyConstraints(true); }")
            page.wait_for_function("() => window.studio.viewer.viewport.getZoom(true) > 3", timeout=60_000)
            on = _settled(page)
            assert _levels(tiles) > shallow   # finer tiles were fetched for the zoomed view
            page.uncheck("#on-mask")
            off = _settled(page)
            assert off[0] != on[0] and off[1] < on[1]   # fewer prediction-blue pixels without the mask
            page.check("#on-mask")
            assert _settled(page)[1] > (on[1] + off[1]) / 2   # back on
            before = page.inner_text("#m-before-dice")
            names = page.locator(".c-names")
            a, b = names.nth(0).input_value(), names.nth(1).input_value()
            names.nth(0).fill(b)
            names.nth(1).fill(a)
            page.click("#b-apply")
            page.wait_for_function("document.getElementById('m-after-dice').textContent !== '–'", timeout=180_000)
            applied = _settled(page)
            after = page.inner_text("#m-after-dice")
            assert after == f"{expected['dice']:.3f}" and after != before
            assert applied != on   # the new mask is drawn
            other = tmp_path / "other.yaml"
            other.write_text((ROOT / "prompts" / "multiclass-skin.yaml").read_text())
            page.set_input_files("#load-file", str(other))   # load another prompt file into the panel
            page.wait_for_function("document.getElementById('msg').textContent.startsWith('loaded other.yaml')")
            loaded = load_prompt_set(str(other))
            assert page.input_value("#ps-name") == loaded.name
            assert page.locator(".cls").count() == len(loaded.classes)
            shot = tmp_path / "studio.png"
            page.screenshot(path=str(shot))
            browser.close()
        assert Image.open(shot).size == (1400, 900) and not errors, errors
    finally:
        proc.terminate()
        proc.wait(30)


def test_zz_the_opened_run_is_unchanged(run):
    out, pk, before, _ = run
    after = _snapshot(out)
    assert {k: after.get(k) for k in before} == before
    added = [k for k in after if k not in before]
    assert added and not [k for k in added if f"/{pk}/" in f"/{k}" or k.startswith(f"cohort/{pk}")]
