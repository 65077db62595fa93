"""JSON lines and whole-file writes that nothing can half-finish: the one reader/writer pair
every module uses for `.jsonl` (corpus, datasets, evaluation runs).

Lines are split on "\\n" only: `str.splitlines()` also splits on U+2028, U+2029, U+0085 and
friends, which `ensure_ascii=False` leaves raw inside strings, so it cannot read back what
`json.dumps` wrote. Files are written to a temporary file in the same folder, fsynced and
moved into place (`os.replace`), so a reader sees the old file or the new one, never half.
A row read back becomes its record (TuneRecord, ComposeRequest) through `dataclass_from_dict`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, TypeVar

_Record = TypeVar("_Record")


def dumps_line(row: Any, sort_keys: bool = False, compact: bool = False) -> str:
    """One JSON line (no trailing newline), UTF-8 text kept as is."""
    return json.dumps(row, ensure_ascii=False, sort_keys=sort_keys,
                      separators=(",", ":") if compact else None)


def loads_lines(text: str, where: str = "") -> list[Any]:
    """The rows of JSON-lines text, split on "\\n" only; blank lines skipped. A bad line raises
    ValueError naming `where` and its line number."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where or 'JSON lines'}:{n}: not a JSON line ({e})") from None
    return rows


def dataclass_from_dict(cls: type[_Record], row: Mapping[str, Any]) -> _Record:
    """`cls(**row)` for a dataclass `cls`, the inverse of its `to_dict`; keys that are not its
    fields are an error (a ValueError naming them), since they would be silently lost."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(row) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}; known: {sorted(names)}")
    return cls(**row)


def read_jsonl(path: str | Path) -> list[Any]:
    """The rows of a `.jsonl` file written by `write_jsonl` (or any JSON-lines file)."""
    return loads_lines(Path(path).read_text(encoding="utf-8"), str(path))


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[Any]:
    """A text file handle whose content replaces `path` only when the block ends without error
    (temporary file in the same folder, fsync, os.replace); on error `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a whole text file atomically (see `atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def write_jsonl(rows: Iterable[Any], path: str | Path, sort_keys: bool = False,
                compact: bool = False) -> int:
    """Write rows one JSON object per line, atomically; returns the count."""
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(dumps_line(row, sort_keys=sort_keys, compact=compact) + "\n")
            n += 1
    return n


def append_jsonl(row: Any, path: str | Path) -> None:
    """Append one row and fsync it, so a crash right after loses nothing already written. A
    half line left by an earlier crash is ended first, so it spoils only itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write((dumps_line(row) + "\n").encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl_tolerant(path: str | Path) -> tuple[list[Any], int]:
    """(rows, number of unreadable lines) of an append-only log such as `append_jsonl` writes:
    a line cut short by a crash is skipped and counted instead of failing the whole file."""
    path = Path(path)
    if not path.exists():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, bad


_HELD: dict[Path, int] = {}  # lock files this process holds -> depth (flock is per open file)


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str = ".build.lock") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (fcntl.flock on a lock file in it) for the block: a
    second process building the same folder waits here until the first has finished. Nested
    use in one process (load_datasets -> assemble_corpus) re-enters instead of deadlocking."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = (folder / name).resolve()
    if _HELD.get(lock):
        _HELD[lock] += 1
        try:
            yield lock
        finally:
            _HELD[lock] -= 1
        return
    with open(lock, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        _HELD[lock] = 1
        try:
            yield lock
        finally:
            _HELD.pop(lock, None)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
