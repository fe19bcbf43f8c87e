"""Boundary-adaptive overlap (issue #7): pass logic on hand-made similarity fields.

Tiles "see" a per-cell tumour field f: a tile's tumour score is a response to the mean of f over
its k × k cells, its normal score is 0.5, so a tile's margin is |response - 0.5|. The reference is
full overlap: every kept tile encoded, maps averaged per cell (rasterise.average_maps).
"""
import math

import numpy as np
import pytest

from zeus_ray.maps.selection import (PassState, Selection, cell_maps, converge, first_pass, next_pass, pass_step,
                                undecided_cells)
from zeus_ray.errors import ConfigError
from zeus_ray.maps.rasterise import argmax_mask, cell_geometry, grid_shape

P, S = 4, 1   # the 448/112 geometry in cell units: 4 × 4 cells per tile, one cell per stride


def tile_means(field, n_rows, n_cols, patch=P, stride=S):
    """Mean of a cell field over each position's k × k box, (R, C)."""
    g = cell_geometry(patch, stride)
    sat = np.pad(np.cumsum(np.cumsum(field, 0), 1), ((1, 0), (1, 0)))
    r0, c0 = np.arange(n_rows) * g.s, np.arange(n_cols) * g.s
    r1, c1 = r0 + g.k, c0 + g.k
    box = sat[np.ix_(r1, c1)] - sat[np.ix_(r0, c1)] - sat[np.ix_(r1, c0)] + sat[np.ix_(r0, c0)]
    return box / g.k ** 2


def scores_from(response):
    """(R, C, 2): normal = 0.5, tumour = the response."""
    return np.stack([np.full_like(response, 0.5), response], axis=-1)


def run_adaptive(kept, tissue, scores, patch=P, stride=S, *, margin, dilation, disagreement=False,
                 coarse_first=True, log=None, state=None, max_passes=None):
    """Adaptive passes until convergence with the selection code `zeus run` executes
    (selection.PassState through selection.converge), tiles revealing `scores` (R, C, n_classes)."""
    if state is None:
        state = PassState(kept, tissue, Selection("adaptive", patch, stride, margin, dilation, disagreement,
                                                  coarse_first), scores.shape[2])
    got = converge(state, lambda r, c, p: scores[r, c], max_passes)
    if log is not None:
        log.extend(got)
    return state


def pass_counts(st):
    return np.bincount(st.passes.ravel(), minlength=st.n_passes + 1)[1:].tolist()


def labels(encoded, scores, tissue, patch=P, stride=S):
    maps, _ = cell_maps(encoded, scores, patch, stride)
    return argmax_mask(maps, valid=tissue)


def full_and_adaptive(kept, tissue, scores, margin, dilation, patch=P, stride=S, coarse_first=True):
    state = run_adaptive(kept, tissue, scores, patch, stride, margin=margin, dilation=dilation,
                         coarse_first=coarse_first)
    full = labels(kept, scores, tissue, patch, stride)
    return full, labels(state.encoded, state.scores, tissue, patch, stride), state


def test_first_pass_is_the_non_overlapping_grid():
    kept = np.ones((9, 10), bool)
    kept[4, 4] = False
    sel = first_pass(kept, 448, 112)
    rows, cols = np.nonzero(sel)
    assert set(rows) == {0, 4, 8} and set(cols) == {0, 4, 8} and not sel[4, 4] and sel.sum() == 8
    assert np.array_equal(first_pass(kept, 448, 448), kept)   # stride = patch: every kept position
    # patch not a multiple of stride (12 / 5 cells: k = 12, s = 5): the step rounds down → no gap.
    sel = first_pass(np.ones((10, 10), bool), 12, 5)
    assert np.array_equal(np.flatnonzero(sel[0]), [0, 2, 4, 6, 8])


@pytest.mark.parametrize("patch,stride", [(4, 1), (8, 2), (12, 8), (6, 6), (448, 112)])
def test_margin_inf_reproduces_full_overlap_exactly(patch, stride):
    rng = np.random.default_rng(patch + stride)
    n_rows, n_cols = 13, 11
    geom = cell_geometry(patch, stride)
    shape = grid_shape(n_rows, n_cols, geom)
    kept = rng.random((n_rows, n_cols)) < 0.7          # includes dropped first-pass positions
    tissue = np.zeros(shape, bool)
    tissue[geom.k // 2:-1, 1:] = True                  # not every cell; some kept tiles partly outside
    scores = rng.normal(size=(n_rows, n_cols, 3)) * 0.05
    state = run_adaptive(kept, tissue, scores, patch, stride, margin=math.inf, dilation=0)
    full_maps, full_counts = cell_maps(kept, scores, patch, stride)
    ada_maps, ada_counts = cell_maps(state.encoded, state.scores, patch, stride)
    # Every kept tile that covers a tissue cell is encoded; here that is every kept tile.
    assert np.array_equal(state.encoded, kept)
    assert np.array_equal(ada_maps, full_maps, equal_nan=True) and np.array_equal(ada_counts, full_counts)
    assert np.array_equal(argmax_mask(ada_maps, valid=tissue), argmax_mask(full_maps, valid=tissue))


@pytest.mark.parametrize("name,mpp", [("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.25)])
def test_margin_inf_on_real_slide_tiles(slides_dir, name, mpp):
    """The real tile table and tissue mask of a slide (10x, 448/112), random scores: margin = inf
    encodes every kept tile and gives full overlap's mask."""
    from zeus_ray.config import JobConfig
    from zeus_ray.maps.rasterise import resample_mask_to_grid
    from zeus_ray.slides.planning import plan_slide

    plan = plan_slide(str(slides_dir / name), "s", JobConfig(), mpp)
    g = plan.grid
    geom = cell_geometry(g.patch_size, g.stride)
    shape = grid_shape(g.n_rows, g.n_cols, geom)
    tissue = resample_mask_to_grid(plan.tissue.mask, plan.tissue.mpp, shape, geom.cell * g.target_mpp)
    kept = np.zeros((g.n_rows, g.n_cols), bool)
    kept[plan.tiles["grid_row"].to_numpy(), plan.tiles["grid_col"].to_numpy()] = True
    scores = np.random.default_rng(1).normal(size=(g.n_rows, g.n_cols, 2)) * 0.01
    st = run_adaptive(kept, tissue, scores, g.patch_size, g.stride, margin=math.inf, dilation=0)
    assert kept.sum() > 30 and np.array_equal(st.encoded, kept)
    full = labels(kept, scores, tissue, g.patch_size, g.stride)
    assert np.array_equal(labels(st.encoded, st.scores, tissue, g.patch_size, g.stride), full)


def test_margin_inf_skips_only_tiles_that_touch_no_tissue():
    n = 12
    kept = np.ones((n, n), bool)
    tissue = np.zeros(grid_shape(n, n, cell_geometry(P, S)), bool)
    tissue[:, :8] = True                               # tiles at columns ≥ 8 cover no tissue cell
    scores = np.random.default_rng(0).normal(size=(n, n, 2))
    full, ada, state = full_and_adaptive(kept, tissue, scores, math.inf, 0)
    touching = np.zeros_like(kept)
    touching[:, :8] = True
    assert np.array_equal(state.encoded & ~first_pass(kept, P, S), touching & ~first_pass(kept, P, S))
    assert np.array_equal(ada, full)
    full_maps, _ = cell_maps(kept, scores, P, S)
    ada_maps, _ = cell_maps(state.encoded, state.scores, P, S)
    assert np.array_equal(ada_maps[:, tissue], full_maps[:, tissue])    # Eq. 4 on every tissue cell


def test_straight_boundary_refines_only_a_band():
    n = 41                                              # first-pass tiles reach the grid's last cells
    shape = grid_shape(n, n, cell_geometry(P, S))
    field = np.zeros(shape)
    field[:, 21:] = 1.0                                 # boundary inside first-pass tile column 20..23
    kept, tissue = np.ones((n, n), bool), np.ones(shape, bool)
    scores = scores_from(tile_means(field, n, n))
    fp = first_pass(kept, P, S)
    # margin 0: only the contour. First-pass labels change between cells 19 | 20: pass 2 encodes the
    # tiles holding both (columns 17..19); the contour moves right and pass 3 straddles it (20..21).
    full, ada, state = full_and_adaptive(kept, tissue, scores, 0.0, 0, coarse_first=False)
    assert np.array_equal(ada, full)
    cols = np.nonzero(state.encoded & ~fp)[1]
    assert (cols.min(), cols.max()) == (17, 21) and state.encoded[:, 17:22].all()
    assert pass_counts(state) == [fp.sum(), 41 * 3, 41 * 2 - 11]
    # Coarse first (the default): the same band, reached through half-overlapping tiles first.
    _, ada, coarse = full_and_adaptive(kept, tissue, scores, 0.0, 0)
    assert np.array_equal(ada, full) and np.array_equal(coarse.encoded, state.encoded)
    assert coarse.n_passes > state.n_passes
    # Without coarse_first: a dilation of 1 position widens the band; the result stays exact.
    full, ada, st = full_and_adaptive(kept, tissue, scores, 0.0, 1, coarse_first=False)
    cols = np.nonzero(st.encoded & ~fp)[1]
    assert np.array_equal(ada, full) and (cols.min(), cols.max()) == (16, 22) and st.encoded[:, 16:23].all()
    assert (st.encoded >= state.encoded).all()
    # Counting disagreeing covering tiles as undecided takes every tile over the contour cells (to 22).
    st = run_adaptive(kept, tissue, scores, P, S, margin=0.0, dilation=0, disagreement=True, coarse_first=False)
    assert np.nonzero(st.encoded & ~fp)[1].max() == 22 and (st.encoded >= state.encoded).all()
    # A margin above the straddling tile's (0.25) also takes every tile over its cells (16..23).
    full, ada, st = full_and_adaptive(kept, tissue, scores, 0.3, 0, coarse_first=False)
    cols = np.nonzero(st.encoded & ~fp)[1]
    assert np.array_equal(ada, full) and (cols.min(), cols.max()) == (16, 23) and st.n_encoded < 0.3 * kept.sum()


@pytest.mark.parametrize("at,parts", [((13, 22), 1), ((18, 11), 2), ((15, 23), 4)])
def test_small_island_is_found_and_refined(at, parts):
    """A 2 × 2-cell lesion (a quarter of a tile) inside one first-pass tile or split over 2 or 4.
    Tiles answer 3 × the lesion fraction they hold (saturating at 1), so a tile holding all of it
    says tumour and a tile holding half or a quarter of it says normal, weakly."""
    n = 37
    shape = grid_shape(n, n, cell_geometry(P, S))
    field = np.zeros(shape)
    field[at[0]:at[0] + 2, at[1]:at[1] + 2] = 1.0
    kept, tissue = np.ones((n, n), bool), np.ones(shape, bool)
    scores = scores_from(np.minimum(1.0, 3 * tile_means(field, n, n)))
    fp = first_pass(kept, P, S)
    assert (scores[fp][:, 1] > 0.5).sum() == (parts == 1)
    full, ada, state = full_and_adaptive(kept, tissue, scores, 0.35, 0)
    assert (full[at[0]:at[0] + 2, at[1]:at[1] + 2] == 1).all() and (full == 1).sum() <= 16
    assert np.array_equal(ada, full) and state.n_encoded < 0.2 * kept.sum()
    rows, cols = np.nonzero(state.encoded & ~fp)
    assert np.abs(rows - at[0]).max() <= 8 and np.abs(cols - at[1]).max() <= 8   # refinement stays local
    # margin 0 (contours only): found when a first-pass tile already says tumour, otherwise missed.
    _, contour_only, st0 = full_and_adaptive(kept, tissue, scores, 0.0, 0)
    assert np.array_equal(contour_only, full) == (parts == 1)
    assert (st0.n_passes == 1) == (parts > 1)


def test_checkerboard_refines_everything():
    n = 20
    shape = grid_shape(n, n, cell_geometry(P, S))
    yy, xx = np.indices(shape)
    field = (((yy // 3) + (xx // 3)) % 2).astype(float)   # squares smaller than a tile
    kept, tissue = np.ones((n, n), bool), np.ones(shape, bool)
    scores = scores_from(tile_means(field, n, n) + 0.01)
    full, ada, state = full_and_adaptive(kept, tissue, scores, 0.2, 0)
    assert state.encoded.all() and np.array_equal(ada, full)


@pytest.mark.parametrize("n,radius,centre", [(41, 9.5, (20.3, 21.7)), (60, 17, (30.5, 31.2))])
def test_coarse_first_locates_a_curved_contour_with_fewer_tiles(n, radius, centre):
    """A disk lesion: with coarse_first pass 2 takes only positions every 2 (m/2), later passes any
    position; the mask is full overlap's either way, and
    the fully-overlapping tiles land on the final contour only, so fewer are encoded."""
    shape = grid_shape(n, n, cell_geometry(P, S))
    yy, xx = np.indices(shape)
    field = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2).astype(float)
    kept, tissue = np.ones((n, n), bool), np.ones(shape, bool)
    scores = scores_from(tile_means(field, n, n))
    log = []
    coarse = run_adaptive(kept, tissue, scores, P, S, margin=0.0, dilation=0, log=log)
    full, ada, fine = full_and_adaptive(kept, tissue, scores, 0.0, 0, coarse_first=False)
    assert np.array_equal(labels(coarse.encoded, coarse.scores, tissue), full) and np.array_equal(ada, full)
    assert coarse.n_encoded < 0.95 * fine.n_encoded and coarse.n_passes <= fine.n_passes + 1
    on_half = [bool((pos % 2 == 0).all()) for p, pos in log[1:]]
    assert on_half[0] and not all(on_half[1:])
    assert [pass_step(p, 448, 112) for p in (2, 3, 4)] == [2, 1, 1] and pass_step(2, 448, 112, False) == 1
    assert [pass_step(p, 448, 56) for p in (2, 3, 4, 5)] == [4, 2, 1, 1]


def test_dilation_equals_dilating_cells_by_strides():
    """Positions within d of a position covering an undecided cell ⇔ positions whose tile, grown
    by d strides on every side, holds an undecided cell (brute force)."""
    rng = np.random.default_rng(3)
    patch, stride, n_rows, n_cols = 8, 2, 15, 17
    geom = cell_geometry(patch, stride)
    kept = rng.random((n_rows, n_cols)) < 0.85
    tissue = np.ones(grid_shape(n_rows, n_cols, geom), bool)
    enc = first_pass(kept, patch, stride)
    scores = scores_from(0.5 + np.abs(rng.normal(size=(n_rows, n_cols))) * 0.2)   # one class: no contour
    und = undecided_cells(enc, scores, tissue, patch, stride, 0.05)
    assert 0 < und.sum() < und.size
    for d in range(3):
        sel = next_pass(kept, enc, scores, tissue, patch, stride, margin=0.05, dilation=d)
        ref = np.zeros_like(kept)
        for r in range(n_rows):
            for c in range(n_cols):
                lo_r, lo_c = max(0, (r - d) * geom.s), max(0, (c - d) * geom.s)
                box = und[lo_r:(r + d) * geom.s + geom.k, lo_c:(c + d) * geom.s + geom.k]
                ref[r, c] = box.any()
        assert np.array_equal(sel, ref & kept & ~enc)


def test_uncovered_tissue_is_undecided_and_disagreement_is_optional():
    n = 13
    kept = np.ones((n, n), bool)
    kept[4, 4] = False                                  # a dropped first-pass position
    tissue = np.ones(grid_shape(n, n, cell_geometry(P, S)), bool)
    scores = scores_from(np.zeros((n, n)))              # every tile: normal, margin 0.5
    enc = first_pass(kept, P, S)
    sel = next_pass(kept, enc, scores, tissue, P, S, margin=0.0, dilation=0)
    rows, cols = np.nonzero(sel)                        # the tiles covering cells 4..7 × 4..7
    assert rows.min() == 1 and rows.max() == 7 and cols.min() == 1 and cols.max() == 7
    # Two encoded tiles over the same cells that disagree make those cells undecided.
    enc2 = enc.copy()
    enc2[1, 1] = True
    scores[1, 1] = [0.5, 0.9]
    assert not undecided_cells(enc2, scores, tissue, P, S, 0.0)[1:4, 1:4].any()
    und = undecided_cells(enc2, scores, tissue, P, S, 0.0, disagreement=True)
    assert und[1:4, 1:4].all() and und[0, 0] == False and und[4:8, 8:].sum() == 0  # noqa: E712


def test_terminates_and_nothing_is_left():
    rng = np.random.default_rng(11)
    n = 24
    shape = grid_shape(n, n, cell_geometry(P, S))
    kept = rng.random((n, n)) < 0.8
    tissue = rng.random(shape) < 0.9
    scores = scores_from(0.5 + rng.normal(size=(n, n)) * 0.3)
    for margin in (0.0, 0.05, 0.2, math.inf):
        for d in (0, 1, 2):
            st = run_adaptive(kept, tissue, scores, P, S, margin=margin, dilation=d)
            assert st.n_passes <= kept.sum() and all(c > 0 for c in pass_counts(st)[1:])
            assert not (st.encoded & ~kept).any()
            assert not next_pass(kept, st.encoded, st.scores, tissue, P, S, margin=margin, dilation=d).any()
    capped = run_adaptive(kept, tissue, scores, P, S, margin=0.2, dilation=0, max_passes=2)
    assert capped.n_passes == 2


def test_first_pass_fills_gaps_in_the_tissue_with_few_tiles():
    n = 9
    kept = np.zeros((n, n), bool)
    kept[1::2, 1::2] = True                             # no kept position on the first-pass grid
    tissue = np.ones(grid_shape(n, n, cell_geometry(P, S)), bool)
    assert not first_pass(kept, P, S).any()
    sel = first_pass(kept, P, S, tissue)
    _, reach = cell_maps(kept, np.zeros((n, n, 1)), P, S)
    _, got = cell_maps(sel, np.zeros((n, n, 1)), P, S)
    assert ((got > 0) == (reach > 0)).all()             # every coverable tissue cell, once
    assert sel.sum() == 9 and np.array_equal(np.unique(np.nonzero(sel)[1]), [1, 5, 7])
    # Gaps are filled only where there is tissue.
    assert first_pass(kept, P, S, np.zeros_like(tissue)).sum() == 0


def test_nothing_to_encode_when_no_kept_tile_touches_tissue():
    n = 9
    kept = np.zeros((n, n), bool)
    kept[:2, :2] = True
    tissue = np.zeros(grid_shape(n, n, cell_geometry(P, S)), bool)
    tissue[8:, 8:] = True
    log = []
    st = run_adaptive(kept, tissue, scores_from(np.zeros((n, n))), P, S, margin=math.inf, dilation=2, log=log)
    assert st.encoded.sum() == 1 and st.n_passes == 1 and [p for p, _ in log] == [1]   # the grid's (0, 0)
    kept[0, 0] = False
    st = run_adaptive(kept, tissue, scores_from(np.zeros((n, n))), P, S, margin=math.inf, dilation=2, log=log)
    assert st.n_encoded == 0 and st.n_passes == 0 and pass_counts(st) == []


def boundary_case():
    n = 32
    shape = grid_shape(n, n, cell_geometry(P, S))
    yy, xx = np.indices(shape)
    field = ((xx - 17) ** 2 + (yy - 15) ** 2 < 9.5 ** 2).astype(float)   # a disc
    rng = np.random.default_rng(5)
    resp = np.minimum(1.0, 1.6 * tile_means(field, n, n)) + rng.normal(size=(n, n)) * 0.05
    return np.ones((n, n), bool), np.ones(shape, bool), scores_from(resp)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_resume_inside_a_pass_gives_the_uninterrupted_result(cut):
    kept, tissue, scores = boundary_case()
    kw = dict(margin=0.15, dilation=1)
    full = run_adaptive(kept, tissue, scores, P, S, **kw)
    assert full.n_passes >= 3
    rows, cols = np.nonzero(full.passes)
    passes = full.passes[rows, cols]
    # A crash after half of pass `cut`'s tiles were stored (and nothing later): the state the
    # engine rebuilds from the stored parts.
    this = np.flatnonzero(passes == cut)
    stored = np.r_[np.flatnonzero(passes < cut), this[::2]]
    partial = PassState(kept, tissue, Selection("adaptive", P, S, **kw), 2)
    partial.add(rows[stored], cols[stored], passes[stored], scores[rows[stored], cols[stored]])
    log = []
    resumed = run_adaptive(kept, tissue, scores, P, S, state=partial, log=log, **kw)
    assert np.array_equal(resumed.passes, full.passes)
    assert np.array_equal(resumed.scores, full.scores, equal_nan=True)
    first_pass_no, first_pos = log[0]
    missing = {(r, c) for r, c in zip(rows[this[1::2]], cols[this[1::2]])}
    assert first_pass_no == cut and {tuple(p) for p in first_pos} == missing
    assert [p for p, _ in log] == list(range(cut, full.n_passes + 1))
    # A finished state resumes to itself without encoding anything.
    log.clear()
    again = run_adaptive(kept, tissue, scores, P, S, state=full, log=log, **kw)
    assert log == [] and np.array_equal(again.passes, full.passes)


def test_full_overlap_is_one_pass_of_every_kept_tile():
    kept, tissue, scores = boundary_case()
    kept[3, 5] = False
    st = PassState(kept, None, Selection("full", P, S), 2)
    p, todo = st.select()
    assert p == 1 and np.array_equal(todo, kept)
    rows, cols = np.nonzero(todo)
    st.add(rows[:10], cols[:10], 1)                       # resume inside the pass: the rest
    p, todo = st.select()
    assert p == 1 and todo.sum() == kept.sum() - 10 and not todo[rows[:10], cols[:10]].any()
    st.add(*np.nonzero(todo), 1)
    assert not st.select()[1].any() and np.array_equal(st.encoded, kept)


def test_bad_input():
    kept, tissue, scores = boundary_case()
    for margin in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ConfigError, match="margin"):
            run_adaptive(kept, tissue, scores, P, S, margin=margin, dilation=0)
    for d in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="dilation"):
            next_pass(kept, kept, scores, tissue, P, S, margin=0.1, dilation=d)
    with pytest.raises(ValueError, match="tissue_cells"):
        run_adaptive(kept, tissue[:-1], scores, P, S, margin=0.1, dilation=0)
    st = PassState(kept & (np.arange(kept.shape[1]) > 0), tissue, Selection("adaptive", P, S), 2)
    with pytest.raises(ValueError, match="not a kept position"):
        st.add([0], [0], 1, [[0.1, 0.2]])
    with pytest.raises(ConfigError, match="mode"):
        PassState(kept, tissue, Selection("partial", P, S), 2)


def test_adaptive_settings_key_the_stored_embeddings():
    """Each selection setting stores its tiles apart (maps average the tiles encoded, so mixing
    settings would change results); pool settings change no selection and share them."""
    from zeus_ray.config import load_config
    from zeus_ray.storage.keys import tiling_key

    def key(*sets):
        return tiling_key(load_config(None, ["tiling.mode=adaptive", *sets]))
    base = key()
    assert tiling_key(load_config(None, [])) != base
    for s in ("tiling.adaptive_margin=0.01", "tiling.adaptive_dilation=1", "tiling.adaptive_disagreement=true",
              "tiling.adaptive_coarse_first=false"):
        assert key(s) != base, s
    assert key("ray.chunk_tiles=3") == key("ray.max_slides_in_flight=2") == base


def test_chunk_target_shares_a_pass_between_workers():
    from zeus_ray.engine.shape import chunk_target
    assert chunk_target(286, 256, 2, 64) == 143        # a slide's pass split over both workers
    assert chunk_target(73, 256, 2, 64) == 64          # never below a batch
    assert chunk_target(30, 256, 4, 16) == 16
    assert chunk_target(5000, 256, 2, 64) == 256       # never above ray.chunk_tiles
    assert chunk_target(286, 256, 1, 128) == 256       # one GPU actor: as before
    assert chunk_target(0, 256, 2, 64) == 64
