"""Requests unlike the corpus: does the model follow *any* request, not only corpus-shaped ones?

    requests = any_request_suite(test_tunes, n=80, seed=0)
    answers = composer.compose_many(requests, seed=0)
    table = follow_report(follow_rows(requests, answers))  # key, meter, length, bars, continuations

The test split's requests come from its tunes, so they ask for what the corpus holds (mostly G,
D and A major, 4/4 and 6/8). This suite draws each field evenly and independently: the key from
all 15 signatures in major and minor plus a few modes, the meter from ten (2/4 .. 12/8, 2/2, C,
C|), the length from 4 to 32 bars, the task kind and the language in turn. Only continuations
come from real tunes (the given bars are a held-out tune's opening, moved to the drawn key's
tonic when the modes agree); their meter is the drawn one when a held-out tune has it, else one
of the suite's meters that the held-out tunes have.

The report gives, with 95 % intervals, what a user would check first: the asked key and meter
written, the length within one bar of the asked, the share of wrong-length bars, continuations
that repeat the given bars note for note, and answers cut off by the token limit.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from imelodist_lib import abc
from imelodist_lib.evaluation import score_answer, summarize
from imelodist_lib.labels import EMOTION_RULES, STYLE_ZH, diatonic_triads
from imelodist_lib.music import pitch_class
from imelodist_lib.instructions import COMPOSE_TASKS, LANGS, ComposeRequest, request_from_tune

__all__ = ["SUITE_KEYS", "SUITE_METERS", "SUITE_LENGTHS", "SuiteRow", "any_request_suite",
           "chord_progression", "tonic_shift", "follow_rows", "follow_report", "markdown", "TARGETS"]

_MAJOR = ("C", "G", "D", "A", "E", "B", "F#", "C#", "F", "Bb", "Eb", "Ab", "Db", "Gb", "Cb")
_MINOR = ("Am", "Em", "Bm", "F#m", "C#m", "G#m", "D#m", "A#m", "Dm", "Gm", "Cm", "Fm", "Bbm", "Ebm", "Abm")
_MODES = ("Ddor", "Edor", "Gdor", "Amix", "Dmix", "Gmix", "Ephr", "Flyd")
SUITE_KEYS: tuple[str, ...] = _MAJOR + _MINOR + _MODES
SUITE_METERS: tuple[str, ...] = ("2/4", "3/4", "4/4", "6/8", "9/8", "12/8", "3/8", "2/2", "C", "C|")
SUITE_LENGTHS: tuple[int, ...] = (4, 6, 8, 12, 16, 20, 24, 32)
_THEMES = (("春天", "Spring"), ("海港", "The Harbour"), ("山间小路", "The Mountain Path"),
           ("归乡", "Homecoming"), ("月夜", "Moonlit Night"), ("丰收", "Harvest Home"))
_STYLES = ("jig", "reel", "waltz", "march", "polka", "air", "hornpipe", "song")
_EMOTIONS = tuple((zh, en) for *_, zh, en in EMOTION_RULES)

# what a follower of any request should reach (free sampling at the default temperature)
TARGETS = {"key_match": 0.90, "meter_match": 0.90, "length_within_one": 0.70,
           "bar_error_rate": 0.05, "reproduced": 0.80, "truncated": 0.02}


def _dealt(values: Sequence[Any], n: int, rng: random.Random) -> list[Any]:
    """`n` draws in which every value appears as evenly as `n` allows, in a shuffled order."""
    out: list[Any] = []
    while len(out) < n:
        block = list(values)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


_ROOT = re.compile(r"[A-G][#b]?")


def _root_pc(symbol: str) -> int:
    """Pitch class of a chord symbol's or tonic's root ("F#m" -> 6)."""
    return pitch_class(_ROOT.match(symbol).group())


def tonic_shift(have: str, want: str) -> int:
    """Semitones (-5..6) moving the tonic of key `have` to the tonic of key `want`."""
    shift = (_root_pc(abc.parse_key(want).tonic) - _root_pc(abc.parse_key(have).tonic)) % 12
    return shift - 12 if shift > 6 else shift


def chord_progression(key: str, bars: int, rng: random.Random) -> list[str]:
    """One chord symbol per bar from the key's diatonic triads: the tonic first and last, the
    triad on the fifth degree (major if the key has one) before the last bar, the others drawn."""
    triads = [c.name for c in diatonic_triads(key)]
    tonic = triads[0]
    if bars <= 2:
        return [tonic] * bars
    middle = [rng.choice(triads[1:] or triads) for _ in range(bars - 2)]
    fifths = [c for c in triads if (_root_pc(c) - _root_pc(tonic)) % 12 == 7]
    if fifths:  # the major triad when there is one (minor keys: the harmonic-minor V)
        middle[-1] = min(fifths, key=lambda c: c.endswith("m"))
    return [tonic, *middle, tonic]


def _continuation(candidates: Sequence[tuple[Any, str | None]], key: str, lang: str, bars: int,
                  rng: random.Random) -> ComposeRequest | None:
    """A continuation of one of `candidates` ((held-out record, its K:) pairs in the wanted
    meter), moved to `key`'s tonic when the modes agree (else kept in its own key), asked to
    reach `bars` bars; None when no tune serves."""
    wanted = abc.parse_key(key)
    pool = list(candidates)
    rng.shuffle(pool)
    for record, tune_key in pool:
        have = abc.parse_key(tune_key or "C")
        shift = 0
        if have.mode == wanted.mode and have.tonic and wanted.tonic:
            shift = tonic_shift(tune_key or "C", key)
        try:
            moved = dataclasses.replace(record, abc=abc.transpose(record.abc, shift)) if shift else record
            given = request_from_tune(moved, "continue", lang, rng)
        except (abc.ABCError, ValueError):
            continue
        return dataclasses.replace(given, bars=bars, tempo=None)
    return None


def any_request_suite(tunes: Sequence[Any], n: int = 80, seed: int = 0) -> list[ComposeRequest]:
    """`n` requests with key, meter, length, task kind and language drawn evenly and
    independently (continuations from `tunes`, the held-out split's records)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    kinds = [(task, lang) for task in COMPOSE_TASKS for lang in LANGS]
    kinds = [kinds[i % len(kinds)] for i in range(n)]
    keys, meters, lengths = (_dealt(v, n, rng) for v in (SUITE_KEYS, SUITE_METERS, SUITE_LENGTHS))
    by_meter: dict[str | None, list[tuple[Any, str | None]]] = {}
    for record in tunes:  # each held-out tune is parsed once, its order kept
        tune = abc.parse_tune(record.abc)
        by_meter.setdefault(tune.meter, []).append((record, tune.key))
    held = set(by_meter)
    fallback = iter(_dealt([m for m in SUITE_METERS if m in held] or [None], n, rng))
    emotions, styles, themes = (iter(_dealt(v, n, rng)) for v in (_EMOTIONS, _STYLES, _THEMES))
    out = []
    for (task, lang), key, meter, bars in zip(kinds, keys, meters, lengths):
        zh_en = 0 if lang == "zh" else 1
        if task == "emotion":
            emotion = next(emotions)[zh_en]
            style = next(styles)
            out.append(ComposeRequest("emotion", lang, emotion=emotion,
                                      style=STYLE_ZH.get(style, style) if lang == "zh" else style,
                                      key=key, meter=meter, bars=bars))
        elif task in ("chords", "theme_chords"):
            theme = next(themes)[zh_en] if task == "theme_chords" else None
            out.append(ComposeRequest(task, lang, chords=chord_progression(key, bars, rng),
                                      theme=theme, key=key, meter=meter))
        else:
            pool = by_meter.get(meter if meter in held else next(fallback), [])
            request = _continuation(pool, key, lang, bars, rng)
            if request is None:
                raise ValueError("no held-out tune can be continued: give the test split's records")
            out.append(request)
    return out


@dataclass(frozen=True)
class SuiteRow:
    """One answer to one suite request, scored: the evaluation's row plus what this suite adds."""

    request: ComposeRequest
    scores: dict[str, Any]  # evaluation.score_answer's row
    length_within_one: float | None  # 1.0 when the tune has the asked bars +- 1
    reproduced: float | None  # continuations: 1.0 when every given note is repeated first
    truncated: float  # 1.0 when the answer hit the token limit


def follow_rows(requests: Sequence[ComposeRequest], answers: Sequence[Sequence[Any]]) -> list[SuiteRow]:
    """Score `answers` (Composer.compose_many's lists of Compositions, one list per request)."""
    if len(requests) != len(answers):
        raise ValueError(f"{len(requests)} requests but {len(answers)} answer lists")
    rows = []
    for request, compositions in zip(requests, answers):
        for c in compositions:
            scores = score_answer(request, c.abc or c.text)
            within = None
            if request.bars is not None:
                within = 0.0 if scores["bars"] is None else float(abs(scores["bars"] - request.bars) <= 1)
            reproduced = None
            if request.task == "continue" and scores.get("continuation_fidelity") is not None:
                reproduced = float(scores["continuation_fidelity"] >= 1.0)
            rows.append(SuiteRow(request, scores, within, reproduced,
                                 float(getattr(c, "finish_reason", "stop") == "length")))
    return rows


_REPORTED = (("key_match", "asked key written"), ("meter_match", "asked meter written"),
             ("length_within_one", "length within one bar of the asked"),
             ("bar_error_rate", "bars of the wrong length"),
             ("reproduced", "continuations that repeat the given bars"),
             ("truncated", "answers cut off by the token limit"), ("valid", "answers that parse"))


def follow_report(rows: Sequence[SuiteRow]) -> list[dict[str, Any]]:
    """The suite's table: each figure with its 95 % interval (requests are the unit: Wilson
    for the yes/no rates, a bootstrap for the pooled wrong-bar share), its target and whether
    the point estimate meets it."""
    clusters = [id(r.request) for r in rows]
    table = []
    for name, label in _REPORTED:
        own = name in ("length_within_one", "reproduced", "truncated")  # SuiteRow's fields
        values = [getattr(r, name) if own else r.scores.get(name) for r in rows]
        if name == "bar_error_rate":
            s = summarize(name, values, [r.scores.get("bars_checked") for r in rows], clusters=clusters)
        else:
            s = summarize(name, values, clusters=clusters, kind="rate")
        target = TARGETS.get(name)
        lower_is_better = name in ("bar_error_rate", "truncated")
        meets = None if target is None or s.n == 0 else (
            s.mean < target if lower_is_better else s.mean >= target)
        table.append({"metric": name, "what": label, "value": s.mean, "low": s.ci_low,
                      "high": s.ci_high, "n": s.n, "target": target,
                      "lower_is_better": lower_is_better, "meets": meets})
    return table


def _percent(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f} %"


def markdown(table: Sequence[dict[str, Any]]) -> str:
    """The report as a Markdown table (percentages, intervals, target, met or not)."""
    lines = ["| | value [95 % interval] | n | target | met |", "|---|---|---|---|---|"]
    for t in table:
        target = "" if t["target"] is None else ("< " if t["lower_is_better"] else ">= ") + _percent(t["target"])
        met = "" if t["meets"] is None else ("yes" if t["meets"] else "no")
        lines.append(f"| {t['what']} | {_percent(t['value'])} [{_percent(t['low'])}, {_percent(t['high'])}] | "
                     f"{t['n']} | {target} | {met} |")
    return "\n".join(lines)
