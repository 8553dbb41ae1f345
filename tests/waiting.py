"""Waiting for a condition in tests: poll, never sleep-and-hope."""

import time


def wait_for(predicate, timeout: float = 120.0, what: str = "condition", period: float = 0.02) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)
