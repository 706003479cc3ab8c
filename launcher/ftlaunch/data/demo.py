"""The bundled demo dataset: chat examples the project writes itself.

Arithmetic and string-reversal questions with exact answers, so the loss visibly
falls within a few hundred steps even on a small model. recipes/data holds the
file this generator writes; a test proves they are the same.

    python -m ftlaunch.data.demo recipes/data/demo-arithmetic.jsonl \
        recipes/data/demo-preference.jsonl

The second file holds preference pairs for the demo's DPO step (preference_pairs).
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


def preference_pairs(count: int = 300, seed: int = 1) -> list[dict]:
    """Preference pairs for the demo's DPO step: new questions of the same kinds (another
    seed), the correct answer chosen and a near miss rejected (off by a little, or the
    word reversed wrongly), so what DPO must learn is exactly being right."""
    rng = random.Random(seed)
    pairs = []
    for row in examples(count, seed):
        *prompt, answer = row["messages"]
        text = answer["content"]
        if " = " in text:  # arithmetic: the same working, a wrong result
            working, result = text.rsplit(" = ", 1)
            wrong = int(result) + rng.choice([-10, -2, -1, 1, 2, 10])
            rejected = f"{working} = {wrong}"
        else:  # a reversal with two neighbouring letters swapped
            i = rng.randrange(len(text) - 1)
            rejected = text[:i] + text[i + 1] + text[i] + text[i + 2:]
            if rejected == text:  # a doubled letter: swapping changes nothing
                rejected = text[::-1]
        pairs.append({"prompt": prompt,
                      "chosen": [{"role": "assistant", "content": text}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def write(path: Path, count: int = 400, seed: int = 0, pairs: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = preference_pairs(count, seed) if pairs else examples(count, seed)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]))
    if len(sys.argv) > 2:  # the demo's preference pairs
        write(Path(sys.argv[2]), count=300, seed=1, pairs=True)
