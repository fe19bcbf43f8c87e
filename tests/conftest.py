"""Shared fixtures: the real test slides in tests/data (committed, see tests/data/slides/README.md)
and a real S3 server (moto) on 127.0.0.1. Stage-specific helpers live in their own test modules."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def test_data() -> Path:
    """tests/data: real slides and checkpoint layouts, part of every clone (nothing to skip)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def slides_dir(test_data) -> Path:
    return test_data / "slides"


@pytest.fixture(scope="module")
def cmu_tiles(slides_dir):
    """Five real 448-px RGB tiles (uint8, N×448×448×3) from CMU-1-Small-Region.svs."""
    import numpy as np
    import openslide
    slide = openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs"))
    try:
        return np.stack([np.asarray(slide.read_region((x, y), 0, (448, 448)).convert("RGB"))
                         for x, y in [(0, 0), (500, 700), (900, 1300), (1300, 2100), (1700, 2400)]])
    finally:
        slide.close()


def row_cosines(a, b):
    """Cosine between matching rows of two (N, D) arrays, in float64."""
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real moto S3 server on 127.0.0.1; sets AWS_* env vars so boto3/s3fs/pyarrow use it.
    Yields the endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; yields its name."""
    import uuid

    import boto3
    name = f"zeus-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
