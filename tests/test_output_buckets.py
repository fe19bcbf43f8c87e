"""output.storage_options: input and output in buckets of a real S3 server (moto on 127.0.0.1) whose
endpoint is given only in the config (no AWS_ENDPOINT_URL), through `zeus doctor`, `zeus run`,
`zeus evaluate`, `zeus reprompt` and `zeus report`; a failing output endpoint is one line, exit code 2,
and nothing complete in the bucket changes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from _cohort import make_cohort

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    return env | {"PYTHONPATH": str(ROOT)}


def zeus(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeus_ray", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900, env=_env())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _objects(s3, bucket: str) -> dict[str, str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def bucket_run(s3_server, tmp_path_factory):
    """One `zeus run` with input and output in two buckets, the endpoint only in job.yaml."""
    tmp = tmp_path_factory.mktemp("buckets")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    src, dst = "zeus-in-" + tmp.name[-6:].lower().replace("_", "-"), "zeus-out-" + tmp.name[-6:].lower().replace("_", "-")
    for b in (src, dst):
        s3.create_bucket(Bucket=b)
    local = make_cohort(tmp / "c", n=2).parent
    for f in sorted(local.iterdir()):
        s3.upload_file(str(f), src, f"cohort/{f.name}")
    cfg = tmp / "job.yaml"
    cfg.write_text(f"input:\n  manifest: s3://{src}/cohort/manifest.csv\n"
                   f"  storage_options: {{client_kwargs: {{endpoint_url: '{s3_server}'}}}}\n"
                   f"output:\n  root: s3://{dst}/results\n"
                   f"  storage_options: {{s3: {{client_kwargs: {{endpoint_url: '{s3_server}'}}}}}}\n"  # per protocol
                   "model: {id: 'random:vit_tiny_patch16_224', batch_size: 16}\n"
                   f"cache: {{dir: {tmp / 'cache'}}}\n")
    p = zeus("run", str(cfg), "--no-progress", cwd=tmp)
    return tmp, cfg, s3, dst, p


def test_run_writes_to_the_configured_endpoint_and_never_stores_its_options(bucket_run, s3_server):
    tmp, cfg, s3, dst, p = bucket_run
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 slides ok" in p.stdout and "Traceback" not in p.stderr
    keys = _objects(s3, dst)
    assert sum(k.endswith("/_COMPLETE.json") and "/results/" in k for k in keys) == 2
    run_json = next(k for k in keys if k.endswith("/run.json"))
    run = json.loads(s3.get_object(Bucket=dst, Key=run_json)["Body"].read())
    assert "storage_options" not in run["config"]["output"]
    assert any(k.endswith("table1.csv") for k in keys)          # cohort tables through the store too


def test_doctor_evaluate_reprompt_report_on_the_bucket_root(bucket_run, s3_server):
    tmp, cfg, s3, dst, _ = bucket_run
    root, opt = f"s3://{dst}/results", f"output.storage_options.client_kwargs.endpoint_url={s3_server}"  # flat form
    d = zeus("doctor", str(cfg), cwd=tmp)
    assert f"output.root s3://{dst}/results: writable" in d.stdout, d.stdout + d.stderr
    assert "FAIL" not in d.stdout, d.stdout
    ev = zeus("evaluate", root, "--set", opt, cwd=tmp)
    assert ev.returncode == 0 and "2 slides evaluated" in ev.stdout, ev.stdout + ev.stderr
    rp = zeus("reprompt", "--results", root, "--prompts", str(ROOT / "tests" / "data" / "prompts-mixed.yaml"),
              "--set", opt, "--no-progress", cwd=tmp)
    assert rp.returncode == 0 and "2 slides ok" in rp.stdout, rp.stdout + rp.stderr
    assert len({k.split("/")[2] for k in _objects(s3, dst) if k.startswith("results/cohort/")}) == 2
    rep = zeus("report", root, "--set", opt, cwd=tmp)
    assert rep.returncode == 0 and rep.stdout.strip().startswith(f"s3://{dst}/results/cohort/"), rep.stdout + rep.stderr
    without = zeus("evaluate", root, cwd=tmp)      # the endpoint is nowhere else: AWS's default is tried
    assert without.returncode != 0 and "Traceback" not in without.stderr


def test_an_unreachable_output_endpoint_is_one_line_and_loses_nothing(bucket_run):
    tmp, cfg, s3, dst, _ = bucket_run
    before = _objects(s3, dst)
    bad = f"http://127.0.0.1:{_closed_port()}"
    p = zeus("run", str(cfg), "--no-progress", "--set", f"output.storage_options.s3.client_kwargs.endpoint_url={bad}",
             cwd=tmp)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"s3://{dst}/results" in lines[0] and "cannot reach the endpoint" in lines[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert _objects(s3, dst) == before
