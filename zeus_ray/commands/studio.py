"""`zeus studio RESULTS_ROOT [--port P] [--host H]`: a local web app over a finished run: the cohort,
each slide at full resolution with its overlays, and live re-prompting from the stored embeddings.

Bound to 127.0.0.1 unless --host says otherwise; on any other address it requires a token, printed
once below. The run it opens is never changed: re-prompts land under their own prompt keys."""
from __future__ import annotations

from .options import add_set_option
from ..errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("studio", help="web app over a finished run: slides, overlays, live re-prompting")
    p.add_argument("results", metavar="RESULTS_ROOT", help="output root of a `zeus run` (local folder or bucket URI)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1); any other address requires the printed token")
    p.add_argument("--prompt-key", help="which run under RESULTS_ROOT (default: the newest)")
    add_set_option(p)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    import socket

    import uvicorn

    from ..studio.app import Studio, build_app
    from ..studio.run_data import StudioRun
    from ..studio.security import is_loopback, new_token

    for o in args.overrides:
        if not o.strip().startswith(("model.", "input.storage_options")):
            raise ConfigError(f"--set {o!r}: zeus studio takes only model.<key>=value (e.g. model.weights=PATH) "
                              "and input.storage_options.<key>=value")
    run = StudioRun(args.results, args.prompt_key, args.overrides)
    token = None if is_loopback(args.host) else new_token()
    hosts = ["127.0.0.1", "localhost"] if is_loopback(args.host) else ["*"]
    app = build_app(Studio(run, args.overrides), token=token, allowed_hosts=hosts)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it. asyncio sets it itself only on sockets made with proto=TCP;
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)   # connections made as soon as the address is printed wait in the backlog
    except OSError as e:
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror}); "
                          "pick another port with --port") from None
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if is_loopback(args.host) else (socket.gethostname() if args.host in ("0.0.0.0", "::")
                                                         else args.host)
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"zeus studio: run {run.prompt_key} ({len(run.table)} slides) from {run.store.root_uri}", flush=True)
    print(f"zeus studio: open {url}" + ("" if token is None else "  (the token is shown only this once)"), flush=True)
    print("zeus studio: stop with Ctrl-C", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0
