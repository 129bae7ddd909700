"""The demo dataset: small templated tasks a tiny random-weight model can learn in minutes.

The same seed always writes the same bytes, so demo runs and tests are reproducible. It lives
below the processes because the CLI writes it and worker_gpu trains the tiny model's tokenizer on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLORS = {
    "red": "rouge", "blue": "bleu", "green": "vert", "black": "noir", "white": "blanc", "yellow": "jaune",
    "pink": "rose", "gray": "gris", "brown": "marron", "orange": "orange", "purple": "violet", "gold": "or",
}
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima",
    "Germany": "Berlin", "Greece": "Athens", "Kenya": "Nairobi", "Chile": "Santiago", "Cuba": "Havana",
    "Norway": "Oslo", "Poland": "Warsaw", "Ireland": "Dublin", "Austria": "Vienna", "Portugal": "Lisbon",
}
ANIMALS = [
    "cat", "dog", "cow", "fox", "owl", "bee", "pig", "hen", "ant", "bat", "eel", "elk", "emu", "yak", "ram",
    "goat", "duck", "frog", "lion", "wolf", "bear", "deer", "crab", "mole", "seal", "swan", "toad", "wasp",
]
GREETINGS = {
    "Say hello politely.": "Hello, it is nice to meet you.",
    "Say goodbye politely.": "Goodbye, have a nice day.",
    "Say thank you politely.": "Thank you very much.",
    "Say sorry politely.": "I am sorry about that.",
}
UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SYSTEM = "You are a concise assistant."


def _in_words(n: int) -> str:
    if n < 20:
        return UNITS[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else f"-{UNITS[n % 10]}")


def _tasks() -> list[list[dict]]:
    """Every distinct row the demo can draw, by task. A question always gets the same answer,
    and no question repeats, so an eval split never holds copies of training rows."""
    return [
        [{"instruction": "Translate the color to French.", "input": c, "output": COLORS[c]} for c in sorted(COLORS)],
        [{"instruction": f"What is the capital of {k}?", "input": "", "output": f"{CAPITALS[k]}."} for k in sorted(CAPITALS)],
        [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(30) for b in range(30)],
        [{"instruction": "Write the animal in uppercase.", "input": a, "output": a.upper()} for a in ANIMALS],
        [{"instruction": q, "input": "", "output": a} for q, a in sorted(GREETINGS.items())],
        [{"instruction": "Write the number in words.", "input": str(n), "output": _in_words(n)} for n in range(100)],
        [{"instruction": f"What number comes after {n}?", "input": "", "output": str(n + 1)} for n in range(200)],
    ]


def _rows(rows: int, seed: int) -> list[dict]:
    """`rows` distinct rows: a task drawn at random, then one of its rows not drawn yet.

    Rows are drawn one after another, so fewer rows with the same seed are a prefix of more.
    """
    rng = random.Random(seed)
    pools = _tasks()
    for pool in pools:
        rng.shuffle(pool)
    capacity = sum(map(len, pools))
    if rows > capacity:
        raise ValueError(f"the demo dataset has {capacity} distinct rows; ask for at most that many (not {rows})")
    out = []
    for _ in range(rows):
        pool = rng.choice([p for p in pools if p])
        out.append(pool.pop())
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
