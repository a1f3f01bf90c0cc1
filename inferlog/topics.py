"""Topic admin: create inferlog's topics idempotently and describe their partition counts."""
from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from .clients import confluent_config, retriable, retry
from .errors import InferlogError
from .settings import Settings


class TopicError(InferlogError):
    """A topic could not be created or described."""


def _admin(settings: Settings) -> AdminClient:
    return AdminClient(confluent_config(settings))


def ensure_topics(settings: Settings, names: list[str] | None = None, partitions: int | None = None,
                  replication_factor: int | None = None, retention_ms: int | None = None,
                  timeout: float = 30, config: dict[str, str] | None = None) -> dict[str, bool]:
    """Create `names` (default: the settings' model's own topics: requests of both tiers, results
    and dead letters; and the model registry's topic: one partition, compacted,
    inferlog/registry.py) unless they exist. Returns {name: created?}; an existing topic is left as it is, even when its
    partition count differs (changing it would move keys to other partitions). `config`:
    more topic configs (e.g. cleanup.policy) for the topics created here."""
    if not names:
        from .registry import TOPIC_CONFIG

        made = ensure_topics(settings, [*settings.request_topics, *settings.model_outputs()], partitions,
                             replication_factor, retention_ms, timeout, config)
        return made | ensure_topics(settings, [settings.models_topic], 1, replication_factor, timeout=timeout,
                                    config=TOPIC_CONFIG)
    partitions = partitions or settings.partitions
    rf = replication_factor or settings.replication_factor
    retention = settings.retention_ms if retention_ms is None else retention_ms
    admin = _admin(settings)
    wanted = {n: NewTopic(n, num_partitions=partitions, replication_factor=rf,
                          config={"retention.ms": str(retention), **(config or {})}) for n in names}
    created: dict[str, bool] = {}
    unsure: set[str] = set()  # a try failed without saying whether the topic was made

    def create_rest() -> None:
        # One try for the topics not settled yet: what it settles stays settled, the first
        # retriable error (a controller not ready, a timeout) is raised for retry() to judge.
        futures = admin.create_topics([t for n, t in wanted.items() if n not in created],
                                      operation_timeout=timeout, request_timeout=timeout)
        again = None
        for name, fut in futures.items():
            try:
                fut.result()
                created[name] = True
            except KafkaException as e:
                err = e.args[0]
                if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    created[name] = name in unsure  # made by an earlier try whose answer was lost
                elif retriable(err):
                    unsure.add(name)
                    again = again or e
                else:
                    raise TopicError(f"cannot create topic {name!r} on {settings.bootstrap_servers}: {err.str()}") from e
        if again:
            raise again

    try:
        # Each try waits up to `timeout` for the controller: three before giving up on a cluster
        # that never answers.
        retry(create_rest, "create topics", tries=3)
    except KafkaException as e:
        raise TopicError(f"cannot create topics {sorted(set(names) - set(created))} on "
                         f"{settings.bootstrap_servers}: {e.args[0].str()}") from e
    _wait_for_leaders(admin, [n for n, new in created.items() if new], timeout)
    return {n: created[n] for n in names}


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout: float) -> None:
    # The controller acknowledges a new topic before every broker has its metadata; wait
    # so that a producer started right after does not see UNKNOWN_TOPIC_OR_PARTITION. The
    # wait follows progress: `timeout` runs from the last topic that got its leaders.
    pending = set(names)
    deadline = time.monotonic() + timeout
    while pending:
        md = retry(lambda: admin.list_topics(timeout=5).topics, "topic metadata")
        left = {n for n in pending if n not in md or md[n].error is not None
                or not md[n].partitions or any(p.leader < 0 for p in md[n].partitions.values())}
        if len(left) < len(pending):
            deadline = time.monotonic() + timeout
        pending = left
        if pending and time.monotonic() > deadline:
            raise TopicError(f"topics without leaders after creation: {sorted(pending)}")
        if pending:
            time.sleep(0.1)


def delete_topics(settings: Settings, names: list[str], timeout: float = 30) -> list[str]:
    """Delete the named topics that exist; returns those deleted. Raises TopicError."""
    if not names:
        return []
    admin = _admin(settings)
    futures = admin.delete_topics(list(names), operation_timeout=timeout, request_timeout=timeout)
    deleted = []
    for name, fut in futures.items():
        try:
            fut.result()
            deleted.append(name)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise TopicError(f"cannot delete topic {name!r} on {settings.bootstrap_servers}: "
                                 f"{e.args[0].str()}") from e
    return deleted


def partition_counts(settings: Settings, names: list[str] | None = None, timeout: float = 10) -> dict[str, int]:
    """{topic: partition count} for the named topics that exist (all topics when names is None)."""
    try:
        md = _admin(settings).list_topics(timeout=timeout).topics
    except KafkaException as e:
        raise TopicError(f"cannot describe topics on {settings.bootstrap_servers}: {e}") from e
    wanted = md.keys() if names is None else [n for n in names if n in md]
    return {n: len(md[n].partitions) for n in wanted if md[n].error is None}


def request_topics(settings: Settings, models: list[str] | None = None) -> list[str]:
    """The request topics that exist, high tier first: of `models` (their topics in the
    settings' layout), else of every model and the shared ones (an old deployment's, or a
    shared-layout one's). What audit and replay read."""
    if models:
        names = [t for m in models for t in settings.model_topics(m)]
        return [t for t in names if t in partition_counts(settings, names)]
    found = [t for t in partition_counts(settings) if settings.is_request_topic(t)]
    return sorted(found, key=lambda t: (settings.tier_of(t) != "high", t))


def output_topics(settings: Settings, kind: str, models: list[str] | None = None) -> list[str]:
    """The results (kind "results") or dead-letter (kind "deadletter") topics that exist: of
    `models` (their own, in the settings' layout), else of every model and the shared one (an
    old deployment's, or a shared-layout one's). What audit, export and drift read."""
    i = 0 if kind == "results" else 1
    if models:
        names = list(dict.fromkeys(settings.model_outputs(m)[i] for m in models))
        return [t for t in names if t in partition_counts(settings, names)]
    return sorted(t for t in partition_counts(settings) if settings.is_output_topic(t, kind))
