"""The n-gram baseline: the floor any model must beat.

`NGramComposer` learns an order-n Markov chain over (pitch relative to the tonic, duration)
events of the training tunes and writes real ABC answering a `ComposeRequest`; notebook 06
scores it beside the models with `evaluation.score_answers`.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from fractions import Fraction
from typing import Any, Iterable

import numpy as np

from imelodist_lib import abc
from imelodist_lib.evaluation import KeyInfo, ParsedTune, key_info, meter_fraction, parse_answer
from imelodist_lib.instructions import ComposeRequest
from imelodist_lib.music import spell_pitch

_START = "<s>"  # context padding before a tune's first note
_TICKS = 8  # n-gram durations in 1/8 quarter lengths (ints hash fast; plain ABC lengths only)


class _BarWriter:
    """Writes (pitch, duration) events as ABC notes, keeping accidentals right within a bar."""

    def __init__(self, key: KeyInfo, unit_ql: Fraction) -> None:
        self.signature = dict(key.signature)
        self.flats = key.fifths < 0
        self.unit_ql = unit_ql
        self.bar_state: dict[str, int] = {}

    def new_bar(self) -> None:
        self.bar_state = {}

    def note(self, pitch: int | None, duration: Fraction) -> str:
        length = abc.length_suffix(Fraction(duration) / self.unit_ql)
        if pitch is None:
            return "z" + length
        letter, alt, octave = spell_pitch(pitch, self.signature, self.flats)
        # An explicit accidental when the key would not give this pitch, or when this letter
        # was already altered in the bar (then be explicit either way: octave rules differ
        # between readers).
        explicit = letter in self.bar_state or alt != self.signature[letter]
        if explicit:
            self.bar_state[letter] = alt
        return abc.note_text(letter, octave, alt if explicit else None) + length


class NGramComposer:
    """The floor any model must beat: an order-n Markov chain over (pitch relative to the tonic,
    duration) events of the training tunes, conditioned on mode family (`music.mode_family`:
    major, minor or modal) and meter (with back-off to shorter contexts and to all tunes),
    written back as real ABC with the requested header.
    Bars are filled exactly (durations that would overflow the bar are not drawn), chord
    symbols are written but not listened to, and a continuation copies the given bars first."""

    def __init__(self, train_abcs: Iterable[str] | Iterable[Any], order: int = 3) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order = order
        self.counts: dict[tuple, dict[tuple, Counter]] = defaultdict(lambda: defaultdict(Counter))
        self.keys: Counter = Counter()
        self.meters: Counter = Counter()
        self.lengths: list[int] = []
        self.tunes = 0
        flat: Counter = Counter()
        for item in train_abcs:
            text = item if isinstance(item, str) else item.abc
            try:
                tune = parse_answer(text)
                key = key_info(tune.key or "")
            except (abc.ABCError, ValueError):
                continue
            if not tune.meter or meter_fraction(tune.meter) is None:
                continue
            self.tunes += 1
            self.keys[tune.key] += 1
            self.meters[tune.meter] += 1
            self.lengths.append(len(tune.bars))
            conds = self._conditions(key, tune.meter)
            for seq in self._segments(tune, key):
                padded = [_START] * (order - 1) + seq
                # (condition, context, token) keys counted in one C-level Counter.update
                flat.update((cond, tuple(padded[i + order - 1 - k:i + order - 1]), token)
                            for i, token in enumerate(seq) for k in range(order) for cond in conds)
        if not self.tunes:
            raise ValueError("NGramComposer found no training tune with a key and a meter")
        for (cond, ctx, token), count in flat.items():
            self.counts[cond][ctx][token] = count

    @staticmethod
    def _conditions(key: KeyInfo, meter: str) -> list[tuple]:
        frac = meter_fraction(meter)
        return [(key.family, frac), (key.family,), ()]

    @staticmethod
    def _segments(tune: ParsedTune, key: KeyInfo) -> list[list[tuple]]:
        """Event runs as tokens (pitch - tonic in the C4 octave, duration); runs break at
        durations ABC cannot write without tuplets (we only write plain lengths)."""
        ref = 60 + key.tonic_pc
        seqs, cur = [], []
        for _, p, d in tune.notes:
            ticks, rest = divmod(d.numerator * _TICKS, d.denominator)
            if rest or ticks > 8 * _TICKS or ticks <= 0:
                if cur:
                    seqs.append(cur)
                cur = []
                continue
            cur.append((None if p is None else p - ref, ticks))
        if cur:
            seqs.append(cur)
        return seqs

    def _draw(self, rng: random.Random, conds: list[tuple], history: list[tuple],
              room: int) -> tuple | None:
        """A token from the longest known context whose continuations fit in `room`."""
        padded = [_START] * (self.order - 1) + history
        for k in range(self.order - 1, -1, -1):
            ctx = tuple(padded[len(padded) - k:]) if k else ()
            for cond in conds:
                options = self.counts.get(cond, {}).get(ctx)
                if not options:
                    continue
                fitting = [(t, c) for t, c in options.items() if t[1] <= room]
                if fitting:
                    tokens, weights = zip(*fitting)
                    return rng.choices(tokens, weights=weights)[0]
        return None

    def _bars(self, rng: random.Random, key: KeyInfo, meter: str, n_bars: int,
              history: list[tuple]) -> list[list[tuple]]:
        frac = meter_fraction(meter) or (4, 4)
        bar_len = int(Fraction(4 * frac[0], frac[1]) * _TICKS)
        conds = self._conditions(key, meter)
        bars = []
        for _ in range(n_bars):
            bar, room = [], bar_len
            while room > 0:
                token = self._draw(rng, conds, history, room) or (None, room)
                bar.append(token)
                history.append(token)
                room -= token[1]
            bars.append(bar)
        return bars

    def compose(self, request: ComposeRequest, n: int = 1, seed: int = 0) -> list[str]:
        """`n` tunes answering the request (each one normalised ABC), reproducible by `seed`."""
        if request.task == "describe":
            raise ValueError("NGramComposer composes tunes; task 'describe' asks for prose")
        return [self._compose_one(request, random.Random(f"{seed}/{i}")) for i in range(n)]

    def _compose_one(self, request: ComposeRequest, rng: random.Random) -> str:
        seed_tune = None
        if request.task == "continue":
            seed_tune = parse_answer(request.seed_abc or "")
        key_text = request.key or (seed_tune.key if seed_tune else None) or self.keys.most_common(1)[0][0]
        meter = request.meter or (seed_tune.meter if seed_tune else None) or self.meters.most_common(1)[0][0]
        key = key_info(key_text)
        if meter_fraction(meter) is None:
            raise ValueError(f"NGramComposer needs a numeric meter such as 4/4 or 6/8, got {meter!r}")
        ref = 60 + key.tonic_pc
        typical = int(np.median(self.lengths)) if self.lengths else 8
        if request.chords:
            n_bars = len(request.chords)
        elif seed_tune is not None:
            n_bars = max(1, (request.bars or len(seed_tune.bars) + max(4, typical // 2)) - len(seed_tune.bars))
        else:
            n_bars = request.bars or min(32, max(8, typical))
        history: list[tuple] = []
        if seed_tune is not None:
            history = [(None if p is None else p - ref, round(d * _TICKS)) for _, p, d in seed_tune.notes]
        bars = self._bars(rng, key, meter, n_bars, history)
        # the seed's own L: (abc's default rule when it has none), else the L:1/8 written below
        unit = abc.parse_tune(request.seed_abc).unit_length * 4 if seed_tune is not None else Fraction(1, 2)
        writer = _BarWriter(key, unit)
        written = []
        for i, bar in enumerate(bars):
            writer.new_bar()
            notes = " ".join(writer.note(None if rp is None else ref + rp, Fraction(ticks, _TICKS))
                             for rp, ticks in bar)
            if request.chords and i < len(request.chords):
                notes = f'"{request.chords[i]}"' + notes
            written.append(notes)
        lines = [" | ".join(written[i:i + 4]) for i in range(0, len(written), 4)]
        body = " |\n".join(lines) + " |]\n"
        if seed_tune is not None:
            return abc.normalize(request.seed_abc.rstrip() + "\n" + body)
        title = request.theme or ("无题" if request.lang == "zh" else "Untitled")
        header = ["X:1", f"T:{title}", f"M:{meter}", "L:1/8"]
        if request.tempo:
            header.append(f"Q:1/4={request.tempo}")
        header.append(f"K:{key_text}")
        return abc.normalize("\n".join(header) + "\n" + body)
