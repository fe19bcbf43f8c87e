"""Remote access rules shared by every input read and the output root: fsspec filesystems with
the config's storage options (flat, or per protocol), one-line causes of remote failures, and
credentials scrubbed from messages."""
from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlparse

LOCAL_PROTOCOLS = {None, "file", "local"}


def protocol(uri: str) -> str | None:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", uri)
    return m.group(1).lower() if m else None


def local_path(uri: str) -> str:
    if protocol(uri) in ("file", "local"):
        return unquote(urlparse(uri).path)
    return os.path.expanduser(uri)


def redact(text: str, secrets=()) -> str:
    """Remove anything credential-like from a message: user:password@ in URLs, the values of
    credential environment variables and `secrets` (a library may echo them back in an error)."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", text)
    for value in secrets:
        text = text.replace(value, "***")
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def cause(err: BaseException, protocol: str | None = None) -> str:
    """One line saying why a remote call failed, without credentials."""
    # fsspec's HTTP backend reports an unreachable server as FileNotFoundError: look at its cause.
    inner = err.__cause__ or err.__context__
    if isinstance(err, FileNotFoundError) and inner is not None and "connect" in type(inner).__name__.lower():
        err = inner
    name = type(err).__name__
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, FileNotFoundError):
        hint = "no such bucket or object"
    elif isinstance(err, PermissionError):
        hint = "access denied (check the credentials and the bucket policy)"
    elif "credential" in name.lower() or "credential" in msg.lower():
        hint = "no usable credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    elif any(k in (name + msg).lower() for k in ("connect", "timeout", "timed out", "unreachable", "resolve")):
        hint = ("cannot reach the endpoint (check client_kwargs.endpoint_url in the storage options or "
                "AWS_ENDPOINT_URL, and the network)" if protocol in ("s3", "s3a")
                else "cannot reach the server (check the address and the network)")
    else:
        hint = name
    return redact(f"{hint} ({name}: {msg})" if msg and hint != name else f"{hint}: {msg}" if msg else hint)


def filesystem(uri: str, storage_options: dict | None = None):
    """(fsspec filesystem, path) for any URI. `storage_options` (the config's input.storage_options
    or output.storage_options, e.g. {"anon": True}) apply to remote URIs only: flat keys to every
    protocol, a key naming a protocol ({"s3": {...}, "gs": {...}}) to that protocol only."""
    import fsspec

    proto = protocol(uri)
    options: dict = {}
    if proto in ("s3", "s3a"):
        # Pass the endpoint explicitly: it also keys fsspec's instance cache, so a changed
        # AWS_ENDPOINT_URL is honoured within one process.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        # Fail fast on an unreachable endpoint instead of botocore's long retry loop.
        options["config_kwargs"] = {"connect_timeout": 10, "retries": {"max_attempts": 2}}
    if storage_options and proto not in LOCAL_PROTOCOLS:
        known = set(fsspec.available_protocols())
        per = {k for k, v in storage_options.items() if k in known and isinstance(v, dict)}
        given = {k: v for k, v in storage_options.items() if k not in per}
        given.update(storage_options.get(proto) or storage_options.get({"s3a": "s3"}.get(proto, "")) or {})
        for k, v in given.items():   # the user's client/config kwargs add to ours, not replace them
            options[k] = {**options[k], **v} if isinstance(v, dict) and isinstance(options.get(k), dict) else v
    return fsspec.core.url_to_fs(uri, **options)


def secrets(storage_options: dict | None) -> list[str]:
    """String values of credential-like storage options, to scrub from messages."""
    out = []
    for k, v in (storage_options or {}).items():
        if isinstance(v, dict):
            out += secrets(v)
        elif isinstance(v, str) and len(v) >= 4 and any(w in str(k).lower() for w in ("key", "secret", "token", "password")):
            out.append(v)
    return out
