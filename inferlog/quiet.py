"""A quiet interpreter exit for inferlog's processes.

The engine freezes the heap once the model is loaded (consumer/engine.py settle_heap,
gc.freeze) so the collector's full passes skip torch, transformers and the model. Frozen
objects are also skipped by the collections the interpreter runs while it shuts down, so
the reference cycles of every module imported by then survive the exit. Triton's nanobind
extension (imported by torch._dynamo, which transformers imports) checks at exit that
its objects were freed and printed ~80 lines of "nanobind: leaked 4 instances! ...
leaked 64 types! ... leaked 514 functions!" after every command, CPU or GPU. Nothing had
leaked: the freeze kept them. Giving the frozen objects back to the collector at exit lets
the interpreter tear down as it would without the freeze, which is what nanobind expects.
"""
from __future__ import annotations

import atexit
import gc

_registered = False


def quiet_exit() -> None:
    """Unfreeze the heap at interpreter exit (idempotent). Registered early (at startup),
    it runs after the handlers registered later: the worker's, the clients' and pytest's."""
    global _registered
    if not _registered:
        _registered = True
        atexit.register(gc.unfreeze)
