"""`ftlaunch plan --json` for every model preset on ten described hardware specs, into one
JSON file: run it before and after a refactor and compare the two files (they must be
equal: exit codes, plan JSON and refusal messages).

    .venv/bin/python bench/plan_snapshot.py before.json
    ... change the code ...
    .venv/bin/python bench/plan_snapshot.py after.json && cmp before.json after.json
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from ftlaunch.cli import main
from ftlaunch.models.presets import load_presets

HARDWARE = ("cpu", "1xRTX4090-24GB", "1xA10G-24GB", "1xL4-24GB", "1xA100-40GB", "1xH100-80GB",
            "2xRTX4090-24GB", "4xA100-40GB", "8xH100-80GB", "2x8xA100-80GB")


def snapshot() -> dict:
    plans = {}
    for preset in load_presets():
        for hardware in HARDWARE:
            out, err, code = io.StringIO(), io.StringIO(), 0
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(["plan", "--model", preset, "--hardware", hardware, "--json"])
                except SystemExit as exc:
                    code = exc.code
            plans[f"{preset} @ {hardware}"] = {"exit": code, "output": out.getvalue(),
                                               "err": err.getvalue()}
    return plans


if __name__ == "__main__":
    plans = snapshot()
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(plans, f, indent=1, sort_keys=True)
    print(f"{len(plans)} plans, {sum(p['exit'] == 0 for p in plans.values())} exit 0")
