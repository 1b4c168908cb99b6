"""SIGTERM / SIGINT handling: ask the training loop to checkpoint at the next step boundary and exit.

Clusters (slurm's preemption, `scancel`) send SIGTERM some time before killing a job; a second
signal of the same kind falls through to the default handler so a stuck run can still be stopped.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Installs handlers for ``signals``; ``requested`` turns true when one arrives.

    Use as a context manager so the previous handlers are restored. Only the main thread of the
    main interpreter can install handlers; elsewhere this object stays inert.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second signal: restore the default behaviour and re-raise it
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"received {signal.Signals(signum).name}: will checkpoint at the next step boundary and exit",
              flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
