"""Slide access: local paths, remote slides through a real S3 (moto) server and a real HTTP
server, the on-disk cache (once per slide, multi-process safe, atomic, LRU), OpenSlide errors."""
from __future__ import annotations

import functools
import http.server
import logging
import multiprocessing as mp
import os
import shutil
import socket
import threading
from pathlib import Path

import boto3
import numpy as np
import openslide
import pytest

from zeus_ray.config import CacheConfig
from zeus_ray.errors import SlideError
from zeus_ray.slides.access import fingerprint, localise, open_slide, slide_read_errors
from zeus_ray.demo.synthetic import write_unsupported_tiff

CMU = "CMU-1-Small-Region.svs"


def _region(slide, loc=(300, 400), size=(256, 192)) -> np.ndarray:
    return np.asarray(slide.read_region(loc, 0, size))


def _put(endpoint, bucket, key, data: bytes | Path):
    body = data.read_bytes() if isinstance(data, Path) else data
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---- local paths -------------------------------------------------------------------------------

def test_local_paths_are_returned_as_is(slides_dir):
    p = str(slides_dir / CMU)
    assert localise(p) == p
    assert localise(f"file://{p}") == p
    with pytest.raises(SlideError) as e:
        localise(str(slides_dir / "nope.svs"), slide_id="s1")
    assert e.value.reason == "missing" and "nope.svs" in str(e.value) and "'s1'" in str(e.value)
    with pytest.raises(SlideError) as e:
        open_slide("file:///no/such/dir/x.svs", "s2")
    assert e.value.reason == "missing" and "/no/such/dir/x.svs" in str(e.value)


def test_open_errors(slides_dir, tmp_path):
    with pytest.raises(SlideError) as e:
        open_slide(str(slides_dir / "broken.svs"), "broken")
    assert e.value.reason == "unsupported" and "broken.svs" in str(e.value) and "tiled pyramidal TIFF" in str(e.value)

    tif = write_unsupported_tiff(tmp_path / "plain.tif")
    with pytest.raises(SlideError) as e:
        open_slide(tif, "plain")
    assert e.value.reason == "unsupported"

    slide = open_slide(str(slides_dir / "unreadable.svs"), "bad")  # opens fine ...
    with pytest.raises(SlideError) as e, slide_read_errors("bad"):
        slide.read_region((0, 0), 0, (16, 16))                     # ... fails when decoded
    assert e.value.reason == "unreadable" and "tile data is corrupt" in str(e.value)
    assert "Bogus marker length" in str(e.value)

    good = open_slide(str(slides_dir / CMU), "good")
    with slide_read_errors("good"):
        assert _region(good).shape == (192, 256, 4)


def test_folder_is_opened_through_its_first_dcm_file(slides_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError) as e:
        open_slide(str(empty), "dicom")
    assert e.value.reason == "unsupported" and "without .dcm files" in str(e.value)
    # A folder whose first .dcm is not a slide: OpenSlide is handed that file and rejects it.
    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(slides_dir / "broken.svs", series / "a.dcm")
    shutil.copy(slides_dir / CMU, series / "b.dcm")
    (series / "notes.txt").write_text("x")
    with pytest.raises(SlideError) as e:
        open_slide(str(series), "dicom")
    assert e.value.reason == "unsupported"


def test_fingerprint_is_cheap_and_content_based(tmp_path, slides_dir):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    a.write_bytes(data)
    b.write_bytes(data)
    assert fingerprint(str(a)) == fingerprint(str(b))
    data[-1] ^= 1                                    # last MiB is hashed
    b.write_bytes(data)
    assert fingerprint(str(a)) != fingerprint(str(b))
    data[-1] ^= 1
    data[len(data) // 2] ^= 1                        # the middle is not (by design: cheap)
    b.write_bytes(data)
    assert fingerprint(str(a)) == fingerprint(str(b))
    b.write_bytes(data + b"\0")                      # size is part of it
    assert fingerprint(str(a)) != fingerprint(str(b))
    assert fingerprint(str(slides_dir / "small.svs")) != fingerprint(str(slides_dir / "unreadable.svs"))


# ---- remote slides: S3 -------------------------------------------------------------------------

def test_s3_slide_is_fetched_once_and_reads_like_the_local_file(s3_server, s3_bucket, slides_dir, tmp_path, caplog):
    uri = _put(s3_server, s3_bucket, f"cohort/{CMU}", slides_dir / CMU)
    cfg = CacheConfig(dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="zeus_ray.slides.access"):
        path = localise(uri, cfg)
        st = os.stat(path)
        again = localise(uri, cfg)
    assert again == path and Path(path).name == CMU and Path(path).parent.parent == tmp_path / "cache"
    assert os.stat(again).st_ino == st.st_ino and os.stat(again).st_mtime_ns == st.st_mtime_ns
    assert sum("fetched" in r.getMessage() for r in caplog.records) == 1
    remote = open_slide(uri, "cmu", cfg)
    local = openslide.OpenSlide(str(slides_dir / CMU))
    assert remote.dimensions == local.dimensions
    assert np.array_equal(_region(remote), _region(local))
    assert fingerprint(path) == fingerprint(str(slides_dir / CMU))


def test_changed_object_is_fetched_again(s3_server, s3_bucket, slides_dir, tmp_path):
    cfg = CacheConfig(dir=str(tmp_path / "cache"))
    uri = _put(s3_server, s3_bucket, "s.svs", slides_dir / "small.svs")
    first = localise(uri, cfg)
    _put(s3_server, s3_bucket, "s.svs", slides_dir / CMU)
    second = localise(uri, cfg)
    assert second != first
    assert Path(second).read_bytes() == (slides_dir / CMU).read_bytes()


def _worker(uri, cache_dir, start, out):
    start.wait(60)  # a barrier: all processes, imports done, fetch at the same moment
    try:
        slide = open_slide(uri, "mp", CacheConfig(dir=cache_dir))
        path = localise(uri, CacheConfig(dir=cache_dir))
        out.put((path, os.stat(path).st_ino, _region(slide).tobytes()))
    except Exception as e:  # reported to the parent, which fails the test
        out.put(repr(e))


def test_concurrent_processes_fetch_one_copy(s3_server, s3_bucket, slides_dir, tmp_path):
    name = "TCGA-CR-7395-01A-01-TS1.svs"   # the larger slide: a wider window for a race
    uri = _put(s3_server, s3_bucket, name, slides_dir / name)
    cache = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(uri, str(cache), start, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(isinstance(r, tuple) for r in results), results
    assert len({r[0] for r in results}) == 1 and len({r[1] for r in results}) == 1
    expected = _region(openslide.OpenSlide(str(slides_dir / name))).tobytes()
    assert all(r[2] == expected for r in results)
    assert len(_entries(cache)) == 1
    assert not list(cache.glob(".tmp-*"))


def test_partial_downloads_are_never_used(s3_server, s3_bucket, slides_dir, tmp_path):
    cfg = CacheConfig(dir=str(tmp_path / "cache"))
    uri = _put(s3_server, s3_bucket, CMU, slides_dir / CMU)
    full = (slides_dir / CMU).read_bytes()
    path = Path(localise(uri, cfg))
    entry = path.parent
    # A process died mid-download: its temporary folder is left behind, the entry never appeared.
    shutil.rmtree(entry)
    stale = entry.parent / f".tmp-{entry.name}-99999-deadbeef"
    stale.mkdir()
    (stale / CMU).write_bytes(full[:1000])
    assert Path(localise(uri, cfg)).read_bytes() == full
    assert not stale.exists()
    # An entry damaged in place (truncated) is detected by its size and fetched again.
    path.write_bytes(full[:5000])
    assert Path(localise(uri, cfg)).read_bytes() == full


def test_lru_eviction(s3_server, s3_bucket, tmp_path, caplog):
    mb = 1_000_000
    cfg = CacheConfig(dir=str(tmp_path / "cache"), max_gb=2.5 * mb / 1e9)
    a, b, c = (_put(s3_server, s3_bucket, k, bytes([i]) * mb) for i, k in enumerate("abc"))
    pa, pb = localise(a, cfg), localise(b, cfg)
    localise(a, cfg)                       # a is now more recently used than b
    pc = localise(c, cfg)                  # 3 MB > 2.5 MB: b (least recently used) goes
    assert os.path.exists(pa) and os.path.exists(pc) and not os.path.exists(pb)
    pb = localise(b, cfg)                  # fetched again; now a is the least recently used
    assert os.path.exists(pb) and os.path.exists(pc) and not os.path.exists(pa)
    # The entry just fetched is kept even when it alone exceeds the limit.
    tiny = CacheConfig(dir=str(tmp_path / "tiny"), max_gb=0.5 * mb / 1e9)
    with caplog.at_level(logging.WARNING, logger="zeus_ray.slides.access"):
        assert os.path.getsize(localise(a, tiny)) == mb
    assert any("raise cache.max_gb" in r.getMessage() for r in caplog.records)


def test_remote_errors_are_one_line_without_secrets(s3_server, s3_bucket, tmp_path, monkeypatch):
    secret = "Zs3cr3tKEYvalue0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = CacheConfig(dir=str(tmp_path / "cache"))
    cases = {
        "s3://zeus-no-such-bucket-x1/slide.svs": "no such bucket",
        f"s3://{s3_bucket}/missing.svs": "no such bucket or object",
        "abfs://container/slide.svs": "adlfs",                  # its fsspec package is not installed
        "nosuchproto://bucket/slide.svs": "nosuchproto",
    }
    for uri, cause in cases.items():
        with pytest.raises(SlideError) as e:
            open_slide(uri, "r1", cfg)
        msg = str(e.value)
        assert e.value.reason == "remote" and uri in msg and cause in msg, msg
        assert "\n" not in msg and secret not in msg
    # An endpoint nobody listens on.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(SlideError) as e:
        localise(f"s3://{s3_bucket}/slide.svs", cfg, slide_id="r2")
    msg = str(e.value)
    assert e.value.reason == "remote" and "cannot reach the endpoint" in msg and "AWS_ENDPOINT_URL" in msg and secret not in msg
    assert not list(tmp_path.rglob("*.svs"))  # nothing was left in the cache


def _closed_port() -> int:
    """A port that was just free: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unusable_cache_dir(s3_server, s3_bucket, slides_dir, tmp_path):
    uri = _put(s3_server, s3_bucket, "small.svs", slides_dir / "small.svs")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SlideError) as e:
        localise(uri, CacheConfig(dir=str(blocker / "cache")), slide_id="c")
    assert e.value.reason == "cache" and str(blocker) in str(e.value) and "cache.dir" in str(e.value)


# ---- remote slides: HTTP -----------------------------------------------------------------------

@pytest.fixture
def http_server(slides_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(slides_dir))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_slide(http_server, slides_dir, tmp_path):
    cfg = CacheConfig(dir=str(tmp_path / "cache"))
    slide = open_slide(f"{http_server}/{CMU}", "web", cfg)
    assert np.array_equal(_region(slide), _region(openslide.OpenSlide(str(slides_dir / CMU))))
    with pytest.raises(SlideError) as e:
        open_slide(f"{http_server}/absent.svs", "web", cfg)
    assert e.value.reason == "remote" and "absent.svs" in str(e.value)
    # Credentials embedded in a URL are never echoed.
    with pytest.raises(SlideError) as e:
        localise(f"http://alice:pa55word@127.0.0.1:{_closed_port()}/x.svs", cfg, slide_id="web")
    assert e.value.reason == "remote" and "pa55word" not in str(e.value) and "x.svs" in str(e.value)
    assert "cannot reach the server" in str(e.value)
