"""Replay: run a window of the request log through the worker's engine again.

A run is bounded (the window's end offsets are snapshotted when it starts), reads by
manual assignment (no consumer group of the live workers moves) and is resumable from a
checkpoint, without reprocessing or skipping a record. This module is the run's life (start,
resume, join, the loop, the summary); its parts are the checkpoint (checkpoint.py), the sinks
(sinks.py: a topic, each commit one transaction of the worker's emitter whose committed
offsets are the checkpoint; or a file, part files and the checkpoint JSON, merged at the end)
and, for a run shared by several processes, its group membership (shared.py). Commits go
through the worker's Committer, give-up on revocation through its membership path, and
back-pressure through its FlowControl (consumer/flow.py): per tier, held records, paused tiers.

Every run keeps <state_dir>/<run_id>/checkpoint.json with everything --resume needs: the
window (by default both tiers' request topics), the settings that shape results (model,
batching, limits) and the output. Progress is kept per (topic, partition).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import TopicPartition

from inferlog.clients import group_protocol_config
from inferlog.codec import Codec
from inferlog.committed import committed_offsets, group_reader, last_committed
from inferlog.consumer.committer import Committer
from inferlog.consumer.engine import Engine, start_up
from inferlog.consumer.flow import FlowControl, steer
from inferlog.errors import FatalError, OffsetsUnreadable
from inferlog.settings import default_model_path
from inferlog.topics import ensure_topics

from .checkpoint import VERSION, Checkpoint, ReplayError, new_run_id, replay_group
from .shared import GroupReader, MemberTally, publish_definition, read_run, run_totals
from .sinks import FileSink, TopicSink
from .window import Window, WindowReader, window_consumer

log = logging.getLogger(__name__)

# settings that change what a replayed result says: stored in the checkpoint, restored on resume
SHAPING = ("model", "model_name", "task", "device", "dtype", "max_batch_size", "max_batch_tokens", "max_wait_ms",
           "max_inputs", "max_input_bytes", "max_input_tokens", "max_new_tokens_limit", "default_max_new_tokens",
           "framing", "requests_topic", "high_priority_topic", "results_topic", "cpu_workers", "max_in_flight",
           "pipeline_depth")
FILE_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}


# -- the run -----------------------------------------------------------------------------------
@dataclass
class Summary:
    run_id: str
    status: str  # done | interrupted
    records: int  # offsets covered by commits in this invocation
    results: int  # of this invocation
    dead_letters: int
    seconds: float
    output: dict
    checkpoint: str
    model: str = ""
    counts: dict = field(default_factory=dict)  # the whole run's results and dead letters
    done: int = 0  # the whole run's records done so far, of `total`
    total: int = 0
    topics: dict = field(default_factory=dict)  # {topic: (done, total)}: every topic the window covers
    member: str = ""  # a shared run's member: "this run" below is this member's share

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """What the CLI says at the end: the whole run, then this invocation."""
        c = self.counts
        where = self.output.get("path") or self.output.get("topic")
        topics = ", ".join(f"{t} {d:,}/{n:,}" for t, (d, n) in self.topics.items())
        text = (f"replay {self.run_id} {self.status}: {self.done:,} of {self.total:,} records, "
                f"{c.get('results', 0):,} results, {c.get('dead_letters', 0):,} dead letters in all -> {where}; "
                f"from {topics}; "
                f"{f'this member ({self.member})' if self.member else 'this run'} {self.records:,} records "
                f"in {self.seconds:.1f} s ({self.rate:.1f} rec/s)")
        if self.status != "done" and self.output.get("kind") == "file":
            text += "; the file is written when the run completes"
        return text


def topic_progress(window: Window, done_to: dict[tuple[str, int], int]) -> dict[str, tuple[int, int]]:
    """{topic: (records done, records in the window)} for every topic of the window, in its order."""
    out = dict.fromkeys(window.topics, (0, 0))
    for r in window.ranges:
        d, n = out[r.topic]
        out[r.topic] = (d + r.done(done_to.get(r.tp)), n + r.size)
    return out


def records_done(ck: Checkpoint, done_to: dict[tuple[str, int], int]) -> int:
    """Records of the run's window before `done_to` {(topic, partition): offset}."""
    return sum(d for d, _ in topic_progress(ck.window, done_to).values())


def output_spec(out: str | None, to_topic: str | None, deadletter_topic: str | None) -> dict:
    if bool(out) == bool(to_topic):
        raise ReplayError("give exactly one of --out FILE(.parquet|.jsonl) and --to-topic NAME")
    if to_topic:
        return {"kind": "topic", "topic": to_topic, "deadletter_topic": deadletter_topic or f"{to_topic}.deadletter"}
    fmt = FILE_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise ReplayError(f"--out {out}: the name must end in .parquet or .jsonl")
    return {"kind": "file", "path": str(Path(out).resolve()), "format": fmt}


SHARED_NEEDS_TOPIC = "--shared and --join need --to-topic: a file output cannot be shared by hosts"


def run_settings(settings, ck: Checkpoint):
    """The settings a run's engine uses: the stored shaping settings, and its outputs. A
    shared run's members have worker ids (and so transactional ids) of their own; a member
    restarted with its old INFERLOG_WORKER_ID fences its predecessor at once."""
    member = f"-{settings.worker_id}" if ck.data.get("shared") else ""
    s = settings.with_overrides(**ck.data["settings"], worker_id=f"replay-{ck.run_id}{member}")
    o = ck.output
    if o["kind"] == "topic":
        s = s.with_overrides(results_topic=o["topic"], deadletter_topic=o["deadletter_topic"],
                             group_id=replay_group(ck.run_id))
    return s


def start(settings, window: Window, output: dict, *, run_id: str | None = None, runner=None,
          state_dir: Path | None = None, force: bool = False, shared: bool = False, join: bool = True,
          **kw) -> Summary:
    """Start a new run over `window`. Checks everything that can be checked before a
    single byte is written: an empty window, an existing run or output file, the model.
    `shared`: publish the run for members on any host (`join`: this process is one)."""
    run_id = run_id or new_run_id()
    if shared and output["kind"] != "topic":
        raise ReplayError(SHARED_NEEDS_TOPIC)
    state_dir = Path(state_dir or settings.replay_dir)
    if window.total == 0:
        raise ReplayError(f"the window is empty: no records of {', '.join(window.topics)} in it ({window.spec()})")
    if (state_dir / run_id / "checkpoint.json").exists():
        raise ReplayError(f"replay run {run_id!r} exists in {state_dir}; continue it with --resume {run_id}")
    if output["kind"] == "file" and Path(output["path"]).exists() and not force:
        raise ReplayError(f"{output['path']} exists; remove it or pass --force")
    if runner is None:
        from inferlog.consumer.runners import build_runner

        runner = build_runner(settings)  # ConfigError for an unknown model: nothing written yet
    shaping = {k: getattr(settings, k) for k in SHAPING}
    if output["kind"] == "topic":
        ensure_topics(settings, [output["topic"], output["deadletter_topic"]])
    data = dict(window=window.to_dict(), settings=shaping, output=output, model_name=runner.info.name)
    if shared:
        if shaping["model"] == default_model_path():  # the embedded model lives elsewhere on each host
            shaping["model"] = None
        data["shared"] = True
        publish_definition(settings, run_id, data)
    ck = Checkpoint.create(state_dir, run_id, **data)
    if shared and not join:
        return _summary(settings, ck, "defined", 0, ck.data["counts"], 0.0, {}, runner)
    return execute(settings, ck, runner, **kw)


def load_run(settings, run_id: str, state_dir: Path | None = None, host: dict | None = None) -> Checkpoint:
    """A run's checkpoint: the local file, or a shared run's definition from Kafka (cached in
    the state dir), so that any host can join or resume it. `host`: settings that may differ
    per member (a local copy of the model, the device); the model's name is still checked."""
    state_dir = Path(state_dir or settings.replay_dir)
    local = Checkpoint.load(state_dir, run_id) if (state_dir / run_id / "checkpoint.json").exists() else None
    if local is not None and not local.data.get("shared"):
        return local
    definition = read_run(settings, run_id)[0]
    if definition is None:
        if local is not None:
            return local
        raise ReplayError(f"no replay run {run_id!r} in {state_dir} (set --state-dir or INFERLOG_REPLAY_DIR) "
                          f"nor on {settings.replays_topic} at {settings.bootstrap_servers}")
    # this member's totals are read from Kafka when it joins (execute)
    data = {"version": VERSION, "status": local.data["status"] if local else "running", "offsets": {}, "parts": [],
            "counts": {"results": 0, "dead_letters": 0}, **definition}
    data["settings"] = {**data["settings"], **{k: v for k, v in (host or {}).items() if v is not None}}
    (state_dir / run_id).mkdir(parents=True, exist_ok=True)
    ck = Checkpoint(state_dir / run_id / "checkpoint.json", data)
    ck.save()
    return ck


def resume(settings, run_id: str, *, runner=None, state_dir: Path | None = None, host: dict | None = None,
           **kw) -> Summary:
    """Go on with a run (a shared one as a member); the model is loaded only when records are left."""
    return execute(settings, load_run(settings, run_id, state_dir, host), runner, **kw)


def join(settings, run_id: str, *, runner=None, state_dir: Path | None = None, host: dict | None = None,
         **kw) -> Summary:
    """Take part in a shared run, from any host."""
    ck = load_run(settings, run_id, state_dir, host)
    if not ck.data.get("shared"):
        raise ReplayError(f"run {run_id} is not shared (it was started without --shared); "
                          f"continue it with --resume {run_id} where it ran")
    return execute(settings, ck, runner, **kw)


def execute(settings, ck: Checkpoint, runner=None, *, progress: bool = False, stop: threading.Event | None = None,
            stop_after: int | None = None, checkpoint_s: float | None = None) -> Summary:
    """Run (or go on with) a checkpointed replay until its window is done or it is stopped.

    `stop` set: stop fetching and batching, let the batches on the device finish, commit
    what is finished, return "interrupted" (within seconds, whatever max_in_flight is).
    `stop_after`: return right after the first commit that brings this invocation past
    that many records, leaving the rest unfinished, as a crash would (for tests).
    A failed device raises ReplayError after committing what finished: the run resumes."""

    s = run_settings(settings, ck)
    window, o = ck.window, ck.output
    shared = bool(ck.data.get("shared"))
    # topic output: the reader's consumer carries the run's group, whose offsets the
    # emitter commits inside each transaction; file output: a throwaway group, never used.
    # A shared run's members join that group as the live workers join theirs.
    conf = {"group.id": replay_group(ck.run_id)} if o["kind"] == "topic" else {}
    if shared:  # its members start where the group committed (GroupReader), never from a policy
        conf.update(group_protocol_config(s), **{"auto.offset.reset": "error"})
    consumer = window_consumer(s, **conf)
    engine = sink = reader = offsets_reader = None
    try:
        if o["kind"] == "topic":  # first: fencing a crashed predecessor settles the offsets read next
            tally = None
            if shared:
                tally = MemberTally(s, ck.run_id, settings.worker_id)
            sink = TopicSink(s, consumer, ck, tally=tally)
            if tally is not None:
                ck.data["counts"] = tally.committed()
        # a shared run's members commit transactions back to back: a stable read of every
        # partition at once waited minutes for a third member here; where this member starts a
        # partition is read stable when it is assigned (GroupReader)
        if shared:
            offsets_reader = group_reader(s, replay_group(ck.run_id))
        done_to = _done_offsets(consumer, ck, offsets_reader)
        todo = window.rest(done_to)
        if ck.data["status"] == "done" or todo.total == 0:  # nothing left: no model to load
            if ck.data["status"] != "done":
                (FileSink(ck, Codec.from_settings(s)).finish() if o["kind"] == "file" else ck.mark_done())
            return _summary(settings, ck, "done", 0, {"results": 0, "dead_letters": 0}, 0.0, done_to, runner)
        if runner is None:
            from inferlog.consumer.runners import build_runner

            runner = build_runner(s)
        if runner.info.name != ck.data.get("model_name", runner.info.name):
            raise ReplayError(f"run {ck.run_id} used model {ck.data['model_name']!r}, not {runner.info.name!r}")
        # A request that named the live model is replayed with the chosen one: that is the point
        # of a replay, so the decoder must not dead-letter it as UNKNOWN_MODEL.
        engine = Engine(s, runner, replay_run_id=ck.run_id, any_model=True, honor_deadlines=False)
        if sink is None:
            sink = FileSink(ck, engine.codec)
        else:  # an output the producer refuses for good becomes its dead letter
            sink.emitter.fallback = engine.builder.unwritable
        start_up(s, runner)
        tally = Progress({r.tp: r.start for r in todo.ranges})
        every = checkpoint_s if checkpoint_s is not None else (
            max(0.1, s.commit_interval_ms / 1000.0) if o["kind"] == "topic" else 2.0)
        # the worker's back-pressure (consumer/flow.py): per tier, what has no room is held
        flow = FlowControl(s, tier_pending(s, engine, todo.topics))
        # the worker's commit path (consumer/committer.py), each commit on this thread; an
        # aborted transaction is the sink's ReplayError (resume), never a rewind
        committer = Committer(s, consumer, engine, sink, engine.metrics, on_rewind=flow.drop,
                              on_commit=tally.committed, interval=every, inline=True)
        if shared:  # the group assigns the partitions; each starts where the group committed
            reader = GroupReader(window, consumer, engine, committer, flow, tally, offsets_reader)
        else:
            reader = WindowReader(s, todo, consumer=consumer)
            for r in todo.ranges:
                engine.assign(r.tp)
        status, seconds = _loop(engine, reader, flow, committer, tally, window, todo, stop or threading.Event(),
                                stop_after, progress, ck.run_id)
        if status == "done":
            sink.finish()
        # a shared run's progress is the group's, all members together
        done_to = _done_offsets(consumer, ck) if shared else {**done_to, **tally.position}
    finally:
        if reader is not None:
            reader.close()
        if engine is not None:
            engine.close()
        if sink is not None:
            sink.close()
        if offsets_reader is not None:
            offsets_reader.close()
        consumer.close()
    return _summary(settings, ck, status, tally.records, engine.counts, seconds, done_to, runner,
                    member=settings.worker_id if shared else "")


def _done_offsets(consumer, ck: Checkpoint, offsets_reader=None) -> dict[tuple[str, int], int]:
    """Where each (topic, partition) of the window is done to: the run group's committed
    offsets (topic output: they went in its transactions) or the checkpoint file's. With an
    `offsets_reader` (a group_reader), the last committed ones, not waiting for open transactions."""
    if ck.output["kind"] == "file":
        return ck.done_offsets()
    tps = [TopicPartition(r.topic, r.partition) for r in ck.window.ranges]
    got = (last_committed(offsets_reader, tps, patience=120.0) if offsets_reader is not None
           else committed_offsets(consumer, tps))
    return {(tp.topic, tp.partition): tp.offset for tp in got if tp.offset >= 0}


def _summary(settings, ck: Checkpoint, status, records, counts, seconds, done_to, runner,
             member: str = "") -> Summary:
    w = ck.window
    if ck.data.get("shared") and status != "defined":
        totals = run_totals(settings, ck.run_id)  # every member's, not only this one's
    else:
        totals = dict(ck.data["counts"])
    return Summary(ck.run_id, status, records, counts["results"], counts["dead_letters"], seconds, ck.output,
                   str(ck.path), runner.info.name if runner is not None else ck.data.get("model_name", ""),
                   totals, records_done(ck, done_to), w.total, topic_progress(w, done_to), member)


class Progress:
    """What this invocation's commits covered: `position` {(topic, partition): first offset not
    committed by it}, the records, and the progress bar (on a terminal)."""

    def __init__(self, position: dict):
        self.position = position
        self.records = 0
        self.bar = None

    def committed(self, _outputs, commits: dict) -> None:
        n = sum(off - self.position[tp] for tp, off in commits.items())
        self.position.update(commits)
        self.records += n
        if self.bar is not None:
            self.bar.update(n)


def tier_pending(s, engine, topics):
    """FlowControl's pending_in for a window of any `topics`: the records of a tier in the
    engine, where every topic but a high tier's is the normal tier's (as the engine batches it)."""
    high = [t for t in topics if s.tier_of(t) == "high"]

    def pending_in(tier: str) -> int:
        n = sum(engine.pending_in(t) for t in high)
        return n if tier == "high" else engine.pending - n

    return pending_in


def _loop(engine, reader, flow: FlowControl, committer: Committer, tally: Progress, window: Window, todo: Window,
          stop, stop_after, progress, run_id):
    """The driver, as the worker's loop: each turn applies back-pressure to the reader's
    partitions, fetches through `flow` (per tier: what has no room is held, in order, and handed
    over as room appears), runs the engine's turn and commits. Done when the window is read,
    nothing is held and the engine is drained (and, for a group member, the group's commits
    cover the window)."""
    if progress:
        from tqdm import tqdm

        tally.bar = tqdm(total=window.total, initial=window.total - todo.total, unit="rec", desc=f"replay {run_id}",
                         dynamic_ncols=True, smoothing=0.1)
    t0 = time.monotonic()
    member = getattr(reader, "member", False)  # a group member polls on, for its rebalances
    ending = False
    state = engine.state()  # as of the end of the last turn

    def fetch(timeout: float):
        if member or not ending:
            if msgs := reader.poll(timeout):
                yield flow.take(msgs)
        elif state.busy:
            time.sleep(min(0.005, timeout))  # all is read: the pools work
        yield from flow.hand_over()  # after the fetched ones are in: a generator, as the worker's

    try:
        while True:
            stopping = stop.is_set()
            if stopping:
                # nothing new starts: queued records are left for --resume, the batches already
                # on the device finish and what is finished in order is committed
                engine.collect()
                engine.drop_queued()
                if not engine.state().running:
                    committer.step(force=True)
                    return "interrupted", time.monotonic() - t0
                time.sleep(0.005)
                continue
            ending = reader.done()
            steer(flow, reader.consumer, reader.reading(), stopping=False)  # the worker's back-pressure
            try:
                engine.turn(fetch, flush=ending)  # the worker's turn (consumer/engine.py)
            except (FatalError, OffsetsUnreadable) as e:
                if isinstance(e, FatalError):  # keep what finished, then stop: the run resumes on a healthy device
                    engine.collect()  # (unreadable offsets: the coordinator is away, a commit would wait for it too)
                    committer.step(force=True)
                raise ReplayError(f"{e}; {tally.records} records of this run are checkpointed; "
                                  f"continue with --resume {run_id}") from e
            # at the end, commit as soon as all that was fetched is answered; else at the cadence
            committer.step(force=ending and engine.all_ready())
            if stop_after is not None and tally.records >= stop_after:
                return "interrupted", time.monotonic() - t0
            state = engine.state()
            if ending and not flow.holding and state.drained and (not member or reader.finished()):
                return "done", time.monotonic() - t0
    finally:
        if tally.bar is not None:
            tally.bar.close()
