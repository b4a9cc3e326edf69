"""Stopping a training run on a cluster's notice: save a checkpoint at the next step, then exit.

Batch schedulers end a job with SIGTERM (SLURM at its time limit or on preemption, then SIGKILL after a grace
period; ``--signal=USR1@90`` sends SIGUSR1 ahead of time). Without a handler the run loses everything since
its last checkpoint (``run.snapshot_every`` iterations). :class:`StopSignals` records the signal; the training
loop saves at the next step's end and stops, and ``python -m advent_fast.train --resume RUN`` goes on from
there exactly as an uninterrupted run would.

Schedulers signal every process of the job, the data loaders' worker processes included: those ignore the
stop signals (:func:`ignore_stop_signals`, their ``worker_init_fn``) and are shut down by the training
process once it has saved. Dying at once they would make the loader raise before the checkpoint is written.
A worker still exits when its parent does (torch's loader workers watch it).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class TrainingStopped(Exception):
    """A stop signal ended the run; ``saved_iteration``: the iteration of the checkpoint to resume from (None:
    none was written)."""

    def __init__(self, signum: int, iteration: int, saved_iteration: Optional[int]):
        self.signum, self.iteration, self.saved_iteration = signum, iteration, saved_iteration
        where = (f"the checkpoint holds iteration {saved_iteration}" if saved_iteration is not None else
                 "no checkpoint was written")
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; {where}")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, what a process killed by it reports (143 for SIGTERM)."""
        return 128 + self.signum


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders: the training process decides when its workers stop."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopSignals:
    """While entered (on the main thread: Python runs signal handlers there), the stop signals are recorded in
    :attr:`received` instead of ending the process; the previous handlers come back on exit. Off the main thread
    it changes nothing (a stop signal acts as before)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
