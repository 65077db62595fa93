"""The tune corpus: sources, cleaning, near-duplicate families, splits, augmentation.

Pipeline (`assemble_corpus`), each step a plain function a notebook can call on its own:

1. **load** every source into `TuneRecord`s: the ABC collections music21 ships
   (`load_music21_corpus`), a folder of `.abc` files (`load_abc_folder`), or a Hugging Face
   dataset by hub id / local copy in the IrishMAN, MusicPile / ChatMusician or IMelodist XTuner
   schemas (`load_hub_dataset`). Every record keeps its source, file and licence.
2. **clean** (`clean`): parse and validate each tune with `imelodist_lib.abc`; drop what cannot
   be used, *counting every drop by reason* (`CleaningReport`, in == out + dropped); drop exact
   duplicates; group near-duplicates into families (kept, never split apart).
3. **split** by family (`split_by_family`): hash-based, seeded, deterministic, zero leakage.
4. **label** (`labels.label_tunes`): chords per bar fitted from the melody, an emotion from mode/pace,
   a style from source and rhythm, a theme from the title. Every label records its method.
5. **augment** (`augment_transpositions`): transposed copies of train tunes only.

Decisions (also in data/DATA_CARD.md):
* multi-voice tunes (two or more `V:` voices) and unbarred music (Josquin's single voices of
  polyphony) are dropped, counted: the composer writes one barred melody line.
* tunes with more than `profile.max_bar_errors` bars of unexplained length are dropped, counted
  (pickups, section ends, endings are understood by `abc.check_bars`, not flagged).
* exact duplicates (same key, meter, unit and normalised body) are dropped, counted; the first
  in corpus order is kept.
* near-duplicates (same tune transposed, re-barred, or with a few notes changed) are KEPT: they
  are variants a composer learns from, but they share a `family`, and a family never straddles
  train/validation/test, so validation loss is not flattered by a variant seen in training.
* `record.abc` stays the melody as transcribed (normalised); the fitted chords live in
  `labels["chords"]` and, written into the tune, in `labels["abc_with_chords"]`.
* labels are heuristics, not annotations: each names its method in `labels["methods"]`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlparse

from imelodist_lib import abc, jsonl, music
from imelodist_lib import labels as labeller
from imelodist_lib.parallel import map_chunks
from imelodist_lib.profiles import Profile

_log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
CORPUS_FORMAT_VERSION = 1  # bump when the record layout or any cleaning rule changes

# --------------------------------------------------------------------------------------------
# Licences. Wording follows what music21 and the sources themselves say (see DATA_CARD.md).
# --------------------------------------------------------------------------------------------
MUSIC21_CORPUS_NOTE = ("distributed with music21 (BSD-3 software); corpus encodings 'distributed with "
                       "the permission of the encoders' (music21/corpus/license.txt)")
LICENCES: dict[str, str] = {
    "essenFolksong": ("Essen Folksong Collection (EsAC, H. Schaffrath / E. Dahlig-Turek; ABC by "
                      "S. Schlien): non-commercial distribution and use only "
                      "(music21/corpus/essenFolksong/license.txt)"),
    "oneills1850": ("O'Neill's Music of Ireland (1903, '1850 melodies'): public-domain music; "
                    "ABC transcription by Norbert Paap et al., " + MUSIC21_CORPUS_NOTE),
    "ryansMammoth": ("Ryan's Mammoth Collection (1883): public-domain music; ABC transcriptions "
                     "contributed by Ray Davies et al., " + MUSIC21_CORPUS_NOTE),
    "airdsAirs": ("Aird's Selection of Scotch, English, Irish and Foreign Airs (1778-1803): "
                  "public-domain music; ABC by Jack Campin, " + MUSIC21_CORPUS_NOTE),
    "miscFolk": ("American fife music and Northumbrian Minstrelsy (19th c.): public-domain "
                 "music; ABC by Jack Campin et al., " + MUSIC21_CORPUS_NOTE),
    "nottingham-dataset": ("Nottingham Music Database (E. Foxley), excerpt: " + MUSIC21_CORPUS_NOTE),
    "josquin": ("Josquin des Prez chansons: ABC (c) 1999 Laura E. Conrad, GNU GPL v2 or later"),
}


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------
@dataclass
class TuneRecord:
    """One tune with its provenance, header facts, derived labels, family and split."""

    id: str  # stable: "<collection>/<file>#<X number>", e.g. "essenFolksong/han1.abc#12"
    abc: str  # normalised ABC text (after `clean`; raw text straight from a loader)
    source: str  # collection name, e.g. "essenFolksong", "hub:sander-wood/irishman"
    file: str = ""  # file (or dataset split) it came from
    licence: str = ""
    title: str = ""
    key: str = ""  # K: value as written, e.g. "G", "Ador"
    meter: str = ""  # M: value, e.g. "6/8"
    unit_length: str = ""  # L: value, e.g. "1/8"
    tempo: str = ""  # Q: value as written ("" when absent)
    n_bars: int = 0
    n_notes: int = 0
    labels: dict = field(default_factory=dict)  # emotion, style, theme, chords, methods, ...
    family: str = ""  # near-duplicate family id (the id of its first member)
    split: str = ""  # "train" | "validation" | "test" | "" (not split yet)
    augmented_from: str | None = None  # id of the tune this is a transposed copy of

    def to_dict(self) -> dict:
        """Plain JSON-able dict, every field present."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TuneRecord":
        """Inverse of `to_dict`; unknown keys are an error (they would be silently lost)."""
        return jsonl.dataclass_from_dict(cls, d)


def _dumps(obj: Any) -> str:
    # sort_keys + fixed separators: the same records always give the same bytes.
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def write_jsonl(records: Iterable[TuneRecord], path: str | Path) -> Path:
    """Write records one JSON object per line (UTF-8, sorted keys: byte-reproducible)."""
    path = Path(path)
    jsonl.write_jsonl((r.to_dict() for r in records), path, sort_keys=True, compact=True)
    return path


def read_jsonl(path: str | Path) -> list[TuneRecord]:
    """Read records written by `write_jsonl`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebook 01 (corpus.assemble_corpus) first")
    out = []
    for n, row in enumerate(jsonl.read_jsonl(path), 1):
        try:
            out.append(TuneRecord.from_dict(row))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: row {n}: not a TuneRecord ({e})") from None
    return out


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def music21_corpus_dir() -> Path:
    """Folder of the corpus bundled with the installed music21."""
    import music21

    return Path(music21.__file__).resolve().parent / "corpus"


def music21_collections() -> list[str]:
    """Every collection folder of the bundled music21 corpus that holds ABC files."""
    root = music21_corpus_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.rglob("*.abc")))


def _read_text(path: Path) -> str:
    # Most files are UTF-8; a few old transcriptions are Latin-1. Never fail on an accent.
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_X_RE = re.compile(r"^X:\s*(\S*)", re.M)


def _records_from_text(text: str, source: str, file: str, licence: str) -> list[TuneRecord]:
    """Split a multi-tune ABC text into records with stable ids `<file>#<X>`."""
    out: list[TuneRecord] = []
    seen: Counter = Counter()
    for n, tune_text in enumerate(abc.split_tunes(text), 1):
        m = _X_RE.search(tune_text)
        x = (m.group(1) if m else "") or str(n)
        seen[x] += 1
        # Repeated X: numbers in one file happen (merged books): disambiguate, stay stable.
        tid = f"{file}#{x}" if seen[x] == 1 else f"{file}#{x}.{seen[x]}"
        out.append(TuneRecord(id=tid, abc=tune_text.strip() + "\n", source=source, file=file,
                              licence=licence))
    return out


def unreadable_record(rid: str, cause: str, source: str, file: str, licence: str) -> TuneRecord:
    """A record standing for a file or row that could not be read: empty ABC, so `clean`
    counts it as a drop ("no_abc", this id as its example), the cause kept in
    labels["load_error"] and logged, so nothing is lost silently or aborts a build."""
    _log.warning("counted as a drop, not loaded: %s (%s)", rid, cause)
    return TuneRecord(id=rid, abc="", source=source, file=file, licence=licence,
                      labels={"load_error": cause})


def _records_from_file(path: Path, source: str, file: str, licence: str) -> list[TuneRecord]:
    """The tunes of one .abc file; a file that can't be read or holds no tune is one
    `unreadable_record` naming it and the cause."""
    try:
        records = _records_from_text(_read_text(path), source, file, licence)
    except (OSError, ValueError) as e:  # a broken link, a folder named x.abc, no permission
        return [unreadable_record(f"{file}#unreadable", f"{type(e).__name__}: {e}", source, file, licence)]
    if not records:
        return [unreadable_record(f"{file}#unreadable", "no tune in the file (no X: or K: field)",
                                  source, file, licence)]
    return records


def load_music21_corpus(collections: Sequence[str] | None = None,
                        limit: int | None = None) -> list[TuneRecord]:
    """Every tune of the ABC collections bundled with music21 (all of them when None)."""
    available = music21_collections()
    wanted = list(available if collections is None else collections)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ValueError(f"music21 has no ABC collection(s) {unknown}; available: {available}")
    root = music21_corpus_dir()
    out: list[TuneRecord] = []
    for coll in wanted:
        licence = LICENCES.get(coll, "see " + MUSIC21_CORPUS_NOTE)
        for path in sorted((root / coll).rglob("*.abc")):
            rel = path.relative_to(root).as_posix()
            out.extend(_records_from_file(path, coll, rel, licence))
            if limit is not None and len(out) >= limit:
                return out[:limit]
    return out


def load_abc_folder(path: str | Path, licence: str = "unknown: state it in DATA_CARD.md",
                    source: str | None = None) -> list[TuneRecord]:
    """Every tune in the `.abc` files under a folder (recursively), one record per tune; a file
    that can't be read is one counted drop naming it (`unreadable_record`), not an abort."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"ABC folder {path} does not exist: pass a folder holding .abc files")
    source = source or path.name
    files = sorted(path.rglob("*.abc"))
    if not files:
        raise FileNotFoundError(f"no .abc files under {path}")
    out: list[TuneRecord] = []
    for f in files:
        out.extend(_records_from_file(f, source, f"{source}/{f.relative_to(path).as_posix()}", licence))
    return out


# ---- Hugging Face datasets ------------------------------------------------------------------
HUB_SCHEMAS = ("irishman", "musicpile", "sft", "xtuner", "text")
HUB_LICENCES = {
    "sander-wood/irishman": ("IrishMAN: MIT on its card; tunes collected from thesession.org and "
                             "abcnotation.com: check those sites' terms before training"),
    "m-a-p/MusicPile": "MusicPile: CC licence per its card; mixed sources, check per source",
    "m-a-p/MusicPile-sft": "MusicPile-sft (ChatMusician): check its card; mixed sources",
}
# An ABC tune inside free text: from an X: or the first header line to the end of the block.
# Each body line must end at a newline or the end (unambiguous: no catastrophic backtracking).
_ABC_IN_TEXT = re.compile(r"(?:^|\n)((?:X:[^\n]*\n)?(?:[A-Za-z]:[^\n]*\n)*K:[^\n]*\n(?:[^\n]+(?:\n|$))+)")


class HubUnavailableError(ConnectionError):
    """A hub id was given but the Hugging Face Hub cannot be reached (offline machine)."""


def _hub_offline_message(name: str) -> str:
    return (f"cannot reach the Hugging Face Hub for dataset {name!r} (offline or HF_HUB_OFFLINE=1). "
            f"On a machine with internet run: python -c \"import datasets; "
            f"datasets.load_dataset('{name}').save_to_disk('DIR')\" (or download its JSON/parquet "
            f"files), copy DIR here and pass the local path instead of the hub id. A copy already "
            f"in the Hugging Face cache is used when HF_HUB_OFFLINE=1 is set before starting Python.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    # One quick TCP connect instead of datasets' ~25 s of retries on an offline machine.
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _rows_from_local(path: Path) -> list[dict]:
    """Rows of a local dataset: a save_to_disk folder, or .json/.jsonl/.parquet/.csv files."""
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            return [dict(r, _split=name) for name in sorted(ds) for r in ds[name]]
        return [dict(r) for r in ds]
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".parquet", ".csv"))
    if not files:
        raise FileNotFoundError(f"{path}: no save_to_disk folder and no .json/.jsonl/.parquet/.csv files")
    rows: list[dict] = []
    for f in files:
        try:
            if f.suffix in (".json", ".jsonl"):
                rows.extend(_json_rows(f))
            else:
                ds = datasets.load_dataset(f.suffix.lstrip("."), data_files=str(f), split="train")
                rows.extend(dict(r, _split=f.name) for r in ds)
        except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types for a bad file
            rows.append({_LOAD_ERROR: f"{f.name}: {type(e).__name__}: {str(e)[:200]}", "_split": f.name})
    return rows


_LOAD_ERROR = "_load_error"  # a row key: this row could not be read, and why


def _json_rows(f: Path) -> list[dict]:
    """Rows of a .json array (XTuner writes one) or JSON-lines file, read directly (datasets'
    json loader chokes on nested lists of dicts with varying keys); a line that is no JSON
    object becomes a row carrying its error, so it is counted instead of aborting the file."""
    text = _read_text(f).strip()
    if text.startswith("["):
        data = json.loads(text)
        return [dict(r, _split=f.name) if isinstance(r, dict) else
                {_LOAD_ERROR: f"{f.name}: item {n}: not a JSON object", "_split": f.name}
                for n, r in enumerate(data, 1)]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            rows.append(dict(row, _split=f.name))
        except ValueError as e:
            rows.append({_LOAD_ERROR: f"{f.name}:{n}: {type(e).__name__}: {e}", "_split": f.name})
    return rows


def _detect_schema(row: dict) -> str:
    if "abc notation" in row:
        return "irishman"
    if "conversation" in row:
        return "xtuner"
    if "messages" in row or ("output" in row and ("instruction" in row or "input" in row)):
        return "sft"
    if "text" in row:
        return "musicpile"
    raise ValueError(f"cannot tell the schema from columns {sorted(row)}: "
                     f"pass schema= one of {list(HUB_SCHEMAS)}")


def tunes_in_text(text: str) -> list[str]:
    """ABC tunes found inside free text (a chat answer, a MusicPile document)."""
    if not text:
        return []
    text = text.replace("\r\n", "\n")
    found: list[str] = []
    if "X:" in text:
        found = [t for t in abc.split_tunes(text[text.index("X:"):]) if "K:" in t]
    if not found:
        found = [m.group(1) for m in _ABC_IN_TEXT.finditer(text + "\n")]
    return [_trim_prose(t) for t in found]


# A trailing line of prose: no bar line, and a word with a letter that is no note name.
_PROSE_LINE = re.compile(r"^[^|]*\b(?=[A-Za-z]*[h-wyH-WY])[A-Za-z]{3,}\b[^|]*$")


def _trim_prose(tune: str) -> str:
    """Cut chat text that follows a tune without a blank line ("...|d2d:|\nEnjoy!")."""
    lines = tune.rstrip("\n").split("\n")
    while len(lines) > 1 and _PROSE_LINE.match(lines[-1]) and not re.match(r"^[A-Za-z]:", lines[-1]):
        lines.pop()
    return "\n".join(lines) + "\n"


def _row_texts(row: dict, schema: str) -> tuple[list[str], dict]:
    """(ABC texts, extra labels) of one dataset row in the given schema."""
    if schema == "irishman":
        labels = {"control_code": row.get("control code", "")} if row.get("control code") else {}
        return [row.get("abc notation") or ""], labels
    if schema == "xtuner":
        turns = row.get("conversation") or []
        abcs, prompts = [], []
        for t in turns:
            abcs += tunes_in_text(t.get("output", ""))
            prompts.append(t.get("input", ""))
        return abcs, {"prompt": prompts[0]} if prompts else {}
    if schema == "sft":
        if "messages" in row:
            answers = [m.get("content", "") for m in row["messages"] if m.get("role") == "assistant"]
            prompts = [m.get("content", "") for m in row["messages"] if m.get("role") == "user"]
        else:
            answers = [row.get("output", "")]
            prompts = [" ".join(x for x in (row.get("instruction", ""), row.get("input", "")) if x)]
        abcs = [t for a in answers for t in tunes_in_text(a or "")]
        return abcs, {"prompt": prompts[0]} if prompts and prompts[0] else {}
    if schema in ("musicpile", "text"):
        return tunes_in_text(row.get("text", "")), {}
    raise ValueError(f"unknown schema {schema!r}: choose one of {list(HUB_SCHEMAS)} or 'auto'")


def load_hub_dataset(name_or_path: str | Path, schema: str = "auto", split: str | None = None,
                     licence: str | None = None, limit: int | None = None) -> list[TuneRecord]:
    """Tunes from a Hugging Face dataset (hub id or local copy) in a known schema.

    Schemas: "irishman" (`abc notation`, `control code`), "sft" (instruction/input/output or
    chat `messages`, as MusicPile-sft / ChatMusician), "xtuner" (IMelodist's
    `{"conversation": [{"system","input","output"}]}`), "musicpile"/"text" (ABC inside `text`).
    Rows with no ABC become records with empty `abc`, so `clean` counts them ("no_abc"); so do
    rows or files that can't be read (a bad JSON line, an unknown schema, ABC that is not text),
    with the cause in labels["load_error"] (`unreadable_record`).
    """
    if schema != "auto" and schema not in HUB_SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}: choose 'auto' or one of {list(HUB_SCHEMAS)}")
    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        rows = _rows_from_local(path)
        source = "local:" + path.name
    else:
        name = str(name_or_path)
        if name.count("/") != 1 or name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{name!r} is neither an existing local path nor a hub id 'owner/name'")
        import datasets

        offline_mode = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")
        offline = offline_mode or not _hub_reachable()
        if offline and not offline_mode:
            # No network and no HF_HUB_OFFLINE: datasets would retry for ~25 s, then fail.
            raise HubUnavailableError(_hub_offline_message(name))
        try:
            # With a limit, stream: MusicPile is billions of tokens and only `limit` rows are wanted.
            ds = datasets.load_dataset(name, split=split, streaming=limit is not None)
        except Exception as e:  # datasets raises many types for "not cached and no network"
            if offline or "reach" in str(e) or "offline" in str(e).lower():
                raise HubUnavailableError(_hub_offline_message(name)) from None
            raise
        single = isinstance(ds, (datasets.Dataset, datasets.IterableDataset))
        parts = {split or "train": ds} if single else dict(ds)
        rows = []
        for s in sorted(parts):
            for n, r in enumerate(parts[s]):
                if limit is not None and n >= limit:
                    break
                rows.append(dict(r, _split=s))
        source = "hub:" + name
    if limit is not None:
        rows = rows[:limit]
    licence = licence or HUB_LICENCES.get(str(name_or_path), "unknown: check the dataset card")
    out: list[TuneRecord] = []
    undetected: list[str] = []
    for n, row in enumerate(rows):
        base = f"{source}/{row.get('_split', 'train')}#{n}"
        try:
            if _LOAD_ERROR in row:
                raise ValueError(row[_LOAD_ERROR])
            try:
                row_schema = _detect_schema(row) if schema == "auto" else schema
            except ValueError as e:
                undetected.append(str(e))
                raise
            texts, extra = _row_texts(row, row_schema)
            if not all(isinstance(t, str) for t in texts):
                raise TypeError(f"ABC is {type(next(t for t in texts if not isinstance(t, str))).__name__}, "
                                "not text")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            out.append(unreadable_record(base, f"{type(e).__name__}: {e}", source,
                                         str(row.get("_split", "")), licence))
            continue
        for k, t in enumerate(texts or [""]):  # no ABC: keep an empty record, counted in clean
            rec = TuneRecord(id=base if k == 0 else f"{base}.{k}", abc=t, source=source,
                             file=str(row.get("_split", "")), licence=licence)
            if extra:
                rec.labels = {"given": dict(extra)}
            out.append(rec)
    if rows and len(undetected) == len(rows):  # a whole dataset in another schema: say so
        raise ValueError(undetected[0])
    return out


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------
@dataclass
class CleaningReport:
    """What cleaning did: totals in and out, and every dropped tune counted by reason."""

    n_in: int = 0
    n_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    n_families: int = 0
    n_near_duplicates: int = 0  # tunes kept that share a family with an earlier tune
    per_source_in: dict[str, int] = field(default_factory=dict)
    per_source_out: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one record id dropped for it

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def is_balanced(self) -> bool:
        """Nothing vanished uncounted: in == out + every drop."""
        return self.n_in == self.n_out + self.n_dropped

    def table(self) -> str:
        """Plain-text table (no pandas) of the counts, for notebooks and logs."""
        rows = [("tunes in", self.n_in)]
        by_count = sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))
        rows += [(f"  dropped: {k}", v) for k, v in by_count]
        rows += [("tunes out", self.n_out), ("near-duplicate families", self.n_families),
                 ("tunes sharing a family", self.n_near_duplicates)]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {value:>7,}" for name, value in rows]
        verdict = "ok" if self.is_balanced() else "MISMATCH"
        lines.append(f"{'check in == out + dropped':<{width}}  {verdict:>7}")
        if self.per_source_in:
            lines.append("")
            lines.append(f"{'source':<{width}}  {'in':>7}  {'out':>7}")
            for s in sorted(self.per_source_in):
                n_in, n_out = self.per_source_in[s], self.per_source_out.get(s, 0)
                lines.append(f"{s:<{width}}  {n_in:>7,}  {n_out:>7,}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able dict (the file cleaning_report.json)."""
        return dict(dataclasses.asdict(self), n_dropped=self.n_dropped)

    @classmethod
    def from_dict(cls, d: dict) -> "CleaningReport":
        """Inverse of `to_dict` (the derived `n_dropped` is ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class _Analysis:
    """What cleaning learns about one tune (small: no parse tree is kept, 13k of them add up)."""

    ok: bool
    reason: str = ""
    abc: str = ""  # normalised text
    n_bars: int = 0
    n_notes: int = 0
    melody: str = ""  # `_encode(_melody_signature(events))`, for near-duplicate families
    bar_errors: int = 0  # bars whose length disagrees with the meter (abc.check_bars)
    header: dict = field(default_factory=dict)  # title, key, meter, unit_length, tempo


def _error_class(message: str) -> str:
    """A stable reason name from an ABCError message: its words up to the first detail."""
    head = re.sub(r"^header field ([A-Za-z]):", r"header field \1", message.strip())
    head = re.split(r"[:(\"'`\d]", head, maxsplit=1)[0].strip()
    head = re.sub(r"[^A-Za-z ]+", "", head)
    return "unparsable: " + (" ".join(head.split()[:6]) or "unknown")


_ANALYSES: dict[str, _Analysis] = {}  # text -> its analysis (clean runs twice in notebook 01)
_ANALYSES_KEPT = 65536


def _analyse(text: str) -> _Analysis:
    """Parse, normalise and bar-check one tune (cached by text)."""
    found = _ANALYSES.get(text)
    if found is None:
        found = _analysis_of(text)
        _remember({text: found})
    return found


def _remember(analyses: dict[str, _Analysis]) -> None:
    if len(_ANALYSES) + len(analyses) > _ANALYSES_KEPT:
        _ANALYSES.clear()
    _ANALYSES.update(analyses)


def _analyse_all(texts: Sequence[str], progress: bool) -> None:
    """Analyse the texts not analysed yet in worker processes (`parallel.map_chunks`), into the
    cache `_analyse` reads. A text whose analysis raised is left for `_analyse` to raise again
    in this process, where `clean` names its tune."""
    todo = list(dict.fromkeys(t for t in texts if t not in _ANALYSES))
    done = map_chunks(_analysis_chunk, todo, desc="analyse" if progress else None)
    _remember({text: an for text, an in zip(todo, done) if an is not None})


def _analysis_chunk(texts: Sequence[str], first: int) -> list[_Analysis | None]:
    out: list[_Analysis | None] = []
    for text in texts:
        try:
            out.append(_analysis_of(text))
        except Exception:  # noqa: BLE001 - clean reports it, from its own call
            out.append(None)
    return out


def _analysis_of(text: str) -> _Analysis:
    if not text.strip():
        return _Analysis(False, "no_abc")
    # Two or more distinct voices; a lone "V:1" declaration is still one melody line.
    if len(set(re.findall(r"(?:^|\[)V:\s*([^\]\s]+)", text, re.M))) > 1:
        return _Analysis(False, "multi_voice")
    body = text.split("\nK:", 1)[1].split("\n", 1)[-1] if "\nK:" in text else text
    music = "\n".join(l for l in body.split("\n") if not re.match(r"^\s*(%|[A-Za-z+]:)", l))
    # bar-line runs holding a "|" (one run per match; `[|:\]]*\|[|:\]]*` backtracked over ":::")
    if sum(1 for run in re.findall(r"[|:\]]+", music) if "|" in run) <= 1:
        # Unbarred music (Josquin's voices: one final bar line at most): cannot be bar-checked
        # or harmonised per bar, and is not the barred melody the composer learns.
        return _Analysis(False, "no_bar_lines")
    # One parse per tune (the scan is most of the cost): validate the text as given, then
    # normalise the parsed tune. Normalising only drops comments and note fields, so the
    # verdict holds for the normalised text too.
    report = abc.validate(text)
    if not report.ok or report.tune is None or report.bars is None:
        return _Analysis(False, _error_class(report.error.message if report.error else "invalid"))
    norm = abc.normalize(report.tune)
    tune = report.tune
    evs = abc.events(tune)
    # Bars as a musician counts them: non-empty, the pickup not counted.
    n_bars = sum(1 for b in report.bars.bars if b.duration > 0 and b.kind != "pickup")
    header = {"title": abc.header_text(tune, "T"), "key": abc.header_text(tune, "K"),
              "meter": abc.header_text(tune, "M"), "unit_length": abc.header_text(tune, "L"),
              "tempo": abc.header_text(tune, "Q")}
    return _Analysis(True, "", norm, n_bars, sum(1 for e in evs if e.pitch is not None),
                     _encode(_melody_signature(evs)), header=header,
                     bar_errors=len(report.bars.errors))


def _body_of(norm: str) -> str:
    # The music without free-text headers: what "same tune" means for exact duplicates.
    keep = []
    for line in norm.splitlines():
        if re.match(r"^[A-Za-z]:", line) and not line.startswith(("K:", "M:", "L:")):
            continue
        keep.append(re.sub(r"\s+", "", line))
    return "\n".join(keep)


def _melody_signature(evs: Sequence) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Transposition- and tempo-invariant melody: pitch intervals, and durations in units of
    the tune's most common duration (so an L:1/16 and an L:1/8 copy match)."""
    notes = [(e.pitch, float(e.duration)) for e in evs if e.pitch is not None]
    if not notes:
        return (), ()
    common = Counter(d for _, d in notes).most_common(1)[0][0] or 1.0
    intervals = tuple(max(-24, min(24, b[0] - a[0])) for a, b in zip(notes, notes[1:]))
    rhythm = tuple(min(32, int(round(d / common * 4))) for _, d in notes)
    return intervals, rhythm


def _encode(sig: tuple[tuple[int, ...], tuple[int, ...]]) -> str:
    # One character per note (interval and relative duration): rapidfuzz compares these strings.
    intervals, rhythm = sig
    return "".join(chr(0x4E00 + (i + 24) * 40 + r) for i, r in zip((0,) + intervals, rhythm))


NEAR_DUP_THRESHOLD = 90.0  # rapidfuzz ratio (0..100) on the melody strings
_MINHASH_PERMS, _MINHASH_BANDS = 32, 16  # 16 bands x 2 rows: candidates from ~40% n-gram overlap


def near_duplicate_families(ids: Sequence[str], melodies: Sequence[str],
                            threshold: float = NEAR_DUP_THRESHOLD) -> dict[str, str]:
    """Family id (id of the family's first member) for each tune: near-duplicates share one.

    Two tunes are near-duplicates when their melody strings (transposition-invariant intervals
    plus relative rhythm, `_melody_signature`) have rapidfuzz ratio >= threshold. Comparing all
    pairs of 13k tunes would take minutes, so candidates come from MinHash LSH buckets over
    5-grams (a cheap signature); only pairs sharing a bucket are scored.
    """
    import numpy as np
    from rapidfuzz import fuzz

    n = len(ids)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # root = earliest member: family id is order-stable

    # Python's str hash is salted per process: use a stable hash for the n-grams instead.
    rng = np.random.default_rng(12345)
    prime = (1 << 61) - 1
    a = rng.integers(1, prime, _MINHASH_PERMS, dtype=np.uint64)
    b = rng.integers(0, prime, _MINHASH_PERMS, dtype=np.uint64)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    rows = _MINHASH_PERMS // _MINHASH_BANDS
    exact: dict[str, int] = {}
    for i, s in enumerate(melodies):
        if not s:
            continue
        if s in exact:  # identical melody (e.g. transposed copy): same family, no scoring needed
            union(exact[s], i)
            continue
        exact[s] = i
        grams = np.fromiter((int.from_bytes(hashlib.blake2b(s[k:k + 5].encode(), digest_size=7).digest(),
                                            "little")
                             for k in range(max(1, len(s) - 4))), dtype=np.uint64)
        # (a*x + b) mod 2^64 is a fine universal-ish hash for MinHash at this scale.
        sig = (grams[:, None] * a[None, :] + b[None, :]).min(axis=0)
        for band in range(_MINHASH_BANDS):
            buckets[(band, *sig[band * rows:(band + 1) * rows].tolist())].append(i)
    checked: set[tuple[int, int]] = set()
    for members in buckets.values():
        if len(members) < 2:
            continue
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                if (i, j) in checked or find(i) == find(j):
                    continue
                checked.add((i, j))
                si, sj = melodies[i], melodies[j]
                # Length ratio bounds the best possible ratio: skip hopeless pairs cheaply.
                if 200.0 * min(len(si), len(sj)) / (len(si) + len(sj)) < threshold:
                    continue
                if fuzz.ratio(si, sj, score_cutoff=threshold):
                    union(i, j)
    return {ids[i]: ids[find(i)] for i in range(n)}


def clean(records: Sequence[TuneRecord], profile: Profile,
          progress: bool = False) -> tuple[list[TuneRecord], CleaningReport]:
    """Validate, normalise and deduplicate tunes; every drop is counted by reason.

    Drops: too long (> profile.max_tune_chars, checked on the raw text before parsing and again
    on the normalised text), no ABC, multi-voice, no bar lines, unparsable (by ABCError class),
    analysis failed (any other exception, named with the record in a warning), no notes, too short (< profile.min_bars), more bar-length errors than
    profile.max_bar_errors (None keeps them), exact duplicate.
    Near-duplicates are kept and grouped into `family` (see `near_duplicate_families`).
    """
    from tqdm.auto import tqdm

    report = CleaningReport(n_in=len(records))
    dropped: Counter = Counter()
    src_in: Counter = Counter(r.source for r in records)
    kept: list[TuneRecord] = []
    melodies: list[str] = []
    seen_bodies: set[str] = set()

    def drop(rec: TuneRecord, reason: str) -> None:
        dropped[reason] += 1
        report.examples.setdefault(reason, rec.id)

    _analyse_all([r.abc for r in records if len(r.abc) <= profile.max_tune_chars], progress)
    for rec in tqdm(records, desc="clean", disable=not progress):
        if len(rec.abc) > profile.max_tune_chars:  # the cheap cap first: no parse of huge text
            drop(rec, "too_long")
            continue
        try:
            an = _analyse(rec.abc)
        except Exception as err:  # noqa: BLE001 - one bad tune must not stop the build
            drop(rec, f"analysis failed: {type(err).__name__}")
            warnings.warn(f"cleaning dropped tune {rec.id}: {type(err).__name__}: {err}",
                          stacklevel=2)
            continue
        if not an.ok:
            drop(rec, an.reason)
            continue
        if len(an.abc) > profile.max_tune_chars:
            drop(rec, "too_long")
            continue
        if an.n_notes == 0:
            drop(rec, "no_notes")
            continue
        if an.n_bars < profile.min_bars:
            drop(rec, "too_short")
            continue
        # A composer learns bar lengths from its data: tunes whose written meter disagrees with
        # their bars (mostly Essen songs whose meter changes were flattened to one M:) go.
        if profile.max_bar_errors is not None and an.bar_errors > profile.max_bar_errors:
            drop(rec, "bar_length_errors")
            continue
        body = _body_of(an.abc)
        if body in seen_bodies:
            drop(rec, "exact_duplicate")
            continue
        seen_bodies.add(body)
        kept.append(dataclasses.replace(rec, abc=an.abc, n_bars=an.n_bars, n_notes=an.n_notes,
                                        labels=dict(rec.labels), **an.header))
        melodies.append(an.melody)
    fam = near_duplicate_families([r.id for r in kept], melodies)
    for r in kept:
        r.family = fam[r.id]
    report.n_out = len(kept)
    report.dropped = dict(sorted(dropped.items()))
    sizes = Counter(fam.values())
    report.n_families = len(sizes)
    report.n_near_duplicates = sum(v - 1 for v in sizes.values())
    report.per_source_in = dict(sorted(src_in.items()))
    report.per_source_out = dict(sorted(Counter(r.source for r in kept).items()))
    report.examples = dict(sorted(report.examples.items()))
    assert report.is_balanced(), "cleaning lost tunes uncounted"  # an internal bug, not user error
    return kept, report


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def _unit_hash(*parts: object) -> float:
    """A stable pseudo-random number in [0, 1) from the parts (sha256, not Python's hash)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def split_by_family(records: Sequence[TuneRecord], profile: Profile) -> list[TuneRecord]:
    """Assign train/validation/test by near-duplicate family: seeded, hash-based, no leakage.

    Each family draws u = sha256(seed, family) in [0, 1): u < test_fraction -> test, below
    test+val -> validation, else train. The same family always lands in the same split, so
    adding tunes never moves old ones. If a non-zero fraction would leave a split empty (tiny
    corpora), the train family with the smallest u moves there, so every split exists.
    """
    fams = sorted({r.family or r.id for r in records})
    u = {f: _unit_hash(profile.seed, f) for f in fams}
    t, v = profile.test_fraction, profile.val_fraction
    assign = {f: "test" if u[f] < t else "validation" if u[f] < t + v else "train" for f in fams}
    for split, frac in (("test", t), ("validation", v)):
        if frac > 0 and split not in assign.values():
            train = sorted((u[f], f) for f in fams if assign[f] == "train")
            if len(train) > 1:
                assign[train[0][1]] = split
    return [dataclasses.replace(r, split=assign[r.family or r.id]) for r in records]


def check_no_leakage(records: Sequence[TuneRecord]) -> dict[str, set[str]]:
    """Families found in more than one split (empty dict: no leakage). Augmented copies count
    with their original's family."""
    where: dict[str, set[str]] = defaultdict(set)
    for r in records:
        where[r.family or r.id].add(r.split)
    return {f: s for f, s in where.items() if len(s) > 1}


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------
def augment_transpositions(records: Sequence[TuneRecord], semitones: Sequence[int],
                           counts: Counter | None = None) -> list[TuneRecord]:
    """Transposed copies (via abc.transpose) of the train split only, one per interval.

    Returns only the new records; failures are counted in `counts["transpose_failed"]`, successes
    in `counts["transposed"]`. Validation/test are never augmented: a transposed copy of a test
    tune in training would be leakage.
    """
    counts = counts if counts is not None else Counter()
    out: list[TuneRecord] = []
    for r in records:
        if r.split != "train" or r.augmented_from:
            continue
        for st in semitones:
            if st == 0:
                continue
            try:
                text = abc.transpose(r.abc, st)
                key = abc.header_text(abc.parse_tune(text), "K")
            except abc.ABCError:
                counts["transpose_failed"] += 1
                continue
            labels = dict(r.labels)
            if "chords" in labels:  # chords were fitted in the old key: refit below
                labels = {k: v for k, v in labels.items() if k not in ("chords", "abc_with_chords")}
            out.append(dataclasses.replace(r, id=f"{r.id}~t{st:+d}", abc=text, key=key,
                                           augmented_from=r.id, labels=labels))
            counts["transposed"] += 1
    return out


# --------------------------------------------------------------------------------------------
# Whole pipeline
# --------------------------------------------------------------------------------------------
@dataclass
class CorpusResult:
    """What `assemble_corpus` made: records, the cleaning report, the manifest and file paths."""

    records: list[TuneRecord]
    report: CleaningReport
    manifest: dict
    paths: dict[str, Path]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (not written)

    def split(self, name: str) -> list[TuneRecord]:
        """Records of one split ("train", "validation", "test")."""
        return [r for r in self.records if r.split == name]


def load_sources(sources: Sequence[str]) -> list[TuneRecord]:
    """Records from each source spec: "music21", "music21:<collection>", a folder of .abc
    files, a local dataset file/folder, or a hub id "owner/name"."""
    out: list[TuneRecord] = []
    for spec in sources:
        if spec == "music21":
            out += load_music21_corpus()
        elif spec.startswith("music21:"):
            out += load_music21_corpus([c for c in spec.split(":", 1)[1].split(",") if c])
        elif Path(spec).is_dir() and any(Path(spec).rglob("*.abc")):
            out += load_abc_folder(spec)
        else:
            out += load_hub_dataset(spec)
    return out


def _select(records: list[TuneRecord], max_tunes: int | None, seed: int) -> list[TuneRecord]:
    """At most `max_tunes` records, whole families first in a seeded hash order (deterministic,
    roughly proportional across sources), kept in corpus order."""
    if max_tunes is None or len(records) <= max_tunes:
        return list(records)
    ranked = sorted(records, key=lambda r: (_unit_hash(seed, "select", r.family or r.id), r.id))
    keep = {r.id for r in ranked[:max_tunes]}
    return [r for r in records if r.id in keep]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_fingerprint(profile: Profile) -> str:
    """sha256 over everything the corpus files depend on: the data settings, the sources
    (music21 version; file contents of local folders/files; hub ids), and the source code of
    `music`, `abc`, `labels` and `corpus`. Equal fingerprints mean `assemble_corpus` may reuse
    its last output."""
    import music21

    h = hashlib.sha256()
    h.update(_dumps(_settings(profile)).encode())
    h.update(f"music21 {music21.__version__}; format {CORPUS_FORMAT_VERSION}".encode())
    for module in (music.__file__, abc.__file__, labeller.__file__, __file__):
        h.update(Path(module).read_bytes())
    for spec in profile.corpus_sources:
        p = Path(spec)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
        h.update(spec.encode())
        for f in files:
            h.update(f.relative_to(p if p.is_dir() else p.parent).as_posix().encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _settings(profile: Profile) -> dict:
    import music21

    return {"profile": profile.name, "corpus_sources": list(profile.corpus_sources),
            "max_tunes": profile.max_tunes, "max_tune_chars": profile.max_tune_chars,
            "min_bars": profile.min_bars, "max_bar_errors": profile.max_bar_errors,
            "transpositions": list(profile.transpositions),
            "val_fraction": profile.val_fraction, "test_fraction": profile.test_fraction,
            "seed": profile.seed, "near_duplicate_threshold": NEAR_DUP_THRESHOLD,
            "music21_version": music21.__version__}


def _cached(out: Path, fingerprint: str) -> CorpusResult | None:
    """The previous build in `out` when it was made from the same inputs and is intact; when
    there is one that can't be reused, a logged line says why."""
    paths = {"tunes": out / "tunes.jsonl", "manifest": out / "manifest.json",
             "cleaning_report": out / "cleaning_report.json", "dir": out}
    if not paths["manifest"].exists():
        return None
    try:
        manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
        if manifest.get("input_fingerprint") != fingerprint:
            return None  # other settings, sources or code: an ordinary rebuild
        for name in ("tunes.jsonl", "cleaning_report.json"):
            want = manifest["files"][name]["sha256"]
            have = _sha256(out / name) if (out / name).exists() else "missing"
            if have != want:
                _log.warning("rebuilding the corpus in %s: %s changed since it was built "
                             "(sha256 %s on disk, %s in manifest.json)", out, name, have[:12], want[:12])
                return None
        report = CleaningReport.from_dict(json.loads(paths["cleaning_report"].read_text(encoding="utf-8")))
        return CorpusResult(read_jsonl(paths["tunes"]), report, manifest, paths)
    except (OSError, KeyError, TypeError, ValueError) as e:
        _log.warning("rebuilding the corpus in %s: its files are unreadable (%s: %s)", out,
                     type(e).__name__, e)
        return None


def assemble_corpus(profile: Profile, progress: bool = True, records: Sequence[TuneRecord] | None = None,
                    out_dir: str | Path | None = None, use_cache: bool = True) -> CorpusResult:
    """Load, clean, select, split, label and augment the corpus; write tunes.jsonl, manifest.json
    and cleaning_report.json under `profile.run_dir/"data"` (or `out_dir`).

    Same inputs and profile give byte-identical files. When the files there were built from the
    same inputs (`input_fingerprint`) and still match their sha256 in manifest.json, they are
    read back instead of rebuilt (`use_cache=False` forces a rebuild). `records` replaces loading
    (tests, a hand-picked subset; never cached). Files are written atomically, manifest last, and
    builds of one folder take turns (a lock file in it), so a second build waits and reuses."""
    out = Path(out_dir) if out_dir is not None else profile.run_dir / "data"
    with jsonl.folder_lock(out):
        return _assemble_corpus(profile, progress, records, out, use_cache)


def _assemble_corpus(profile: Profile, progress: bool, records: Sequence[TuneRecord] | None,
                     out: Path, use_cache: bool) -> CorpusResult:
    timings: dict[str, float] = {}
    fingerprint = input_fingerprint(profile) if records is None else ""
    if use_cache and fingerprint:
        t0 = time.perf_counter()
        hit = _cached(out, fingerprint)
        if hit is not None:
            hit.timings = {"cache": time.perf_counter() - t0}
            return hit

    t0 = time.perf_counter()
    raw = list(records) if records is not None else load_sources(profile.corpus_sources)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    kept, report = clean(raw, profile, progress=progress)
    timings["clean"] = time.perf_counter() - t0

    selected = _select(kept, profile.max_tunes, profile.seed)
    split = split_by_family(selected, profile)
    leaks = check_no_leakage(split)
    if leaks:  # cannot happen by construction; guard the invariant the whole evaluation rests on
        raise RuntimeError(f"split leakage in {len(leaks)} families, e.g. {next(iter(leaks))}")

    t0 = time.perf_counter()
    labelled = labeller.label_tunes(split, progress=progress)
    timings["label"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    aug_counts: Counter = Counter()
    augmented = labeller.label_tunes(augment_transpositions(labelled, profile.transpositions, aug_counts))
    timings["augment"] = time.perf_counter() - t0
    final = labelled + augmented

    out.mkdir(parents=True, exist_ok=True)
    tunes_path = write_jsonl(final, out / "tunes.jsonl")
    report_path = out / "cleaning_report.json"
    jsonl.write_text_atomic(report_path, json.dumps(report.to_dict(), ensure_ascii=False, indent=2,
                                                    sort_keys=True) + "\n")
    manifest = build_manifest(final, report, profile, raw_count=len(raw), selected=len(selected),
                              augmentation=dict(sorted(aug_counts.items())))
    manifest["input_fingerprint"] = fingerprint
    manifest["files"] = {"tunes.jsonl": {"sha256": _sha256(tunes_path), "records": len(final)},
                         "cleaning_report.json": {"sha256": _sha256(report_path)}}
    manifest_path = out / "manifest.json"
    jsonl.write_text_atomic(manifest_path, json.dumps(manifest, ensure_ascii=False, indent=2,
                                                      sort_keys=True) + "\n")
    return CorpusResult(final, report, manifest,
                        {"tunes": tunes_path, "manifest": manifest_path, "cleaning_report": report_path,
                         "dir": out}, timings)


def build_manifest(records: Sequence[TuneRecord], report: CleaningReport, profile: Profile,
                   raw_count: int, selected: int, augmentation: dict) -> dict:
    """Counts per split and source, licences and the settings that made the corpus (no clock
    times: the manifest is byte-reproducible)."""
    per_split = Counter(r.split for r in records)
    per_source_split: dict[str, dict[str, int]] = defaultdict(dict)
    for (src, sp), n in sorted(Counter((r.source, r.split) for r in records).items()):
        per_source_split[src][sp] = n
    return {
        "format_version": CORPUS_FORMAT_VERSION,
        "settings": _settings(profile),
        "counts": {"loaded": raw_count, "after_cleaning": report.n_out, "selected": selected,
                   "augmented": sum(1 for r in records if r.augmented_from), "total": len(records),
                   "per_split": {s: per_split.get(s, 0) for s in SPLITS},
                   "per_source": dict(per_source_split),
                   "families": len({r.family for r in records})},
        "augmentation": augmentation,
        "licences": dict(sorted({r.source: r.licence for r in records}.items())),
    }


# --------------------------------------------------------------------------------------------
# Plots for notebook 01 (each returns the Figure)
# --------------------------------------------------------------------------------------------
def _bar_chart(ax: Any, counter: Counter, title: str, top: int = 12, horizontal: bool = True) -> None:
    items = counter.most_common(top)
    names = [str(k) for k, _ in items][::-1]
    values = [v for _, v in items][::-1]
    ax.barh(names, values, color="#4C72B0") if horizontal else ax.bar(names, values, color="#4C72B0")
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)


def plot_corpus_overview(records: Sequence[TuneRecord]) -> Any:
    """A 2x4 panel: tunes per source, keys, meters, split sizes, chars, notes, bars, emotions."""
    import matplotlib.pyplot as plt

    originals = [r for r in records if not r.augmented_from]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    _bar_chart(axes[0, 0], Counter(r.source for r in originals), "tunes per source")
    _bar_chart(axes[0, 1], Counter(r.key for r in originals), "keys (K:), top 12")
    _bar_chart(axes[0, 2], Counter(r.meter for r in originals), "meters (M:), top 12")
    _bar_chart(axes[0, 3], Counter(r.split or "(none)" for r in records), "records per split")
    axes[1, 0].hist([len(r.abc) for r in originals], bins=40, color="#55A868")
    axes[1, 0].set_title("length (characters)", fontsize=10)
    axes[1, 1].hist([r.n_notes for r in originals], bins=40, color="#55A868")
    axes[1, 1].set_title("notes per tune", fontsize=10)
    axes[1, 2].hist([r.n_bars for r in originals], bins=40, color="#55A868")
    axes[1, 2].set_title("bars per tune", fontsize=10)
    _bar_chart(axes[1, 3], Counter(_label_en(r.labels.get("emotion")) for r in originals), "emotion labels")
    fig.tight_layout()
    return fig


def plot_label_balance(records: Sequence[TuneRecord]) -> Any:
    """Style and emotion label counts, and the chord vocabulary (top 15 chord symbols)."""
    import matplotlib.pyplot as plt

    originals = [r for r in records if not r.augmented_from]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    _bar_chart(axes[0], Counter(_label_en(r.labels.get("style")) for r in originals), "style labels", top=15)
    _bar_chart(axes[1], Counter(_label_en(r.labels.get("emotion")) for r in originals), "emotion labels", top=15)
    chords = Counter(c for r in originals for c in r.labels.get("chords", []))
    _bar_chart(axes[2], chords, "chords (all bars)", top=15)
    fig.tight_layout()
    return fig


def _label_en(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("en") or value.get("zh") or "?")
    return str(value) if value else "(none)"
