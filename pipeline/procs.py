"""Stopping the child processes agentstream starts (brokers, workers) the same way everywhere."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30) -> bool:
    """SIGTERM ``proc``'s process group, SIGKILL it if it is still there after ``timeout``.

    The process must have been started with ``start_new_session=True``. Returns True if it
    stopped on SIGTERM (or had already exited), False if it had to be killed.
    """
    if proc.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False
