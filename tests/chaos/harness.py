"""Chaos harness: worker processes to kill, a request stream to keep flowing, an exact account.

Workers are real `inferlog worker` processes (signals reach a real process, SIGKILL leaves
a real open transaction behind) serving a tiny BERT classifier, so the runs measure the
Kafka side of the worker and not the speed of a model on a shared 2-core machine.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from inferlog.producer.sync import Producer
from support import account, output_count, wait_until

WORDS = ("quick", "slow", "red", "tiny", "loud", "fox", "cat", "bird", "horse", "lazy", "happy", "dog")


def text(i: int) -> str:
    # short (the tiny model has 64 positions) and distinct per request, so per-request faults vary
    r = random.Random(i)
    return f"the {r.choice(WORDS)} {r.choice(WORDS)} jumps over the {r.choice(WORDS)} dog number {i}."


def own_topics(bootstrap: str, prefix: str):
    """Settings naming fresh topics (both tiers, results, dead letters) and a group on a broker
    of the test's own, the topics created."""
    from conftest import unique
    from inferlog.settings import load_settings
    from inferlog.topics import ensure_topics

    tag = unique(prefix)
    s = load_settings(bootstrap_servers=bootstrap, requests_topic=f"{tag}.requests",
                      high_priority_topic=f"{tag}.requests.high", results_topic=f"{tag}.results",
                      deadletter_topic=f"{tag}.deadletter", partitions=6, group_id=f"{tag}.workers")
    ensure_topics(s)
    return s


def worker_env(s, model_dir, **extra) -> dict:
    """A worker process's environment: the model of `model_dir` served under the name of the
    settings' own model, so that the test's producers (whose requests name none) reach it."""
    env = dict(os.environ)
    env.update({
        "INFERLOG_SERVED_MODEL_NAME": s.served_name,
        "INFERLOG_BOOTSTRAP_SERVERS": s.bootstrap_servers, "INFERLOG_REQUESTS_TOPIC": s.requests_topic,
        "INFERLOG_HIGH_PRIORITY_TOPIC": s.high_priority_topic,
        "INFERLOG_RESULTS_TOPIC": s.results_topic, "INFERLOG_DEADLETTER_TOPIC": s.deadletter_topic,
        "INFERLOG_GROUP_ID": s.group_id, "INFERLOG_MODEL": str(model_dir), "INFERLOG_DEVICE": "cpu",
        "INFERLOG_MAX_WAIT_MS": "10", "INFERLOG_MAX_BATCH_SIZE": "16", "INFERLOG_SESSION_TIMEOUT_MS": "6000",
        "INFERLOG_CPU_WORKERS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        # small enough that the backlog after a kill or an outage is partly held back (and
        # paused), so held records meet every fault here too
        "INFERLOG_MAX_IN_FLIGHT": "64",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Fleet:
    """Worker processes by worker id; every process ever started is kept for the final check."""

    def __init__(self, settings, model_dir, log_dir: Path, **env):
        self.s, self.model_dir, self.log_dir, self.env = settings, model_dir, Path(log_dir), env
        self.live: dict[str, subprocess.Popen] = {}
        self.all: list[tuple[str, subprocess.Popen, int | None]] = []  # (id, process, signal sent)
        self.n = 0

    def start(self, wid: str) -> subprocess.Popen:
        self.n += 1
        log = open(self.log_dir / f"{wid}.{self.n}.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "inferlog.cli", "worker", "--no-create-topics"],
                             env=worker_env(self.s, self.model_dir, INFERLOG_WORKER_ID=wid, **self.env),
                             stdout=log, stderr=subprocess.STDOUT)
        self.live[wid] = p
        self.all.append((wid, p, None))
        return p

    def signal(self, wid: str, sig: int) -> subprocess.Popen:
        p = self.live.pop(wid) if sig in (signal.SIGKILL, signal.SIGTERM) else self.live[wid]
        p.send_signal(sig)
        self.all = [(w, q, sig if q is p else s) for w, q, s in self.all]
        return p

    def start_joined(self, *wids: str, timeout: float = 120) -> None:
        """Start workers and wait until each has joined (on a loaded machine, torch alone takes seconds)."""
        for wid in wids:
            self.start(wid)
        wait_until(lambda: all(self.joined(w) for w in wids), timeout=timeout, what=f"{wids} to join")

    def joined(self, wid: str) -> bool:
        return "joined group" in self.log(self.live[wid])

    def log(self, p: subprocess.Popen) -> str:
        i = next(i for i, (_, q, _) in enumerate(self.all) if q is p)
        wid = self.all[i][0]
        return (self.log_dir / f"{wid}.{i + 1}.log").read_text(errors="replace")

    def stop_all(self, timeout: float = 90) -> None:
        """SIGTERM every live worker once it has joined; each must drain and exit 0."""
        wait_until(lambda: all(map(self.joined, self.live)), timeout=timeout, what="every worker to join")
        procs = [self.signal(w, signal.SIGTERM) for w in list(self.live)]
        for p in procs:
            code = p.wait(timeout)
            assert code == 0, f"SIGTERM'd worker exited {code}:\n{self.log(p)[-4000:]}"

    def kill_all(self) -> None:
        for _, p, _ in self.all:
            if p.poll() is None:
                p.kill()
                p.wait(10)


class Stream:
    """An open-loop producer on a thread: n classify requests at `rate` per second; with
    `high_every` k, every k-th of them high-priority (the high tier's topic)."""

    def __init__(self, settings, n: int, rate: float, start: int = 0, high_every: int = 0):
        self.s, self.n, self.rate, self.start_i, self.high_every = settings, n, rate, start, high_every
        self.ids: list[str] = []
        self.texts: dict[str, str] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.join()

    def _run(self) -> None:
        try:
            with Producer(self.s) as p:
                t0 = time.monotonic()
                for i in range(self.n):
                    lag = t0 + i / self.rate - time.monotonic()
                    if lag > 0:
                        time.sleep(lag)
                    t = text(self.start_i + i)
                    high = self.high_every and i % self.high_every == 0
                    rid = p.submit("classify", t, priority=self.s.high_priority if high else 0)
                    self.ids.append(rid)
                    self.texts[rid] = t
        except BaseException as e:  # surfaced by join()
            self.error = e

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout: float = 300) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request stream did not finish"
        if self.error is not None:
            raise self.error
        assert len(self.ids) == self.n


def wait_all_answered(s, n: int, timeout: float = 240) -> None:
    wait_until(lambda: output_count(s) >= n, timeout=timeout, every=1.0, what=f"{n} outputs")


def check_exactly_once(s, ids: list[str], fault: str, expect_dead: set[str] = frozenset(), **extra) -> dict:
    """Every produced request has exactly one committed output, at offset and request_id level;
    exactly `expect_dead` are (MODEL_ERROR) dead letters. Returns the figures for the report."""
    acc = account(s)
    acc.assert_exactly_once()
    outs = Counter([r["request_id"] for r in acc.results] + [d["request_id"] for d in acc.dead_letters])
    lost = set(ids) - set(outs)
    dupes = {k: v for k, v in outs.items() if v > 1}
    assert len(acc.requests) == len(ids), f"{len(acc.requests)} records on the topic for {len(ids)} submitted"
    assert not lost, f"{len(lost)} request ids without an output"
    assert not dupes, f"{len(dupes)} request ids answered more than once"
    assert set(outs) == set(ids), "outputs for request ids never produced"
    assert {d["request_id"] for d in acc.dead_letters} == set(expect_dead)
    assert set(acc.reasons()) <= {"MODEL_ERROR"}
    assert all(r["status"] == "OK" for r in acc.results)
    row = {"fault": fault, "produced": len(ids), "results": len(acc.results), "dead_letters": len(acc.dead_letters),
           "lost": len(lost), "duplicated": sum(v - 1 for v in dupes.values()),
           "workers": len({r["worker_id"] for r in acc.results}), **extra}
    report = os.environ.get("INFERLOG_CHAOS_REPORT")
    if report:  # one JSON line per run, for the tables in reports
        with open(report, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row
