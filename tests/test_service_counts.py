"""The /health store counts' refresh thread ends before the interpreter does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    from scdrugmap.classify.service.background import StoreCounts

    log = open(sys.argv[1], "a")

    def query(sql):
        log.write("start\\n"); log.flush()
        time.sleep(0.3)  # a slow refresh, in progress when the script ends
        log.write("end\\n"); log.flush()
        return pd.DataFrame({"datasets": [1], "cells": [2], "embeddings": [0], "runs": [0]})

    counts = StoreCounts(query, interval_s=0.05)  # never closed: no app lifespan ran
    time.sleep(0.2)
    print(counts.counts)
    """
)


def test_an_unclosed_refresh_thread_finishes_before_exit(tmp_path: Path) -> None:
    log = tmp_path / "refresh.log"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "{'datasets': 1, 'cells': 2, 'embeddings': 0, 'runs': 0}" in res.stdout
    lines = log.read_text().split()
    # every refresh that started also finished: none was cut off inside the query at exit
    assert lines.count("start") == lines.count("end") >= 2
