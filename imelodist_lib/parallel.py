"""Run a pure function over chunks of a list in worker processes, results in input order.

The dataset builders (`instructions.build_instruction_records`, `instructions.phrase_records`)
are pure Python and per tune: each tune's chats depend on the tune and on seeds drawn before
the loop, never on the tunes before it. So they split into contiguous chunks that worker
processes build side by side, and joined in order the chunks give the same bytes as one loop.

    chats = map_chunks(functools.partial(_chats_of, base=base), records, desc="instructions")

`fn(chunk, start)` gets a slice of the items and the index of its first item, and returns a
list. `fn` must be a module-level function (or a `functools.partial` of one), its items and
results picklable. Workers are forked where the platform can (Linux: no start-up, and a script
needs no `if __name__ == "__main__"` guard; the builders run pure Python, nothing of torch or
of a notebook kernel's threads), spawned elsewhere. Small inputs, one worker, or
`IMELODIST_WORKERS=1` run in this process, chunk by chunk, with the same results.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_all_start_methods, get_context
from typing import Any, TypeVar

T = TypeVar("T")

WORKERS_ENV = "IMELODIST_WORKERS"
CHUNK = 100  # items per task: ~1-2 s of building each, enough to hide the pickling
MIN_PARALLEL = 200  # fewer items: starting the processes would cost more than it saves


def default_workers() -> int:
    """`IMELODIST_WORKERS` when set, else the cores this process may run on (at most 8)."""
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{WORKERS_ENV}={value!r}: give a whole number of processes >= 1")
        return int(value)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _context():
    """fork where it exists (see the module's docstring), else spawn."""
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


def map_chunks(fn: Callable[[Sequence[T], int], list], items: Sequence[T], *,
               workers: int | None = None, chunk: int = CHUNK, desc: str | None = None,
               min_parallel: int = MIN_PARALLEL) -> list[Any]:
    """`fn(items[i:i + chunk], i)` for each chunk, concatenated in order; in `workers`
    processes (None: `default_workers()`) when there are at least `min_parallel` items.
    `desc`: a progress bar of that name, counting items."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    starts = list(range(0, len(items), chunk))
    workers = default_workers() if workers is None else workers
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="tune", disable=desc is None)
    parts: dict[int, list] = {}
    try:
        if workers <= 1 or len(items) < min_parallel or len(starts) < 2:
            for start in starts:
                parts[start] = fn(items[start:start + chunk], start)
                bar.update(min(chunk, len(items) - start))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(starts)),
                                     mp_context=_context()) as pool:
                futures = {pool.submit(fn, items[start:start + chunk], start): start for start in starts}
                for future in as_completed(futures):
                    start = futures[future]
                    parts[start] = future.result()
                    bar.update(min(chunk, len(items) - start))
    finally:
        bar.close()
    return [value for start in starts for value in parts[start]]
