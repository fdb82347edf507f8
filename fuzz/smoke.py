"""A short in-process run of a target, for the tests: its seeds, then random mutations of them
(byte flips, inserts, deletions, repeats, splices, boundary values) for a bounded time.

It is not coverage-guided (that is ``python -m fuzz``, libFuzzer): it replays every seed and past
finding and shakes the inputs around them, quickly and deterministically for a given seed.
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from collections.abc import Callable

from . import CORPUS, TARGETS

_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff", b"\x00\x00\x00\x00",
                b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\r\n", b"\r\n\r\n", b".", b":", b"%", b"\\u0000"]


def mutate(data: bytes, others: list[bytes], rng: random.Random, max_len: int = 8192) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 2:
            out[pos:pos] = rng.choice(_INTERESTING)
        elif op == 3 and out:
            del out[pos:pos + rng.randint(1, 16)]
        elif op == 4 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start:start + rng.randint(1, 64)] * rng.randint(1, 8)
        elif op == 5 and others:
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1)
            out = out[:pos] + other[cut:]
        else:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(out[:max_len])


def smoke(name: str, seconds: float, seed: int = 1) -> tuple[int, bytes | None]:
    """Run target ``name`` for ``seconds``: (inputs run, None). An input that breaks the contract
    propagates its exception; ``last_input`` then holds it."""
    module = importlib.import_module(TARGETS[name][0])
    one_input: Callable[[bytes], None] = module.one_input
    seeds = [p.read_bytes() for p in sorted((CORPUS / name).iterdir())]
    rng = random.Random(seed)
    runs = 0
    logging.disable(logging.CRITICAL)
    try:
        for data in seeds:
            smoke.last_input = data  # type: ignore[attr-defined]
            one_input(data)
            runs += 1
        deadline = time.monotonic() + seconds
        pool = list(seeds)
        while time.monotonic() < deadline:
            data = mutate(rng.choice(pool), pool, rng)
            smoke.last_input = data  # type: ignore[attr-defined]
            one_input(data)
            runs += 1
            if len(pool) < 256 and rng.random() < 0.05:
                pool.append(data)
    finally:
        logging.disable(logging.NOTSET)
    return runs, None
