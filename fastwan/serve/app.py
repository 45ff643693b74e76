"""The HTTP API of ``fastwan serve`` (FastAPI on uvicorn), and running it.

Routes: ``POST /v1/videos`` (202 and a job; 429 with Retry-After when the queue is full),
``GET /v1/videos/{id}`` (status and progress), ``GET /v1/videos/{id}/content`` (the MP4),
``DELETE /v1/videos/{id}`` (cancel), ``GET /health``, ``GET /metrics`` (Prometheus text),
``/docs`` (OpenAPI). Bodies are validated by the pydantic models of
:mod:`fastwan.serve.schemas`, then by the model (``check_inputs``) before anything is
queued: a bad request is a 422 whose ``detail[].loc`` names the field. Job ids in paths must
be 32 hex digits; the only files served are the ones the workers wrote for those ids.

With an API key every ``/v1`` route and ``/metrics`` need ``Authorization: Bearer KEY``
(compared in constant time); ``/health`` and the docs stay open. A server on an address
other than loopback refuses to start without a key.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Path, Response
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fastwan.serve.runtime import QueueFullError, RequestError, ServeOptions, ServeRuntime
from fastwan.serve.schemas import MAX_IMAGE_CHARS, Health, Job, VideoRequest

logger = logging.getLogger("fastwan.serve")

# A request is a few hundred bytes of JSON, plus up to two base64 images.
MAX_BODY_BYTES = 2 * MAX_IMAGE_CHARS + 64 * 1024
MIN_API_KEY_CHARS = 16
# Module level: the routes' string annotations (``from __future__``) resolve here.
BEARER = HTTPBearer(auto_error=False, description="the server's --api-key")
JobId = Annotated[
    str,
    Path(pattern=r"^[0-9a-f]{32}$", description="the job id POST /v1/videos returned"),
]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int, api_key: str | None) -> None:
    """Refuse what must not start: a bad port, a blank host, a non-loopback address
    without an API key, a short key."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535] (0: any free port), got {port!r}")
    if not host or not host.strip():
        raise ValueError("--host must not be empty (default 127.0.0.1)")
    if api_key is not None and len(api_key) < MIN_API_KEY_CHARS:
        raise ValueError(
            f"--api-key must be at least {MIN_API_KEY_CHARS} characters (e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    if not is_loopback(host) and api_key is None:
        raise ValueError(
            f"--host {host} is reachable from other machines: pass --api-key KEY (or set "
            "FASTWAN_API_KEY) so only clients with the key can run the model, or bind to "
            "127.0.0.1"
        )


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before the app sees
    it (bodies here are small JSON, so it is buffered while counted, then replayed)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._too_large(scope, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away
                break
            size += len(message.get("body", b""))
            if size > self.limit:  # chunked, no Content-Length
                await self._too_large(scope, send)
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, send) -> None:
        response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, 413)
        await response(scope, None, send)


def _job_or_404(runtime: ServeRuntime, job_id: str):
    job = runtime.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id} (ids come from POST /v1/videos)")
    return job


def build_app(runtime: ServeRuntime, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI application over ``runtime``."""
    app = FastAPI(
        title="fastwan",
        summary="Text- and image-to-video jobs on a Wan / FastWan model",
        description=(
            f"Serving **{runtime.model_name}**. Submit a job with `POST /v1/videos`, poll "
            "`GET /v1/videos/{id}`, download `GET /v1/videos/{id}/content`."
        ),
    )
    key = api_key.encode() if api_key is not None else None

    def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if credentials is None or not hmac.compare_digest(given, key):
            raise HTTPException(
                401,
                "missing or wrong API key: send the header Authorization: Bearer KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )

    guarded = [Depends(require_key)] if key is not None else []

    @app.post(
        "/v1/videos",
        status_code=202,
        response_model=Job,
        dependencies=guarded,
        responses={
            422: {"description": "a field the server or the model refuses"},
            429: {"description": "the queue is full; retry after the Retry-After seconds"},
        },
    )
    def create_video(request: VideoRequest, response: Response) -> Job:
        """Queue a video; returns the job (status ``queued``) at once."""
        try:
            job = runtime.submit(request)
        except RequestError as err:
            loc = ["body", err.field] if err.field else ["body"]
            raise HTTPException(
                422, [{"type": "value_error", "loc": loc, "msg": str(err)}]
            ) from None
        except QueueFullError as err:
            raise HTTPException(
                429,
                f"{err}; retry in {err.retry_after} s",
                headers={"Retry-After": str(err.retry_after)},
            ) from None
        response.headers["Location"] = f"/v1/videos/{job.id}"
        return runtime.view(job)

    @app.get("/v1/videos/{job_id}", response_model=Job, dependencies=guarded)
    def get_video(job_id: JobId) -> Job:
        """A job's status, progress (denoising steps done / total), timings and error."""
        return runtime.view(_job_or_404(runtime, job_id))

    @app.get(
        "/v1/videos/{job_id}/content",
        dependencies=guarded,
        response_class=FileResponse,
        responses={
            200: {"content": {"video/mp4": {}}, "description": "the MP4"},
            409: {"description": "the job has no video (yet)"},
            410: {"description": "the result expired"},
        },
    )
    def get_video_content(job_id: JobId) -> FileResponse:
        """The MP4 of a succeeded job."""
        job = _job_or_404(runtime, job_id)
        if job.status == "expired":
            raise HTTPException(410, f"job {job_id} expired; its video was deleted")
        if job.status != "succeeded":
            raise HTTPException(409, f"job {job_id} is {job.status}; it has no video")
        path = runtime.content_path(job)
        if path is None:  # expired between the two reads
            raise HTTPException(410, f"job {job_id} expired; its video was deleted")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.delete(
        "/v1/videos/{job_id}",
        response_model=Job,
        dependencies=guarded,
        responses={409: {"description": "the job already finished"}},
    )
    def cancel_video(job_id: JobId) -> Job:
        """Cancel a job: a queued one never runs, a running one stops at its next step."""
        result = runtime.store.cancel(job_id)
        if result is None:
            raise HTTPException(404, f"no job {job_id} (ids come from POST /v1/videos)")
        previous, job = result
        if previous not in ("queued", "running"):
            raise HTTPException(409, f"job {job_id} is {previous}; only unfinished jobs cancel")
        return runtime.view(job)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    def health(response: Response) -> Health:
        """Whether every worker is up, and the queue's depth."""
        report = runtime.health()
        if report.status != "ok":
            response.status_code = 503
        return report

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=guarded)
    def metrics() -> PlainTextResponse:
        """Prometheus text: queue depth, jobs by state, workers, seconds per stage."""
        return PlainTextResponse(
            runtime.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    app.add_middleware(BodyLimit)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port), or a ValueError."""
    shown = f"[{host}]" if ":" in host else host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as err:
        raise ValueError(
            f"cannot serve on {shown}:{port}: {err.strerror or err}; pass a free --port or "
            "another --host"
        ) from err
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: after a graceful shutdown uvicorn re-raises
    the signal, which kills the process before the workers re-queue their jobs;
    :meth:`Server.run` handles SIGINT / SIGTERM itself."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield


class Server:
    """A running ``fastwan serve``: the runtime (workers loaded) and uvicorn on a socket.

    :meth:`run` serves in this thread until SIGINT / SIGTERM (the CLI);
    :meth:`start` serves from a background thread (tests, benchmarks) until :meth:`stop`.
    Either way stopping re-queues a running job, so nothing is lost.
    """

    def __init__(
        self,
        options: ServeOptions,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        log_level: str = "info",
    ) -> None:
        check_bind(host, port, api_key)  # before anything loads
        self.runtime = ServeRuntime(options)
        try:
            self.socket = bind_socket(host, port)
        except BaseException:
            self.runtime.close()
            raise
        self.host = host
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(
            build_app(self.runtime, api_key=api_key),
            log_level=log_level,
            lifespan="off",
            timeout_graceful_shutdown=10,
        )
        self._uvicorn = _Uvicorn(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT / SIGTERM (from the main thread), then stop the workers: a
        running job stops at its next step and goes back to the queue. A second signal
        drops open connections at once."""

        def on_signal(signum: int, frame) -> None:
            if self._uvicorn.should_exit:
                self._uvicorn.force_exit = True
            self._uvicorn.should_exit = True

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    previous[sig] = signal.signal(sig, on_signal)
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            try:
                self._close()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def start(self, timeout: float = 30.0) -> Server:
        """Serve from a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._close()
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving, then the workers (a running job goes back to the queue)."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self._close()

    def _close(self) -> None:
        self.socket.close()
        self.runtime.close()
