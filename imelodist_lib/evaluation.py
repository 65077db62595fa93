"""Evaluation: how good are a composer's answers? Metrics with confidence intervals and a
novelty index against the training split. (The n-gram baseline any model must beat is in
`ngram`; the probes that read a model's own likelihoods, such as perplexity, are in `probes`.)

For a list of (request, answer) pairs, `score_answers` measures every answer on
- syntax: does it parse with our ABC core (and, on a sample, does music21 agree)?
- bar-duration errors: share of checked bars whose length differs from the meter's
  (`abc.check_bars`, pickups and final bars excepted; NotaGen's paper reports 0.38 % on human
  sheets, 0.18 % for NotaGen and 0.8-4.7 % for MuPT);
- adherence to the request: key, mode, meter, tempo, length, chords (share of strong-beat melody
  notes that are chord tones of the requested chord for that bar), continuation (share of the
  given notes reproduced, then at least one new bar);
- musical statistics: pitch-class entropy, in-scale rate, range, rhythmic variety, repeats and
  sections, repeated-bar share;
- diversity across samples of one request and novelty against the training tunes;
and aggregates each metric with a seeded 95 % interval (Wilson for yes/no rates, percentile
bootstrap for means and pooled ratios).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from imelodist_lib import abc, jsonl
from imelodist_lib.music import NATURAL_PITCH_CLASS, mode_family, pitch_class
from imelodist_lib.instructions import (COMPOSE_TASKS, LANGS, ComposeRequest,
                                        request_from_tune, target_for)
from imelodist_lib.profiles import Profile

Pair = tuple[ComposeRequest, str]  # (request, the composer's answer text)

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
NEAR_COPY = 0.95  # novelty: an answer this similar to a training tune is a near-copy


# --------------------------------------------------------------------------------------------
# Confidence intervals
# --------------------------------------------------------------------------------------------
def _normal_quantile(confidence: float) -> float:
    """The z value a two-sided interval at `confidence` reaches (0.95 -> 1.96)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a rate: stays inside [0, 1] and is sane at 0/n and n/n
    (`successes` may be fractional: rate x effective sample size)."""
    if n <= 0:
        return (math.nan, math.nan)
    z = _normal_quantile(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0/n and n/n the bound is exactly 0 or 1 (floating point would leave 1e-17).
    return (0.0 if successes <= 0 else max(0.0, centre - half),
            1.0 if successes >= n else min(1.0, centre + half))


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       weights: Sequence[float] | None = None,
                       clusters: Sequence[Any] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (or, with `weights`, of the pooled ratio
    sum(values*weights)/sum(weights)); seeded, so reproducible. With `clusters` (e.g. the
    request each answer answers) whole clusters are resampled: samples of one request are
    not independent, and pretending they are would make the interval too narrow."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    if clusters is None:
        num, den = x * w, w
    else:  # one (sum of x*w, sum of w) per cluster; the statistic is their ratio
        keys = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
        ids = np.array([keys[c] for c in clusters])
        num = np.bincount(ids, weights=x * w, minlength=len(keys))
        den = np.bincount(ids, weights=w, minlength=len(keys))
    if num.size == 1:
        value = float(num[0] / den[0]) if den[0] else math.nan
        return (value, value)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(resamples, num.size))
    tot_num, tot_den = num[idx].sum(axis=1), den[idx].sum(axis=1)
    stats = tot_num[tot_den > 0] / tot_den[tot_den > 0]
    alpha = (1 - confidence) / 2
    return (float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)))


def entropy_bits(counts: Iterable[float]) -> float:
    """Shannon entropy in bits of a histogram (zeros ignored)."""
    c = np.asarray([v for v in counts if v > 0], dtype=float)
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum() + 0.0)


# --------------------------------------------------------------------------------------------
# Music helpers: keys, chords, strong beats
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyInfo:
    """A key reduced to what metrics need: tonic pitch class, mode family, scale pitch classes."""

    tonic: str
    tonic_pc: int
    mode: str
    fifths: int
    scale: frozenset[int]  # the seven pitch classes of the signature (explicit K: accidentals too)
    signature: tuple[tuple[str, int], ...]  # alteration per letter, ("F", 1) in G major

    @property
    def family(self) -> str:
        """major, minor or modal (`music.mode_family`, the family the corpus labels use)."""
        return mode_family(self.mode)


def key_info(key: str) -> KeyInfo:
    """Parse an ABC K: value with the core parser; raises abc.ABCError on nonsense."""
    k = abc.parse_key(key)
    tonic = str(k.tonic)
    scale = frozenset((NATURAL_PITCH_CLASS[letter] + alt) % 12 for letter, alt in k.accidentals.items())
    return KeyInfo(tonic=tonic, tonic_pc=pitch_class(tonic), mode=k.mode,
                   fifths=int(k.fifths), scale=scale, signature=tuple(sorted(k.accidentals.items())))


_CHORD_SYMBOL = re.compile(r"^\s*([A-Ga-g])([#b♯♭]?)([^/]*)(?:/([A-Ga-g][#b♯♭]?))?\s*$")


def chord_pitch_classes(symbol: str) -> frozenset[int] | None:
    """Pitch classes of a chord symbol: 'G' -> {7,11,2}, 'Am7' -> {9,0,4,7}, 'D/F#' adds F#;
    None when the symbol is not a chord (so the bar is skipped, not counted wrong)."""
    m = _CHORD_SYMBOL.match(symbol or "")
    if not m:
        return None
    root = pitch_class(m.group(1).upper() + m.group(2))
    q = m.group(3).strip()
    ql = q.lower()
    if q.startswith(("maj7", "M7", "Δ")) or ql.startswith("maj7"):
        steps = [0, 4, 7, 11]
    elif ql.startswith(("m7b5", "ø")):
        steps = [0, 3, 6, 10]
    elif ql.startswith(("dim7", "°7", "o7")):
        steps = [0, 3, 6, 9]
    elif ql.startswith(("dim", "°", "o")):
        steps = [0, 3, 6]
    elif ql.startswith(("aug", "+")):
        steps = [0, 4, 8]
    elif ql.startswith("sus2"):
        steps = [0, 2, 7]
    elif ql.startswith("sus"):
        steps = [0, 5, 7]
    elif ql.startswith("maj") or q == "":
        steps = [0, 4, 7]
    elif ql.startswith(("min", "m", "-")):
        rest = ql[3:] if ql.startswith("min") else ql[1:]
        steps = [0, 3, 7] + ([10] if rest.startswith(("7", "9", "11")) else [9] if rest.startswith("6") else [])
    elif ql[:1].isdigit():
        steps = [0, 4, 7] + ([10] if ql.startswith(("7", "9", "11", "13")) else [9] if ql.startswith("6") else [])
    else:
        return None
    pcs = {(root + s) % 12 for s in steps}
    if m.group(4):
        pcs.add(pitch_class(m.group(4).upper() if len(m.group(4)) == 1 else
                                  m.group(4)[0].upper() + m.group(4)[1:]))
    return frozenset(pcs)


def meter_fraction(meter: str | None) -> tuple[int, int] | None:
    """'6/8' -> (6, 8), 'C' -> (4, 4), 'C|' -> (2, 2) as `abc.meter_parts` reads it; None for
    free meter ('none') and for text that is no meter."""
    try:
        return abc.meter_parts(meter or "")
    except abc.ABCError:
        return None


def strong_beats(meter: str) -> list[Fraction]:
    """Strong-beat offsets (quarter lengths from the bar line): the downbeat, plus the bar's
    midpoint when the bar holds an even number of main beats. So 2/4 [0,1], 4/4 [0,2], 2/2 [0,1],
    3/4 [0], 6/8 [0,3/2], 9/8 [0], 12/8 [0,3]; compound meters count dotted-quarter beats."""
    frac = meter_fraction(meter)
    if frac is None:
        return [Fraction(0)]
    num, den = frac
    bar = Fraction(4 * num, den)
    compound = den >= 8 and num % 3 == 0 and num > 3
    beats = num // 3 if compound else num
    return [Fraction(0)] + ([bar / 2] if beats % 2 == 0 else [])


# --------------------------------------------------------------------------------------------
# A parsed answer: events grouped in bars with onsets
# --------------------------------------------------------------------------------------------
@dataclass
class ParsedTune:
    """An answer as metrics see it: header values, bars of (onset, pitch, duration) notes."""

    text: str
    key: str | None
    meter: str | None
    tempo: int | None
    title: str | None
    bars: list[list[tuple[Fraction, int | None, Fraction]]]  # per counted bar: notes and rests
    bar_texts: list[str]
    bar_errors: int
    bars_checked: int
    body: str

    @property
    def notes(self) -> list[tuple[Fraction, int | None, Fraction]]:
        return [e for bar in self.bars for e in bar]

    @property
    def pitches(self) -> list[int]:
        return [p for _, p, _ in self.notes if p is not None]


@lru_cache(maxsize=65536)
def parse_answer(text: str) -> ParsedTune:
    """Parse one answer with the ABC core's strict check (`abc.validate`: parses, has K: and
    M:, a full bar, closed repeats and tuplets); raises abc.ABCError when it is not valid.
    Cached: the n-gram composer and the novelty index read the same training tunes."""
    report = abc.validate(text)
    if not report.ok:
        raise report.error or abc.ABCError("not a valid ABC tune")
    tune, bar_report = report.tune, report.bars
    by_bar: dict[int, list[Any]] = defaultdict(list)
    for ev in abc.events(tune):
        by_bar[int(ev.bar)].append(ev)
    bars: list[list[tuple[Fraction, int | None, Fraction]]] = []
    texts: list[str] = []
    for index in sorted(by_bar):
        group = [ev for ev in by_bar[index] if Fraction(ev.duration) > 0]
        if not group:
            continue  # as `instructions.chords_per_bar`, a bar counts when it holds notes
        bar = bar_report.bars[index] if 0 <= index < len(bar_report.bars) else None
        total = sum((Fraction(ev.duration) for ev in group), Fraction(0))
        # A pickup (anacrusis) leads into the next downbeat: its notes end at the bar line.
        start = Fraction(0)
        if bar is not None and bar.kind == "pickup" and bar.expected is not None and total < bar.expected:
            start = bar.expected - total
        row, t = [], start
        for ev in group:
            row.append((t, ev.pitch, Fraction(ev.duration)))
            t += Fraction(ev.duration)
        bars.append(row)
        texts.append(bar.text if bar is not None else "")
    meter = tune.meter if tune.meter != "none" else None
    return ParsedTune(text=text, key=tune.key or None, meter=meter, tempo=tune.tempo,
                      title=tune.title or None, bars=bars, bar_texts=texts,
                      bar_errors=len(bar_report.errors), bars_checked=int(bar_report.checked),
                      body=tune.body)


# --------------------------------------------------------------------------------------------
# Per-answer metrics
# --------------------------------------------------------------------------------------------
def chord_adherence(tune: ParsedTune, chords: Sequence[str]) -> float | None:
    """Share of strong-beat melody notes that are chord tones of the requested chord for their
    bar (bar i <-> chords[i], pickup counted as a bar as the chord labels count it). The note
    sounding at each strong beat counts (a held note too); rests and unreadable chords are
    skipped. None when nothing could be checked."""
    beats = strong_beats(tune.meter or "")
    hits = total = 0
    for bar, symbol in zip(tune.bars, chords):
        pcs = chord_pitch_classes(symbol)
        if pcs is None:
            continue
        for beat in beats:
            sounding = [p for onset, p, d in bar if onset <= beat < onset + d]
            if not sounding or sounding[0] is None:
                continue
            total += 1
            hits += (sounding[0] % 12) in pcs
    return hits / total if total else None


def _event_seq(tune: ParsedTune) -> list[tuple[int | None, Fraction]]:
    return [(p, d) for _, p, d in tune.notes]


def continuation_fidelity(answer: ParsedTune, seed: ParsedTune) -> tuple[float, bool]:
    """(share of the seed's notes reproduced in order at the start of the answer, whether the
    answer goes on for at least one bar more than the seed)."""
    from rapidfuzz.distance import LCSseq

    given = _event_seq(seed)
    if not given:
        return (0.0, len(answer.bars) > 0)
    head = _event_seq(answer)[: len(given)]
    share = LCSseq.similarity(given, head) / len(given)
    return (float(share), len(answer.bars) > len(seed.bars))


def _section_stats(body: str, n_bars: int) -> tuple[int, float]:
    """(repeat count, bars per section) from the body's bar lines (`abc.barline_tokens`): each
    bar line with ':|' or '::' is a repeat; sections are the stretches with notes between
    section bar lines ('||', '|]', '[|' and any with a repeat colon: ':|', '|:', '::')."""
    clean = re.sub(r'"[^"]*"|%[^\n]*|![^!]*!|\[[A-Za-z]:[^\]]*\]', "", body)
    repeats = sections = 0
    notes = False  # the stretch since the last section bar line has notes
    for line in clean.split("\n"):
        pos = 0
        for start, end, text in abc.barline_tokens(line) + [(len(line), len(line), "")]:
            notes = notes or re.search(r"[A-Ga-gz]", line[pos:start]) is not None
            pos = end
            repeats += ":|" in text or "::" in text
            if ":" in text or text in ("||", "|]", "[|", "[|]"):
                sections, notes = sections + notes, False
    sections += notes
    return repeats, n_bars / max(1, sections)


def musical_statistics(tune: ParsedTune, key: KeyInfo | None) -> dict[str, float | None]:
    """Pitch-class entropy, in-scale rate, range, rhythmic variety, repeats, sections and
    repeated-bar share of one tune."""
    pitches = tune.pitches
    durations = [d for _, _, d in tune.notes]
    pcs = Counter(p % 12 for p in pitches)
    rhythm = Counter(durations)
    contents = [tuple((p, d) for _, p, d in bar) for bar in tune.bars]
    seen: set = set()
    repeated = 0
    for c in contents:
        repeated += c in seen
        seen.add(c)
    repeats, per_section = _section_stats(tune.body, len(tune.bars))
    return {
        "pc_entropy": entropy_bits(pcs.values()) if pitches else None,
        "in_scale_rate": (sum(1 for p in pitches if p % 12 in key.scale) / len(pitches)
                          if key is not None and pitches else None),
        "pitch_range": float(max(pitches) - min(pitches)) if pitches else None,
        "rhythm_distinct": float(len(rhythm)) if durations else None,
        "rhythm_entropy": entropy_bits(rhythm.values()) if durations else None,
        "repeats": float(repeats),
        "bars_per_section": per_section if tune.bars else None,
        "repeated_bar_share": repeated / len(contents) if contents else None,
    }


def _safe_key(key: str | None) -> KeyInfo | None:
    if not key:
        return None
    try:
        return key_info(key)
    except (abc.ABCError, ValueError):
        return None


def score_answer(request: ComposeRequest, answer: str) -> dict[str, Any]:
    """Every per-answer metric for one (request, answer) pair. Metrics that do not apply are
    None; an answer our parser rejects scores 0 on every adherence metric its request asks for
    (it honoured nothing) and None on the musical statistics."""
    row: dict[str, Any] = {"task": request.task, "lang": request.lang}
    if request.task == "describe":
        raise ValueError("score_answer scores tunes; a 'describe' answer is prose (leave it out "
                         "of the pairs, as build_benchmark does)")
    try:
        tune = parse_answer(answer)
        row.update(valid=1, parse_error=None)
    except (abc.ABCError, ValueError) as exc:
        tune = None
        row.update(valid=0, parse_error=str(exc)[:200])
    readable_chords = request.chords if request.chords and any(
        chord_pitch_classes(c) for c in request.chords) else None
    asked = {"key_match": request.key, "mode_match": request.key, "meter_match": request.meter,
             "tempo_match": request.tempo, "length_match": request.bars,
             "chord_adherence": readable_chords,
             "continuation_fidelity": request.seed_abc if request.task == "continue" else None,
             "continued": request.seed_abc if request.task == "continue" else None}
    for name, value in asked.items():
        row[name] = None if value is None else 0.0
    if tune is None:
        for name in ("bars", "bar_errors", "bars_checked", "bar_error_rate", "pc_entropy",
                     "in_scale_rate", "pitch_range", "rhythm_distinct", "rhythm_entropy",
                     "repeats", "bars_per_section", "repeated_bar_share"):
            row[name] = None
        return row
    row["bars"] = len(tune.bars)
    row["bar_errors"] = tune.bar_errors
    row["bars_checked"] = tune.bars_checked
    row["bar_error_rate"] = tune.bar_errors / tune.bars_checked if tune.bars_checked else None
    produced = _safe_key(tune.key)
    if request.key is not None:
        wanted = _safe_key(request.key)
        if wanted is not None and produced is not None:
            row["key_match"] = float(wanted.tonic_pc == produced.tonic_pc and wanted.mode == produced.mode)
            row["mode_match"] = float(wanted.mode == produced.mode)
    if request.meter is not None:
        row["meter_match"] = float(_same_meter(request.meter, tune.meter))
    if request.tempo is not None:
        row["tempo_match"] = float(tune.tempo is not None and abs(tune.tempo - request.tempo) <= 1)
    if request.bars is not None:
        row["length_match"] = float(len(tune.bars) == request.bars)
    if readable_chords:  # (None when no requested symbol is a chord we can read)
        adherence = chord_adherence(tune, readable_chords)
        row["chord_adherence"] = 0.0 if adherence is None else adherence
    if request.task == "continue" and request.seed_abc:
        try:
            seed = parse_answer(request.seed_abc)
            row["continuation_fidelity"], continued = continuation_fidelity(tune, seed)
            row["continued"] = float(continued)
        except (abc.ABCError, ValueError):
            row["continuation_fidelity"] = row["continued"] = None  # the seed itself is broken
    row.update(musical_statistics(tune, produced))
    return row


def _same_meter(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    fa, fb = meter_fraction(a), meter_fraction(b)
    if fa is None or fb is None:
        return a.strip().lower() == b.strip().lower()
    return fa == fb


# --------------------------------------------------------------------------------------------
# Diversity and novelty: tunes as compact symbol strings
# --------------------------------------------------------------------------------------------
class SymbolTable:
    """Maps (scale step from the tonic, duration) events to single characters, so a tune becomes
    a short string that rapidfuzz compares fast. Pitch is taken relative to the tonic (mod 12):
    a transposed copy is still a copy."""

    def __init__(self) -> None:
        self._codes: dict[tuple, str] = {}
        self.symbols: dict[str, tuple] = {}  # character -> (step or None for a rest, duration)

    def encode(self, tune: ParsedTune) -> str:
        """The tune's compact string ('' when it has no notes)."""
        tonic = _safe_key(tune.key)
        t = tonic.tonic_pc if tonic else 0
        out = []
        for _, p, d in tune.notes:
            sym = (None if p is None else (p - t) % 12, d)
            code = self._codes.get(sym)
            if code is None:
                code = self._codes[sym] = chr(0x4E00 + len(self._codes))
                self.symbols[code] = sym
            out.append(code)
        return "".join(out)


def compact_string(abc_text: str, table: SymbolTable | None = None) -> str:
    """An ABC tune as a compact pitch/duration string ('' when it does not parse)."""
    try:
        tune = parse_answer(abc_text)
    except (abc.ABCError, ValueError):
        return ""
    return (table or SymbolTable()).encode(tune)


def pitch_ngrams(pitches: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """Overlapping n-grams of MIDI pitches (absolute: samples of one request share its key)."""
    return [tuple(pitches[i:i + n]) for i in range(len(pitches) - n + 1)]


def diversity(answers: Sequence[str], n: int = 4) -> dict[str, float | None]:
    """Across samples of one request: distinct-n (distinct pitch n-grams / all n-grams) and the
    mean pairwise similarity (normalised edit similarity of compact strings, 0..1)."""
    from rapidfuzz import fuzz

    table = SymbolTable()
    parsed = []
    for a in answers:
        try:
            parsed.append(parse_answer(a))
        except (abc.ABCError, ValueError):
            continue
    grams = [g for t in parsed for g in pitch_ngrams(t.pitches, n)]
    strings = [table.encode(t) for t in parsed]
    pairs = [fuzz.ratio(a, b) / 100 for a, b in combinations(strings, 2)]
    return {f"distinct_{n}": len(set(grams)) / len(grams) if grams else None,
            "pairwise_similarity": float(np.mean(pairs)) if pairs else None}


class NoveltyIndex:
    """Nearest training tune of an answer by normalised edit similarity (rapidfuzz `fuzz.ratio`
    over compact pitch/duration strings), fast enough for the whole training split.

    `fuzz.ratio` is 2*LCS/(len_a+len_b), and an LCS can match no more symbols than both tunes
    hold: per pitch step and per duration, sum(min(count_a, count_b)) bounds it. A query
    (1) scores the `candidates` tunes sharing the most pitch/duration n-grams with it (an
    inverted index) to get a good first best, (2) computes that histogram bound for every
    training tune at once (numpy), then (3) scores exactly only the tunes whose bound beats that
    best (about a third of them on real tunes). The answer is exact; `exact=False` keeps step
    (1) only (a lower bound, much faster; near-copies are still found)."""

    def __init__(self, train_abcs: Sequence[str] | Mapping[str, str] | Sequence[Any],
                 ngram: int = 4, candidates: int = 64) -> None:
        if isinstance(train_abcs, Mapping):
            items = list(train_abcs.items())
        else:
            items = []
            for i, t in enumerate(train_abcs):
                if isinstance(t, str):
                    items.append((str(i), t))
                else:  # a TuneRecord-like object
                    items.append((str(getattr(t, "id", None) or getattr(t, "tune_id", i)), t.abc))
        self.table = SymbolTable()
        self.ngram, self.candidates = ngram, candidates
        pairs = [(tid, self.table.encode(parse_answer(a))) for tid, a in items if _parses(a)]
        pairs = [(tid, s) for tid, s in pairs if s]
        if not pairs:
            raise ValueError("NoveltyIndex needs at least one training tune that parses")
        self.ids = [tid for tid, _ in pairs]
        self.strings = [s for _, s in pairs]
        self.lengths = np.array([len(s) for s in self.strings], dtype=np.int32)
        durations = sorted({d for _, d in self.table.symbols.values()})
        self._dur_col = {d: 13 + i for i, d in enumerate(durations)}
        self._hist = np.stack([self._histogram(s) for s in self.strings])
        postings: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(self.strings):
            for g in {s[j:j + ngram] for j in range(len(s) - ngram + 1)}:
                postings[g].append(i)
        self._postings = {g: np.asarray(v, dtype=np.int32) for g, v in postings.items()}
        self.skipped = len(items) - len(pairs)

    def _histogram(self, s: str) -> np.ndarray:
        """Counts per pitch step (12 + rest) and per duration seen in training."""
        h = np.zeros(13 + len(self._dur_col), dtype=np.int32)
        for ch, count in Counter(s).items():
            step, dur = self.table.symbols[ch]
            h[12 if step is None else step] += count
            col = self._dur_col.get(dur)
            if col is not None:  # a duration no training tune has matches nothing
                h[col] += count
        return h

    def __len__(self) -> int:
        return len(self.strings)

    def query_string(self, s: str, exact: bool = True) -> tuple[float, str | None]:
        """(highest similarity 0..1, id of that training tune) for a compact string."""
        from rapidfuzz import fuzz, process

        if not s:
            return (0.0, None)
        best, best_i = 0.0, -1
        grams = {s[j:j + self.ngram] for j in range(len(s) - self.ngram + 1)}
        lists = [self._postings[g] for g in grams if g in self._postings]
        if lists:
            counts = np.bincount(np.concatenate(lists), minlength=len(self.strings))
            top = np.argpartition(-counts, min(self.candidates, len(counts) - 1))[: self.candidates]
            top = top[counts[top] > 0]
            hit = process.extractOne(s, [self.strings[i] for i in top], scorer=fuzz.ratio)
            if hit is not None:
                best, best_i = hit[1], int(top[hit[2]])
        if exact:
            h = self._histogram(s)
            shared = np.minimum(np.minimum(self._hist[:, :13], h[:13]).sum(1),
                                np.minimum(self._hist[:, 13:], h[13:]).sum(1))
            bound = 200.0 * shared / (self.lengths + len(s))
            alive = np.flatnonzero(bound > best)  # only these could beat the best so far
            hit = process.extractOne(s, [self.strings[i] for i in alive], scorer=fuzz.ratio,
                                     score_cutoff=best)
            if hit is not None and hit[1] > best:
                best, best_i = hit[1], int(alive[hit[2]])
        return (best / 100, self.ids[best_i] if best_i >= 0 else None)

    def query(self, abc_text: str, exact: bool = True) -> tuple[float, str | None]:
        """(highest normalised edit similarity to any training tune, that tune's id)."""
        return self.query_string(compact_string(abc_text, self.table), exact=exact)

    def query_brute_force(self, abc_text: str) -> tuple[float, str | None]:
        """The reference answer: score every training tune (for tests and the benchmark)."""
        from rapidfuzz import fuzz, process

        s = compact_string(abc_text, self.table)
        if not s:
            return (0.0, None)
        hit = process.extractOne(s, self.strings, scorer=fuzz.ratio)
        return (hit[1] / 100, self.ids[hit[2]])


def _parses(text: str) -> bool:
    try:
        parse_answer(text)
        return True
    except (abc.ABCError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
@dataclass
class MetricSpec:
    """How a metric aggregates: 'rate' (0/1 values, Wilson), 'mean' (bootstrap of the mean),
    'pooled' (bootstrap of sum(num)/sum(den) over answers)."""

    name: str
    kind: str
    description: str
    higher_is_better: bool | None = None
    den: str | None = None  # for 'pooled': the weight column


METRICS: list[MetricSpec] = [
    MetricSpec("valid", "rate", "answers that parse as ABC (our core)", True),
    MetricSpec("music21_agreement", "rate", "sampled answers where music21 agrees on validity", True),
    MetricSpec("bar_error_rate", "pooled", "checked bars whose duration differs from the meter", False, "bars_checked"),
    MetricSpec("key_match", "rate", "requested key (tonic+mode) produced", True),
    MetricSpec("mode_match", "rate", "requested mode produced", True),
    MetricSpec("meter_match", "rate", "requested meter produced", True),
    MetricSpec("tempo_match", "rate", "requested tempo produced (+-1 bpm)", True),
    MetricSpec("length_match", "rate", "requested number of bars produced", True),
    MetricSpec("chord_adherence", "mean", "strong-beat notes that are tones of the bar's chord", True),
    MetricSpec("continuation_fidelity", "mean", "given notes reproduced at the start", True),
    MetricSpec("continued", "rate", "continuations that add at least one bar", True),
    MetricSpec("pc_entropy", "mean", "pitch-class entropy (bits)"),
    MetricSpec("in_scale_rate", "mean", "notes in the key's scale"),
    MetricSpec("pitch_range", "mean", "highest minus lowest note (semitones)"),
    MetricSpec("rhythm_distinct", "mean", "distinct note durations"),
    MetricSpec("rhythm_entropy", "mean", "duration entropy (bits)"),
    MetricSpec("repeats", "mean", "repeat signs (:| and ::)"),
    MetricSpec("bars_per_section", "mean", "bars per section"),
    MetricSpec("repeated_bar_share", "mean", "bars that repeat an earlier bar exactly"),
    MetricSpec("distinct_4", "mean", "distinct pitch 4-grams across samples of one request", True),
    MetricSpec("pairwise_similarity", "mean", "mean similarity between samples of one request", False),
    MetricSpec("novelty_similarity", "mean", "highest similarity to a training tune", False),
    MetricSpec("near_copy", "rate", f"answers >= {NEAR_COPY} similar to a training tune", False),
]
METRIC_BY_NAME = {m.name: m for m in METRICS}


@dataclass
class MetricSummary:
    """One line of the aggregate table."""

    metric: str
    mean: float
    ci_low: float
    ci_high: float
    n: int


def summarize(name: str, values: Sequence[float | None], weights: Sequence[float | None] | None = None,
              seed: int = 0, clusters: Sequence[Any] | None = None,
              kind: str | None = None) -> MetricSummary:
    """Aggregate one metric's per-answer values (None skipped) with its 95 % interval: Wilson
    for yes/no rates, a seeded bootstrap for means and pooled ratios. With `clusters` (the
    request of each answer) the independent unit is the cluster: Wilson counts clusters, the
    bootstrap resamples them. `kind` ("rate" | "mean" | "pooled") overrides the metric table's."""
    spec = METRIC_BY_NAME.get(name, MetricSpec(name, "mean", name))
    if kind is not None:  # a metric the table does not list (e.g. request_suite's own rates)
        spec = replace(spec, kind=kind)
    pooled = spec.kind == "pooled" and weights is not None
    ws = list(weights) if pooled else [1.0] * len(values)
    cs = list(clusters) if clusters is not None else list(range(len(values)))
    kept = [(float(v), float(w), c) for v, w, c in zip(values, ws, cs)
            if v is not None and w and not (isinstance(v, float) and math.isnan(v))]
    if not kept:
        return MetricSummary(name, math.nan, math.nan, math.nan, 0)
    x, w, c = (list(t) for t in zip(*kept))
    mean = float(np.dot(x, w) / np.sum(w))
    shared = len(set(c)) < len(c)
    if spec.kind == "rate":
        # Wilson over independent units: answers, or requests when several answers share one
        # (a bootstrap would give a zero-width interval whenever every answer succeeds).
        units = len(set(c))
        lo, hi = wilson_interval(mean * units, units)
    else:
        lo, hi = bootstrap_interval(x, seed=seed, weights=w if pooled else None,
                                    clusters=c if shared else None)
    return MetricSummary(name, mean, lo, hi, len(x))


class _SummaryLookup:
    """`metric(name)` and `table()` over a `summary: list[MetricSummary]` field."""

    summary: list[MetricSummary]

    def metric(self, name: str) -> MetricSummary:
        """The summary line of one metric (KeyError if it was not measured)."""
        for s in self.summary:
            if s.metric == name:
                return s
        raise KeyError(f"metric {name!r} not in this result; have {[s.metric for s in self.summary]}")

    def table(self):
        """The aggregate table as a pandas DataFrame (metric, mean, ci_low, ci_high, n)."""
        import pandas as pd

        return pd.DataFrame([asdict(s) for s in self.summary])


@dataclass
class EvaluationResult(_SummaryLookup):
    """Per-answer rows and the aggregate table of one system's answers."""

    system: str
    rows: list[dict[str, Any]]
    summary: list[MetricSummary]
    groups: list[dict[str, Any]] = field(default_factory=list)  # per-request diversity
    answers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: system, summary, rows, per-request groups."""
        return {"system": self.system, "summary": [_json_safe(asdict(s)) for s in self.summary],
                "rows": [_json_safe(r) for r in self.rows], "groups": [_json_safe(g) for g in self.groups]}

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=1)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        return text


def _json_safe(d: dict) -> dict:
    """The row with NaN as None and Fractions, numpy scalars as plain floats (JSON can hold it)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and math.isnan(v):
            v = None
        elif isinstance(v, Fraction):
            v = float(v)
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def music21_valid(text: str) -> bool:
    """Does music21's own ABC parser read the tune (with at least one note)?"""
    import music21

    try:
        score = music21.converter.parse(text, format="abc")
        return len(score.recurse().notesAndRests) > 0
    except Exception:  # music21 raises many unrelated exception types on bad ABC
        return False


def _request_identity(request: ComposeRequest) -> str:
    """The request as canonical JSON: one text per request (its answers form one cluster)."""
    return json.dumps(request.to_dict(), sort_keys=True, ensure_ascii=False)


def score_answers(pairs: Sequence[Pair], train_index: NoveltyIndex | None = None,
                  system: str = "system", music21_sample: int = 16, seed: int = 0) -> EvaluationResult:
    """Score every (request, answer) pair, then aggregate each metric with a 95 % interval.
    Diversity is measured within groups of answers to the same request; novelty needs a
    `train_index`; music21 cross-checks a seeded sample of `music21_sample` answers."""
    rows = []
    for i, (request, answer) in enumerate(pairs):
        row = score_answer(request, answer)
        row["index"] = i
        if train_index is not None:
            sim, nearest = train_index.query(answer) if row["valid"] else (None, None)
            row["novelty_similarity"], row["nearest_tune"] = sim, nearest
            row["near_copy"] = None if sim is None else float(sim >= NEAR_COPY)
        rows.append(row)
    sample = random.Random(seed).sample(range(len(pairs)), min(music21_sample, len(pairs)))
    for i in sample:
        rows[i]["music21_valid"] = int(music21_valid(pairs[i][1]))
        rows[i]["music21_agreement"] = float(rows[i]["music21_valid"] == rows[i]["valid"])
    grouped: dict[str, list[int]] = defaultdict(list)
    for i, (request, _) in enumerate(pairs):
        grouped[_request_identity(request)].append(i)
    groups = []
    for key, idx in grouped.items():
        if len(idx) < 2:
            continue
        d = diversity([pairs[i][1] for i in idx])
        groups.append({"request": key, "samples": len(idx), **d})
    summary = []
    for spec in METRICS:
        if spec.name in ("distinct_4", "pairwise_similarity"):
            values = [g[spec.name] for g in groups]
        else:
            values = [r.get(spec.name) for r in rows]
        weights = [r.get(spec.den) for r in rows] if spec.den else None
        clusters = None if spec.name in ("distinct_4", "pairwise_similarity") else \
            [_request_identity(request) for request, _ in pairs]
        s = summarize(spec.name, values, weights, seed=seed, clusters=clusters)
        if s.n:
            summary.append(s)
    return EvaluationResult(system=system, rows=rows, summary=summary, groups=groups,
                            answers=[a for _, a in pairs])


# --------------------------------------------------------------------------------------------
# The benchmark: requests from the test split, and the human reference
# --------------------------------------------------------------------------------------------
def _benchmark_items(records_test: Sequence[Any], n: int, seed: int) -> list[tuple[ComposeRequest, Any]]:
    """`n` (request, source tune) items: task kinds and languages in turn (balanced), tunes
    drawn in a seeded order; a tune that cannot serve a kind (too short, no title) is passed."""
    records = list(records_test)
    if not records:
        raise ValueError("build_benchmark needs test records: run notebook 01 (assemble_corpus)")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    combos = [(task, lang) for task in COMPOSE_TASKS for lang in LANGS]
    items: list[tuple[ComposeRequest, Any]] = []
    cursor = 0
    for i in range(n):
        task, lang = combos[i % len(combos)]
        for attempt in range(len(records)):
            record = records[order[(cursor + attempt) % len(records)]]
            try:
                request = request_from_tune(record, task, lang, random.Random(f"{seed}/{i}"))
                target_for(record, request)
            except (ValueError, abc.ABCError):
                continue
            items.append((request, record))
            cursor += attempt + 1
            break
    return items


def build_benchmark(records_test: Sequence[Any], profile: Profile, n: int | None = None,
                    seed: int | None = None) -> list[ComposeRequest]:
    """Benchmark requests from the test split: every composing task kind (emotion, chords,
    theme_chords, continue) in zh and en, balanced; `n` defaults to profile.eval_requests."""
    n = profile.eval_requests if n is None else n
    return [r for r, _ in _benchmark_items(records_test, n, profile.seed if seed is None else seed)]


def human_reference(records_test: Sequence[Any], profile: Profile, n: int | None = None,
                    seed: int | None = None) -> list[Pair]:
    """The benchmark's requests answered by the test tunes they came from (their ground truth,
    `instructions.target_for`): the human reference, scored by the same code as any model."""
    n = profile.eval_requests if n is None else n
    return [(r, target_for(rec, r)) for r, rec in
            _benchmark_items(records_test, n, profile.seed if seed is None else seed)]


CPU_TRAIN_TUNES = 3000  # CPU size: training tunes the n-gram and novelty index read (minutes)


def load_splits(profile: Profile, max_train: int | None = None,
                held_out: str = "test") -> tuple[list[Any], list[Any]]:
    """(training tunes, held-out tunes) from notebook 01's `run_dir/data/tunes.jsonl` (assembled
    now when missing). `held_out` is "test" for reported figures, "validation" for choosing
    settings (a decoding temperature, say) without looking at the test split. Transposed copies
    are left out (the metrics are key-invariant). The training side is a seeded subset of
    `max_train` tunes; None means 3000 at CPU size and the whole split at GPU size."""
    from imelodist_lib import corpus

    if held_out not in ("test", "validation"):
        raise ValueError(f"held_out must be 'test' or 'validation', got {held_out!r}")
    path = profile.run_dir / "data" / "tunes.jsonl"
    records = corpus.read_jsonl(path) if path.exists() else corpus.assemble_corpus(profile, progress=False).records
    train = [r for r in records if r.split == "train" and not r.augmented_from]
    test = [r for r in records if r.split == held_out and not r.augmented_from]
    if not test:
        raise ValueError(f"{path} has no {held_out} split: rebuild it with notebook 01 (assemble_corpus)")
    limit = max_train if max_train is not None else (None if profile.is_gpu else CPU_TRAIN_TUNES)
    if limit is not None and len(train) > limit:
        keep = set(random.Random(profile.seed).sample(range(len(train)), limit))
        train = [r for i, r in enumerate(train) if i in keep]
    return train, test


def evaluate_systems(systems: Mapping[str, Sequence[Pair]], train_index: NoveltyIndex | None = None,
                     seed: int = 0, music21_sample: int = 16) -> list[EvaluationResult]:
    """`score_answers` for each named system's (request, answer) pairs, in the given order."""
    return [score_answers(pairs, train_index, system=name, seed=seed, music21_sample=music21_sample)
            for name, pairs in systems.items()]


def collect_answers(composer: Any, requests: Sequence[ComposeRequest], n: int = 1, seed: int = 0,
                    results_path: str | Path | None = None, batch_requests: int = 8,
                    **kwargs: Any) -> list[Pair]:
    """Ask a composer for `n` answers per request: an NGramComposer, an `inference.Composer`
    (keyword arguments such as constrained=True pass through), or any callable
    (request, n, seed) -> list of texts. Answers that are not ABC stay as text (scored invalid).

    With `results_path` (one .jsonl file per system), each answer is appended there, scored, as
    soon as it arrives, and a rerun reuses every answer already in the file for the same request,
    sample index and settings (seed, n, composer, keyword arguments): a server timeout at request
    k loses nothing made before it, and the rerun asks only for the rest. A Composer answers up to
    `batch_requests` consecutive requests in one `compose_many` batch (the same answers, faster);
    their answers are written when the batch returns."""
    done: dict[tuple[str, int, str], str] = {}
    if results_path is not None:
        rows, bad = jsonl.read_jsonl_tolerant(results_path)
        if bad:
            print(f"{results_path}: skipped {bad} unreadable line(s) (cut short by a crash); "
                  "their answers are asked for again")
        for row in rows:
            if isinstance(row, dict) and {"request_id", "sample", "settings", "answer"} <= set(row):
                done[row["request_id"], row["sample"], _settings_key(row["settings"])] = row["answer"]
    settings_of = [{"seed": seed + i, "n": n, "composer": _composer_name(composer),
                    **{k: kwargs[k] for k in sorted(kwargs)}} for i in range(len(requests))]
    keys_of = [[(_request_id(r), k, _settings_key(settings_of[i])) for k in range(n)]
               for i, r in enumerate(requests)]
    texts: dict[int, list[str]] = {}
    for i, keys in enumerate(keys_of):
        if results_path is not None and all(key in done for key in keys):
            texts[i] = [done[key] for key in keys]
    # a Composer that batches (compose_many) answers consecutive pending requests together:
    # request i still gets seed + i, so the answers are the ones compose would give
    many = hasattr(composer, "compose_many") and set(kwargs) <= _COMPOSE_MANY_OPTIONS
    pending = [i for i in range(len(requests)) if i not in texts]
    while pending:
        run = [pending[0]]
        while many and len(run) < batch_requests and len(run) < len(pending) and pending[len(run)] == run[-1] + 1:
            run.append(pending[len(run)])
        pending = pending[len(run):]
        if many:
            answers = composer.compose_many([requests[i] for i in run], n=n, seed=seed + run[0], **kwargs)
        elif hasattr(composer, "compose"):
            answers = [composer.compose(requests[run[0]], n=n, seed=seed + run[0], **kwargs)]
        else:
            answers = [composer(requests[run[0]], n, seed + run[0])]
        for i, outputs in zip(run, answers):
            request, texts[i] = requests[i], []
            for k, out in enumerate(outputs):
                text = out if isinstance(out, str) else (getattr(out, "abc", None) or getattr(out, "text", ""))
                key = keys_of[i][k]
                if results_path is not None and key not in done:
                    score = _json_safe(score_answer(request, text or "")) if request.task != "describe" else {}
                    jsonl.append_jsonl({"request_id": key[0], "sample": k, "settings": settings_of[i],
                                        "request": request.to_dict(), "answer": text or "",
                                        "score": score}, results_path)
                    done[key] = text or ""
                texts[i].append(text or "")
    return [(request, text) for i, request in enumerate(requests) for text in texts[i]]


_COMPOSE_MANY_OPTIONS = {"temperature", "top_p", "top_k", "max_new_tokens", "constrained"}


def _request_id(request: ComposeRequest) -> str:
    """A short stable id of a request's content (every field)."""
    return hashlib.sha256(_request_identity(request).encode("utf-8")).hexdigest()[:16]


def _settings_key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)


def _composer_name(composer: Any) -> str:
    """Which kind of composer answered (a function's name, else the class): one file per system
    keeps different models apart."""
    return getattr(composer, "__name__", None) or type(composer).__name__


# --------------------------------------------------------------------------------------------
# Reports: tables, files, plots
# --------------------------------------------------------------------------------------------
def comparison_table(results: Sequence[EvaluationResult], metrics: Sequence[str] | None = None):
    """Systems side by side: one row per metric, one 'mean [low, high]' column per system."""
    import pandas as pd

    names = list(metrics) if metrics else [m.name for m in METRICS]
    table = {}
    for res in results:
        col = {}
        for s in res.summary:
            col[s.metric] = _cell(s)
        table[res.system] = col
    df = pd.DataFrame(table).reindex([m for m in names if any(m in c for c in table.values())])
    return df.fillna("-")


def _cell(s: MetricSummary) -> str:
    fmt = "{:.3f}" if abs(s.mean) < 10 else "{:.1f}"
    return f"{fmt.format(s.mean)} [{fmt.format(s.ci_low)}, {fmt.format(s.ci_high)}] n={s.n}"


def markdown_table(results: Sequence[EvaluationResult], metrics: Sequence[str] | None = None) -> str:
    """The comparison table as GitHub Markdown (metric rows, system columns, 95 % intervals)."""
    df = comparison_table(results, metrics)
    head = "| metric | " + " | ".join(df.columns) + " |"
    rule = "|---|" + "---|" * len(df.columns)
    lines = [head, rule]
    for name, row in df.iterrows():
        desc = METRIC_BY_NAME[name].description if name in METRIC_BY_NAME else ""
        lines.append(f"| {name} ({desc}) | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def save_results(results: Sequence[EvaluationResult], out_dir: str | Path,
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write results.json (every system: summary, rows, groups; plus `extra`) and results.md
    (the comparison table) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"systems": [r.to_dict() for r in results], **(extra or {})}
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
    md_path.write_text(markdown_table(results), encoding="utf-8")
    return {"json": json_path, "markdown": md_path}


DEFAULT_PLOT_METRICS = ("valid", "bar_error_rate", "key_match", "meter_match", "chord_adherence",
                        "continuation_fidelity", "in_scale_rate", "pc_entropy",
                        "repeated_bar_share", "novelty_similarity")


def plot_metrics(results: Sequence[EvaluationResult], metrics: Sequence[str] = DEFAULT_PLOT_METRICS):
    """One small bar chart per metric: each system's mean with its 95 % interval."""
    import matplotlib.pyplot as plt

    present = [m for m in metrics if any(s.metric == m for r in results for s in r.summary)]
    cols = min(5, max(1, len(present)))
    rows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, present):
        for j, res in enumerate(results):
            try:
                s = res.metric(name)
            except KeyError:
                continue
            err = [[max(0.0, s.mean - s.ci_low)], [max(0.0, s.ci_high - s.mean)]]
            ax.bar(j, s.mean, yerr=err, color=colors[j % len(colors)], capsize=3)
        ax.set_xticks(range(len(results)), [r.system for r in results], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _degree_and_interval_histograms(answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    degrees, intervals = np.zeros(12), np.zeros(25)
    for text in answers:
        try:
            tune = parse_answer(text)
        except (abc.ABCError, ValueError):
            continue
        key = _safe_key(tune.key)
        tonic = key.tonic_pc if key else 0
        ps = tune.pitches
        for p in ps:
            degrees[(p - tonic) % 12] += 1
        for a, b in zip(ps, ps[1:]):
            intervals[int(np.clip(b - a, -12, 12)) + 12] += 1
    return degrees, intervals


def plot_pitch_histograms(results: Sequence[EvaluationResult]):
    """Pitch classes (semitones above the tonic) and melodic intervals, as shares, per system."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.5))
    width = 0.8 / max(1, len(results))
    for j, res in enumerate(results):
        deg, itv = _degree_and_interval_histograms(res.answers)
        off = (j - (len(results) - 1) / 2) * width
        if deg.sum():
            left.bar(np.arange(12) + off, deg / deg.sum(), width=width, label=res.system)
        if itv.sum():
            right.bar(np.arange(-12, 13) + off, itv / itv.sum(), width=width, label=res.system)
    left.set_xticks(range(12), ["1", "b2", "2", "b3", "3", "4", "#4", "5", "b6", "6", "b7", "7"])
    left.set_title("pitch class relative to the tonic")
    right.set_title("melodic interval (semitones, clipped at an octave)")
    left.set_ylabel("share of notes")
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_novelty(results: Sequence[EvaluationResult]):
    """Distribution of each answer's highest similarity to a training tune, per system."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(0, 1, 21)
    for res in results:
        sims = [r["novelty_similarity"] for r in res.rows if r.get("novelty_similarity") is not None]
        if sims:
            ax.hist(sims, bins=bins, alpha=0.5, label=f"{res.system} (n={len(sims)})")
    ax.axvline(NEAR_COPY, color="k", ls="--", lw=1)
    ax.text(NEAR_COPY, ax.get_ylim()[1] * 0.9, " near-copy", fontsize=8)
    ax.set_xlabel("highest similarity to a training tune")
    ax.set_ylabel("answers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Editing: harmonise adherence and regenerated-bar validity
# --------------------------------------------------------------------------------------------
EDITING_CHORD_SOURCES = ("model", "labeller", "random", "human")


def editable_tune(text: str, min_bars: int = 8, max_bars: int = 16) -> str | None:
    """The tune normalised when editing can take it (one voice, valid, every bar the meter's
    length, `min_bars`..`max_bars` bars), else None."""
    from imelodist_lib.editing import bar_spans

    try:
        text = abc.normalize(text)
        report = abc.validate(text)
        if not report.ok or report.bars.errors or len({e.voice for e in abc.events(text)}) > 1:
            return None
        return text if min_bars <= len(bar_spans(text)) <= max_bars else None
    except (abc.ABCError, ValueError):
        return None


def editing_tunes(records: Iterable[Any], count: int, min_bars: int = 8, max_bars: int = 16) -> list[str]:
    """The first `count` tunes (records with `.abc`, or ABC texts) that `editable_tune` takes."""
    out: list[str] = []
    for record in records:
        text = editable_tune(record if isinstance(record, str) else record.abc, min_bars, max_bars)
        if text is not None:
            out.append(text)
        if len(out) >= count:
            break
    return out


def _carried(chords: Sequence[str | None]) -> list[str]:
    """One chord per bar: a bar without one keeps the previous (the first bars take the first)."""
    out, last = [], next((c for c in chords if c), "C")
    for c in chords:
        last = c or last
        out.append(last)
    return out


@dataclass
class EditingEvaluation(_SummaryLookup):
    """How a composer edits tunes: per tune and aggregated with 95 % intervals."""

    rows: list[dict[str, Any]]  # per tune: bars, adherence_<source>, regenerate_valid, regenerate_kept
    summary: list[MetricSummary]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: summary and per-tune rows."""
        return {"summary": [_json_safe(asdict(s)) for s in self.summary], "rows": [_json_safe(r) for r in self.rows]}


def editing_evaluation(composer: Any, tunes: Sequence[str], seed: int = 0, lang: str = "zh",
                       regenerate_bars: int = 2) -> EditingEvaluation:
    """Harmonise adherence and regenerated-bar validity of `composer` on `tunes` (ABC texts,
    e.g. `editing_tunes(test, 4)`).

    Harmonise: each tune's chords are stripped and the composer harmonises the melody
    (`editing.harmonise`: notes forced, one chord per bar from the key's vocabulary); its chords
    are scored with `chord_adherence` on that melody beside the corpus labeller's
    (`labels.fit_chords`), a seeded random pick from the same vocabulary and, for tunes that
    carry them, the human chords (a bar without one keeps the previous). Regenerate: the
    `regenerate_bars` middle bars written anew (`editing.regenerate`); valid = passes
    `abc.validate` with no bar-length error, kept = every other bar byte for byte. Adherence is
    a bootstrap mean, the two regenerate figures Wilson rates, over tunes."""
    from imelodist_lib.labels import fit_chords
    from imelodist_lib.editing import bar_spans, chord_vocabulary, harmonise, regenerate, strip_chords
    from imelodist_lib.instructions import chords_per_bar

    rows = []
    for i, text in enumerate(tunes):
        melody = strip_chords(text)
        spans = bar_spans(melody)
        rng = random.Random(seed + i)
        labelled = dict(fit_chords(melody))
        vocabulary = chord_vocabulary(abc.parse_tune(melody).key or "C")
        sequences = {"model": harmonise(composer, melody, lang=lang, seed=seed + i).chords,
                     "labeller": _carried([labelled.get(s.index) for s in spans]),
                     "random": [rng.choice(vocabulary) for _ in spans]}
        human = chords_per_bar(text)
        if any(human):
            sequences["human"] = _carried(human)
        parsed = parse_answer(melody)
        row: dict[str, Any] = {"tune": abc.parse_tune(text).title, "bars": len(spans)}
        for source in EDITING_CHORD_SOURCES:
            row[f"adherence_{source}"] = chord_adherence(parsed, sequences[source]) if source in sequences else None
        start = len(spans) // 2
        bars = range(start, min(len(spans), start + regenerate_bars))
        [r] = regenerate(composer, text, bars, seed=seed + i)
        old, new = bar_spans(text), bar_spans(r.abc)
        row["regenerate_valid"] = float(r.report.ok and not r.report.bars.errors)
        row["regenerate_kept"] = float(len(old) == len(new) and all(
            text[a.start:a.end] == r.abc[b.start:b.end] for k, (a, b) in enumerate(zip(old, new)) if k not in bars))
        rows.append(row)
    summary = [summarize(f"harmonise_adherence_{source}", [r[f"adherence_{source}"] for r in rows], seed=seed)
               for source in EDITING_CHORD_SOURCES]
    summary += [summarize(name, [r[name] for r in rows], seed=seed, kind="rate")
                for name in ("regenerate_valid", "regenerate_kept")]
    return EditingEvaluation(rows, summary)
