"""The HTTP routes (FastAPI): parse, check, hand over to the engine, shape the answer. No tensors here.

Errors follow OpenAI/vLLM: 400 bad body or parameter (naming it), 401 missing/wrong API key, 404 unknown
model (listing the known ones), 429 queue full, 500 only for a failure inside the engine. Every error body is
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from . import protocol
from .engine import Engine, Output, QueueFullError
from .engine import Request as EngineRequest
from .metrics import ServeMetrics
from .protocol import ApiError
from .registry import UnknownAdapterError

# Paths open without an API key: liveness, metrics, and the playground page itself (which then asks for one).
_OPEN_PATHS = {"/health", "/metrics", "/"}


def create_app(engine: Engine, base_name: str, metrics: ServeMetrics, api_key: str | None = None) -> FastAPI:
    """The ASGI app serving ``engine``; the lifespan starts and stops its worker thread."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = engine.tokenizer
    registry = engine.registry
    expected_key = api_key.encode() if api_key else None

    def error(exc: ApiError, adapter: str | None = None) -> JSONResponse:
        metrics.count_request(adapter, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next: Any) -> Response:
        if expected_key is not None and request.url.path not in _OPEN_PATHS:
            header = request.headers.get("authorization", "")
            given = header[7:].encode() if header.lower().startswith("bearer ") else b""
            if not hmac.compare_digest(given, expected_key):  # constant time: no timing oracle on the key
                return error(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the "
                                           "--api-key the server was started with)."))
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"} | engine.stats()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        page = resources.files("lorakit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "lorakit", "root": base_name,
                 "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": name,
                  "parent": base_name} for name in registry.names()]
        return {"object": "list", "data": data}

    async def generate(request: Request, chat: bool) -> Response:
        adapter: str | None = None
        try:
            body = protocol.parse_generation(protocol.parse_json(await request.body()), chat)
            adapter = None if body.model == base_name else body.model
            if adapter is not None:
                try:
                    registry.lookup(adapter)
                except UnknownAdapterError as exc:
                    raise ApiError(404, f"the model {adapter!r} does not exist; available: "
                                   f"{[base_name, *exc.known]}", "model") from None
            prompt_ids = _prompt_ids(tokenizer, body)
            params = body.params
            if chat and not body.max_tokens_given:  # chat default: as much as the context allows
                params.max_tokens = max(1, engine.max_model_len - len(prompt_ids))
            loop = asyncio.get_running_loop()
            outputs: asyncio.Queue[Output] = asyncio.Queue()

            def sink(out: Output) -> None:  # on the engine's worker thread
                loop.call_soon_threadsafe(outputs.put_nowait, out)

            try:
                handle = engine.submit(EngineRequest(prompt_ids, adapter, params), sink)
            except UnknownAdapterError as exc:  # unloaded between the lookup and now
                raise ApiError(404, str(exc), "model") from None
            except QueueFullError as exc:
                raise ApiError(429, str(exc)) from None
            except ValueError as exc:
                raise ApiError(400, str(exc), "max_tokens") from None
        except ApiError as exc:
            return error(exc, adapter)
        rid = protocol.new_id(chat)
        if body.stream:
            metrics.count_request(adapter, 200)
            return StreamingResponse(_stream(outputs, handle, chat, rid, body), media_type="text/event-stream")
        return await _collect(request, outputs, handle, chat, rid, body, adapter)

    async def _collect(request: Request, outputs: asyncio.Queue[Output], handle: Any, chat: bool, rid: str,
                       body: protocol.GenerationBody, adapter: str | None) -> Response:
        parts: list[str] = []
        while True:
            try:
                out = await asyncio.wait_for(outputs.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # nobody waits for the answer: free the slot
                    handle.cancel()
                    return Response(status_code=499)
                continue
            parts.append(out.text)
            if out.finish_reason is not None:
                break
        if out.finish_reason == "error":
            return error(ApiError(500 if out.error_status == 500 else 400, out.error or "generation failed"), adapter)
        metrics.count_request(adapter, 200)
        return JSONResponse(protocol.response(chat, rid, body.model, "".join(parts), out.finish_reason,
                                              protocol.usage(out.prompt_tokens, out.completion_tokens)))

    async def _stream(outputs: asyncio.Queue[Output], handle: Any, chat: bool, rid: str,
                      body: protocol.GenerationBody) -> AsyncIterator[bytes]:
        finished = False
        try:
            if chat:
                yield protocol.sse(protocol.chunk(chat, rid, body.model, "", None, first=True))
            while True:
                out = await outputs.get()
                if out.finish_reason == "error":
                    finished = True
                    yield protocol.sse(ApiError(500 if out.error_status == 500 else 400,
                                                out.error or "generation failed").body())
                    break
                if out.finish_reason is None:
                    yield protocol.sse(protocol.chunk(chat, rid, body.model, out.text, None))
                    continue
                finished = True
                if out.text:
                    yield protocol.sse(protocol.chunk(chat, rid, body.model, out.text, None))
                yield protocol.sse(protocol.chunk(chat, rid, body.model, None if chat else "", out.finish_reason))
                if body.include_usage:
                    yield protocol.sse(protocol.usage_chunk(chat, rid, body.model,
                                                            protocol.usage(out.prompt_tokens, out.completion_tokens)))
                break
            yield protocol.sse("[DONE]")
        finally:
            if not finished:  # the client went away (the server cancelled this generator): free the slot
                handle.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        name = None
        try:
            name, path = protocol.parse_load(protocol.parse_json(await request.body()))
            if name == base_name:
                raise ApiError(400, f"'lora_name' {name!r} is the base model's name; choose another.", "lora_name")
            try:
                checked = registry.check_path(path)
                await asyncio.wrap_future(engine.call(lambda: registry.load(name, checked)))
            except (ValueError, TypeError, OSError) as exc:
                raise ApiError(400, f"cannot load adapter {name!r}: {' '.join(str(exc).split())}",
                               "lora_path") from None
        except ApiError as exc:
            return error(exc)
        metrics.count_request(None, 200)
        return JSONResponse({"status": "loaded", "lora_name": name, "loaded": registry.loaded_names()})

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        try:
            name = protocol.parse_unload(protocol.parse_json(await request.body()))
            try:
                in_flight = registry.unregister(name)
            except UnknownAdapterError as exc:
                raise ApiError(404, str(exc), "lora_name") from None
        except ApiError as exc:
            return error(exc)
        engine.call(lambda: None)  # wake the worker: it deletes the weights once in_flight reaches 0
        metrics.count_request(None, 200)
        return JSONResponse({"status": "unloaded", "lora_name": name, "in_flight": in_flight})

    return app


def _prompt_ids(tokenizer: Any, body: protocol.GenerationBody) -> list[int]:
    if body.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions.", "messages")
        text = tokenizer.apply_chat_template(body.messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(body.prompt, list):
        vocab = len(tokenizer)
        bad = [t for t in body.prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"'prompt' holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}.", "prompt")
        return body.prompt
    return list(tokenizer(body.prompt)["input_ids"])
