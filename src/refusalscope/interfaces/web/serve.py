"""Run the web app with uvicorn on a socket bound here first, so a busy port is a one-line error
(exit 2) rather than a traceback, and the loopback default keeps it off the network."""

from __future__ import annotations

import ipaddress
import os
import socket

from ...errors import UserError

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; UserError when it cannot be had."""
    if not 0 <= port <= 65535:
        raise UserError(f"port {port} is out of range: pick one in 1-65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(
            f"cannot resolve host {host!r} ({err.strerror}): pass an IP address such as 127.0.0.1"
        ) from None
    sock = socket.socket(family, kind, proto)
    # a killed server's connections linger in TIME_WAIT for a minute or more; without this a restart
    # on the same port is refused meanwhile (a live listener still refuses: Linux needs SO_REUSEPORT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): stop what uses that port or pass "
                        "another --port") from None
    return sock


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, log=print,
          annotations: str | os.PathLike | None = None) -> None:
    """Serve the app over `run_dir` until interrupted (the study's answers go to `annotations`,
    default RUN_DIR/annotations.sqlite)."""
    import uvicorn

    from ...run.store import RunStore
    from .app import create_app

    RunStore(run_dir, create=False).verify_all()  # a damaged artifact is named now, not page by page
    allowed = None if not is_loopback(host) else sorted(set(LOOPBACK_NAMES + [host]))
    app = create_app(run_dir, allowed_hosts=allowed, annotations=annotations)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    log(f"refusalscope: serving {run_dir} at http://{shown}:{sock.getsockname()[1]}/ (Ctrl+C stops)")
    if not is_loopback(host):
        log("warning: listening beyond this machine; anyone who can reach it can read the run and post annotations")
    app.state.rs.warm()  # the overview's plots and the latent index, while the server starts
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
