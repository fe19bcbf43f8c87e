"""A worker's encode call over several chunks of several slides (engine/work.encode_chunks): tiles of
different slides share batches, yet each chunk's part holds exactly its own tiles and the
embeddings each tile gets alone; a chunk whose slide cannot be read fails alone."""
import dataclasses

import numpy as np
import openslide
import pytest
from shapely.geometry import box

from zeus_ray.config import ModelConfig, TissueConfig
from zeus_ray.encoders.registry import load_encoder
from zeus_ray.engine import work
from zeus_ray.engine.records import Chunk
from zeus_ray.storage.parts import read_parts
from zeus_ray.storage.keys import FAILED, OK
from zeus_ray.slides.region_reader import plan_regions
from zeus_ray.storage.store import OutputStore
from zeus_ray.demo.synthetic import write_synthetic_slide
from zeus_ray.slides.tiling import make_grid, tile_table
from zeus_ray.slides.tissue import TissueMask, read_thumbnail, segment_tissue


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ModelConfig(id="random:test_vit", batch_size=8, device="cpu"))


def job_for(path, sid: str, mpp: float, emb_dir: str, tissue_mask=None, min_fraction=0.25) -> Chunk:
    slide = openslide.OpenSlide(str(path))
    g = make_grid(*slide.dimensions, mpp, 1.0, 448, 112)
    if tissue_mask is None:
        thumb, tmpp = read_thumbnail(slide, mpp, 8.0)
        tissue_mask = segment_tissue(thumb, tmpp, TissueConfig())
    regions = plan_regions(tile_table(g, tissue_mask, min_fraction, sid), g, 4, slide_id=sid)
    return Chunk(slide_id=sid, uri=str(path), grid=g, pass_no=1, emb_dir=emb_dir, tiling_key="t", model_key="m",
                 dtype="float32", direct_tiff=True, regions=regions, want_scores=False)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("ew")
    return [write_synthetic_slide(d / f"s{i}.svs", 1800, 1400, 0.5, tissue=box(100, 100, 1000 + 300 * i, 1200),
                                  lesions=None, downsamples=(1, 4)).path for i in range(2)]


def test_chunks_of_several_slides_share_batches_not_tiles(encoder, slides, slides_dir, tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    jobs = [job_for(p, f"s{i}", 0.5, store.path("emb", f"s{i}")) for i, p in enumerate(slides)]
    bad = job_for(slides_dir / "unreadable.svs", "bad", 0.499, store.path("emb", "bad"),
                  TissueMask(mask=np.ones((1, 1), np.uint8), mpp=8.0), min_fraction=0.0)
    assert bad.n_tiles == 1
    sizes = [j.n_tiles for j in jobs]
    assert all(n % encoder.batch_size for n in sizes)       # each chunk alone ends in a partial batch
    work._HANDLES.clear()
    recs = work.encode_chunks(encoder, store, [jobs[0], bad, jobs[1]])
    assert [r.status for r in recs] == [OK, FAILED, OK]
    assert recs[1].slide_id == "bad" and "corrupt" in recs[1].message and recs[1].n == 0
    for job, rec in zip(jobs, (recs[0], recs[2])):
        want = np.sort(np.concatenate([r.tile_ids for r in job.regions]))
        np.testing.assert_array_equal(rec.tile_ids, want)
        ids, _, emb = read_parts(store, job.emb_dir)
        np.testing.assert_array_equal(ids, want)
        # The same tiles encoded on their own (one chunk per call) give the same embeddings.
        solo = OutputStore(str(tmp_path / f"alone-{job.slide_id}"))
        job_a = dataclasses.replace(job, emb_dir=solo.path("emb", job.slide_id))
        alone = work.encode_chunks(encoder, solo, [job_a])[0]
        ids_a, _, emb_a = read_parts(solo, job_a.emb_dir)
        assert alone.status == OK
        np.testing.assert_array_equal(ids_a, ids)
        np.testing.assert_allclose(emb, emb_a, atol=1e-5)
    assert not store.fs.exists(f"{store.root}/emb/bad")
    work._HANDLES.clear()


class _Recording:
    """The real encoder, with the size of every batch it is given recorded."""

    def __init__(self, encoder):
        self.encoder, self.batch_size, self.calls = encoder, encoder.batch_size, []

    def encode_images(self, tiles):
        self.calls.append(len(tiles))
        return self.encoder.encode_images(tiles)


def test_stream_encodes_full_batches_and_carries_the_rest(encoder):
    """Pieces (regions) of uneven sizes fill whole batches; only the call's last batch is partial,
    and every tile keeps its own embedding and id, in order."""
    rng = np.random.default_rng(3)
    sizes = [5, 7, 9, 3, 11]
    pieces = [(np.arange(sum(sizes[:i]), sum(sizes[:i + 1])),
               rng.integers(0, 255, (n, 448, 448, 3), dtype=np.uint8)) for i, n in enumerate(sizes)]
    rec = _Recording(encoder)
    ids, emb = work._encode_stream(rec, iter(pieces), rec.batch_size, {})
    assert rec.batch_size == 8 and sum(rec.calls) == sum(sizes)
    assert all(n % 8 == 0 for n in rec.calls[:-1]) and rec.calls[-1] == sum(sizes) % 8 == 3
    np.testing.assert_array_equal(ids, np.arange(sum(sizes)))
    alone = encoder.encode_images(np.concatenate([p[1] for p in pieces]))
    np.testing.assert_allclose(emb, alone, atol=1e-5)
    assert work._encode_stream(rec, iter([]), 8, {}) == (None, None)
