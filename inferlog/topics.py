"""Topic admin: create inferlog's topics idempotently and describe their partition counts."""
from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from .clients import confluent_config
from .errors import InferlogError
from .settings import Settings


class TopicError(InferlogError):
    """A topic could not be created or described."""


def _admin(settings: Settings) -> AdminClient:
    return AdminClient(confluent_config(settings))


def ensure_topics(settings: Settings, names: list[str] | None = None, partitions: int | None = None,
                  replication_factor: int | None = None, retention_ms: int | None = None,
                  timeout: float = 30, config: dict[str, str] | None = None) -> dict[str, bool]:
    """Create `names` (default: the requests (both tiers), results and deadletter topics) unless they
    exist. Returns {name: created?}; an existing topic is left as it is, even when its
    partition count differs (changing it would move keys to other partitions). `config`:
    more topic configs (e.g. cleanup.policy) for the topics created here."""
    names = names or [settings.requests_topic, settings.high_priority_topic, settings.results_topic,
                      settings.deadletter_topic]
    partitions = partitions or settings.partitions
    rf = replication_factor or settings.replication_factor
    retention = settings.retention_ms if retention_ms is None else retention_ms
    admin = _admin(settings)
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=rf, config={"retention.ms": str(retention), **(config or {})})
         for n in names], operation_timeout=timeout, request_timeout=timeout)
    created: dict[str, bool] = {}
    for name, fut in futures.items():
        try:
            fut.result()
            created[name] = True
        except KafkaException as e:
            err = e.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"cannot create topic {name!r} on {settings.bootstrap_servers}: {err.str()}") from e
            created[name] = False
    _wait_for_leaders(admin, [n for n, new in created.items() if new], time.monotonic() + timeout)
    return created


def _wait_for_leaders(admin: AdminClient, names: list[str], deadline: float) -> None:
    # The controller acknowledges a new topic before every broker has its metadata; wait
    # so that a producer started right after does not see UNKNOWN_TOPIC_OR_PARTITION.
    pending = set(names)
    while pending:
        md = admin.list_topics(timeout=5).topics
        pending = {n for n in pending if n not in md or md[n].error is not None
                   or not md[n].partitions or any(p.leader < 0 for p in md[n].partitions.values())}
        if pending and time.monotonic() > deadline:
            raise TopicError(f"topics without leaders after creation: {sorted(pending)}")
        if pending:
            time.sleep(0.1)


def partition_counts(settings: Settings, names: list[str] | None = None, timeout: float = 10) -> dict[str, int]:
    """{topic: partition count} for the named topics that exist (all topics when names is None)."""
    try:
        md = _admin(settings).list_topics(timeout=timeout).topics
    except KafkaException as e:
        raise TopicError(f"cannot describe topics on {settings.bootstrap_servers}: {e}") from e
    wanted = md.keys() if names is None else [n for n in names if n in md]
    return {n: len(md[n].partitions) for n in wanted if md[n].error is None}
