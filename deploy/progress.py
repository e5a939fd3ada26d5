"""Progress for long runs: a bar on a terminal, plain periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("forest.progress")

LOG_INTERVAL_SECONDS = 10.0  # without a terminal, a progress line at most this often


class Progress:
    def __init__(self, total: int, *, label: str, interval_s: float = LOG_INTERVAL_SECONDS, stream=None,
                 unit: str = "tree"):
        self.total, self.label, self.interval_s, self.unit = total, label, interval_s, unit
        self.stream = stream or sys.stderr
        self.done = self.failed = self.tokens = 0
        self.start = self._last = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=label, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, *, ok: bool, tokens: int) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self._rates())
        elif time.monotonic() - self._last >= self.interval_s or self.done == self.total:
            self._last = time.monotonic()
            log.info("%s: %d/%d problems, %s", self.label, self.done, self.total, self._rates())

    def _rates(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (f"{self.done / elapsed:.2f} trees/s, {self.tokens / elapsed:.0f} tokens/s, "
                f"{self.failed} failed")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
