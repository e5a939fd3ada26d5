"""Progress reporting of long runs: a bar on a terminal, plain log lines otherwise."""

import io
import logging

from deploy.progress import Progress


def test_progress_logs_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="forest.progress")
    progress = Progress(3, label="build", interval_s=0.0, stream=io.StringIO())
    for ok in (True, False, True):
        progress.update(ok=ok, tokens=10)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("build: 3/3 problems") and "1 failed" in lines[-1] and "tokens/s" in lines[-1]


def test_progress_draws_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(2, label="build", stream=stream)
    progress.update(ok=True, tokens=5)
    progress.close()
    assert "build:" in stream.getvalue() and "1/2" in stream.getvalue()
