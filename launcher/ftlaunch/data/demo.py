"""The bundled demo dataset: chat examples the project writes itself.

Arithmetic and string-reversal questions with exact answers, so the loss visibly
falls within a few hundred steps even on a small model. recipes/data holds the
file this generator writes; a test proves they are the same.

    python -m ftlaunch.data.demo recipes/data/demo-arithmetic.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

_WORDS = (
    "planet river candle garden window silver forest rocket pencil marble orange "
    "castle dragon summer winter harbor lantern meadow puzzle violin"
).split()

SYSTEM_PROMPT = "You are a precise assistant. Answer with the result only."


def examples(count: int = 400, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            question, answer = f"What is {a} + {b}?", f"{a} + {b} = {a + b}"
        elif kind == 1:
            a, b = rng.randint(10, 99), rng.randint(0, 9)
            question, answer = f"What is {a} - {b}?", f"{a} - {b} = {a - b}"
        elif kind == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            question, answer = f"What is {a} times {b}?", f"{a} x {b} = {a * b}"
        else:
            word = rng.choice(_WORDS)
            question, answer = f"Reverse the word '{word}'.", word[::-1]
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]
        if index % 5 == 0:  # some carry a system prompt, as real chat data does
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        rows.append({"messages": messages})
    return rows


def write(path: Path, count: int = 400, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in examples(count, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]))
