"""Seconds from starting a command to its ``--help`` text, for every command a user types.

Each command (``python -m ddtas_lightning.<module> --help``) runs ``--repeats`` times in a fresh process;
the row gives the median and the minimum wall time, and the median as a multiple of ``python -c pass``
measured in the same run (the interpreter's own start-up on this machine, at this load). ``train`` and
``evaluate`` are Hydra apps: their ``--help`` also composes the config (conf/train.yaml, conf/eval.yaml).
What keeps it short: Lightning, timm, faiss, wandb, torchvision, matplotlib and optuna are imported where
a command needs them, not at import time (tests/test_package_layout.py checks the imports; this script
measures the time, which depends on the machine and its load, so no test asserts it).

Run: .venv/bin/python benchmarks/bench_startup.py [--repeats 3] [--only train,compare]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "evaluate", "compare", "study", "nspa_report", "data.prepare", "data.cached_features")


def wall(argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated commands (default: all)")
    args = parser.parse_args(argv)
    commands = args.only.split(",") if args.only else COMMANDS
    base = [wall([sys.executable, "-c", "pass"]) for _ in range(args.repeats)]
    base_s = statistics.median(base)
    print(f"python -c pass: {base_s:.3f} s (median of {args.repeats}); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'command':<54} {'median s':>9} {'min s':>7} {'x pass':>7}")
    for name in commands:
        times = [wall([sys.executable, "-m", f"ddtas_lightning.{name}", "--help"]) for _ in range(args.repeats)]
        med = statistics.median(times)
        print(f"{'python -m ddtas_lightning.' + name + ' --help':<54} {med:9.2f} {min(times):7.2f} "
              f"{med / base_s:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
