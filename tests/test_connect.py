"""Joining clusters: `ray.address=auto` with no cluster or a stale `ray_current_cluster` file, and a
real token-authenticated cluster (`ray start --head` with RAY_AUTH_MODE=token) joined by `zeus run`
and `zeus doctor` with the token from each of Ray's documented places, or refused in one line.

Every Ray here lives in its own temp folder (--temp-dir, RAY_TMPDIR) with its own HOME (the default
token file) and free ports, so other Ray users of the machine are never touched."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from _cohort import make_cohort

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_TMPDIR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict:
    """This process's environment without Ray's address and auth settings, HOME in `home`."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env | {"HOME": str(home)} | extra


@pytest.fixture(scope="module")
def token_cluster():
    """A head started with `ray start --head --block` and token auth on; stopped by its pids."""
    base = Path(tempfile.mkdtemp(prefix="zc-", dir="/tmp"))   # short: Ray's socket paths have a limit
    home = base / "head-home"
    home.mkdir()
    token = uuid.uuid4().hex
    port = _free_port()
    cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "2",
           "--include-dashboard", "false", "--temp-dir", str(base / "ray"), "--port", str(port),
           "--ray-client-server-port", str(_free_port()), "--dashboard-port", str(_free_port()),
           "--dashboard-agent-listen-port", str(_free_port())]
    proc = subprocess.Popen(cmd, env=_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address_file = base / "ray" / "ray_current_cluster"
        deadline = time.time() + 120
        while time.time() < deadline and not address_file.exists():
            assert proc.poll() is None, "ray start --head failed"
            time.sleep(0.5)
        assert address_file.exists(), "ray start --head did not come up in 120 s"
        yield {"address": address_file.read_text().strip(), "token": token, "base": base}
    finally:
        proc.send_signal(signal.SIGTERM)          # `ray start --block` stops its node on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # anything of its process group still left
        except ProcessLookupError:
            pass
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n=1, width=1600, height=1200)


def _zeus(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeus_ray", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def _run_args(manifest: Path, out: Path, address: str) -> list[str]:
    return ["run", "--no-progress", "--address", address, "--set", f"input.manifest={manifest}",
            "--set", f"output.root={out}", "--set", "model.id=random:vit_tiny_patch16_224",
            "--set", "model.batch_size=16", "--set", f"cache.dir={out.parent / 'cache'}"]


def _doctor_args(manifest: Path, out: Path, address: str) -> list[str]:
    config = out.parent / "doctor.yaml"
    config.write_text(f"input: {{manifest: {manifest}}}\noutput: {{root: {out}}}\n"
                      "model: {id: 'random:vit_tiny_patch16_224'}\n")
    return ["doctor", str(config), "--sample", "0", "--address", address]


def _one_error(p: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a run that stopped before starting (exit 2), no traceback."""
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "InvalidAuthToken" not in p.stderr, p.stderr[-3000:]
    return errors[0]


def _ray_line(p: subprocess.CompletedProcess) -> str:
    (line,) = [ln for ln in p.stdout.splitlines() if ln[5:].startswith("ray")]
    assert "Traceback" not in p.stderr and "InvalidAuthToken" not in p.stderr, p.stderr[-3000:]
    return line


def test_auto_without_a_cluster_or_with_a_stale_file_is_one_line(cohort, tmp_path):
    """No `ray_current_cluster` under Ray's temp folder, or one naming a dead cluster: one line at
    once (before: a traceback, or a hang with GCS warnings every ~40 s)."""
    tmpdir = tmp_path / "raytmp"
    (tmpdir / "ray").mkdir(parents=True)
    env = _env(tmp_path, RAY_TMPDIR=str(tmpdir))
    line = _one_error(_zeus(env, *_run_args(cohort, tmp_path / "out", "auto"), timeout=60))
    assert "ray.address=auto: no Ray cluster was started on this machine" in line
    assert str(tmpdir / "ray" / "ray_current_cluster") in line

    dead = f"127.0.0.1:{_free_port()}"                  # nothing listens there any more
    (tmpdir / "ray" / "ray_current_cluster").write_text(dead)
    line = _one_error(_zeus(env, *_run_args(cohort, tmp_path / "out", "auto"), timeout=60))
    assert f"({dead}) is not running" in line and "ray_current_cluster" in line
    doc = _zeus(env, *_doctor_args(cohort, tmp_path / "out", "auto"), timeout=60)
    assert doc.returncode == 1 and _ray_line(doc).startswith("fail ray: ray.address=auto: the cluster recorded in ")


def test_token_cluster_refuses_in_one_line_without_the_right_token(token_cluster, cohort, tmp_path):
    addr = token_cluster["address"]
    home = tmp_path / "home"                 # no ~/.ray/auth_token
    home.mkdir()
    line = _one_error(_zeus(_env(home), *_run_args(cohort, tmp_path / "out", addr), timeout=120))
    assert f"authentication failed: the Ray cluster at {addr} requires token authentication and no token" in line
    assert "RAY_AUTH_TOKEN" in line
    line = _one_error(_zeus(_env(home, RAY_AUTH_TOKEN="not-the-token"), *_run_args(cohort, tmp_path / "out", addr),
                            timeout=120))
    assert f"authentication failed: the Ray cluster at {addr} rejected the token from RAY_AUTH_TOKEN" in line
    doc = _zeus(_env(home), *_doctor_args(cohort, tmp_path / "o", addr), timeout=120)
    assert doc.returncode == 1
    assert _ray_line(doc).startswith(f"fail ray: authentication failed: the Ray cluster at {addr} requires token")
    assert not (tmp_path / "out").exists()   # nothing was started


def test_token_cluster_runs_with_the_token_from_the_environment(token_cluster, cohort, tmp_path):
    """RAY_AUTH_TOKEN, RAY_AUTH_MODE unset (before: 20 InvalidAuthToken warnings and a traceback)."""
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, RAY_AUTH_TOKEN=token_cluster["token"])
    p = _zeus(env, *_run_args(cohort, tmp_path / "out", token_cluster["address"]))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 slides ok (0 already complete)" in p.stdout, p.stdout
    assert "InvalidAuthToken" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("slides/syn-0/results/*/*/_COMPLETE.json"))) == 1


def test_token_from_a_file_or_the_default_place_and_auto(token_cluster, cohort, tmp_path):
    """`zeus doctor --address` joins with RAY_AUTH_TOKEN_PATH, and with ~/.ray/auth_token through
    `auto` (the address `ray start` recorded under RAY_TMPDIR)."""
    addr = token_cluster["address"]
    home = tmp_path / "home"
    home.mkdir()
    path = tmp_path / "token"
    path.write_text(token_cluster["token"] + "\n")
    doc = _zeus(_env(home, RAY_AUTH_TOKEN_PATH=str(path)), *_doctor_args(cohort, tmp_path / "o", addr))
    assert _ray_line(doc).startswith(f"ok   ray cluster at {addr}: 1 node(s), 2 CPUs"), doc.stdout
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token_cluster["token"])
    env = _env(home, RAY_TMPDIR=str(token_cluster["base"]))
    doc = _zeus(env, *_doctor_args(cohort, tmp_path / "o", "auto"))
    assert _ray_line(doc).startswith(f"ok   ray cluster at {addr}: 1 node(s)"), doc.stdout
    bad = _zeus(_env(home, RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing")), *_run_args(cohort, tmp_path / "o", addr),
                timeout=60)
    assert "RAY_AUTH_TOKEN_PATH=" in _one_error(bad) and "cannot read the Ray token file" in _one_error(bad)
