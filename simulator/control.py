"""The simulator's local control API, and the state file that tells the CLI where to find it.

Bound to 127.0.0.1 only and guarded by a random token kept in the state file (mode 0600), so
only the user who started the simulator can switch its faults.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

from simulator.fleet import FaultError, Fleet

TOKEN_HEADER = "X-Camera-Sim-Token"  # noqa: S105 - a header name, not a secret


def default_state_file() -> Path:
    """Where a running simulator writes its control URL: per user, in the runtime dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(runtime) / f"isocam-camera-sim-{os.getuid()}.json"


class ControlError(RuntimeError):
    """The CLI could not reach or use a running simulator."""


def make_control_app(fleet: Fleet, token: str) -> web.Application:
    """JSON API: GET /cameras, POST /cameras/{id}/fault {"kind": ..., "value": ...}."""

    @web.middleware
    async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if not secrets.compare_digest(request.headers.get(TOKEN_HEADER, ""), token):
            return web.json_response({"error": "missing or wrong control token"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def cameras(_: web.Request) -> web.Response:
        return web.json_response([c.announcement() for c in fleet.cameras])

    async def fault(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
            return web.json_response(
                {"error": 'body must be {"kind": str, "value"?: num}'}, status=400
            )
        value = body.get("value")
        if value is not None and not isinstance(value, int | float):
            return web.json_response({"error": "value must be a number"}, status=400)
        try:
            cam = await fleet.set_fault(request.match_info["cam"], body["kind"], value)
        except FaultError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(cam.announcement())

    app = web.Application(middlewares=[_auth])
    app.router.add_get("/cameras", cameras)
    app.router.add_post("/cameras/{cam}/fault", fault)
    return app


def write_state_file(path: Path, url: str, token: str) -> None:
    """Write {url, token, pid} readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": url, "token": token, "pid": os.getpid()}, fh)
    tmp.replace(path)


def _read_state_file(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ControlError(
            f"no running simulator found ({path} is missing); start one with `camera-sim run`"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ControlError(f"cannot read simulator state file {path}: {exc}") from None
    return state


async def call(state_file: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to a running simulator's control API; errors become ControlError."""
    state = _read_state_file(state_file)
    headers = {TOKEN_HEADER: state["token"]}
    try:
        async with (
            ClientSession(timeout=ClientTimeout(total=30)) as session,
            session.request(method, state["url"] + path, json=body, headers=headers) as resp,
        ):
            data = await resp.json()
            if resp.status != 200:
                raise ControlError(data.get("error", f"HTTP {resp.status}"))
            return data
    except OSError as exc:
        raise ControlError(
            f"the simulator at {state['url']} does not answer ({exc}); is it still running?"
        ) from None
