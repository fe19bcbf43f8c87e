"""The studio's web app (Starlette): the cohort page, the slide viewer's tiles and overlays, the
prompt panel's apply / save / apply-to-cohort. Pages are static files (static/); everything else
is JSON, PNG or JPEG under /api.

Every slide id in a path is looked up in the run (run_data.StudioRun.slide): unknown ids, and so
any attempt to reach other files, get 404. Overlay names are a fixed list, static files are
served by Starlette's StaticFiles (which refuses paths outside its folder)."""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ZeusError
from ..prompts import PromptSet, parse_prompt_set
from . import overlays as ov
from .cohort_job import CohortJob, prompt_yaml, save_prompt_set
from .reprompt import METRIC_KEYS, NoStoredResults, Reprompter, UnknownDraft
from .run_data import StudioRun, UnknownSlide, query_slides
from .security import StudioGuard
from .tiles import DeepZoomTiles, LRUCache, TileError

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
THUMB_PX = 192
JPEG = "image/jpeg"
PNG = "image/png"
CACHE_TILE = {"Cache-Control": "private, max-age=3600"}


class Studio:
    """The state behind the app: the run, tiles, re-prompts, overlays and cohort jobs."""

    def __init__(self, run: StudioRun, overrides: list[str] | None = None, reprompter: Reprompter | None = None):
        self.run = run
        self.overrides = list(overrides or [])
        self.tiles = DeepZoomTiles(run.cfg.cache, run.storage_options)
        self.reprompter = reprompter or Reprompter(run)
        self.overlays = LRUCache(128)
        self.thumbs = LRUCache(2048)
        self.jobs: dict[str, CohortJob] = {}

    # --- overlays ------------------------------------------------------------------------------
    def overlay(self, sid: str, name: str, draft: str | None) -> ov.Overlay:
        key = (sid, name, draft if name == "mask" or name.startswith("heat-") else None)
        got = self.overlays.get(key)
        return got if got is not None else self.overlays.put(key, self._draw(sid, name, key[2]))

    def _draw(self, sid: str, name: str, draft: str | None) -> ov.Overlay:
        ref = self.run.slide(sid)
        st = self.reprompter.state(ref)
        sg = st.sg
        if name == "tissue":
            mask, mpp = st.tissue_mask
            return ov.tissue_overlay(mask, mpp / sg.grid.mpp0)
        if name == "truth":
            if st.truth is None:
                raise NotFound(f"slide {sid}: no ground truth ({st.truth_error or 'the manifest gives no annotation_uri'})")
            f, truth = st.truth
            return ov.truth_overlay(truth, sg.cell0 / f)
        d = self.reprompter.draft(sid, draft) if draft else None
        if name == "mask":
            return ov.mask_overlay(d.tumour if d else st.stored["tumour"], sg.cell0)
        if name.startswith("heat-") and name[5:].isdigit():
            classes = d.class_names if d else st.stored["classes"]
            i = int(name[5:])
            if i < len(classes):
                maps = d.maps if d else st.stored["maps"]
                return ov.heat_overlay(maps[i], sg.tissue_cells, sg.cell0, f"similarity to {classes[i]}")
        raise NotFound(f"slide {sid}: no overlay {name!r} (mask, truth, tissue, heat-<class index>)")

    def thumbnail(self, sid: str) -> bytes:
        got = self.thumbs.get(sid)
        if got is not None:
            return got
        ref = self.run.slide(sid)
        if ref.keys is None:
            raise NotFound(f"slide {sid}: no stored picture (status {ref.row.get('status')})")
        store = self.run.store
        path = f"{ref.keys.res_dir}/overlay.jpg"
        if not store.exists(path):
            raise NotFound(f"slide {sid}: no overlay.jpg in its results")
        img = Image.open(io.BytesIO(store.read_bytes(path))).convert("RGB")
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        return self.thumbs.put(sid, buf.getvalue())

    def slide_info(self, sid: str) -> dict:
        ref = self.run.slide(sid)
        out = {"slide_id": sid, "row": ref.row, "viewer": ref.uri is not None, "classes": [], "overlays": []}
        if ref.keys is None:
            return out
        st = self.reprompter.state(ref)
        g = st.sg.grid
        out.update(width=g.width, height=g.height, mpp0=g.mpp0, cell_um=st.sg.cell_um, classes=st.stored["classes"],
                   metrics=_metrics(st.stored["metrics"], float(st.stored["tumour"].sum() * (st.sg.cell_um / 1000) ** 2)),
                   truth_error=st.truth_error)
        names = ["mask"] + [f"heat-{i}" for i in range(len(st.stored["classes"]))] + ["tissue"]
        out["overlays"] = names + (["truth"] if st.truth is not None else [])
        return out

    # --- prompts -------------------------------------------------------------------------------
    def apply(self, sid: str, ps: PromptSet) -> dict:
        ref = self.run.slide(sid)
        t0 = time.perf_counter()
        d = self.reprompter.apply(ref, ps)
        self.overlay(sid, "mask", d.key)   # the overlay is part of the answer's time
        st = self.reprompter.state(ref)
        before = _metrics(st.stored["metrics"], float(st.stored["tumour"].sum() * (st.sg.cell_um / 1000) ** 2))
        return {"key": d.key, "classes": d.class_names, "before": before,
                "after": _metrics(d.metrics, d.tumour_area_mm2), "encoded_prompts": d.encoded_prompts,
                "seconds": round(time.perf_counter() - t0, 3),
                "same_as_run": d.key == self.run.prompt_key}

    def apply_cohort(self, ps: PromptSet) -> dict:
        model_key = self.reprompter.text.model_key
        for job in self.jobs.values():
            if job.status()["state"] == "running":
                raise Conflict(f"a cohort re-prompt is running (prompt key {job.key}); wait for it to finish")
        uri = save_prompt_set(self.run, ps, model_key)
        job = CohortJob(self.run, uri, ps, model_key, self.overrides)
        self.jobs[job.key] = job
        return job.status()


class NotFound(ZeusError):
    pass


class Conflict(ZeusError):
    pass


def _metrics(m: dict | None, area: float) -> dict:
    out = {k: (None if m is None or m.get(k) is None or (isinstance(m.get(k), float) and np.isnan(m[k])) else m[k])
           for k in METRIC_KEYS}
    out["tumour_area_mm2"] = area
    return out


def _error(e: Exception) -> JSONResponse:
    status = 404 if isinstance(e, (UnknownSlide, UnknownDraft, NoStoredResults, NotFound, TileError)) else 409 if isinstance(e, Conflict) else 400
    return JSONResponse({"error": str(e)}, status_code=status)


def _handle(fn):
    """One-line JSON errors for our own errors; anything else is a bug and raises."""
    def wrapped(request: Request):
        try:
            return fn(request)
        except (ZeusError, ValueError) as e:
            return _error(e)
    return wrapped


MAX_BODY = 1 << 20   # a prompt set is a few kB; refuse anything past 1 MiB unread


async def _json(request: Request):
    if int(request.headers.get("content-length") or 0) > MAX_BODY or len(body := await request.body()) > MAX_BODY:
        raise ZeusError(f"the request body is over {MAX_BODY // 1024} KiB; a prompt file is a few kB")
    try:
        return json.loads(body)
    except ValueError:
        raise ZeusError("the request body is not JSON") from None


async def _prompt_body(request: Request) -> PromptSet:
    body = await _json(request)
    if not isinstance(body, dict) or not isinstance(body.get("prompts"), dict):
        raise ZeusError("send {\"prompts\": {name, templates, classes, tumour_class}}")
    return parse_prompt_set(body["prompts"], "prompt panel")


def _async_handle(fn):
    async def wrapped(request: Request):
        try:
            return await fn(request)
        except (ZeusError, ValueError) as e:
            return _error(e)
    return wrapped


def build_app(studio: Studio, *, token: str | None = None, allowed_hosts: list[str] | None = None) -> Starlette:
    run = studio.run
    from starlette.concurrency import run_in_threadpool

    def page(name):
        return lambda request: FileResponse(STATIC / name)

    @_handle
    def run_info(request):
        return JSONResponse(run.summary())

    @_handle
    def slides(request):
        q = request.query_params
        return JSONResponse(query_slides(run.table, status=q.get("status"), dataset=q.get("dataset"),
                                         center=q.get("center"), search=q.get("q"), sort=q.get("sort", "slide_id"),
                                         descending=q.get("order") == "desc", page=int(q.get("page", 0)),
                                         per_page=int(q.get("per_page", 50))))

    @_handle
    def slide(request):
        return JSONResponse(studio.slide_info(request.path_params["sid"]))

    @_handle
    def thumbnail(request):
        return Response(studio.thumbnail(request.path_params["sid"]), media_type=JPEG, headers=CACHE_TILE)

    def _uri(sid):
        ref = run.slide(sid)
        if ref.uri is None:
            raise NotFound(f"slide {sid}: the run's manifest no longer lists its file; the viewer needs it")
        return ref.uri

    @_handle
    def dzi(request):
        sid = request.path_params["sid"]
        return Response(studio.tiles.dzi(sid, _uri(sid)), media_type="application/xml")

    @_handle
    def tile(request):
        p = request.path_params
        return Response(studio.tiles.tile(p["sid"], _uri(p["sid"]), p["level"], p["col"], p["row"]),
                        media_type=JPEG, headers=CACHE_TILE)

    @_handle
    def overlay_png(request):
        p = request.path_params
        o = studio.overlay(p["sid"], p["name"], request.query_params.get("draft"))
        return Response(o.png, media_type=PNG, headers=CACHE_TILE)

    @_handle
    def overlay_meta(request):
        p = request.path_params
        return JSONResponse(studio.overlay(p["sid"], p["name"], request.query_params.get("draft")).meta())

    @_handle
    def prompts(request):
        ps = run.prompt_set
        return JSONResponse({"prompts": ps.model_dump(exclude_none=True), "yaml": prompt_yaml(ps),
                             "file": run.cfg.prompts.file})

    @_async_handle
    async def parse(request):
        body = await _json(request)
        import yaml
        text = body.get("yaml") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise ZeusError("send {\"yaml\": \"<prompt file text>\"}")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ZeusError(f"prompt file {body.get('name') or ''}: not valid YAML ({str(e).splitlines()[0]})") from None
        ps = parse_prompt_set(data, body.get("name") or "uploaded prompt file")
        return JSONResponse({"prompts": ps.model_dump(exclude_none=True)})

    @_async_handle
    async def apply(request):
        ps = await _prompt_body(request)
        return JSONResponse(await run_in_threadpool(studio.apply, request.path_params["sid"], ps))

    @_async_handle
    async def save(request):
        ps = await _prompt_body(request)
        key = await run_in_threadpool(lambda: studio.reprompter.text.model_key)
        uri = await run_in_threadpool(save_prompt_set, run, ps, key)
        return JSONResponse({"saved": uri, "yaml": prompt_yaml(ps)})

    @_async_handle
    async def cohort_apply(request):
        ps = await _prompt_body(request)
        return JSONResponse(await run_in_threadpool(studio.apply_cohort, ps))

    @_handle
    def cohort_job(request):
        job = studio.jobs.get(request.path_params["key"])
        if job is None:
            raise NotFound(f"no cohort re-prompt {request.path_params['key']!r} in this studio session")
        return JSONResponse(job.status())

    routes = [
        Route("/", page("index.html")), Route("/slide", page("slide.html")),
        Route("/api/run", run_info), Route("/api/slides", slides),
        Route("/api/slides/{sid}", slide), Route("/api/slides/{sid}/thumbnail.jpg", thumbnail),
        Route("/api/slides/{sid}/dzi.dzi", dzi),
        Route("/api/slides/{sid}/dzi_files/{level:int}/{col:int}_{row:int}.jpeg", tile),
        Route("/api/slides/{sid}/overlays/{name}.png", overlay_png),
        Route("/api/slides/{sid}/overlays/{name}.json", overlay_meta),
        Route("/api/slides/{sid}/apply", apply, methods=["POST"]),
        Route("/api/prompts", prompts), Route("/api/prompts/parse", parse, methods=["POST"]),
        Route("/api/prompts/save", save, methods=["POST"]),
        Route("/api/cohort/apply", cohort_apply, methods=["POST"]), Route("/api/cohort/jobs/{key}", cohort_job),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost"]),
                  Middleware(StudioGuard, token=token)]
    return Starlette(routes=routes, middleware=middleware)
