"""Failures a user can act on. The CLI prints each as one line and exits with its code; `--debug` adds the traceback."""

from __future__ import annotations

import signal


class RunError(Exception):
    """A run cannot start or go on; the message names the file or field and the fix."""

    exit_code = 2


class NonFiniteError(RunError):
    """Training produced a non-finite loss or gradient norm; nothing after the last good checkpoint was saved."""

    exit_code = 3


class Interrupted(BaseException):
    """SIGINT or SIGTERM. A BaseException, as KeyboardInterrupt is, so that no `except Exception` swallows it;
    the exit code is the shell's convention, 128 + the signal number (130, 143)."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
