"""What the emitter's start-up sweep costs: seconds from a new TransactionalEmitter to ready,
with the sweep (init_transactions, then read the open records, abort one empty transaction
over every output partition and the group's offsets) and without it (init_transactions only),
on a healthy broker, for output topics of a few partition counts. Printed and saved as JSON.

    .venv/bin/python bench/sweep_bench.py [--bootstrap-servers HOST:PORT] [--repeat 7]

Without --bootstrap-servers a throwaway local Kafka is started and removed afterwards. Each
figure is the median of `repeat` emitters under one worker id (each fences the one before).
"""
from __future__ import annotations

import argparse
import statistics
import time

from confluent_kafka import Consumer, Producer

from harness import broker, fresh_settings, save
from inferlog.clients import confluent_config
from inferlog.consumer.emit import TransactionalEmitter


def timed(make, repeat: int) -> float:
    make()  # not timed: the first finds the coordinator of a new transactional id loading
    took = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        make()
        took.append(time.perf_counter() - t0)
    return statistics.median(took)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap-servers", default=None)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--partitions", type=int, nargs="+", default=[6, 24, 48])
    a = ap.parse_args()
    rows = []
    with broker(a.bootstrap_servers) as base:
        for parts in a.partitions:
            s = fresh_settings(base, f"sweep{parts}", partitions=parts, worker_id="w0")
            consumer = Consumer(confluent_config(s, **{"group.id": s.worker_group, "enable.auto.commit": False}))
            txn = {"transactional.id": f"inferlog-{s.worker_group}-{s.worker_id}"}
            init_only = timed(lambda: Producer(confluent_config(s, **txn)).init_transactions(30), a.repeat)
            with_sweep = timed(lambda: TransactionalEmitter(s, consumer), a.repeat)
            consumer.close()
            rows.append({"partitions": parts, "output_partitions": 2 * parts, "init_only_s": round(init_only, 3),
                         "init_and_sweep_s": round(with_sweep, 3), "sweep_s": round(with_sweep - init_only, 3)})
            print(f"{parts:>4} partitions per output topic: init_transactions {init_only * 1000:7.0f} ms, "
                  f"with the sweep {with_sweep * 1000:7.0f} ms (sweep {1000 * (with_sweep - init_only):+.0f} ms)")
    path = save({"bench": "sweep", "repeat": a.repeat, "rows": rows}, "sweep.json")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
