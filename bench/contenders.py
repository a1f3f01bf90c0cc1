"""Contender processes for the benchmarks that need one (peer, latency, scaling).

    python bench/contenders.py inferlog|quix --settings JSON [--echo | --sleep-ms MS [--shared-device LOCK]] [--batch N]

Each loads and warms its model, prints READY, then serves the given topics until SIGTERM. The
benchmark drives them from outside (producer, read_committed meter), so the same harness
times inferlog and its peer, each in a process of its own as it would be deployed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile

from harness import _epoch_ms, on_model_thread

from inferlog.codec import REQUEST, Codec
from inferlog.consumer.runners import Row, load_runner
from inferlog.request import Parameters
from inferlog.settings import default_model_path, load_settings


def model(echo: bool, sleep_ms: float | None = None, shared_device: str | None = None):
    if shared_device is not None:
        from echo_runner import SharedDeviceRunner

        runner = SharedDeviceRunner(sleep_ms or 2.0, shared_device)
    elif sleep_ms is not None:
        from echo_runner import SleepRunner

        runner = SleepRunner(sleep_ms)
    elif echo:
        from echo_runner import EchoRunner

        runner = EchoRunner()
    else:
        runner = load_runner(default_model_path())
    runner.warmup()
    return runner


def run_inferlog(s, runner) -> int:
    from inferlog.consumer.worker import Worker

    # BENCH_LOG=INFO shows each worker's joins, assignments, pauses and drain
    logging.basicConfig(level=os.environ.get("BENCH_LOG", "WARNING"), format="%(asctime)s %(process)d %(message)s")
    w = Worker(s, runner)
    w.install_signal_handlers()
    print("READY", flush=True)
    return w.run()


def run_quix(s, runner, batch: int, commit_s: float) -> int:
    """The same job as Quix Streams users write it: Application + StreamingDataFrame, the model
    in sdf.apply, results to a topic as JSON, Quix's own checkpointing, exactly-once."""
    from quixstreams import Application
    from quixstreams.models.serializers import Deserializer

    codec, params = Codec.from_settings(s), Parameters()

    class AvroRequest(Deserializer):  # the requests on the log are inferlog's Avro records
        def __call__(self, value, ctx):
            return codec.decode(value, expect=REQUEST)

    def embed(texts: list[str]) -> list[list[float]]:
        prepared = runner.prepare([Row(ids, params) for ids in runner.tokenize(texts)])
        return [o["vector"].tolist() for o in runner.finish(runner.run(prepared), prepared)]  # for JSON

    def result(req: dict, vector) -> dict:
        return {"request_id": req["request_id"], "created_at": _epoch_ms(req["created_at"]), "vector": vector}

    app = Application(
        broker_address=s.bootstrap_servers, consumer_group=s.group_id, auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        commit_interval=commit_s,  # 0.1 s by default (Quix's own default is 5 s: slow to answer)
        state_dir=tempfile.mkdtemp(prefix="bench-quix-state-"), auto_create_topics=True)
    src = app.topic(s.tier_topic("normal"), value_deserializer=AvroRequest())
    dst = app.topic(s.model_results_topic, value_serializer="json")
    sdf = app.dataframe(src)
    # The model runs on a thread of its own, as in the other contenders: from the main thread
    # torch's OpenMP spin-waits and a loaded 2-core box measures 2-3x slower (bench/README.md).
    if batch <= 1:
        sdf = sdf.apply(lambda req: result(req, on_model_thread(embed, req["inputs"][:1])[0]))
    else:
        # Quix's batching: a count window over one key (group_by repartitions every request to
        # it through an internal topic); the window's state lives in RocksDB + a changelog topic,
        # so buffered requests survive a crash and exactly-once holds. A window closes on count
        # only: there is no max-wait, a partial window waits for the next requests.
        def run_window(w: dict) -> list[dict]:
            reqs = w["value"]
            return [result(r, v) for r, v in zip(reqs, on_model_thread(embed, [r["inputs"][0] for r in reqs]))]

        sdf = sdf.group_by(lambda req: "all", name="one-key").tumbling_count_window(batch).collect().final()
        sdf = sdf.apply(run_window, expand=True)
    sdf.to_topic(dst)
    print("READY", flush=True)
    app.run()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["inferlog", "quix"])
    ap.add_argument("--settings", required=True, help="JSON of Settings fields (topics, group, batching)")
    ap.add_argument("--echo", action="store_true", help="the echo runner instead of the default model")
    ap.add_argument("--sleep-ms", type=float, help="the sleep runner: a device that sleeps this long per batch")
    ap.add_argument("--shared-device", metavar="LOCK_FILE",
                    help="with --sleep-ms: one device for all processes given the same lock file (batches take turns)")
    ap.add_argument("--batch", type=int, default=1, help="quix: requests per model call (count window)")
    ap.add_argument("--commit-interval", type=float, default=0.1, help="quix: seconds between checkpoints")
    args = ap.parse_args()
    s = load_settings(**json.loads(args.settings))
    runner = model(args.echo, args.sleep_ms, args.shared_device)
    if s.model_name:  # served under this name, as build_runner names it: results and the registry carry it
        runner.info = dataclasses.replace(runner.info, name=s.model_name)
    return run_inferlog(s, runner) if args.kind == "inferlog" else run_quix(s, runner, args.batch, args.commit_interval)


if __name__ == "__main__":
    sys.exit(main())
