"""The HTTP application: OpenAI's Chat Completions API, the model list, health, and the web page at `/`.

Bad input is answered with a 4xx and OpenAI's error body, never a 500: the body is read with a size
limit and decoded here (invalid JSON, wrong types, bad images, a prompt longer than the context are
400s naming the field; an unknown model 404; a full queue 429 with ``Retry-After``). Blocking work
(image decoding, tokenization) runs in worker threads, the model in the scheduler's thread, so the
event loop only moves bytes. A streaming client that disconnects cancels its request, which frees its
decode slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.serve.engine import Engine, api_error_for
from vlmkit.serve.errors import APIError, invalid
from vlmkit.serve.images import ImageLimits, decode_image, image_bytes
from vlmkit.serve.protocol import (
    ChatRequest,
    chunk_body,
    completion_body,
    new_completion_id,
    now,
    parse_chat_request,
    usage,
)
from vlmkit.serve.scheduler import Event, Job, QueueFull

log = logging.getLogger("vlmkit.serve")
MAX_BODY_BYTES = 64 * 1024 * 1024


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_json(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES:,} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES:,} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError too
        raise invalid(f"the request body is not valid JSON: {str(err)[:200]}", None, "invalid_json") from None


def create_app(engine: Engine, limits: ImageLimits | None = None) -> FastAPI:
    """The application serving `engine`; its scheduler thread starts with the app and stops with it."""
    limits = limits or ImageLimits()

    async def lifespan(app: FastAPI):
        engine.scheduler.start()
        yield
        engine.scheduler.close()

    app = FastAPI(title="vlmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(err.status_code,
                                                                                           str(err.detail))
        return error_response(APIError(err.status_code, message, code="not_found" if err.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception) -> JSONResponse:  # a bug: say so, keep serving
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {type(err).__name__}", code="internal_error"))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("vlmkit.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        info = engine.health()
        return JSONResponse(info, status_code=200 if info["status"] == "ok" else 503)

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "vlmkit"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != engine.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat = parse_chat_request(await read_json(request), engine.context_length)
        if chat.model is not None and chat.model != engine.model_id:
            raise APIError(404, f"The model '{chat.model}' does not exist (this server serves '{engine.model_id}')",
                           param="model", code="model_not_found")
        refs = chat.images
        engine.check_image_count(refs)
        images = []
        for ref in refs:
            data = await image_bytes(ref, limits)
            images.append(await run_in_threadpool(decode_image, data, ref, limits))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def notify(event: Event) -> None:  # from the scheduler thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        def prepare() -> Job:
            return engine.job(chat, engine.preprocess(images), notify)

        job = await run_in_threadpool(prepare)
        try:
            engine.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except RuntimeError as err:
            raise APIError(503, str(err), code="unavailable") from None
        if chat.stream:
            return StreamingResponse(_stream(engine, chat, job, len(job.prompt), events),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(engine, job, events, request)

    return app


async def _complete(engine: Engine, job: Job, events: asyncio.Queue[Event], request: Request) -> Response:
    text = []
    getter: asyncio.Task | None = None
    try:
        while True:
            getter = getter or asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter}, timeout=1.0)
            if not done:  # nothing yet: is the client still there?
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the job is cancelled below
                continue
            event, getter = getter.result(), None
            if event.kind == "error":
                return error_response(api_error_for(event))
            text.append(event.text)
            if event.kind == "done":
                return JSONResponse(completion_body(new_completion_id(), engine.model_id, now(), "".join(text),
                                                    event.finish_reason, len(job.prompt), event.completion_tokens))
    finally:
        if getter is not None:
            getter.cancel()
        job.cancel()  # no-op once done; frees the slot if the client left or this handler was cancelled


def _sse(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def _stream(engine: Engine, chat: ChatRequest, job: Job, prompt_tokens: int,
                  events: asyncio.Queue[Event]) -> AsyncIterator[bytes]:
    cid, created, model = new_completion_id(), now(), engine.model_id
    try:
        yield _sse(chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if event.kind == "error":  # headers are sent already: the error goes in the stream, as OpenAI does
                yield _sse(api_error_for(event).body())
                break
            if event.text:
                yield _sse(chunk_body(cid, model, created, {"content": event.text}))
            if event.kind == "done":
                yield _sse(chunk_body(cid, model, created, {}, event.finish_reason))
                if chat.include_usage:
                    totals = usage(prompt_tokens, event.completion_tokens)
                    yield _sse(chunk_body(cid, model, created, None, usage_=totals))
                break
        yield _sse("[DONE]")
    finally:
        job.cancel()  # the client went away (or we are done): free the slot
