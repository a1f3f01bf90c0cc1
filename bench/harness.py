"""Pieces the benchmark scripts share: the broker, fresh topics, producing, reading results,
machine facts, contender processes and plots. Nothing here times anything by itself."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default model ships with its weights

from confluent_kafka import OFFSET_END, Consumer, Producer as KafkaProducer, TopicPartition
from confluent_kafka.admin import AdminClient

from inferlog.clients import confluent_config
from inferlog.codec import RESULT, Codec
from inferlog.localkafka import LocalKafka
from inferlog.producer.sync import Producer, RequestEncoder
from inferlog.settings import load_settings
from inferlog.topics import ensure_topics

ROOT = Path(__file__).resolve().parent.parent
# run_all.py --quick points this elsewhere, so a short run never overwrites the full figures
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "bench" / "results"))
PARTITIONS = 6
# The worker calls the model from its own device thread. torch's libgomp counts the OpenMP
# teams of all threads: with more busy threads than cores it stops spin-waiting, without it
# spins, which on a shared, loaded machine costs about 3x CPU per request. So offline and
# naive call the model from a thread of their own too, not from the main thread.
MODEL_THREAD = ThreadPoolExecutor(1, thread_name_prefix="bench-model")


def on_model_thread(fn, *args):
    return MODEL_THREAD.submit(fn, *args).result()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def broker(bootstrap_servers: str | None):
    """Base settings on `bootstrap_servers`, or on a throwaway LocalKafka removed afterwards."""
    if bootstrap_servers:
        yield load_settings(bootstrap_servers=bootstrap_servers)
        return
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="inferlog-bench-kafka-")
    base = load_settings(bootstrap_servers=f"127.0.0.1:{port}", kafka_home=ROOT / ".kafka")
    lk = LocalKafka.from_settings(base, port=port, controller_port=free_port(), data_dir=Path(tmp))
    lk.fetch()
    print(f"starting a throwaway Kafka {lk.version} on {lk.bootstrap} (data in {tmp}) ...", flush=True)
    lk.start()
    try:
        yield base
    finally:
        lk.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_settings(base, name: str, partitions: int = PARTITIONS, **overrides):
    """Own topics and group per contender: no run reads another's offsets or results."""
    tag = f"bench.{name}.{uuid.uuid4().hex[:8]}"
    s = base.with_overrides(requests_topic=f"{tag}.requests", results_topic=f"{tag}.results",
                            high_priority_topic=f"{tag}.requests.high", deadletter_topic=f"{tag}.deadletter",
                            group_id=f"{tag}.group", partitions=partitions, **overrides)
    ensure_topics(s, partitions=partitions)
    return s


def produce_requests(settings, texts: list[str]) -> None:
    """Through the SDK: created_at is the moment of each submit."""
    with Producer(settings) as prod:
        for t in texts:
            prod.submit("embed", t, metadata={"source": "bench"})


def blast(settings, texts: list[str]) -> float:
    """The same records as produce_requests, encoded first and then sent as fast as the client
    goes, so a backlog appears within a fraction of a second. Returns the seconds it took."""
    enc = RequestEncoder(settings)
    return send_all(settings, [enc.envelope("embed", t, metadata={"source": "bench"}) for t in texts])


def send_all(settings, envs) -> float:
    """Encoded requests (envelopes), sent as fast as the client goes; returns the seconds it took."""
    p = KafkaProducer(confluent_config(settings, **{"linger.ms": 5, "compression.type": "lz4",
                                                    "partitioner": "murmur2_random"}))
    t0 = time.perf_counter()
    for e in envs:
        while True:
            try:
                p.produce(e.topic, e.value, e.key, headers=e.headers)
                break
            except BufferError:
                p.poll(0.01)
    if p.flush(60):
        raise RuntimeError("backlog not delivered")
    return time.perf_counter() - t0


def _epoch_ms(v) -> float:
    return v.timestamp() * 1000 if isinstance(v, datetime.datetime) else float(v)


def avro_created_at(codec: Codec):
    return lambda value: _epoch_ms(codec.decode(value, expect=RESULT)["timings"]["created_at"])


def read_results(settings, codec: Codec, timeout: float = 60) -> list[dict]:
    """Every committed result (read_committed), to check the count the timing relied on."""
    return read_committed(settings, settings.model_results_topic, lambda v: codec.decode(v, expect=RESULT), timeout)


def read_committed(settings, topic: str, decode, timeout: float = 60) -> list:
    """decode(value) of every committed record of `topic` (read_committed, to its end now)."""
    c = Consumer(confluent_config(settings, **{"group.id": f"{topic}.reader", "isolation.level": "read_committed",
                                               "enable.auto.commit": False}))
    try:
        ends = {}
        for p in c.list_topics(topic, timeout=10).topics[topic].partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        out, deadline = [], time.monotonic() + timeout
        # the end offset may be a transaction marker, never delivered: stop on positions
        while any(c.position([TopicPartition(topic, p)])[0].offset < e for p, e in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took over {timeout}s")
            out += [decode(m.value()) for m in c.consume(1000, 0.2) if m.error() is None]
        return out
    finally:
        c.close()


class ResultMeter:
    """Reads a results topic read_committed from its current end and stamps each record with its
    arrival (epoch ms): a result is committed when such a reader can see it. With `created_at`
    (value -> epoch ms) it also records end-to-end latency. Contender-agnostic: the same meter
    times inferlog and its peers."""

    def __init__(self, settings, topic: str, created_at=None, keep: bool = False, fetch_wait_ms: int = 10,
                 keep_keys: bool = False):
        self.created_at = created_at
        self.arrivals: list[float] = []
        # keep=True: each record's value too (values[i] arrived at arrivals[i]), to decode after
        # the run rather than spend the shared cores on it while the contenders are timed
        self.values: list[bytes] | None = [] if keep else None
        # keep_keys=True: each record's key too (keys[i] arrived at arrivals[i]), appended last, so
        # keys[:n] always has its arrivals and values
        self.keys: list[bytes] | None = [] if keep_keys else None
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self.c = Consumer(confluent_config(settings, **{
            "group.id": f"bench-meter-{uuid.uuid4().hex}", "isolation.level": "read_committed",
            # 10 ms stamps arrivals closely, but an idle reader costs the broker ~0.3 cores on these
            # 2 (~0.1 at 100 ms); a meter that needs no close stamps may wait longer
            "enable.auto.commit": False, "fetch.wait.max.ms": fetch_wait_ms}))
        parts = self.c.list_topics(topic, timeout=10).topics[topic].partitions
        # the end, resolved on the first fetch: start the meter before anything is produced
        self.c.assign([TopicPartition(topic, p, OFFSET_END) for p in parts])
        self._t = threading.Thread(target=self._run, name="bench-meter", daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            # consume(n, t) returns when it has n messages or t passed: stamping a batch from it
            # added up to t to every latency. poll() returns on the first; then what is queued.
            first = self.c.poll(0.05)
            if first is None:
                continue
            msgs = [first, *self.c.consume(1000, 0)]
            now = time.time() * 1000
            for m in msgs:
                if m.error() is None:
                    self.arrivals.append(now)
                    if self.values is not None:
                        self.values.append(m.value())
                    if self.keys is not None:
                        self.keys.append(m.key())
                    if self.created_at is not None:
                        self.latencies.append(now - self.created_at(m.value()))

    @property
    def count(self) -> int:
        return len(self.arrivals)

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.count >= n

    def mark(self) -> int:
        return self.count

    def rate(self, since: int = 0) -> float:
        """Results per second between the first and the last arrival after `since`: the drain
        rate, free of group-join and start-up time (which differ between contenders)."""
        a = self.arrivals[since:]
        return (len(a) - 1) / ((a[-1] - a[0]) / 1000) if len(a) > 1 and a[-1] > a[0] else float("nan")

    def close(self):
        self._stop.set()
        self._t.join(5)
        self.c.close()


@contextlib.contextmanager
def serving(settings, runner, timeout: float = 120, **worker_kw):
    """A Worker on a thread of this process, assigned on entry (its run() warms the model),
    stopped (drained, committed) and joined on exit."""
    from inferlog.consumer.worker import Worker

    w = Worker(settings, runner, **worker_kw)
    th = threading.Thread(target=w.run, name="bench-worker", daemon=True)
    th.start()
    if not w.ready.wait(timeout):
        raise RuntimeError(f"the worker got no partitions within {timeout:g} s")
    try:
        yield w
    finally:
        w.stop()
        th.join(300)


def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def wait_group(settings, group: str, members: int, timeout: float = 90) -> None:
    """Until the group is Stable with `members` members that hold all partitions between them."""
    admin = AdminClient(confluent_config(settings))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            d = admin.describe_consumer_groups([group])[group].result(10)
            held = sum(len(m.assignment.topic_partitions) for m in d.members if m.assignment)
            if str(d.state).upper().endswith("STABLE") and len(d.members) == members and held > 0:
                return
        except Exception:  # the group does not exist until its first member joins
            pass
        time.sleep(0.2)
    raise TimeoutError(f"group {group} not stable with {members} members in {timeout}s")


CHILD_FIELDS = ("bootstrap_servers", "requests_topic", "results_topic", "high_priority_topic", "deadletter_topic",
                "group_id", "max_batch_size", "max_wait_ms", "delivery", "partitions", "commit_interval_ms",
                "max_in_flight", "pipeline_depth", "cpu_workers",
                # the served name picks the model's request topics and group (topic_layout per-model)
                "model_name", "topic_layout")


def spawn(kind: str, settings, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """A contender process (bench/contenders.py) on `settings`' topics; returns once its model
    is warm (it prints READY)."""
    conf = json.dumps({k: getattr(settings, k) for k in CHILD_FIELDS})
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "contenders.py"), kind, "--settings", conf, *extra],
                         cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    for line in p.stdout:
        if line.strip() == "READY":
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()  # keep the pipe drained
            return p
    raise RuntimeError(f"contender {kind} exited with {p.wait()} before it was ready")


def stop(p: subprocess.Popen, timeout: float = 30) -> None:
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def machine_facts(argv: list[str]) -> dict:
    import torch

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv]),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "platform": platform.platform(), "loadavg_start": os.getloadavg(),
            # others edit the worker concurrently: the figures belong to this tree
            "git": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip()}


def rates(n: int, wall: float, cpu: float) -> dict:
    # The machine may be shared: CPU seconds per request (this process, all threads; the
    # broker not included) is steadier than the wall clock when others load the cores.
    return {"seconds": wall, "per_s": n / wall, "cpu_ms_per_request": cpu * 1000 / n, "loadavg_1m": os.getloadavg()[0]}


def best_of(runs: dict[str, list[dict]], key: str = "per_s") -> dict[str, dict]:
    """Rounds interleave the contenders, so load from other work falls on all of them alike;
    each figure is the best round (the least disturbed one), with every round kept."""
    return {k: {**max(v, key=lambda r: r[key]), f"{key}_rounds": [round(r[key], 1) for r in v]} for k, v in runs.items()}


def save(report: dict, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def plot_bars(path: Path, title: str, labels: list[str], values: list[float], ylabel: str, note: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(labels))])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="0.3")
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
