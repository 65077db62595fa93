"""Agreement and speed of `imelodist_lib.abc` against music21 on every ABC tune music21 ships.

For each tune (split with `abc.split_tunes`) we compare our `events()` with the notes music21's
own ABC reader produces from the same text (marked `%abc-2.1`, so both carry accidentals through
the bar). Comparison rules, applied to both sides alike:
  * per voice/part, in written order; grace notes, chord symbols, `x` and `Z` rests dropped
    (music21 skips x and Z rests when reading);
  * a note/chord is its sorted MIDI pitches, a rest is None, with its duration in quarter lengths;
  * tied notes are merged into one (music21 splits notes that overflow a bar into tied pieces).
Disagreements are grouped by a cause found from the tune text; see `_cause`.

Speed: our parse_tune + check_bars versus music21's converter.parse on the same tunes.
Bar checking: share of bars a naive check flags (every music21 measure whose length differs
from its time signature) versus the bars our musical check flags.

music21 takes ~70 ms a tune, so the full run (~12,978 tunes) takes ~15 min on one core;
music21's results are cached per tune under benchmarks/cache/ so reruns take seconds.

    python benchmarks/bench_abc.py            # everything
    python benchmarks/bench_abc.py --limit 300
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pickle
import random
import re
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imelodist_lib import abc  # noqa: E402

CACHE_DIR = ROOT / "benchmarks" / "cache" / "abc_music21"
RESULTS = ROOT / "benchmarks" / "results" / "abc.json"


def corpus_tunes(limit: int | None = None) -> list[tuple[str, str]]:
    """(source name, tune text) for every tune in music21's bundled .abc files."""
    from music21 import corpus

    out = []
    for path in sorted(corpus.getPaths(fileExtensions=("abc",)), key=str):
        name = str(path).split("corpus/")[-1]
        text = Path(path).read_text(encoding="latin-1")
        for i, tune in enumerate(abc.split_tunes(text)):
            out.append((f"{name}#{i}", tune))
    # a fixed shuffle: any prefix (--limit, or a run cut short) is a spread over all collections
    random.Random(0).shuffle(out)
    return out[:limit] if limit else out


def _merge_ties(seq: list[tuple]) -> list[tuple]:
    """Merge tied runs (pitches, duration, tie) into single (pitches, duration) items."""
    out: list[tuple] = []
    tied_prev = False
    for pitches, dur, tie in seq:
        if tied_prev and out and out[-1][0] == pitches:
            out[-1] = (pitches, out[-1][1] + dur)
        else:
            out.append((pitches, dur))
        tied_prev = tie
    return out


def ours(tune: abc.Tune) -> list[list[tuple]]:
    """Our events as comparable per-voice sequences."""
    voices: dict[str, list[tuple]] = {}
    for e in abc.events(tune):
        if e.kind in ("invisible_rest", "measure_rest"):
            continue
        pitches = tuple(sorted(e.pitches)) if e.pitch is not None else None
        voices.setdefault(e.voice, []).append((pitches, e.duration, e.tie))
    return [_merge_ties(v) for v in voices.values()]


def _cache_path(text: str) -> Path:
    return CACHE_DIR / f"{hashlib.sha1(text.encode('utf-8', 'replace')).hexdigest()}.pkl"


def _cached(text: str) -> bool:
    return _cache_path(text).exists()


def music21_reading(text: str) -> dict:
    """music21's notes per part, its timing, and the naive measure check (cached per tune)."""
    path = _cache_path(text)
    if path.exists():
        return pickle.loads(path.read_bytes())
    from music21 import converter, harmony

    start = time.perf_counter()
    result: dict = {}
    try:
        score = converter.parse("%abc-2.1\n" + text, format="abc")
        result["seconds"] = time.perf_counter() - start
        parts = list(score.parts) if hasattr(score, "parts") and len(score.parts) else [score]
        seqs = []
        measures = flagged = 0
        for part in parts:
            seq = []
            for n in part.recurse().notesAndRests:
                if n.duration.isGrace or isinstance(n, harmony.ChordSymbol):
                    continue
                pitches = None if n.isRest else tuple(sorted(p.midi for p in n.pitches))
                tie = n.tie is not None and n.tie.type in ("start", "continue")
                seq.append((pitches, Fraction(n.quarterLength).limit_denominator(100000), tie))
            seqs.append(_merge_ties(seq))
            for m in part.getElementsByClass("Measure"):
                ts = m.getContextByClass("TimeSignature")
                if ts is None:
                    continue
                measures += 1
                if abs(m.duration.quarterLength - ts.barDuration.quarterLength) > 1e-6:
                    flagged += 1
        result.update(ok=True, seqs=seqs, measures=measures, flagged=flagged)
    except Exception as err:  # music21 fails on some corpus tunes: record and move on
        result.update(ok=False, error=f"{type(err).__name__}: {err}"[:200],
                      seconds=time.perf_counter() - start)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(result))
    return result


_CAUSES = [
    # (name, pattern in the tune body, who is right) - checked in this order
    ("music21 drops a note that carries a glued H/T/u/v decoration or a leading annotation "
     "(Hf2, H^C4, \">\"d)",
     re.compile(r"[HTuv][\^_=]?[A-Ga-gz]|\"[<>^_@][^\"]*\"\s*[A-Ga-g]"),
     "ours: the decoration belongs to the note; music21 skips the token"),
    ("broken rhythm next to a slur, tie, staccato or grace (a>(b, (a>)b, .a>.b, a>-b)",
     re.compile(r"[<>]\s*[().!~{-]|[).}]\s*[<>]"),
     "ours: ABC 2.1 applies > to the notes either side; music21 only to adjacent tokens"),
    ("tuplet holding grace notes ((3{a}gfg)", re.compile(r"\([2-9][^|]*?\{"),
     "ours: ABC 2.1 counts the tuplet's notes without grace notes; music21 counts them"),
    ("accidental inside a chord", re.compile(r"\[[^\]|:]*[\^_=][A-Ga-g][^\]]*\]"),
     "ours: ABC 2.1 carries chord accidentals through the bar; music21 does not"),
]


def _merge_rests(seqs: list[list[tuple]]) -> list[list[tuple]]:
    """Join consecutive rests (music21 splits a rest that overflows a bar into two)."""
    out = []
    for seq in seqs:
        merged: list[tuple] = []
        for pitches, dur in seq:
            if pitches is None and merged and merged[-1][0] is None:
                merged[-1] = (None, merged[-1][1] + dur)
            else:
                merged.append((pitches, dur))
        out.append(merged)
    return out


def _cause(text: str, ours_seqs: list, theirs_seqs: list) -> tuple[str, str]:
    if _merge_rests(ours_seqs) == _merge_rests(theirs_seqs):
        return ("music21 splits a rest that overflows a (mis-written) bar into two rests",
                "ours: the text has one rest")
    body = text.split("\nK:", 1)[-1]
    for name, pattern, right in _CAUSES:
        if pattern.search(body):
            return name, right
    return "other", "see example"


def main() -> None:
    """Run the comparison and write benchmarks/results/abc.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="compare only N tunes")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop asking music21 (uncached tunes) after this long")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tunes = corpus_tunes(args.limit)

    ours_seconds = m21_seconds = 0.0
    n_equal = n_compared = n_we_reject = n_m21_fail = 0
    our_bars = our_flags = naive_measures = naive_flags = 0
    our_bars_same = our_flags_same = 0
    disagreements: dict[str, dict] = {}
    rejected = collections.Counter()
    rejected_examples: dict[str, str] = {}
    flagged_examples = []
    began = time.perf_counter()
    n_skipped = 0
    for name, text in tunes:
        if args.max_minutes is not None and time.perf_counter() - began > 60 * args.max_minutes \
                and not _cached(text):
            n_skipped += 1
            continue
        start = time.perf_counter()
        try:
            tune = abc.parse_tune(text)
            report = abc.check_bars(tune)
            ours_ok = True
        except abc.ABCError as err:
            ours_ok = False
            msg = re.sub(r"'.*'", "'…'", err.message)
            rejected[msg] += 1
            rejected_examples.setdefault(msg, f"{name}: {err}")
        elapsed = time.perf_counter() - start
        m21 = music21_reading(text)
        if not m21["ok"]:
            n_m21_fail += 1
            continue
        if not ours_ok:
            n_we_reject += 1
            continue
        ours_seconds += elapsed
        m21_seconds += m21["seconds"]
        our_bars += report.checked
        our_flags += len(report.errors)
        naive_measures += m21["measures"]
        naive_flags += m21["flagged"]
        if report.errors and len(flagged_examples) < 40:
            e = report.errors[0]
            flagged_examples.append(f"{name} line {e.line}: {e.message}")
        n_compared += 1
        our_seqs = ours(tune)
        if our_seqs == m21["seqs"]:
            n_equal += 1
        else:
            cause, right = _cause(text, our_seqs, m21["seqs"])
            entry = disagreements.setdefault(cause, {"count": 0, "right": right, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < 5:
                entry["examples"].append(name)

    results = {
        "command": "python " + " ".join(["benchmarks/bench_abc.py"] + sys.argv[1:]),
        "tunes_total": len(tunes),
        "tunes_skipped_for_time": n_skipped,
        "music21_fails": n_m21_fail,
        "we_reject_music21_reads": n_we_reject,
        "we_reject_reasons": dict(rejected.most_common()),
        "we_reject_examples": rejected_examples,
        "compared": n_compared,
        "events_equal": n_equal,
        "agreement": round(n_equal / n_compared, 4) if n_compared else None,
        "agreement_excluding_known_music21_bugs": round(
            (n_equal + sum(v["count"] for v in disagreements.values()
                           if v["right"].startswith("ours")))
            / n_compared, 4) if n_compared else None,
        "disagreements_by_cause": dict(sorted(disagreements.items(),
                                              key=lambda kv: -kv[1]["count"])),
        "speed": {
            "ours_parse_and_check_bars_ms_per_tune": round(1000 * ours_seconds / n_compared, 3)
            if n_compared else None,
            "music21_parse_ms_per_tune": round(1000 * m21_seconds / n_compared, 3)
            if n_compared else None,
            "speedup": round(m21_seconds / ours_seconds, 1) if ours_seconds else None,
        },
        "bar_check": {
            "naive_music21_measures": naive_measures,
            "naive_flagged": naive_flags,
            "naive_flag_rate": round(naive_flags / naive_measures, 4) if naive_measures else None,
            "ours_bars": our_bars,
            "ours_flagged": our_flags,
            "ours_flag_rate": round(our_flags / our_bars, 4) if our_bars else None,
            "ours_flagged_examples": flagged_examples,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: results[k] for k in ("compared", "agreement",
                                              "agreement_excluding_known_music21_bugs", "speed",
                                              "bar_check")},
                     indent=2)[:3000])


if __name__ == "__main__":
    main()
