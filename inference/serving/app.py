"""An OpenAI-compatible HTTP server for any model `inference.sample` loads, with step-level continuous batching.

    python -m inference.serve --ckpt out/shakespeare_mdlm                 # http://127.0.0.1:8000/ (playground)
    python -m inference.serve --init_from gpt2 --port 8001
    python -m inference.serve --ckpt out/shakespeare_ar --host 0.0.0.0 --api-key "$KEY"   # your choice: open to the network

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="shakespeare_mdlm", prompt="ROMEO:", max_tokens=48, temperature=0,
                              extra_body={"strategy": "threshold", "threshold": 0.9})

Endpoints: POST /v1/completions (OpenAI fields: prompt, max_tokens, temperature, top_p, n, stop, seed,
stream; diffusion knobs as extra fields: strategy, steps, tokens_per_step, threshold, block_length,
block_rule, top_k, kv_cache), GET /v1/models, GET /health, GET /metrics (Prometheus text, prometheus_client),
GET /openapi.json (the schema: the body is `inference.serving.protocol.CompletionRequest`), GET / (the playground).

The server validates (FastAPI against `CompletionRequest`, then what needs the model), enqueues and streams;
decoding is `inference.api` and batching is `inference.serving.scheduler.StepScheduler` (each step steps every
active row, rows of a kind sharing their model calls, KV caches included). Every bad request gets a 4xx with
an OpenAI-style error body {"error": {"message", "type", "param", "code"}} that says what to fix, and the
server keeps serving. A full queue answers 429.
SIGTERM: stop accepting, let in-flight requests finish for --grace_s seconds, cancel the rest, exit 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, ProcessCollector, \
    generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.config import knob, parse_cli
from common.precision import autocast
from inference.api import DIFFUSION_STRATEGIES, Completion, DecodeOptions, encode_requests
from inference.serving.protocol import DECODING_FIELDS, DEFAULT_MAX_TOKENS, CompletionRequest, error_message
from inference.serving.scheduler import (Cancelled, QueueFull, RowSpec, ShuttingDown, StepScheduler,
                                         measure_call_overhead, server_options)
from models.tokenizer import PLACEHOLDER

PAGE = Path(__file__).with_name("playground.html")
API_KEY_ENV = "DIFFUSIONGPT_API_KEY"
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class BadRequest(Exception):
    """A request the client must change: becomes a 4xx with an OpenAI-style error body."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 type_: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ServerConfig:
    model_id: str
    max_rows: int = 64  # decodes in one model call at most
    max_queue: int = 256  # rows waiting beyond those (then 429)
    max_n: int = 16  # completions per request (n x prompts) at most
    api_key: Optional[str] = None
    grace_s: float = 10.0


@dataclass
class ParsedRequest:
    prompts: list[str]
    max_tokens: int
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    options: DecodeOptions  # resolved for the model, as served (scheduler.server_options); seed = the first row's


# ----------------------------------------------------------------------------- request parsing
def parse_completion_request(body: CompletionRequest, loaded, cfg: ServerConfig) -> ParsedRequest:
    """The checks of a validated body that need the model and the server's limits, before anything is queued
    (BadRequest names the fix): the model's id, n x prompts, the strategy and blocks the model can decode,
    prompt + max_tokens within its context."""
    if body.model is not None and body.model != cfg.model_id:
        raise BadRequest(f"model {body.model!r} is not served here; this server serves {cfg.model_id!r} "
                         f"(GET /v1/models)", param="model", status=404, code="model_not_found")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    n = 1 if body.n is None else body.n
    if n * len(prompts) > cfg.max_n:
        raise BadRequest(f"n={n} completions for {len(prompts)} prompt(s) = {n * len(prompts)} exceeds this server's "
                         f"limit of {cfg.max_n} per request (--max_n); lower n or split the request", param="n")
    stop = [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else body.stop
    knobs = {k: getattr(body, k) for k in DECODING_FIELDS + ("temperature", "top_p") if getattr(body, k) is not None}
    knobs["seed"] = secrets.randbits(31) if body.seed is None else body.seed  # unseeded: random, as with OpenAI
    try:
        options = replace(DecodeOptions(schedule=loaded.schedule), **knobs).for_model(loaded.model)
    except ValueError as e:
        raise BadRequest(f"{e}", param=_param_of(str(e), knobs)) from None
    try:
        encode_requests(loaded.model, loaded.tokenizer, prompts, [max_tokens] * len(prompts))
    except ValueError as e:
        msg = str(e) if len(prompts) > 1 else str(e).replace("prompt 0 ", "the prompt ")
        raise BadRequest(msg.replace("max_new_tokens", "max_tokens"),
                         param="max_tokens" if "new tokens" in msg else "prompt") from None
    include_usage = body.stream_options is not None and bool(body.stream_options.include_usage)
    return ParsedRequest(prompts, max_tokens, n, stop, bool(body.stream), include_usage,
                         server_options(options, loaded.model, body.kv_cache))


def _param_of(message: str, knobs: dict) -> Optional[str]:
    for name in sorted(knobs, key=len, reverse=True):
        if name in message:
            return name
    return None


def row_specs(req: ParsedRequest) -> list[RowSpec]:
    """One row per (prompt, sample): choice index = prompt index * n + sample, seeds seed, seed + 1, ..."""
    return [RowSpec(p, req.max_tokens, replace(req.options, seed=req.options.seed + i * req.n + j),
                    stop=tuple(req.stop), report_steps=req.stream)
            for i, p in enumerate(req.prompts) for j in range(req.n)]


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def held_back(text: str, stop: list[str]) -> int:
    """Characters at the end of text that are the start of a stop string (not to be streamed yet)."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


# ----------------------------------------------------------------------------- metrics
class ServerMetrics:
    """The server's Prometheus metrics (prometheus_client, one registry per app). Requests, tokens and latency
    are counted as answers go out; the scheduler's counters are read when /metrics is scraped
    (`SchedulerCollector`); process_* are prometheus_client's (resident memory, CPU seconds, open files)."""

    def __init__(self, scheduler: StepScheduler, model_id: str):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("diffusiongpt_requests", "HTTP requests answered, by status code", ["code"],
                                registry=registry)
        self.prompt_tokens = Counter("diffusiongpt_prompt_tokens", "prompt tokens of finished completions",
                                     registry=registry)
        self.completion_tokens = Counter("diffusiongpt_completion_tokens", "generated tokens of finished completions",
                                         registry=registry)
        self.latency = Histogram("diffusiongpt_request_latency_seconds", "time from arrival to the last byte of a "
                                 "completion", buckets=LATENCY_BUCKETS_S, registry=registry)
        Info("diffusiongpt_model", "the model served", registry=registry).info({"model": model_id})
        ProcessCollector(registry=registry)
        registry.register(SchedulerCollector(scheduler))

    def count_request(self, status: int) -> None:
        self.requests.labels(code=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SchedulerCollector:
    """The scheduler's own counters and gauges, read at scrape time."""

    def __init__(self, scheduler: StepScheduler):
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler
        for name, help_, value in [
                ("diffusiongpt_model_calls", "model calls (a step runs one or a few)", s.calls),
                ("diffusiongpt_row_calls", "rows run over all model calls", s.row_calls),
                ("diffusiongpt_cached_row_calls", "rows run with their KV cache (past keys/values)", s.cached_row_calls),
                ("diffusiongpt_mixed_past_calls", "model calls whose rows had past keys/values of different lengths",
                 s.mixed_past_calls),
                ("diffusiongpt_model_seconds", "time spent in model calls", s.forward_s)]:
            yield CounterMetricFamily(name, help_, value=value)
        counts = dict(s.rows_per_call)
        buckets = [(str(b), sum(c for n, c in counts.items() if n <= b)) for b in ROWS_BUCKETS]
        yield HistogramMetricFamily("diffusiongpt_batch_rows", "rows per model call (the batch size of each step)",
                                    buckets=buckets + [("+Inf", sum(counts.values()))],
                                    sum_value=sum(n * c for n, c in counts.items()))
        for name, help_, value in [
                ("diffusiongpt_queue_depth", "rows waiting for a slot", s.queued),
                ("diffusiongpt_active_rows", "rows being decoded", s.active),
                ("diffusiongpt_call_overhead_tokens", "what a separate model call costs, in row-columns (measured at "
                 "startup unless given)", s.call_overhead_tokens),
                ("diffusiongpt_max_rows", "rows per model call at most (--max_rows)", s.max_rows)]:
            yield GaugeMetricFamily(name, help_, value=value)


# ----------------------------------------------------------------------------- the app
def build_app(loaded, scheduler: StepScheduler, cfg: ServerConfig):
    tokenizer, model = loaded.tokenizer, loaded.model
    kind = model.config.kind
    metrics = ServerMetrics(scheduler, cfg.model_id)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.stop, min(cfg.grace_s, 2.0))

    app = FastAPI(title="diffusionGPT", summary="OpenAI-compatible completions by diffusion (or AR) decoding",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  strict_content_type=False)  # a body without a Content-Type header is read as JSON too
    app.state.metrics, app.state.scheduler = metrics, scheduler

    def error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        return JSONResponse(error_body(message, type_, param, code), status_code=status)

    app.add_middleware(AuthAndCount, api_key=cfg.api_key, metrics=metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI could not read the body as text
            e = exc.__cause__
            return error(400, f"the request body is not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}; "
                              f"send the JSON body encoded as UTF-8")
        hint = {404: f"{request.url.path} does not exist; the endpoints are POST /v1/completions, GET /v1/models, "
                     f"GET /health, GET /metrics, GET /openapi.json and GET / (the playground)",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, hint, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        message, param = error_message(exc.errors(), exc.body)
        return error(400, message, param=param)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_id, "active_rows": scheduler.active, "queued": scheduler.queued}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        strategies = ["ar"] if kind == "ar" else list(DIFFUSION_STRATEGIES)
        return {"id": cfg.model_id, "object": "model", "created": created, "owned_by": "diffusionGPT",
                "objective": loaded.objective, "attention": model.config.attention,
                "context_length": model.config.block_size, "strategies": strategies,
                "default_strategy": strategies[0], "mask_placeholder": PLACEHOLDER}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != cfg.model_id:
            raise BadRequest(f"model {model_id!r} is not served here; this server serves {cfg.model_id!r}",
                             param="model", status=404, code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        req = parse_completion_request(body, loaded, cfg)
        specs = row_specs(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(i, kind_, payload):  # row threads -> the event loop (steps only when streamed)
            if req.stream or kind_ != "step":
                loop.call_soon_threadsafe(events.put_nowait, (i, kind_, payload))

        try:
            rows = scheduler.submit(specs, on_event)
        except QueueFull as e:
            raise BadRequest(str(e), status=429, type_="rate_limit_error", code="queue_full") from None
        except ShuttingDown as e:
            raise BadRequest(str(e), status=503, type_="server_error", code="shutting_down") from None
        stream = CompletionStream(req, specs, tokenizer, kind, cfg.model_id)
        if req.stream:
            async def sse():
                try:
                    while not stream.finished:
                        for chunk in stream.handle(*(await events.get())):
                            yield f"data: {json.dumps(chunk)}\n\n"
                    for chunk in stream.final_chunks():
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                    stream.account(metrics, time.perf_counter() - t0)
                finally:
                    if not stream.finished:  # the client left: free its rows
                        scheduler.cancel(rows)
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:  # collect the rows' results; a client that hangs up meanwhile frees its rows
            next_check = time.monotonic() + 0.25
            while not stream.finished:
                try:
                    stream.handle(*(await asyncio.wait_for(events.get(), timeout=0.25)))
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() >= next_check:
                    if await request.is_disconnected():
                        break
                    next_check = time.monotonic() + 0.25
        finally:
            if not stream.finished:
                scheduler.cancel(rows)
        if not stream.finished:
            return error(499, "the client closed the connection")
        if stream.errors:
            return stream.error_response(error)
        stream.account(metrics, time.perf_counter() - t0)
        return stream.response()

    return app


class AuthAndCount:
    """ASGI middleware: the API key on every request but the page and /health; requests counted by status.
    (Plain ASGI, so that streamed responses and client disconnects pass straight through.)"""

    OPEN_PATHS = ("/", "/health")

    def __init__(self, app, api_key: Optional[str], metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] not in self.OPEN_PATHS:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                self.metrics.count_request(401)
                body = error_body("missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                  f"key the server was started with (--api-key or ${API_KEY_ENV})",
                                  code="invalid_api_key")
                return await JSONResponse(body, status_code=401)(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


class CompletionStream:
    """The rows of one request as they decode: streamed chunks (SSE) and the final OpenAI response."""

    def __init__(self, req: ParsedRequest, specs: list[RowSpec], tokenizer, kind: str, model_id: str):
        self.req, self.specs, self.tokenizer, self.kind = req, specs, tokenizer, kind
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.model_id = model_id
        self.done: dict[int, Completion] = {}
        self.errors: dict[int, BaseException] = {}
        self.sent = [""] * len(specs)  # text already streamed (AR)
        self.previous = [None] * len(specs)  # last canvas ids (diffusion)

    @property
    def finished(self) -> bool:
        return len(self.done) + len(self.errors) == len(self.specs)

    def _chunk(self, choice: dict) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": None, **choice}]}

    def handle(self, i: int, kind: str, payload) -> list[dict]:
        if kind == "error":  # streamed: the choice ends here, saying how; the error event follows at the end
            self.errors[i] = payload
            reason = "cancelled" if isinstance(payload, Cancelled) else "error"
            return [self._chunk({"index": i, "finish_reason": reason})] if self.req.stream else []
        if kind == "done":
            self.done[i] = payload
            return [self._chunk(self.final_choice(i, streaming=True))] if self.req.stream else []
        if not self.req.stream:
            return []
        ids = payload.token_ids[0]
        if self.kind == "ar":  # tokens: send what is new (held back while a character is split)
            text, hit = cut_at_stop(self.tokenizer.decode(ids).split("<|endoftext|>")[0], self.req.stop)
            if not hit:  # hold back an ending that may grow into a stop string (it would be cut then)
                text = text[:len(text) - held_back(text, self.req.stop)]
            if text.endswith("\ufffd") or not text.startswith(self.sent[i]) or len(text) == len(self.sent[i]):
                return []
            delta, self.sent[i] = text[len(self.sent[i]):], text
            return [self._chunk({"index": i, "text": delta, "model_calls": int(payload.nfe[0])})]
        prev = self.previous[i]
        mask_id = self.tokenizer.mask_id
        committed = [p for p, t in enumerate(ids) if t != mask_id and (prev is None or prev[p] == mask_id)]
        self.previous[i] = list(ids)
        # diffusion: the whole canvas after this step (MASK shown as the placeholder), in extra fields;
        # "text" stays empty so that a client concatenating text deltas gets exactly the final text
        return [self._chunk({"index": i, "canvas": self.tokenizer.decode(ids), "committed": committed,
                             "model_calls": int(payload.nfe[0])})]

    def final_choice(self, i: int, streaming: bool = False) -> dict:
        c = self.done[i]
        text, hit = cut_at_stop(c.text, self.req.stop)
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": "stop" if (hit or c.stopped_at_eot)
                  else "length", "model_calls": c.nfe, "steps": c.steps}
        if streaming:
            choice["text"] = text[len(self.sent[i]):] if self.kind == "ar" else text
            if self.kind != "ar":
                choice["canvas"] = text
        return choice

    def usage(self) -> dict:
        prompt = sum(len(self.done[i].prompt_ids) for i in range(0, len(self.specs), self.req.n) if i in self.done)
        completion = sum(len(c.token_ids) for c in self.done.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "model_calls": sum(c.nfe for c in self.done.values())}

    def final_chunks(self) -> list[dict]:
        if self.errors:
            return [{"error": error_body(*self._error())["error"]}]
        return [{"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                 "choices": [], "usage": self.usage()}]

    def _error(self) -> tuple[str, str]:
        e = next(iter(self.errors.values()))
        if isinstance(e, Cancelled):
            return "the request was cancelled: the server is shutting down", "server_error"
        return f"decoding failed: {type(e).__name__}: {e}", "server_error"

    def error_response(self, error):
        message, type_ = self._error()
        return error(503 if type_ == "server_error" and "shutting down" in message else 500, message, type_)

    def response(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "choices": [self.final_choice(i) for i in range(len(self.specs))], "usage": self.usage()}

    def account(self, metrics: ServerMetrics, elapsed_s: float) -> None:
        u = self.usage()
        metrics.prompt_tokens.inc(u["prompt_tokens"])
        metrics.completion_tokens.inc(u["completion_tokens"])
        metrics.latency.observe(elapsed_s)


# ----------------------------------------------------------------------------- CLI
def prepare_model(loaded, dtype: str):
    """The model in eval mode and the context its calls run in: float64 (exactness tests), float32, or
    bf16/fp16 autocast on GPU (auto = bf16 where the GPU computes it natively, else fp16; float32 on CPU)."""
    model = loaded.model.eval()
    device = next(model.parameters()).device
    if dtype == "float64":
        loaded.model = model.double()
        return contextlib.nullcontext
    if device.type != "cuda" and dtype in ("bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype} needs a GPU; on CPU use float32 (or float64)")
    return lambda: autocast(device, dtype)


ANSWER_MARGIN_S = 5.0  # after --grace_s, time for the cancelled rows to leave at their step and be answered


class DrainingServer(uvicorn.Server):
    """uvicorn's Server whose shutdown (SIGTERM, Ctrl-C) first drains the scheduler: the running rows get
    grace_s to finish, the rest are cancelled at their next step and their requests answered (503, or a
    stream's last choice with finish_reason "cancelled" and an error event), all before uvicorn's own wait
    for open connections (grace_s + ANSWER_MARGIN_S) would cut them mid-answer."""

    def __init__(self, config: uvicorn.Config, scheduler: StepScheduler, grace_s: float):
        super().__init__(config)
        self.scheduler, self.grace_s = scheduler, grace_s

    async def shutdown(self, sockets=None) -> None:
        drained = asyncio.get_running_loop().run_in_executor(None, self.scheduler.stop, self.grace_s)
        await super().shutdown(sockets)  # stops accepting, then waits for the answers to go out
        await drained


def default_model_id(ckpt: Optional[str], init_from: Optional[str]) -> str:
    if init_from:
        return Path(init_from).name or init_from
    p = Path(ckpt).resolve()
    return p.parent.name if p.name == "export" else p.name


@dataclass
class ServeCommand:
    """`python -m inference.serve` (common/config.py: --key=value, --key value, --config FILE)."""
    ckpt: str = knob("", "our checkpoint: a consolidated dir, a training out dir, or a DeepSpeed checkpoint")
    init_from: str = knob("", "gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a Hugging Face GPT-2 dir")
    host: str = knob("127.0.0.1", "address to bind (loopback only; 0.0.0.0 opens the server to the network: "
                                  "set --api-key)")
    port: int = knob(8000, "port to bind")
    model_name: str = knob("", "the model id clients send ('' = the run's folder name)")
    api_key: str = knob("", f"require 'Authorization: Bearer KEY' on every request but / and /health "
                            f"('' = ${API_KEY_ENV} if set, else no key)")
    max_rows: int = knob(64, "rows (decodes) per model call at most")
    max_queue: int = knob(256, "rows that may wait beyond max_rows; then 429")
    max_n: int = knob(16, "completions per request (n x prompts) at most")
    grace_s: float = knob(10.0, "on SIGTERM, seconds in-flight requests get to finish")
    step_delay_s: float = knob(0.0, "pause before every model call (demos: watch the canvas fill in)")
    device: str = knob("auto", "auto (cuda if present) | cpu | cuda | cuda:1 ...")
    dtype: str = knob("auto", "autocast dtype on GPU", choices=("auto", "float32", "float64", "bfloat16", "float16"))
    attn_impl: str = knob("auto", "attention kernel: auto = Triton on GPU, PyTorch elsewhere",
                          choices=("auto", "triton", "torch"))
    threads: int = knob(0, "torch CPU threads (0: torch's default)")
    call_overhead_tokens: float = knob(0.0, "what a separate model call costs, in row-columns of work (the "
                                            "scheduler pads short calls to wide ones when that is cheaper); "
                                            "0 = measure it at startup on this device")


def bad_setting(args: ServeCommand) -> Optional[str]:
    """What is wrong with the command's settings, saying what to give instead (None: nothing)."""
    if bool(args.ckpt) == bool(args.init_from):
        return "give --ckpt DIR (our model) or --init_from gpt2|... (OpenAI GPT-2), exactly one"
    if not 0 <= args.port <= 65535:
        return f"--port must be 0-65535 (a free one, e.g. 8000), got {args.port}"
    for name, least in (("max_rows", 1), ("max_n", 1), ("max_queue", 0), ("threads", 0)):
        if getattr(args, name) < least:
            return f"--{name} must be >= {least}, got {getattr(args, name)}"
    for name, what in (("call_overhead_tokens", "0 = measure it"), ("grace_s", "0 = stop at once"),
                       ("step_delay_s", "0 = no pause")):
        if not getattr(args, name) >= 0:  # (NaN too)
            return f"--{name} must be >= 0 ({what}), got {getattr(args, name)}"
    return None


def port_in_use(host: str, port: int) -> Optional[str]:
    """Why the server could not listen on host:port (None: it can), found before the model is loaded. The
    probe binds as uvicorn does (SO_REUSEADDR), so a port left in TIME_WAIT by a stopped server is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def parse_args(argv=None) -> ServeCommand:
    args = parse_cli(ServeCommand, argv, prog="python -m inference.serve", description=__doc__)
    problem = bad_setting(args)
    if problem:
        print(f"python -m inference.serve: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV, "")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    taken = port_in_use(args.host, args.port)
    if taken:
        print(f"error: cannot listen on {args.host}:{args.port} ({taken}): another server holds the port, or "
              f"the address is not this machine's; choose another --port (or stop that server)", file=sys.stderr)
        return 2
    from inference.loading import load_model
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_model(args.ckpt or None, args.init_from or None, args.device, args.attn_impl,
                            log=lambda m: print(m, file=sys.stderr))
        autocast = prepare_model(loaded, args.dtype)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = ServerConfig(model_id=args.model_name or default_model_id(args.ckpt or None, args.init_from or None),
                       max_rows=args.max_rows, max_queue=args.max_queue, max_n=args.max_n,
                       api_key=args.api_key or None, grace_s=args.grace_s)
    overhead = args.call_overhead_tokens or measure_call_overhead(loaded.model, autocast)
    print(f"scheduler: a separate model call costs about {overhead:.0f} row-columns of work on "
          f"{next(loaded.model.parameters()).device} ({'given' if args.call_overhead_tokens else 'measured'}); "
          f"calls narrower than the widest are run apart only where padding them would cost more",
          file=sys.stderr, flush=True)
    scheduler = StepScheduler(loaded.model, loaded.tokenizer, cfg.max_rows, cfg.max_queue, autocast,
                              step_delay_s=args.step_delay_s, call_overhead_tokens=overhead).start()
    app = build_app(loaded, scheduler, cfg)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who reaches this port can use the "
              f"model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.grace_s + ANSWER_MARGIN_S),
                            scheduler, args.grace_s)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"serving {cfg.model_id} ({loaded.objective}, {loaded.model.config.kind}) on http://{args.host}:{args.port}/ "
          f"(max_rows {cfg.max_rows}, max_queue {cfg.max_queue})", file=sys.stderr, flush=True)
    server.run()
    print("server stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
