"""`inferlog demo`: the whole path on one machine, in one command.

Starts the local Kafka (unless one answers already), creates the topics, loads the default
model, runs a worker, streams sample texts through it, prints results as they commit and
ends with a summary: throughput, end-to-end latency percentiles and batch sizes.
"""
from __future__ import annotations

import random
import statistics
import threading
import time

import click
from confluent_kafka import Consumer, TopicPartition

from inferlog.clients import confluent_config, consume_ready
from inferlog.codec import RESULT, Codec

from inferlog.options import settings_from

from .cli import worker_options
from .runners import build_runner

SUBJECTS = ["The payment service", "A customer in Lisbon", "Our nightly batch job", "The fraud model",
            "An auditor", "The search index", "A delivery driver", "The support team", "Kafka", "The GPU"]
VERBS = ["reported", "asked about", "flagged", "summarised", "replayed", "could not find", "approved",
         "rejected", "translated", "compared"]
OBJECTS = ["a late refund for order 4411", "the latency spike after the deploy", "three duplicate invoices",
           "the new pricing page", "an expired passport", "the weekly revenue report", "a damaged parcel",
           "the consumer lag on partition five", "a suspicious login from a new device", "the model's drift"]
TAILS = ["", " yesterday", " before noon", ", again", " in the audit log",
         " and asked for a full explanation of every step that was taken since Monday morning"]


def sample_texts(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    return [f"{rnd.choice(SUBJECTS)} {rnd.choice(VERBS)} {rnd.choice(OBJECTS)}{rnd.choice(TAILS)}." for _ in range(n)]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


class ResultTail:
    """read_committed reader of the results topic from its current end."""

    def __init__(self, settings, codec: Codec):
        self.codec = codec
        self.c = Consumer(confluent_config(settings, **{
            "group.id": f"inferlog-demo-reader-{time.time_ns()}", "isolation.level": "read_committed",
            "enable.auto.commit": False}))
        md = self.c.list_topics(settings.model_results_topic, timeout=10).topics[settings.model_results_topic]
        tps = []
        for p in md.partitions:
            _, high = self.c.get_watermark_offsets(TopicPartition(settings.model_results_topic, p), timeout=10)
            tps.append(TopicPartition(settings.model_results_topic, p, high))
        self.c.assign(tps)

    def poll(self, timeout: float = 0.2) -> list[dict]:
        out = []
        for m in consume_ready(self.c, 500, timeout):
            if m.error() is None:
                out.append(self.codec.decode(m.value(), expect=RESULT))
        return out

    def close(self):
        self.c.close()


@click.command("demo")
@worker_options
@click.option("-n", "--count", default=1000, show_default=True, help="Sample requests to stream.")
@click.option("--rate", default=0.0, show_default=True, help="Requests per second to offer (0: as fast as possible).")
@click.option("--show", default=20, show_default=True, help="Print this many results as they arrive (then only progress).")
@click.option("--keep-kafka", is_flag=True, help="Leave the local broker running afterwards.")
def demo(count: int, rate: float, show: int, keep_kafka: bool, **flags) -> None:
    """Run the whole path locally: Kafka, the worker on the default model, a sample stream."""
    from tqdm import tqdm

    from inferlog.localkafka import LocalKafka
    from inferlog.producer.sync import Producer
    from inferlog.topics import ensure_topics

    from .worker import Worker

    settings = settings_from(flags)
    started_kafka = None
    lk = LocalKafka.from_settings(settings)
    if not _answers(settings):
        click.echo(f"starting a local Kafka {lk.version} (data in {lk.data_dir}) ...")
        lk.fetch()
        lk.start()
        started_kafka = lk
    try:
        ensure_topics(settings)
        click.echo(f"loading model {settings.model} ...")
        runner = build_runner(settings)
        codec = Codec.from_settings(settings)
        w = Worker(settings, runner, codec=codec)
        t = threading.Thread(target=w.run, name="inferlog-worker", daemon=True)
        t.start()
        tail = ResultTail(settings, codec)
        if not w.ready.wait(120):
            raise click.ClickException("the worker did not get partitions within 120 s")
        texts = sample_texts(count)
        ids: set[str] = set()
        t0 = time.monotonic()
        with Producer(settings) as prod:
            for i, text in enumerate(texts):
                ids.add(prod.submit("embed", text, metadata={"source": "demo"}))
                if rate > 0:
                    time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
        got: dict[str, dict] = {}
        bar = tqdm(total=count, unit="req", desc="results", disable=None)  # None: no bar unless a terminal
        while len(got) < len(ids) and t.is_alive():
            for r in tail.poll():
                if r["request_id"] in ids and r["request_id"] not in got:
                    got[r["request_id"]] = r
                    if len(got) <= show:
                        bar.write(_format_result(r, len(got)))
                    bar.update(1)
        elapsed = time.monotonic() - t0
        bar.close()
        w.stop()
        t.join(60)
        tail.close()
        _summary(list(got.values()), count, elapsed, w.counts, rate)
    finally:
        if started_kafka is not None and not keep_kafka:
            started_kafka.stop()
            click.echo("local Kafka stopped (use --keep-kafka to leave it running)")


def _answers(settings) -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient(confluent_config(settings)).list_topics(timeout=3)
        return True
    except Exception:
        return False


def _format_result(r: dict, n: int) -> str:
    lat = r["timings"]["completed_at"] - r["timings"]["created_at"]
    out = r["outputs"][0] if r["outputs"] else {}
    head = ", ".join(f"{x:+.3f}" for x in out.get("vector", [])[:4])
    src = r["source"]
    return (f"{n:5d} {r['request_id'][:8]} {r['status']:<7} p{src['partition']}@{src['offset']:<6} "
               f"batch={r['batch']['size']:<3} {lat:5d} ms  [{head}, ...] dim={len(out.get('vector', []))}")


def _summary(results: list[dict], offered: int, elapsed: float, counts: dict, rate: float) -> None:
    lats = [r["timings"]["completed_at"] - r["timings"]["created_at"] for r in results]
    sizes = [r["batch"]["size"] for r in results if r["batch"]["size"]]
    click.echo("\nsummary")
    click.echo(f"  records      {len(results)} results for {offered} requests "
               f"({counts['dead_letters']} dead letters, {counts['commits']} commits)")
    click.echo(f"  throughput   {len(results) / elapsed:.1f} requests/s over {elapsed:.1f} s")
    if lats:
        click.echo(f"  latency      p50 {_percentile(lats, 50):.0f} ms, p95 {_percentile(lats, 95):.0f} ms, "
                   f"p99 {_percentile(lats, 99):.0f} ms (created -> committed result)")
        if not rate:
            click.echo("               (all requests were offered at once, so this is mostly queueing; "
                       "--rate N offers a steady load)")
    if sizes:
        click.echo(f"  batch size   mean {statistics.mean(sizes):.1f}, max {max(sizes)} "
                   f"(by request; {len(set(r['batch']['batch_id'] for r in results))} batches)")
