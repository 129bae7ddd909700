"""The demo dataset: small templated tasks a tiny random-weight model can learn in minutes.

The same seed always writes the same bytes, so demo runs and tests are reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLORS = {"red": "rouge", "blue": "bleu", "green": "vert", "black": "noir", "white": "blanc", "yellow": "jaune"}
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima"}
ANIMALS = ["cat", "dog", "cow", "fox", "owl", "bee", "pig", "hen"]
GREETINGS = {"Say hello politely.": "Hello, it is nice to meet you.", "Say goodbye politely.": "Goodbye, have a nice day."}
SYSTEM = "You are a concise assistant."


def _rows(rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        kind = rng.randrange(5)
        if kind == 0:
            c = rng.choice(sorted(COLORS))
            out.append({"instruction": "Translate the color to French.", "input": c, "output": COLORS[c]})
        elif kind == 1:
            country = rng.choice(sorted(CAPITALS))
            out.append({"instruction": f"What is the capital of {country}?", "input": "", "output": f"{CAPITALS[country]}."})
        elif kind == 2:
            a, b = rng.randrange(10), rng.randrange(10)
            out.append({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)})
        elif kind == 3:
            animal = rng.choice(ANIMALS)
            out.append({"instruction": "Write the animal in uppercase.", "input": animal, "output": animal.upper()})
        else:
            q = rng.choice(sorted(GREETINGS))
            out.append({"instruction": q, "input": "", "output": GREETINGS[q]})
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_demo_dataset(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """Instruction-shape JSONL ({"instruction", "input", "output"} per line)."""
    return _write(path, _rows(rows, seed))


def write_demo_chat_dataset(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """The same content in the chat shape ({"messages": [...]}), every third row with a system message."""
    out = []
    for i, r in enumerate(_rows(rows, seed)):
        user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        out.append({"messages": messages})
    return _write(path, out)


def write_demo_completion_dataset(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """The same content in the completion shape ({"prompt", "completion"})."""
    out = []
    for r in _rows(rows, seed):
        prompt = r["instruction"] + (f" {r['input']}" if r["input"] else "") + "\nAnswer: "
        out.append({"prompt": prompt, "completion": r["output"]})
    return _write(path, out)


def demo_texts(rows: int = 400, seed: int = 0) -> list[str]:
    """Plain strings for training the tiny model's tokenizer."""
    texts = [SYSTEM, "Answer:"]
    for r in _rows(rows, seed):
        texts += [r["instruction"], r["input"], r["output"]]
    return [t for t in texts if t]
