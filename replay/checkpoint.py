"""A replay run's checkpoint: <state_dir>/<run_id>/checkpoint.json, with everything --resume
needs - the window, the settings that shape results, the output, progress per (topic, partition)
and the totals - written atomically (aside, fsync, rename, fsync the directory)."""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from inferlog.errors import InferlogError
from inferlog.request import now_ms

from .window import Window

VERSION = 2  # of checkpoint.json; 1: one topic, offsets keyed by partition; 2: by topic, then partition

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")


class ReplayError(InferlogError):
    """A replay that cannot start or go on; the message says what to do."""


def new_run_id() -> str:
    return time.strftime("r%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def replay_group(run_id: str) -> str:
    return f"inferlog-replay-{run_id}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write aside, fsync, rename over, fsync the directory: the old or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class Checkpoint:
    path: Path
    data: dict

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def window(self) -> Window:
        return Window.from_dict(self.data["window"])

    @property
    def output(self) -> dict:
        return self.data["output"]

    def done_offsets(self) -> dict[tuple[str, int], int]:
        """{(topic, partition): first offset not done}, as the file says (a file output's progress)."""
        return {(t, int(p)): off for t, parts in self.data["offsets"].items() for p, off in parts.items()}

    def advance(self, commits: dict, results: int, dead_letters: int) -> None:
        """Move the offsets past a commit's records, add its outputs to the totals, save."""
        for (t, p), off in commits.items():
            self.data["offsets"].setdefault(t, {})[str(p)] = off
        self.data["counts"]["results"] += results
        self.data["counts"]["dead_letters"] += dead_letters
        self.save()

    def mark_done(self) -> None:
        self.data["status"] = "done"
        self.save()

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1).encode())

    @classmethod
    def create(cls, state_dir: Path, run_id: str, **data) -> "Checkpoint":
        if not _RUN_ID.match(run_id):
            raise ReplayError(f"run id {run_id!r}: use letters, digits, '.', '_' or '-'")
        d = Path(state_dir) / run_id
        if (d / "checkpoint.json").exists():
            raise ReplayError(f"replay run {run_id!r} exists in {state_dir}; continue it with --resume {run_id}")
        d.mkdir(parents=True, exist_ok=True)
        ck = cls(d / "checkpoint.json", {"version": VERSION, "run_id": run_id, "created_at": now_ms(),
                                         "status": "running", "offsets": {}, "parts": [],
                                         "counts": {"results": 0, "dead_letters": 0}, **data})
        ck.save()
        return ck

    @classmethod
    def load(cls, state_dir: Path, run_id: str) -> "Checkpoint":
        path = Path(state_dir) / run_id / "checkpoint.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ReplayError(f"no replay run {run_id!r} in {state_dir} (set --state-dir or INFERLOG_REPLAY_DIR)") from None
        if data.get("version", 1) == 1:  # one topic: its offsets were keyed by partition alone
            topic = data["window"]["topic"]
            data["offsets"] = {topic: data["offsets"]} if data["offsets"] else {}
            data["window"] = Window.from_dict(data["window"]).to_dict()
            data["version"] = VERSION  # written so on the next save
        return cls(path, data)
