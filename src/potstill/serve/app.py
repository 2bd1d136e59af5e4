"""The FastAPI app of `potstill serve` (`create_app`) and `LocalServer`, uvicorn in a background thread. See
`potstill.serve` for the routes, parameters, faults and request log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from potstill.errors import UserError
from potstill.teachers.response_cache import canonical_json

from .service import FaultSettings, _ApiError, _Service

logger = logging.getLogger("potstill.serve")


_NOT_JSON = object()


def _body_sha256(raw: bytes) -> tuple[str | None, Any]:
    """(sha256 of the canonical JSON body, or of the raw bytes when not JSON; the parsed body or _NOT_JSON)."""
    if not raw:
        return None, None
    try:
        body = json.loads(raw)
    except ValueError:
        return hashlib.sha256(raw).hexdigest(), _NOT_JSON
    return hashlib.sha256(canonical_json(body)).hexdigest(), body


def create_app(model, tokenizer, *, model_name: str, faults: FaultSettings = FaultSettings(),
               request_log: str | Path | None = None, api_key: str | None = None,
               max_tokens_limit: int = 512, aliases: tuple[str, ...] = ()) -> FastAPI:
    """A FastAPI app serving `model` (a HF causal LM, put in eval mode) as `model_name`; see the module docstring.
    Requests may also name the model by one of `aliases` (e.g. "smollm2" for builtin:smollm2); answers say
    `model_name`.

    `app.state.generation_lock` serialises generations (tokenization included: fast tokenizers are not safe to
    share between threads that change their settings).
    """
    if not isinstance(max_tokens_limit, int) or max_tokens_limit < 1:
        raise UserError(f"max_tokens_limit: expected an integer >= 1, got {max_tokens_limit!r}")
    if not model_name:
        raise UserError("model_name: expected the name clients send as 'model'; got an empty value")
    model.eval()
    service = _Service(model, tokenizer, model_name=model_name, faults=faults, request_log=request_log,
                       api_key=api_key, max_tokens_limit=max_tokens_limit, aliases=aliases)
    app = FastAPI(title="potstill serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.generation_lock = service.generation_lock

    # One generation at a time. Waiting requests queue on this asyncio lock rather than on the threading lock,
    # so a request whose client timed out while queued is dropped (logged 499) without costing a generation.
    queue = asyncio.Lock()

    def client_gone(request: Request, body_sha: str | None) -> JSONResponse:
        service.log(request.url.path, body_sha, 499, False)
        return JSONResponse({"error": {"message": "client closed the connection", "type": "aborted",
                                       "param": None, "code": None}}, status_code=499)

    def error_response(err: _ApiError) -> JSONResponse:
        return JSONResponse(err.payload(), status_code=err.status, headers=err.headers)

    async def handle(request: Request, kind: str) -> JSONResponse:
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client hung up before its body was complete
            logger.warning("%s %s: client disconnected before sending the whole body", request.method,
                           request.url.path)
            return client_gone(request, None)
        body_sha, body = _body_sha256(raw)
        fault = False
        try:
            service.check_auth(request)
            if kind == "models":
                response = JSONResponse({"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": service.created, "owned_by": "potstill"}]})
            else:
                fail, delay = service.draw_faults()
                if delay and faults.delay_s > 0:
                    await asyncio.sleep(faults.delay_s)
                if fail:
                    fault = True
                    raise service.fault_error()
                if body is _NOT_JSON:
                    raise _ApiError(400, "the request body is not valid JSON")
                params = service.parse(kind, body)
                async with queue:  # requests wait here, where a client that gave up can still be noticed
                    if await request.is_disconnected():
                        return client_gone(request, body_sha)
                    try:
                        gen = await run_in_threadpool(service.run, params)
                    except _ApiError:
                        raise
                    except Exception as err:  # a bug or an out-of-memory: report it, keep serving
                        logger.exception("generation failed")
                        raise _ApiError(500, f"generation failed: {type(err).__name__}",
                                        kind="server_error") from err
                if await request.is_disconnected():
                    return client_gone(request, body_sha)
                response = JSONResponse(service.format(kind, gen, params["top_logprobs"] is not None))
        except _ApiError as err:
            response = error_response(err)
        service.log(request.url.path, body_sha, response.status_code, fault)
        return response

    @app.get("/v1/models")
    async def models(request: Request):
        return await handle(request, "models")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        service.log(request.url.path, None, exc.status_code, False)
        err = _ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None)
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        service.log(request.url.path, None, 400, False)
        return error_response(_ApiError(400, f"malformed request: {exc.errors()}"))

    return app


class LocalServer:
    """Serve `app` with uvicorn from a background thread: `with LocalServer(app) as server: server.base_url`.

    The socket is bound in the constructor (port 0 picks a free port), so `base_url` ("http://HOST:PORT/v1") is
    known at once; a port in use is a `UserError`. `start()` returns once uvicorn accepts connections; `stop()`
    shuts it down. `serve_forever()` runs in the calling thread instead (the CLI; Ctrl-C stops it).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
        # it every reply waits ~40 ms for a delayed ACK.
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as err:
            self._sock.close()
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --host / --port") \
                from err
        self.host, self.port = host, self._sock.getsockname()[1]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self.base_url = f"http://{shown}:{self.port}/v1"
        self.app = app
        # log_config=None: uvicorn's default runs logging.config.dictConfig, which closes every handler the
        # process has (the caller's, a test's captured stream); uvicorn's loggers then just propagate.
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                     log_config=None, access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self, timeout: float = 30.0) -> LocalServer:
        self._thread = threading.Thread(target=self.serve_forever, name="potstill-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.base_url} did not start")
            time.sleep(0.01)
        return self

    def wait(self) -> None:
        """Block until the server thread ends (in short joins, so Ctrl-C gets through)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalServer({self.base_url!r})"
