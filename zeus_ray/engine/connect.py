"""Joining an existing Ray cluster (ray.address, --address, RAY_ADDRESS) in seconds, or one line
saying why not, with the token of a token-authenticated cluster.

- `auto` is RAY_ADDRESS, else the cluster the last `ray start` on this machine recorded in
  `ray_current_cluster` under Ray's temp folder (RAY_TMPDIR, else TMPDIR, else /tmp, + /ray). A file
  left behind by a cluster that is gone fails at once (Ray would retry for minutes). Unlike Ray's
  own `auto`, GCS processes found by `ps` are not joined: on a shared machine they are other
  people's private clusters.
- Token authentication (Ray >= 2.52): Ray sends a token only when RAY_AUTH_MODE=token, and a driver
  joining by address does not turn it on by itself. When RAY_AUTH_MODE is unset and Ray would find
  a token (its documented places, in its order: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names,
  ~/.ray/auth_token), it is turned on here; a cluster without authentication accepts it too.
- Before ray.init, a child process opens a GCS client to the address (Ray's C++ warnings, retries
  and aborts stay in it) and says whether the cluster answers and accepts the token.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError

PROBE_TIMEOUT_S = 30     # a Python start with Ray imported, on a busy machine, and one GCS call
CONNECT_TIMEOUT_S = 3
AUTH_MODE, TOKEN, TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
HOW = ("check the address (the head's `ray start --head` prints it), or run on a local Ray by leaving "
       "ray.address/--address unset and unsetting RAY_ADDRESS")
TOKEN_HOW = ("`ray get-auth-token` on the head prints the token; give it as RAY_AUTH_TOKEN, in a file named "
             "by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (docs/clusters.md)")


def address_file() -> str:
    """Where `ray start` records the address that `auto` joins (Ray's own lookup)."""
    from ray._common.utils import get_ray_address_file
    return get_ray_address_file(None)


def auto_address() -> str:
    """The address `auto` stands for: RAY_ADDRESS, else the one the last `ray start` recorded."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return env
    path = address_file()
    try:
        recorded = Path(path).read_text().strip()
    except OSError:
        recorded = ""
    if not recorded:
        raise ConfigError(f"ray.address=auto: no Ray cluster was started on this machine (no {path}); start one "
                          "with `ray start --head`, give a cluster's address (ray.address / --address HOST:PORT), "
                          "or leave ray.address unset to run on a local Ray")
    return recorded


def check_reachable(address: str, auto: bool = False) -> None:
    """Something listens at host:port, else one line (ray.init would retry for minutes)."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not host:port; {HOW}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        if auto:
            raise ConfigError(f"ray.address=auto: the cluster recorded in {address_file()} ({address}) is not "
                              f"running ({why}); start one with `ray start --head`, or delete that file and "
                              "leave ray.address unset to run on a local Ray") from None
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({why}); {HOW}") from None


def token_source() -> str | None:
    """Where Ray will read its token from, in Ray's order, or None. A RAY_AUTH_TOKEN_PATH that
    cannot be read is an error here (Ray aborts the process on it)."""
    if os.environ.get(TOKEN, "").strip():
        return TOKEN
    path = os.environ.get(TOKEN_PATH)
    if path:
        try:
            text = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{TOKEN_PATH}={path}: cannot read the Ray token file ({e.strerror or e}); "
                              f"point it at a file holding the cluster's token, or unset it") from None
        if not text:
            raise ConfigError(f"{TOKEN_PATH}={path}: the Ray token file is empty; {TOKEN_HOW}")
        return f"{TOKEN_PATH} ({path})"
    default = Path.home() / ".ray" / "auth_token"
    try:
        return str(default) if default.read_text().strip() else None
    except OSError:
        return None


def auth_env() -> dict:
    """The environment the join needs: RAY_AUTH_MODE=token when Ray would find a token and the
    mode is unset (an explicit RAY_AUTH_MODE is kept as it is)."""
    mode = os.environ.get(AUTH_MODE)
    src = token_source()
    if mode is not None:
        if mode.strip().lower() == "token" and src is None:
            raise ConfigError(f"{AUTH_MODE}=token but no Ray token was found; {TOKEN_HOW}")
        return {}
    return {AUTH_MODE: "token"} if src else {}


_PROBE = """
import sys
import ray._raylet as r
try:
    r.GcsClient(address=sys.argv[1])
except Exception as e:
    text = str(e).strip().splitlines()
    print("ZEUS-PROBE", type(e).__name__, text[0] if text else "", flush=True)
else:
    print("ZEUS-PROBE ok", flush=True)
"""


def probe(address: str, env: dict, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the cluster's GCS at `address` answers with these auth settings, else one line."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                              timeout=timeout, env=os.environ | env)
    except subprocess.TimeoutExpired:
        return f"no answer from a Ray cluster at {address} within {timeout:g} s (is it a Ray head's GCS port?); {HOW}"
    out = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ZEUS-PROBE ")), None)
    if out == "ZEUS-PROBE ok":
        return None
    if out is not None and out.split()[1] == "AuthenticationError":
        return auth_failure(address, env)
    detail = out.split(" ", 1)[1] if out else (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"cannot join the Ray cluster at {address}: {detail[:300]}"


def auth_failure(address: str, env: dict) -> str:
    """The one line of a cluster that refused us: no token, or the wrong one."""
    mode = (env.get(AUTH_MODE) or os.environ.get(AUTH_MODE) or "").strip().lower()
    src = token_source()
    if mode == "token":
        return (f"authentication failed: the Ray cluster at {address} rejected the token from {src}; "
                f"use that cluster's token: {TOKEN_HOW}")
    if src:   # a token exists but RAY_AUTH_MODE says not to send it
        return (f"authentication failed: the Ray cluster at {address} requires token authentication and "
                f"{AUTH_MODE}={os.environ.get(AUTH_MODE)}; unset it or set {AUTH_MODE}=token")
    return (f"authentication failed: the Ray cluster at {address} requires token authentication and no "
            f"token was found; {TOKEN_HOW}")


def preflight(address: str) -> tuple[str, dict]:
    """(the host:port to join, the environment the join needs) or ConfigError with one line.
    `ray://` (Ray Client) addresses are only checked for a listener."""
    auto = address == "auto"
    target = auto_address() if auto else address
    check_reachable(target, auto=auto)
    if target.startswith("ray://"):
        return target, {}
    env = auth_env()
    why = probe(target, env)
    if why:
        raise ConfigError(why)
    return target, env


def use_env(env: dict) -> None:
    """Apply the join's environment to this process before ray.init."""
    if not env:
        return
    os.environ.update(env)
    import ray._raylet
    ray._raylet.Config.initialize("")   # Ray caches its config at import; re-read it (as Ray does itself)


def join(address: str) -> None:
    """ray.init on an existing cluster, after the preflight."""
    import ray
    target, env = preflight(address)
    use_env(env)
    ray.init(address=target, log_to_driver=True, configure_logging=False)
