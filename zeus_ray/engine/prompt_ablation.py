"""Prompt studies from cached embeddings (`zeus prompts ablate`): the Dice of the full ensemble
and of leave-one-out variants (each classname, each template), per dataset.

This uses the annotations, so it is a label-using analysis of the prompts, not part of the
zero-shot method. Every prompt is encoded once; a variant's class embedding is Eq. 1 over its
subset of those prompt embeddings. No slide is read and no image encoded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..prompts import PLACEHOLDER, PromptSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str                       # "full", "-classname tumor/neoplasm", "-template An example of CLASSNAME."
    keep: tuple[np.ndarray, ...]    # per class: bool mask over that class's prompts


def prompt_index(ps: PromptSet) -> list[list[tuple[str, str]]]:
    """Per class, (classname, template) of each prompt, in PromptSet.prompts() order."""
    return [[(n, t) for n in c.classnames for t in ps.templates_for(c)] for c in ps.classes]


def variants(ps: PromptSet) -> list[Variant]:
    idx = prompt_index(ps)
    full = tuple(np.ones(len(i), bool) for i in idx)
    out = [Variant("full", full)]
    for ci, c in enumerate(ps.classes):
        if len(c.classnames) > 1:
            for n in c.classnames:
                keep = list(full)
                keep[ci] = np.array([cn != n for cn, _ in idx[ci]])
                out.append(Variant(f"-classname {c.name}/{n}", tuple(keep)))
    templates = list(dict.fromkeys(t for c in ps.classes for t in ps.templates_for(c)))
    if len(templates) > 1:
        for t in templates:
            keep = tuple(np.array([tt != t for _, tt in i]) for i in idx)
            if all(k.any() for k in keep):
                out.append(Variant(f"-template {t.replace(PLACEHOLDER, '…')}", keep))
    return out


def variant_matrices(prompt_emb: list[np.ndarray], vs: list[Variant]) -> np.ndarray:
    """(V, C, D) class matrices: Eq. 1 over each variant's prompts (rows already L2-normalised)."""
    out = np.stack([np.stack([e[k].mean(axis=0) for e, k in zip(prompt_emb, v.keep)]) for v in vs])
    return (out / np.linalg.norm(out, axis=-1, keepdims=True)).astype(np.float32)


def encode_prompts(encoder, ps: PromptSet) -> list[np.ndarray]:
    groups = ps.prompts()
    flat = [p for _, g in groups for p in g]
    emb = np.asarray(encoder.encode_texts(flat), dtype=np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out, start = [], 0
    for _, g in groups:
        out.append(emb[start:start + len(g)])
        start += len(g)
    return out


def slide_dice(store, keys, entry: dict, matrices: np.ndarray, tumour_index: int, evaluation: dict,
               tumour_class_name: str | None = None) -> list[float]:
    """Dice of each variant's tumour mask against the slide's annotation (metric grid as in runs)."""
    from ..results.slide_outputs import metric_truth, metrics_on_grid
    from ..results.reduce import cosine_scores, load_embeddings, load_slide_grid

    sg = load_slide_grid(store, keys.tiles_dir)
    emb = load_embeddings(store, keys.emb_dir, sg)
    f, truth = metric_truth(entry["annotation_uri"], sg.shape, cell0=sg.cell0, cell_um=sg.cell_um,
                            mpp0=sg.grid.mpp0, evaluation=evaluation, tumour_class_name=tumour_class_name,
                            origin0=sg.origin0)
    dice = []
    for cm in matrices:
        maps, _ = sg.maps(cosine_scores(emb, cm))
        dice.append(metrics_on_grid(sg.labels(maps) == tumour_index, sg.tissue_cells, truth, f, sg.cell_um)["dice"])
    return dice


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice per dataset and variant, with the change against the full ensemble."""
    g = rows.groupby(["dataset", "variant"], sort=False)["dice"].agg(["mean", "std", "count"]).reset_index()
    full = g[g["variant"] == "full"].set_index("dataset")["mean"]
    g["delta_vs_full"] = g["mean"] - g["dataset"].map(full)
    order = g["variant"] != "full"
    return pd.concat([g[~order], g[order].sort_values(["dataset", "delta_vs_full"], ascending=[True, False])])


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| dataset | variant | mean Dice | Δ vs full | slides |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        delta = "" if r.variant == "full" else f"{r.delta_vs_full:+.4f}"
        lines.append(f"| {r.dataset} | {r.variant} | {r.mean:.4f} | {delta} | {r.count} |")
    return "\n".join(lines)


def _text_task(model_cfg, ps: PromptSet):
    from ..encoders.registry import load_encoder
    enc = load_encoder(model_cfg)
    return encode_prompts(enc, ps), enc.model_key


def _slide_task(store_root, keys, entry, matrices, tumour_index, evaluation, tumour_class_name):
    from ..storage.store import OutputStore
    try:
        return entry["slide_id"], slide_dice(OutputStore(store_root), keys, entry, matrices, tumour_index,
                                             evaluation, tumour_class_name), None
    except Exception as e:  # one slide's missing data or bad annotation never stops the study
        return entry["slide_id"], None, f"{type(e).__name__}: {e}"


def run_ablation(cfg) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Leave-one-out study over the slides of the stored run that have embeddings and annotations.
    Returns (per-slide rows, summary table, output folder)."""
    import ray

    from ..cohort_input.manifest import load_cohort
    from .cluster import init_ray
    from ..slides.slide_keys import cohort_keys
    from ..storage.keys import run_key, tiling_key
    from ..prompts import load_prompt_set, prompt_key
    from ..storage.store import OutputStore

    ps = load_prompt_set(cfg.prompts.file)
    entries = [e for e in load_cohort(cfg.input) if e.annotation_uri]
    store = OutputStore(cfg.output.root, cfg.output.storage_options)
    started = init_ray(cfg)
    try:
        prompt_emb, model_key = ray.get(ray.remote(_text_task).options(num_cpus=1).remote(cfg.model, ps))
        vs = variants(ps)
        mats = ray.put(variant_matrices(prompt_emb, vs))
        pkey, tkey = run_key(prompt_key(ps, model_key), cfg), tiling_key(cfg)
        task = ray.remote(_slide_task).options(num_cpus=1)
        keys = cohort_keys(store, entries, cfg, tkey, model_key, pkey, stored_only=True)[1]
        refs = [task.remote(store, keys[e.slide_id], e.as_dict(), mats, ps.tumour_index,
                            cfg.evaluation.model_dump(), ps.class_names[ps.tumour_index])
                for e in entries if store.complete(keys[e.slide_id].emb_dir) is not None]
        results = ray.get(refs)
    finally:
        if started:
            ray.shutdown()
    by_id = {e.slide_id: e for e in entries}
    rows = [{"slide_id": sid, "dataset": by_id[sid].dataset or "all", "variant": v.name, "dice": d}
            for sid, dice, err in results if dice is not None for v, d in zip(vs, dice)]
    for sid, _, err in results:
        if err:
            log.warning("slide %s left out of the study: %s", sid, err)
    if not rows:
        from ..errors import ZeusError
        raise ZeusError(f"--results {cfg.output.root}: no slide with stored embeddings and an annotation; "
                        "run `zeus run` with annotation_uri in the manifest first")
    per_slide = pd.DataFrame(rows)
    table = summarise(per_slide)
    out = store.path("cohort", pkey, "ablation")
    store.write_bytes(f"{out}/per_slide.csv", per_slide.to_csv(index=False).encode())
    store.write_bytes(f"{out}/summary.csv", table.to_csv(index=False).encode())
    store.write_bytes(f"{out}/summary.md", to_markdown(table).encode())
    if store.exists(store.path("cohort", pkey, "run.json")):   # the run with these prompts: add the study to its report
        from ..results.report import write_report
        write_report(store, pkey)
    return per_slide, table, store.uri(out)
