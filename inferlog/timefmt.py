"""Time as the command lines write and read it: epoch milliseconds as ISO 8601 text, and
durations ("90s", "10m", "1.5h", "2d", "1w") as milliseconds. The clock itself is
inferlog.request.now_ms."""
from __future__ import annotations

import re
from datetime import UTC, datetime

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def iso_ms(ms: int | None) -> str:
    """Epoch ms as UTC ISO 8601 to the millisecond; "-" for None (a field not set)."""
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def parse_duration(text: str, bare: str | None = "ms") -> int:
    """Milliseconds from "250ms", "90s", "10m", "1.5h", "2d" or "1w" (case and spaces aside).
    A bare number is in the unit `bare`; with bare=None a unit is required. Raises ValueError,
    which callers turn into their own command-line error."""
    m = _DURATION.fullmatch(text.strip().lower())
    unit = m and (m[2] or bare)
    if not unit:
        raise ValueError(f"cannot read duration {text!r}: use e.g. 90s, 10m, 1h, 2d")
    return int(float(m[1]) * _UNIT_MS[unit])
