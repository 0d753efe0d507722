"""Wall time of ``scdrugmap --help`` and of every subcommand's ``--help`` (each a fresh process).

Usage::

    python benchmarks/bench_cli_help.py [--repeat 3]

Prints the best of ``--repeat`` runs per command, slowest last (target: under 1 s each).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from scdrugmap.cli import main as group

    exe = shutil.which("scdrugmap") or "scdrugmap"
    names = ["", *sorted(group.list_commands(None))]  # type: ignore[arg-type]
    rows = []
    for name in names:
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            subprocess.run([exe, *([name] if name else []), "--help"], check=True, capture_output=True)
            best = min(best, time.perf_counter() - t)
        rows.append((best, f"scdrugmap {name} --help".replace("  ", " ")))
    for best, label in sorted(rows):
        print(f"{best:6.2f} s  {label}")


if __name__ == "__main__":
    main()
