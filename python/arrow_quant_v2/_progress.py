"""Adapting the core's progress events to the seed's ``progress_callback(message, progress)``."""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from typing import Callable, List, Optional


def format_eta(seconds: float) -> str:
    if seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class ProgressAdapter:
    """Called by the core with raw counts; calls the user's ``callback(message, progress)``.

    An exception raised by the callback is reported once (a ``RuntimeWarning``, and in the result's
    ``warnings``) and does not stop or corrupt the run; later calls go on. ``KeyboardInterrupt``
    inside the callback asks the core to stop cleanly (no partial output is left).
    """

    def __init__(self, callback: Optional[Callable[[str, float], object]], verb: str = "Quantized") -> None:
        self.callback = callback
        self.verb = verb
        self.errors: List[str] = []
        self.calls = 0

    def __call__(self, tensors_done: int, tensors_total: int, weights_done: int, weights_total: int,
                 elapsed_s: float, eta_s: float, current: str) -> bool:
        progress = weights_done / weights_total if weights_total else 1.0
        if tensors_done >= tensors_total and current == "done":
            message = f"{self.verb} {tensors_done}/{tensors_total} layers in {elapsed_s:.1f}s"
            progress = 1.0
        else:
            message = (f"{self.verb} {tensors_done}/{tensors_total} layers ({current}), "
                       f"{100 * progress:.0f}% of weights, ETA {format_eta(eta_s)}")
        return self.deliver(message, min(1.0, progress))

    def deliver(self, message: str, progress: float) -> bool:
        if self.callback is None:
            return False
        self.calls += 1
        try:
            self.callback(message, progress)
        except KeyboardInterrupt:
            return True
        except Exception as e:  # noqa: BLE001 - the user's callback may raise anything
            text = f"progress_callback raised {type(e).__name__}: {e}"
            self.errors.append(text)
            if len(self.errors) == 1:
                warnings.warn(f"{text}; the run goes on and further errors from the callback are not reported",
                              RuntimeWarning, stacklevel=2)
        return False


class TerminateAsInterrupt:
    """While a run is in progress, SIGTERM stops it as Ctrl-C does: the core stops within a
    fraction of a second and removes what it had written (or, with ``resume``, keeps its staging
    directory for the next run). Then the process ends as SIGTERM asks (the default action).

    Installed only on the main thread and only over the default disposition: a handler of the
    application's own is left alone (one that raises stops the run the same way).
    """

    def __init__(self) -> None:
        self.previous = None
        self.received = False

    def _handler(self, signum, frame) -> None:
        self.received = True
        raise KeyboardInterrupt("terminated (SIGTERM)")

    def __enter__(self) -> "TerminateAsInterrupt":
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    self.previous = signal.signal(signal.SIGTERM, self._handler)
            except (ValueError, OSError):
                self.previous = None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if self.received:
            if exc is not None:
                sys.stderr.write(f"arrow_quant_v2: terminated by SIGTERM: {exc}\n")
                sys.stderr.flush()
            signal.raise_signal(signal.SIGTERM)  # the default action: the process ends here
        return False
