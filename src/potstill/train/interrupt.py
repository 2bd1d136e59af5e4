"""Ctrl-C during training: finish the optimizer step in flight, write a checkpoint, then stop.

`StopRequest` is a context manager the loop holds around its steps. The first SIGINT (Ctrl-C, or `kill -INT`)
only sets `requested`; the loop sees it after the step, saves a checkpoint at that step (the same checkpoint a
`trainer.save_every` step writes, so `--resume` continues bit-identically) and raises `KeyboardInterrupt`, which
the CLI turns into one line with the `--resume` hint and exit code 130. A second SIGINT interrupts at once, as
Python's default handler does (the work since the last checkpoint is then lost). Outside the main thread, where
Python cannot install signal handlers, it does nothing and Ctrl-C keeps its default behaviour.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopRequest:
    """Turns the first SIGINT inside the `with` block into a flag the training loop polls between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        from potstill.ui import console

        console.print("[yellow]interrupt:[/] finishing this step and writing a checkpoint (Ctrl-C again to stop "
                      "at once)", soft_wrap=True, highlight=False)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
