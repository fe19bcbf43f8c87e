"""Re-prompting one slide live from its stored embeddings: class embeddings of the edited prompts
(text tower on CPU), similarities, overlap-averaged maps, argmax, mask and metrics, with the same
functions as the run's reduce (results/reduce.py, results/slide_outputs.py) and Eq. 1 from
prompts.class_embeddings. Nothing is written: a draft lives in memory under its prompt key.

Prompt embeddings are cached per prompt text, so an edit encodes only the prompts it changed."""
from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import ZeusError
from ..maps.postprocess import apply_postprocess
from ..prompts import PromptSet, class_embeddings, prompt_key
from ..results.reduce import SlideGrid, cosine_scores, load_embeddings, load_slide_grid, load_tissue_mask
from ..results.slide_outputs import metric_truth, metrics_on_grid
from ..storage.keys import run_key
from .tiles import LRUCache

METRIC_KEYS = ("dice", "precision", "recall", "iou", "pred_area_mm2", "true_area_mm2")


class UnknownDraft(ZeusError):
    """A draft key this session has not applied (answered 404)."""


class NoStoredResults(ZeusError):
    """A slide of the run without stored results (failed, no tissue): answered 404."""


class CachedTextEncoder:
    """The run's encoder on CPU, loaded on first use; `encode_texts` encodes only unseen prompts."""

    def __init__(self, model_cfg, expected_model_key: str | None = None, encoder=None):
        self.model_cfg = model_cfg.model_copy(update={"device": "cpu"})
        self.expected = expected_model_key
        self._enc, self._rows, self._lock = encoder, {}, threading.Lock()

    @property
    def encoder(self):
        if self._enc is None:
            from ..encoders.registry import load_encoder
            enc = load_encoder(self.model_cfg)
            if self.expected and enc.model_key != self.expected:
                raise ZeusError(f"model {self.model_cfg.id}: its weights give model key {enc.model_key}, the run's "
                                f"embeddings were made with {self.expected}; give the run's weights with "
                                "--set model.weights=PATH")
            self._enc = enc
        return self._enc

    @property
    def model_key(self) -> str:
        return self.encoder.model_key

    def encode_texts(self, texts) -> np.ndarray:
        with self._lock:   # one text tower: requests take turns
            new = list(dict.fromkeys(t for t in texts if t not in self._rows))
            if new:
                emb = np.asarray(self.encoder.encode_texts(new), dtype=np.float64)
                self._rows.update(zip(new, emb, strict=True))
            return np.stack([self._rows[t] for t in texts])


@dataclass
class SlideState:
    """What a slide's re-prompts need, read once from the run's stored outputs."""
    sg: SlideGrid
    emb: np.ndarray
    truth: tuple[int, np.ndarray] | None      # (f, truth on the metric grid)
    truth_error: str | None
    tissue_mask: tuple[np.ndarray, float]     # (tissue mask, its µm/px) of the tiles stage
    stored: dict = field(default_factory=dict)   # maps.npz arrays, mask, metrics of the run


@dataclass
class Draft:
    key: str
    class_names: list[str]
    tumour_index: int
    maps: np.ndarray
    tumour: np.ndarray
    metrics: dict | None
    tumour_area_mm2: float
    encoded_prompts: int


def post_settings(cfg, sg: SlideGrid) -> dict:
    g = sg.grid
    return {"mode": cfg.postprocess, "patch_um": g.patch_size * g.target_mpp, "px_um": g.target_mpp}


def load_slide_state(run, ref) -> SlideState:
    store, keys = run.store, ref.keys
    if keys is None:
        raise NoStoredResults(f"slide {ref.slide_id}: no stored results in run {run.prompt_key} "
                        f"(status {ref.row.get('status')}); re-run it with `zeus run`")
    sg = load_slide_grid(store, keys.tiles_dir)
    emb = load_embeddings(store, keys.emb_dir, sg)
    truth, err = None, None
    if ref.annotation_uri:
        try:
            truth = metric_truth(ref.annotation_uri, sg.shape, cell0=sg.cell0, cell_um=sg.cell_um,
                                 mpp0=sg.grid.mpp0, evaluation=run.cfg.evaluation.model_dump(),
                                 tumour_class_name=run.prompt_set.tumour_class, storage_options=run.storage_options)
        except ZeusError as e:   # the slide is still shown; only its metrics are missing
            err = str(e)
    st = SlideState(sg, emb, truth, err, load_tissue_mask(store, keys.tiles_dir))
    with np.load(io.BytesIO(store.read_bytes(f"{keys.res_dir}/maps.npz"))) as z:
        st.stored = {"maps": z["maps"], "tissue": z["tissue"].astype(bool), "classes": [str(c) for c in z["classes"]]}
    masks = [p for p in store.fs.ls(keys.res_dir, detail=False) if re.search(r"/mask_[\d.]+mpp\.png$", p)]
    st.stored["tumour"] = np.array(Image.open(io.BytesIO(store.read_bytes(masks[0])))) > 0
    mpath = f"{keys.res_dir}/metrics.json"
    st.stored["metrics"] = store.read_json(mpath) if store.exists(mpath) else None
    return st


class Reprompter:
    """Slide states (a few, least recently used dropped) and drafts of the studio's session."""

    def __init__(self, run, text: CachedTextEncoder | None = None, slides: int = 4, drafts: int = 64):
        self.run = run
        self.text = text or CachedTextEncoder(run.cfg.model, run.model_key)
        self._states, self._drafts = LRUCache(slides), LRUCache(drafts)
        self._load_lock = threading.Lock()

    def state(self, ref) -> SlideState:
        st = self._states.get(ref.slide_id)
        if st is None:
            with self._load_lock:
                st = self._states.get(ref.slide_id) or self._states.put(ref.slide_id, load_slide_state(self.run, ref))
        return st

    def draft(self, slide_id: str, key: str) -> Draft:
        d = self._drafts.get((slide_id, key))
        if d is None:
            raise UnknownDraft(f"slide {slide_id}: no applied prompt set {key!r} in this studio session; apply it again")
        return d

    def apply(self, ref, ps: PromptSet) -> Draft:
        """The slide's mask and metrics under prompt set `ps` (kept as a draft)."""
        st = self.state(ref)
        before = len(self.text._rows)
        matrix = class_embeddings(self.text, ps)
        key = run_key(prompt_key(ps, self.text.model_key), self.run.cfg)
        d = reprompt_slide(st, matrix, ps, post_settings(self.run.cfg, st.sg), key)
        d.encoded_prompts = len(self.text._rows) - before
        return self._drafts.put((ref.slide_id, key), d)


def reprompt_slide(st: SlideState, class_matrix: np.ndarray, ps: PromptSet, post: dict, key: str) -> Draft:
    """Similarities → maps → argmax → mask (post-processed as the run's) → metrics, as the reduce."""
    sg, ti = st.sg, ps.tumour_index
    maps, _ = sg.maps(cosine_scores(st.emb, class_matrix))
    argmax_tumour = sg.labels(maps) == ti
    tumour = argmax_tumour
    if post["mode"] != "none":
        tumour = apply_postprocess(post["mode"], argmax_tumour, sg.tissue_cells, cell_um=sg.cell_um,
                                   patch_um=post["patch_um"], px_um=post["px_um"])
    metrics = None
    if st.truth is not None:
        f, truth = st.truth
        m = metrics_on_grid(argmax_tumour, sg.tissue_cells, truth, f, sg.cell_um, post)
        metrics = {k: m[k] for k in METRIC_KEYS}
    area = float(tumour.sum() * (sg.cell_um / 1000.0) ** 2)
    return Draft(key, ps.class_names, ti, maps, tumour, metrics, area, 0)
