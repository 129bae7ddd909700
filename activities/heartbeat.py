"""Heartbeats from a helper thread while a sync activity is busy in one long call
(loading a model, evaluating), so Temporal knows the worker is alive."""

from __future__ import annotations

import contextvars
import threading

from temporalio import activity


class Heartbeater:
    """`with Heartbeater(every_s, lambda: details):` heartbeats until the block ends."""

    def __init__(self, every_s: float, details=lambda: {}):
        self.every_s = every_s
        self.details = details
        self._stop = threading.Event()
        # The activity context lives in a contextvar: the thread must run inside a copy of it.
        self._ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=self._ctx.run, args=(self._loop,), daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            activity.heartbeat(self.details())

    def __enter__(self) -> "Heartbeater":
        activity.heartbeat(self.details())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
