"""The HTTP gateway: submit requests and fetch their results over HTTP (FastAPI, fully async).

POST /v1/requests validates with the SDK's encoder, stamps the caller's tenant, publishes to
the priority tier's topic through the asyncio SDK and answers 202 once the broker has the
record (or, with ?wait=N, the result itself). GET /v1/requests/{id} answers from the
replica's results reader (producer/replies.py), which sees every partition, so any replica
answers any id. Nothing here blocks the loop: Kafka I/O is aiokafka, auth/encode/decode are
microseconds, and a lag probe measures that this stays true.

Tracing: the OpenTelemetry FastAPI instrumentation continues the caller's W3C traceparent in a
server span; the publish runs in a child span of it, so the SDK's header injection carries the
same trace into the Kafka record and on to the worker's batch span and the result.
/docs and /redoc load their JavaScript and CSS from this process, never a CDN.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Literal

import click
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from pydantic import BaseModel, ConfigDict, Field

from inferlog.errors import RecordError
from inferlog.request import now_ms
from inferlog.options import settings_from, settings_options
from inferlog.settings import Settings, load_settings

from inferlog.registry import request_directory

from . import models_api
from . import openai_api as oai
from .aio import AsyncProducer
from .auth import Authenticator, AuthError, IdSigner, QuotaExceeded, Quotas, retry_after_header
from .replies import Outcome, Replies, TopicMissing
from .sync import ProduceError

log = logging.getLogger(__name__)
# no `_created` series beside every counter and histogram: a timestamp per series nobody charts
disable_created_metrics()

LAG_PROBE_S = 0.1
# how long start-up waits for the model registry to be read (a cluster that answers reads it in
# well under a second); without it requests are not checked against it until it is
MODELS_WAIT_S = 15.0
MODEL_WATCH_S = 0.5  # how often the gateway looks for newly served models (their tokenizers load then)
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LAG_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# Where /docs and /redoc get Swagger UI 5 (which reads the OpenAPI 3.1 that FastAPI emits) and ReDoc.
DOCS_ASSETS = "/docs-assets"
# Probes and scrapes come every few seconds and would drown the traces of real requests.
UNTRACED_URLS = "/healthz,/readyz,/metrics"
SUBMIT = "/v1/requests"
SUBMISSIONS = frozenset({SUBMIT, *oai.TASKS})  # what inferlog_gateway_requests counts (POSTs to them)
# the tenant label of a submission refused for its credentials (401, 403): it names no tenant
UNAUTHENTICATED = "unauthenticated"
# the model label of a submission naming a model the gateway does not know, or refused before
# its body was read: any string a client sends would be a series of its own otherwise
UNKNOWN_MODEL = "unknown"


# -- the API's shapes -----------------------------------------------------------------------
class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


class SubmitBody(BaseModel):
    """One inference request. The tenant comes from the caller's credentials, never the body."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"task": "embed", "inputs": ["a first text", "a second one"], "priority": 0}]})
    task: str = Field(description="embed, generate or classify (the worker's model decides which it serves)")
    inputs: str | list[str] = Field(description="one text or a list of texts; one output each")
    model: str | None = Field(None, description="null: the worker's model")
    parameters: Parameters | None = None
    priority: int = Field(0, description="requests at or above the high-priority threshold go to the high tier")
    deadline_ms: int | None = Field(None, description="epoch ms after which the answer is an EXPIRED result")
    metadata: dict[str, str] | None = None


class Status(BaseModel):
    request_id: str
    status: Literal["pending", "done", "failed"]
    result: dict[str, Any] | None = Field(None, description="the InferenceResult record (status done)")
    reason: str | None = Field(None, description="the dead letter's reason code (status failed)")
    detail: str | None = None


class Problem(BaseModel):
    detail: Any


ERRORS = {401: {"model": Problem}, 403: {"model": Problem}, 429: {"model": Problem}}


# -- metrics ---------------------------------------------------------------------------------
class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()  # per app: several gateways in one process do not mix
        self.requests = Counter("inferlog_gateway_requests", "Submissions answered (whatever the answer, 401 "
                                "included), by tier, tenant, HTTP code and model",
                                ["tier", "tenant", "code", "model"], registry=r)
        self.latency = Histogram("inferlog_gateway_latency_seconds", "Submit to answer of ?wait= submissions",
                                 ["tier", "model"], buckets=SECONDS, registry=r)
        self.loop_lag = Histogram("inferlog_gateway_event_loop_lag_seconds",
                                  f"Overshoot of a {LAG_PROBE_S}s sleep on the event loop", buckets=LAG_SECONDS,
                                  registry=r)
        self.loop_lag_max = Gauge("inferlog_gateway_event_loop_lag_max_seconds", "Largest overshoot seen",
                                  registry=r)
        self.outcomes = Counter("inferlog_gateway_outcomes_read", "Results and dead letters read", registry=r)

    @staticmethod
    def model_label(requested: str | None, default: str, models) -> str:
        """The `model` label of a submission naming `requested` (None: the gateway's `default`,
        its settings.served_name, where such a request goes): the served name of a model the
        gateway knows (`default`, or one live in its directory `models`, by name or files),
        else UNKNOWN_MODEL."""
        if requested is None or requested == default:
            return default
        lm = models.find(requested)
        return lm.name if lm is not None else UNKNOWN_MODEL

    async def probe_loop_lag(self) -> None:
        worst = 0.0
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_S)
            lag = max(0.0, time.perf_counter() - t0 - LAG_PROBE_S)
            self.loop_lag.observe(lag)
            if lag > worst:
                worst = lag
                self.loop_lag_max.set(lag)


# -- the app ---------------------------------------------------------------------------------
class Gateway:
    """What one replica holds: Kafka clients, identity, quotas, metrics."""

    def __init__(self, settings: Settings, tracer_provider: trace.TracerProvider | None = None):
        self.s = settings
        self.tracer = trace.get_tracer("inferlog.gateway", tracer_provider=tracer_provider)
        self.auth = Authenticator.from_settings(settings)
        secret = settings.gateway_id_secret
        self.ids = IdSigner(secret.get_secret_value().encode() if secret else None)
        self.quotas = Quotas.from_settings(settings)
        self.metrics = GatewayMetrics()
        # it checks requests against its own directory (self.models) first, for its HTTP answers
        self.producer = AsyncProducer(settings, client_id="inferlog-gateway", check_models=False)
        self.replies = Replies(settings, self.producer.codec, on_outcome=self._answered)
        # which models the live workers serve, and where their files are (inferlog/registry.py)
        self.models = request_directory(settings)
        # each served model's tokenizer (chat templates, usage); the settings' own model's is
        # loaded at start-up, every other one as soon as the registry names it
        self.tokenizers = oai.Tokenizers(settings.served_name, settings.model)
        self.tokenizer = self.tokenizers.by_name[settings.served_name]
        self._lag_task: asyncio.Task | None = None
        self._tokenizer_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None

    def _answered(self, request_id: str) -> None:
        self.metrics.outcomes.inc()
        self.quotas.done(request_id)

    async def start(self) -> None:
        # The tokenizer loads (seconds) beside the Kafka connections, off the loop; /readyz says
        # ready once it is loaded (or known not to be), so the first OpenAI call does not pay it.
        self._tokenizer_task = asyncio.create_task(asyncio.to_thread(self.tokenizer.load), name="tokenizer-load")
        if self.auth.open:
            log.warning("no API keys or JWT keys configured: the gateway is OPEN, every caller is tenant 'default'")
        if self.s.gateway_id_secret is None:
            log.info("no gateway_id_secret: request ids are signed with a per-process key, so replicas "
                     "cannot answer each other's pending ids (set INFERLOG_GATEWAY_ID_SECRET to share one)")
        await self.replies.start()  # first: outcomes of what we send must not be missed
        try:
            await self.producer.start()
        except BaseException:
            await self.replies.stop()
            raise
        self.models.start()
        if not await asyncio.to_thread(self.models.wait_settled, MODELS_WAIT_S):
            log.warning("the model registry %s is not read (%s): requests are not checked against it until it is",
                        self.s.models_topic, self.models.error or "no answer yet")
        self._lag_task = asyncio.create_task(self.metrics.probe_loop_lag(), name="loop-lag-probe")
        self._watch_task = asyncio.create_task(self._watch_models(), name="model-watch")
        log.info("gateway ready: requests to each model's topics %s.<model> / %s.<model> (priority >= %d), "
                 "outcomes from %s.<model> / %s.<model>; models live: %s", self.s.requests_topic,
                 self.s.high_priority_topic, self.s.high_priority, self.s.results_topic, self.s.deadletter_topic,
                 ", ".join(self.models.live()) or "none yet")

    async def _watch_models(self) -> None:
        """Loads the tokenizer of every model the registry names, and reads its outcomes, as
        soon as it names it: any replica answers a request id made by another."""
        while True:
            for lm in self.models.live().values():
                self.tokenizers.see(lm.name, lm.members[0].model)
                try:
                    await self.replies.watch(lm.name)
                except Exception as e:  # its topics not described yet, Kafka away: asked again next turn
                    log.debug("outcomes of %s: %s", lm.name, e)
            await asyncio.sleep(MODEL_WATCH_S)

    def tokenizer_for(self, model: str) -> oai.Tokenizer:
        """The tokenizer of the model a request names (by its served name or its files)."""
        lm = self.models.find(model)
        if lm is not None:
            return self.tokenizers.see(lm.name, lm.members[0].model)
        if model in self.tokenizers.by_name:
            return self.tokenizers.by_name[model]
        return oai.Tokenizer(None)  # a model the registry does not know (not read yet): no template, usage 0

    async def stop(self) -> None:
        for task in (self._lag_task, self._watch_task):
            if task is not None:
                task.cancel()
        await asyncio.to_thread(self.models.stop)
        try:
            await self.producer.stop()  # flushes what was accepted
        finally:
            await self.replies.stop()

    def tier(self, priority: int) -> str:
        return self.s.tier_of(self.s.topic_for_priority(priority))

    def status(self, request_id: str, o: Outcome | None, tenant: str) -> Status:
        if o is None:
            return Status(request_id=request_id, status="pending")
        rec = o.decode(self.replies.codec)
        if rec.get("tenant") not in (tenant, None):  # belt and braces: the id's tag already said
            raise HTTPException(404, "unknown or expired request id")
        if o.failed:
            return Status(request_id=request_id, status="failed", reason=rec["reason"], detail=rec["detail"])
        return Status(request_id=request_id, status="done", result=rec)


def create_app(settings: Settings | None = None, *, tracer_provider: trace.TracerProvider | None = None) -> FastAPI:
    """The gateway's app. tracer_provider: None is the global one (set by setup_tracing)."""
    gw = Gateway(settings or load_settings(), tracer_provider)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="inferlog gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Submit inference requests and fetch their results over HTTP. "
                              "Authenticate with `X-API-Key` or `Authorization: Bearer <API key or JWT>`.")
    app.state.gateway = gw
    # The server span it makes from an incoming traceparent is current while the endpoint runs;
    # the per-message ASGI send/receive spans say nothing about a JSON API.
    FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider, excluded_urls=UNTRACED_URLS,
                                       exclude_spans=["receive", "send"])
    _serve_docs_locally(app)
    api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")
    bearer = HTTPBearer(auto_error=False, description="an API key or a JWT (HS256/RS256)")

    async def tenant(request: Request, key: str | None = Depends(api_key),
                     cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        try:
            who = gw.auth.tenant(f"Bearer {cred.credentials}" if cred else None, key)
        except AuthError as e:
            raise HTTPException(e.status, e.detail, headers={"WWW-Authenticate": "Bearer"}) from None
        request.state.tenant = who
        return who

    def count(request: Request, tier: str, code: int | str, model: str = UNKNOWN_MODEL) -> None:
        """A submission's answer in inferlog_gateway_requests, once: by its endpoint, or by the
        error handlers for one refused before it ran (credentials, a body that did not parse)."""
        if request.method != "POST" or request.url.path not in SUBMISSIONS or getattr(request.state, "counted", False):
            return
        request.state.counted = True
        gw.metrics.requests.labels(tier, getattr(request.state, "tenant", UNAUTHENTICATED), str(code), model).inc()

    async def credentials_first(request: Request) -> HTTPException | None:
        """FastAPI parses a JSON body before it runs the dependencies: a submission refused for
        its body is judged on its credentials first, as every other call is. The 401/403 to
        answer instead, or None (the caller's tenant is then on request.state)."""
        if request.method != "POST" or request.url.path not in SUBMISSIONS or hasattr(request.state, "tenant"):
            return None
        try:
            await tenant(request, await api_key(request), await bearer(request))
        except HTTPException as e:
            return e
        return None

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> Response:
        if (refused := await credentials_first(request)) is not None:
            return await http_error(request, refused)
        openai = request.url.path in oai.TASKS  # OpenAI's shape and status for a body it would refuse
        count(request, "unknown", 400 if openai else 422)
        if openai:
            return JSONResponse(oai.invalid(exc.errors(), skip=1, body=oai.BODIES[request.url.path]).body(),
                                status_code=400)
        errors = [{"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return JSONResponse({"detail": {"reason": "INVALID_REQUEST", "errors": errors}}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code not in (401, 403) and (refused := await credentials_first(request)) is not None:
            exc = refused  # e.g. a body that is not UTF-8, refused before the dependencies ran
        count(request, "unknown", exc.status_code)
        if request.url.path in oai.TASKS:  # e.g. a 401 from the credentials, as OpenAI clients parse it
            kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
                exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
            detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
            return JSONResponse(oai.OpenAIError(detail, exc.status_code, kind).body(), status_code=exc.status_code,
                                headers=exc.headers)
        return await http_exception_handler(request, exc)

    @app.post("/v1/requests", response_model=Status, status_code=202, tags=["requests"],
              responses={200: {"model": Status, "description": "the outcome, when ?wait= saw it in time"},
                         400: {"model": Problem}, 404: {"model": Problem}, 422: {"model": Problem},
                         503: {"model": Problem}, **ERRORS})
    async def submit(body: SubmitBody, request: Request, response: Response, who: str = Depends(tenant),
                     wait: float | None = Query(None, ge=0, le=3600, description=(
                         "seconds to wait for the outcome (capped by the gateway); 200 with it, "
                         "or 202 pending when it does not come in time"))) -> Status:
        tier, code = gw.tier(body.priority), 500
        model = gw.metrics.model_label(body.model, gw.s.served_name, gw.models)
        started = time.perf_counter()
        try:
            # 404/400 before anything is published; a request naming no model goes to the gateway's own
            models_api.refuse_submit(gw.models, body.model or gw.s.served_name, body.task)
            status = await _submit(gw, body, who, wait, response)
            code = response.status_code or 202
            if wait:
                gw.metrics.latency.labels(tier, model).observe(time.perf_counter() - started)
            return status
        except HTTPException as e:
            code = e.status_code
            raise
        finally:
            count(request, tier, code, model)

    @app.get("/v1/requests/{request_id}", response_model=Status, tags=["requests"],
             responses={404: {"model": Problem}, **ERRORS})
    async def get(request_id: str = Path(max_length=128), who: str = Depends(tenant)) -> Status:
        # another tenant's id, or no id we made: the same 404, so existence does not leak
        if not gw.ids.owns(request_id, who):
            raise HTTPException(404, "unknown or expired request id")
        o = gw.replies.get(request_id)
        created = gw.ids.created_ms(request_id) or 0
        if o is None and gw.replies.may_have_missed(created):
            o = await gw.replies.lookup(request_id, created)
        if o is None and gw.s.retention_ms >= 0 and created < now_ms() - gw.s.retention_ms:
            raise HTTPException(404, "unknown or expired request id")
        return gw.status(request_id, o, who)

    # -- OpenAI-compatible endpoints: the same path through Kafka, answered when the result is in
    async def openai_call(request: Request, url: str, body, who: str):
        tier, code = gw.tier(0), "500"
        try:
            models_api.refuse_openai(gw.models, body.model, oai.TASKS[url])  # 404/400 before anything is published
            tok = gw.tokenizer_for(body.model)
            if not tok.loaded:  # a call before /readyz said ready: it waits for the start-up load, off the loop
                await asyncio.to_thread(tok.get)
            fields = oai.to_request(url, body, tok, high_priority=gw.s.high_priority)
            tier = gw.tier(fields.get("priority", 0))
            sub = SubmitBody(task=fields["task"], inputs=fields["inputs"], model=fields["model"],
                             parameters=Parameters(**fields["parameters"]) if fields.get("parameters") else None,
                             priority=fields.get("priority", 0), metadata=fields["metadata"])
            prompt_tokens = await asyncio.to_thread(tok.count, fields["inputs"])
            st = await _submit(gw, sub, who, gw.s.gateway_max_wait_s, Response())
            if st.status == "pending":  # not answered within the gateway's longest wait
                raise oai.OpenAIError(f"no answer within {gw.s.gateway_max_wait_s:g} s; request {st.request_id} "
                                      f"is still queued (GET /v1/requests/{st.request_id})", 504, "timeout",
                                      code="timeout")
            if st.status == "failed":
                raise oai.failure(st.reason or "ERROR", st.detail or "")
            answer = oai.response(st.result, fields["metadata"], prompt_tokens)
            code = "200"
            if getattr(body, "stream", False):
                usage = bool((body.stream_options or {}).get("include_usage"))
                return StreamingResponse(iter(oai.sse(oai.stream_chunks(answer, usage))),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return JSONResponse(answer)
        except oai.OpenAIError as e:
            code = str(e.status)
            # a client's retry of a timed-out call would ask again: the first is still queued
            headers = {"x-should-retry": "false"} if e.status == 504 else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)
        except HTTPException as e:
            code = str(e.status_code)
            if e.status_code == 422:  # the SDK's validation (a record the worker would dead-letter): 400 here
                d = e.detail if isinstance(e.detail, dict) else {"reason": "INVALID_REQUEST", "detail": str(e.detail)}
                code = "400"
                return JSONResponse(oai.failure(d["reason"], d["detail"]).body(), status_code=400)
            if e.status_code == 404 and isinstance(e.detail, dict):  # a model no worker has served
                err = oai.failure(e.detail["reason"], e.detail["detail"])
                err.param = "model"
                return JSONResponse(err.body(), status_code=err.status)
            raise
        finally:
            count(request, tier, code, gw.metrics.model_label(body.model, gw.s.served_name, gw.models))

    openai_errors = {400: {"model": Problem}, 404: {"model": Problem}, 504: {"model": Problem}, **ERRORS}

    @app.post(oai.EMBEDDINGS, tags=["openai"], responses=openai_errors)
    async def embeddings(body: oai.EmbeddingsBody, request: Request, who: str = Depends(tenant)):
        """OpenAI's embeddings call, answered by the workers through Kafka."""
        return await openai_call(request, oai.EMBEDDINGS, body, who)

    @app.post(oai.COMPLETIONS, tags=["openai"], responses=openai_errors)
    async def completions(body: oai.CompletionsBody, request: Request, who: str = Depends(tenant)):
        """OpenAI's (legacy) completions call; `stream: true` sends the whole answer as one chunk."""
        return await openai_call(request, oai.COMPLETIONS, body, who)

    @app.post(oai.CHAT, tags=["openai"], responses=openai_errors)
    async def chat_completions(body: oai.ChatBody, request: Request, who: str = Depends(tenant)):
        """OpenAI's chat completions call: the messages through the model's chat template."""
        return await openai_call(request, oai.CHAT, body, who)

    models_api.add_routes(app, gw.models, tenant)  # GET /v1/models, /v1/models/{id}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": Problem}})
    async def readyz() -> dict:
        if not gw.replies.running or not gw.producer.started:
            raise HTTPException(503, "not connected to Kafka")
        if loading := gw.tokenizers.loading:
            raise HTTPException(503, f"loading the tokenizer of {', '.join(loading)} (the OpenAI endpoints' "
                                     "chat template and usage)")
        # a tokenizer that failed to load leaves the gateway ready (only chat needs it): the body says why
        return {"ok": True, "outcomes_read": gw.replies.read, "tokenizer": gw.tokenizer.status,
                "tokenizers": gw.tokenizers.status(), "models": sorted(gw.models.live())}

    return app


async def _submit(gw: Gateway, body: SubmitBody, tenant: str, wait: float | None, response: Response) -> Status:
    try:
        gw.quotas.admit(tenant, body.model or gw.s.served_name)  # per model: one model's backlog spares another's
    except QuotaExceeded as e:
        raise HTTPException(429, e.detail, headers={"Retry-After": retry_after_header(e.retry_after)}) from None
    rid = gw.ids.new(tenant)
    model = body.model or gw.s.served_name
    try:  # its model's outcomes read from before its request is sent: they cannot be missed
        await gw.replies.watch(model)
    except TopicMissing:  # no worker ever made its topics (and the registry is not read yet)
        status, _, code = oai.REASONS["UNKNOWN_MODEL"]
        raise HTTPException(status, {"reason": "UNKNOWN_MODEL", "code": code, "detail": (
            f"no worker has served model {model!r}: its topics do not exist")}) from None
    except Exception as e:  # Kafka did not answer
        log.warning("reading the outcomes of %s: %s", model, e)
        raise HTTPException(503, "Kafka did not answer; retry") from None
    waiter = gw.replies.expect(rid) if wait else None  # before sending: the outcome cannot be missed
    gw.quotas.track(rid, tenant, body.model or gw.s.served_name)
    try:
        # Current while the SDK encodes, so the record's traceparent names this span (a child
        # of the HTTP server span, in the caller's trace).
        with gw.tracer.start_as_current_span("inferlog.publish", kind=trace.SpanKind.PRODUCER, attributes={
                "messaging.system": "kafka", "inferlog.tier": gw.tier(body.priority),
                "inferlog.request_id": rid, "inferlog.tenant": tenant}):
            await gw.producer.submit(
                body.task, body.inputs, model=body.model, tenant=tenant,
                parameters=body.parameters.model_dump(exclude_none=True) if body.parameters else None,
                priority=body.priority, deadline_ms=body.deadline_ms, metadata=body.metadata,
                request_id=rid, acked=True)
    except BaseException as e:
        gw.quotas.done(rid)
        if waiter is not None:
            gw.replies.forget(rid, waiter)
        if isinstance(e, RecordError):
            raise HTTPException(422, {"reason": e.reason, "detail": e.detail}) from None
        if isinstance(e, ProduceError):
            log.warning("publishing %s failed: %s", rid, e)
            raise HTTPException(503, "Kafka did not take the request; retry") from None
        raise
    response.headers["Location"] = f"/v1/requests/{rid}"
    if waiter is not None:
        o = await gw.replies.wait(rid, min(wait, gw.s.gateway_max_wait_s), waiter)
        if o is not None:
            response.status_code = 200
            return gw.status(rid, o, tenant)
    response.status_code = 202
    return Status(request_id=rid, status="pending")


def _serve_docs_locally(app: FastAPI) -> None:
    """FastAPI's self-hosted docs assets recipe: the stock pages fetch them from a CDN, so they
    are blank on a network without one."""
    app.mount(DOCS_ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")  # behind a proxy that strips a prefix
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
                              with_google_fonts=False)  # a CDN too


# -- running it ------------------------------------------------------------------------------
def _server(settings: Settings, host: str, port: int, tracer_provider: trace.TracerProvider | None = None):
    import uvicorn

    config = uvicorn.Config(create_app(settings, tracer_provider=tracer_provider), host=host, port=port,
                            log_config=None, access_log=False,
                            timeout_graceful_shutdown=int(settings.gateway_max_wait_s) + 5, lifespan="on")
    return uvicorn.Server(config)


@contextlib.contextmanager
def serve_in_thread(settings: Settings, host: str = "127.0.0.1", port: int = 0,
                    tracer_provider: trace.TracerProvider | None = None):
    """A gateway on a background thread (tests, benchmarks); yields its base URL."""
    server = _server(settings, host, port, tracer_provider)
    t = threading.Thread(target=server.run, name="inferlog-gateway", daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start (see the log)")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        t.join(60)


@click.command("gateway")
@settings_options("connection", "requests_topic", "high_priority_topic", "high_priority", "results_topic",
                  "deadletter_topic", "models_topic", "framing", "schema_registry_url", "model", "model_name", "gateway",
                  "otlp_endpoint",
                  flags={"gateway_host": ("--host", "--gateway-host"), "gateway_port": ("--port", "--gateway-port")})
def gateway_cli(**flags) -> None:
    """Serve the HTTP gateway until SIGTERM/SIGINT (in-flight calls finish, the producer flushes)."""
    from inferlog.telemetry import setup_tracing

    s = settings_from(flags)
    if setup_tracing(s, service="inferlog-gateway"):
        log.info("exporting traces to %s", s.otlp_endpoint)
    _server(s, s.gateway_host, s.gateway_port).run()
