"""How long `ftlaunch plan` takes cold, per preset (a benchmark, not a test).

Each run is a fresh process, as a user types it, so imports are included:
    .venv/bin/python bench/plan_speed.py [--repeat 5]
Prints one line per preset (median and worst wall time) and whether torch was imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

FTLAUNCH = str(Path(sys.executable).parent / "ftlaunch")
HARDWARE = {"tiny": "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from ftlaunch.models import presets as models

    probe = subprocess.run(
        [sys.executable, "-c", "import sys, ftlaunch.cli, ftlaunch.plan.job, ftlaunch.plan.planner; "
         "print('torch' in sys.modules)"], capture_output=True, text=True, check=True)
    print(f"planning path imports torch: {probe.stdout.strip()}")
    worst_overall = 0.0
    for name in models.preset_names():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([FTLAUNCH, "plan", "--model", name, "--hardware",
                            HARDWARE.get(name, "8xH100-80GB"), "--json"],
                           capture_output=True, check=False)
            times.append(time.perf_counter() - start)
        worst_overall = max(worst_overall, max(times))
        print(f"{name:<14} median {statistics.median(times) * 1000:6.0f} ms   "
              f"worst {max(times) * 1000:6.0f} ms")
    print(f"worst of all: {worst_overall * 1000:.0f} ms")


if __name__ == "__main__":
    main()
