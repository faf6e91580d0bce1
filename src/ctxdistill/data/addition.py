"""Synthetic addition with scratchpads (Nye et al. 2021), the task of Snell et al. 2022 §4 Hyp. 6.

Operands have 1 to ``max_digits`` digits (8 in the paper), each length equally likely.
Numbers are written digit by digit with spaces, and the scratchpad adds them right to
left, one line per digit: the digits still to add, then the digits of the result so far
and the carry. For 29 + 57::

    <scratch>
    2 9 + 5 7 , C: 0
    2 + 5 , 6 C: 1
    , 8 6 C: 0
    0 8 6
    </scratch>
    8 6

Each record is ``{"problem": "2 9 + 5 7", "scratchpad": "<scratch>...</scratch>", "answer": "8 6"}``.
A problem belongs to "train" or "eval" by a hash of its text, so the splits never share
a problem whatever the seeds.
"""

from __future__ import annotations

import random
import zlib

_SPLITS = ("train", "eval")


def spaced(digits: str) -> str:
    return " ".join(digits)


def scratchpad(a: int, b: int) -> str:
    """Nye et al.'s right-to-left addition trace, from ``<scratch>`` to ``</scratch>``."""
    left, right, result, carry = str(a), str(b), "", 0
    lines = [f"{spaced(left)} + {spaced(right)} , C: 0"]
    while left or right:
        total = int(left[-1:] or 0) + int(right[-1:] or 0) + carry
        left, right = left[:-1], right[:-1]
        result, carry = str(total % 10) + result, total // 10
        operands = " ".join(part for part in (spaced(left), "+", spaced(right)) if part) + " " if left or right else ""
        lines.append(f"{operands}, {spaced(result)} C: {carry}")
    lines.append(spaced(str(carry) + result))
    return "\n".join(["<scratch>", *lines, "</scratch>"])


def split_of(problem: str) -> str:
    return "eval" if zlib.crc32(problem.encode()) % 5 == 0 else "train"


def generate_examples(num_examples: int, seed: int, split: str = "train", max_digits: int = 8) -> list[dict]:
    """Deterministic distinct problems of one split."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    records, seen = [], set()
    for _ in range(num_examples * 1000):  # bounded: small max_digits hold few distinct problems
        if len(records) == num_examples:
            return records
        a, b = (
            rng.randrange(10 ** (n - 1) if n > 1 else 0, 10**n)
            for n in (rng.randint(1, max_digits), rng.randint(1, max_digits))
        )
        problem = f"{spaced(str(a))} + {spaced(str(b))}"
        if problem in seen or split_of(problem) != split:
            continue
        seen.add(problem)
        records.append({"problem": problem, "scratchpad": scratchpad(a, b), "answer": spaced(str(a + b))})
    raise ValueError(f"cannot generate {num_examples} distinct {split} problems with up to {max_digits} digits")
