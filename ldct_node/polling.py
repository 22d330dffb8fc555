"""The loop the node's background threads share: the worker, the sender and housekeeping each poll
the queue, do what is due, and wait ``queue.poll_interval_s`` when nothing was.

A subclass implements ``step()``: one turn, True when it did work (then it polls again at once, so a
backlog drains without pauses), False when there was nothing to do. ``stop()`` ends the loop after
the current step; the caller joins the thread to wait for that. ``wake()`` ends a wait at once,
for another thread that just made work for this one.
"""

from __future__ import annotations

import threading


class PollingThread(threading.Thread):
    def __init__(self, name: str, poll_interval_s: float):
        # A daemon thread: a step that hangs past queue.stop_timeout_s must not keep the process alive.
        super().__init__(name=name, daemon=True)
        self.poll_interval_s = poll_interval_s
        self.stopping = threading.Event()
        self._woken = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            if not self.step():
                self._woken.wait(self.poll_interval_s)
            self._woken.clear()

    def step(self) -> bool:
        """One turn; True when it did work and the next turn should follow at once."""
        raise NotImplementedError

    def wake(self) -> None:
        self._woken.set()

    def stop(self) -> None:
        self.stopping.set()
        self._woken.set()
