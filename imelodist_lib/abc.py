"""ABC notation core: split, parse, normalise, events, bar check, keys, transpose, music21.

Everything the workbench knows about ABC (https://abcnotation.com/wiki/abc:standard:v2.1) lives
here, written for one job: judging and cleaning *melodies* (folk tunes and model output).

Decisions (documented once, relied on by the other modules):

* Durations are `fractions.Fraction` in quarter lengths (music21's unit): a 6/8 bar is 3.
* `split_tunes`: a tune starts at an `X:` line and ends at the first blank line (ABC 2.1).
  Text before the first `X:` (the file header, free text) is dropped, not applied. Text with no
  `X:` at all is split at blank lines, keeping the chunks that hold a `K:` field.
* Absent `M:` means free meter (ABC 2.1; music21 also makes no TimeSignature): `Tune.meter` is
  "none" and nothing is bar-checked. Absent `L:` is 1/16 when the meter is < 3/4, else 1/8.
* Accidentals carry through the bar for every octave of the same letter (ABC 2.1's default
  `%%propagate-accidentals pitch`; music21 does the same once it is told the text is ABC 2.1,
  which `to_music21` does), also inside chords and grace notes.
* `events`: chords are one Event (`pitches` all notes, `pitch` the highest); grace notes
  make no event; ties are kept as separate events (`tie=True` on the first), as music21 does;
  repeats are not expanded; `x` rests are events of kind "invisible_rest", `Z`/`X` are
  "measure_rest" (n bars of the current meter); `y` spacers make nothing.
* Voices (`V:`): every voice is read; events carry their voice and bars are checked per voice.
* `clef=`/`middle=`/`transpose=` (and a clef's +8/-8) in K:/V: fields do not change the
  pitches (written pitch); `octave=N` does (ABC 2.1 4.6: the code is read N octaves away).
* Other ABC 2.1 constructs read: `K:G exp ^f` (only the listed accidentals), microtonal
  accidentals `^/c` `_/e` `^3/4c` (rounded to the nearest semitone, see `_alter_of`),
  `%%begintext`...`%%endtext` (text, read as comments), `M:(2+3)/8` and `M:2+3/8` (one 5/8 bar),
  `M:2/4 3/4` (not 2.1: each bar may have any listed length, see `meter_choices`), and `&`
  voice overlay (each layer is an event voice "name&k"; every layer must fill the bar).
  Rejected with an ABCError naming the construct: `(&...&)` overlays across bar lines.
"""
from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple

from imelodist_lib.music import NATURAL_PITCH_CLASS

__all__ = [
    "ABCError", "Tune", "Event", "Bar", "BarError", "BarReport", "Key", "ValidationReport",
    "meter_parts", "header_text", "bar_segments", "note_midi", "note_name", "note_text",
    "split_tunes", "parse_tune", "normalize", "events", "check_bars", "bar_duration_errors",
    "parse_key", "transpose", "length_suffix", "to_music21", "validate", "meter_duration", "unit_length_of",
    "parse_fraction", "parse_tempo", "MAX_TUNE_CHARS", "MAX_FIELD_CHARS", "meter_choices",
    "octave_shift", "barline_tokens",
]

MAX_TUNE_CHARS = 100_000  # longest tune text the parser reads (the longest real tune is ~10 KB)
MAX_FIELD_CHARS = 1_000  # longest header field value (a Q:, K:, M: or T: line)


# --------------------------------------------------------------------------- errors
class ABCError(ValueError):
    """Bad ABC: says what is wrong and where (1-based line/column, either may be None)."""

    def __init__(self, message: str, line: int | None = None, col: int | None = None):
        self.message = message
        self.line = line
        self.col = col
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is None:
            return self.message
        if self.col is None:
            return f"line {self.line}: {self.message}"
        return f"line {self.line}, col {self.col}: {self.message}"

    def __reduce__(self):  # keep pickling (multiprocessing) working with the extra args
        return (ABCError, (self.message, self.line, self.col))


# --------------------------------------------------------------------------- numbers, meters
_FRACTION_RE = re.compile(r"^\s*([0-9]{1,6})\s*/\s*([0-9]{1,6})\s*$")


def parse_fraction(text: str) -> Fraction:
    """Parse "1/8" (or "1") into a Fraction; ABCError when it is not a positive fraction."""
    m = _FRACTION_RE.match(text)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
    elif text.strip().isascii() and text.strip().isdigit() and len(text.strip()) <= 6:
        num, den = int(text.strip()), 1
    else:
        raise ABCError(f"expected a fraction like 1/8, got {text.strip()!r}")
    if num == 0 or den == 0:
        raise ABCError(f"fraction {text.strip()!r} must be positive (e.g. 1/8)")
    return Fraction(num, den)


_METER_RE = re.compile(r"^\(?\s*([0-9]{1,3}(?:\s*\+\s*[0-9]{1,3})*)\s*\)?\s*/\s*([0-9]{1,3})$")


def length_suffix(units: Fraction) -> str:
    """A note length in unit lengths as ABC writes it after the note: 1 -> "", 3 -> "3",
    1/2 -> "/2", 3/2 -> "3/2" (the inverse of the length `parse_tune` reads)."""
    units = Fraction(units)
    if units == 1:
        return ""
    if units.denominator == 1:
        return str(units.numerator)
    if units.numerator == 1:
        return f"/{units.denominator}"
    return f"{units.numerator}/{units.denominator}"


def meter_parts(meter: str) -> tuple[int, int] | None:
    """An M: value as (beats, beat unit): "6/8" -> (6, 8), "(2+2+3)/8" -> (7, 8), "C" -> (4, 4),
    "C|" -> (2, 2); None for free meter ("none" or empty); ABCError when it is no meter."""
    text = _strip_comment(meter).strip()
    if text == "" or text.lower() == "none":
        return None
    if text == "C":
        return (4, 4)
    if text == "C|":
        return (2, 2)
    if _METERS_RE.match(text):  # "M:2/4 3/4": the first meter sets defaults (L:, tuplets)
        text = text.split()[0]
    m = _METER_RE.match(text)
    if not m:
        raise ABCError(f"bad meter M:{text} (write e.g. M:6/8, M:C, M:C| or M:none)")
    num = sum(int(x) for x in m.group(1).split("+"))
    den = int(m.group(2))
    if num == 0 or den == 0:
        raise ABCError(f"bad meter M:{text}: numbers must be positive")
    return (num, den)


def _meter_fraction(meter: str) -> Fraction | None:
    """Meter as a fraction of a whole note ("6/8" -> 3/4); None for free meter."""
    parts = meter_parts(meter)
    return None if parts is None else Fraction(*parts)


_METERS_RE = re.compile(r"^[0-9]{1,3}/[0-9]{1,3}(?:\s+[0-9]{1,3}/[0-9]{1,3}){1,7}$")


def meter_choices(meter: str) -> tuple[Fraction, ...]:
    """Quarter lengths a bar of `meter` may have: one for "6/8" or "(2+3)/8" (a 5/8 bar, as
    ABC 2.1 reads it), each listed meter for "2/4 3/4" (alternating or mixed meters, not in
    ABC 2.1: abcm2ps prints both), none for free meter."""
    text = _strip_comment(meter).strip()
    if _METERS_RE.match(text):
        return tuple(_meter_fraction(part) * 4 for part in text.split())
    frac = _meter_fraction(meter)
    return () if frac is None else (frac * 4,)


def meter_duration(meter: str) -> Fraction | None:
    """Quarter lengths in one bar of `meter` ("6/8" -> 3, "C|" -> 4); None for free meter."""
    frac = _meter_fraction(meter)
    return None if frac is None else frac * 4


def unit_length_of(meter: str) -> Fraction:
    """ABC 2.1 default unit note length (fraction of a whole) when L: is absent."""
    frac = _meter_fraction(meter)
    if frac is None:
        return Fraction(1, 8)
    return Fraction(1, 16) if frac < Fraction(3, 4) else Fraction(1, 8)


def _is_compound(meter: str | None) -> bool:
    """Compound meter (6/8, 9/8, 12/8): tuplet defaults (5, 7, 9) use 3 instead of 2."""
    try:
        parts = meter_parts(meter or "")
    except ABCError:
        return False
    return parts is not None and parts[0] > 3 and parts[0] % 3 == 0


# --------------------------------------------------------------------------- keys
_LETTER_FIFTHS = {"F": -1, "C": 0, "G": 1, "D": 2, "A": 3, "E": 4, "B": 5}
_MODE_OFFSETS = {
    "major": 0, "lydian": 1, "mixolydian": -1, "dorian": -2,
    "minor": -3, "phrygian": -4, "locrian": -5,
}
_MODE_ABBREV = {
    "": "major", "m": "minor", "maj": "major", "min": "minor", "ion": "major", "mix": "mixolydian",
    "dor": "dorian", "phr": "phrygian", "lyd": "lydian", "loc": "locrian", "aeo": "minor",
}
_SHARP_ORDER = "FCGDAEB"
_CLEF_WORDS = {"treble", "bass", "alto", "tenor", "perc", "none", "bass3", "alto1", "alto2",
               "tenor", "baritone", "soprano", "mezzosoprano", "mezzo", "subbass", "treble8",
               "bass8", "+8", "-8"}
_ACC_VALUES = {"^^": 2, "^": 1, "=": 0, "_": -1, "__": -2}
_ACC_TEXT = {v: k for k, v in _ACC_VALUES.items()}
_MICROTONE_RE = re.compile(r"^([\^_])([0-9]{0,2})/([0-9]{0,2})$")


def _alter_of(acc: str) -> int:
    """Semitones an accidental raises a note ("^" 1, "__" -2). A microtonal accidental (ABC
    2.1: "^/" a quarter tone up, "_/" down, "^3/4", "_1/3") is a fraction of a semitone; events
    carry MIDI numbers, so it rounds to the nearest semitone, half a semitone away from the
    natural ("^/c" reads as C sharp, "_/e" as E flat, "^1/3c" as C)."""
    value = _ACC_VALUES.get(acc)
    if value is not None:
        return value
    m = _MICROTONE_RE.match(acc)
    num, den = int(m.group(2) or 1), int(m.group(3) or 2)
    if den == 0 or Fraction(num, den) > 2:
        raise ABCError(f"microtonal accidental {acc} must be a fraction of at most 2 semitones "
                       "(e.g. ^/ ^3/4 _1/2)")
    amount = Fraction(num, den)
    whole = int(amount + Fraction(1, 2))  # half away from zero: 1/2 -> 1, 1/3 -> 0, 3/2 -> 2
    return whole if m.group(1) == "^" else -whole


@dataclass
class Key:
    """A key signature: tonic, mode, the alteration of every letter, and circle-of-fifths."""

    tonic: str
    mode: str
    accidentals: dict[str, int]
    fifths: int

    def __str__(self) -> str:
        suffix = {"major": "", "minor": "m"}.get(self.mode, self.mode[:3])
        return f"{self.tonic}{suffix}"


def _signature(fifths: int) -> dict[str, int]:
    """Alteration per letter for a key signature with `fifths` sharps (negative: flats)."""
    acc = {}
    for letter in "CDEFGAB":
        if fifths >= 0:
            k = _SHARP_ORDER.index(letter)
            acc[letter] = (fifths - k + 6) // 7
        else:
            k = _SHARP_ORDER[::-1].index(letter)
            acc[letter] = -((-fifths - k + 6) // 7)
    return acc


_KEY_RE = re.compile(r"^([A-G])([#b]?)([A-Za-z]*)")
_KEY_ACC_RE = re.compile(r"^(\^\^|\^|__|_|=)([A-Ga-g])$")
_FULL_MODES = ("major", "minor", "ionian", "aeolian", "mixolydian", "dorian", "phrygian",
               "lydian", "locrian")
_OCTAVE_WORD_RE = re.compile(r"^[+-]?[0-9]+(?:va|vb|ma|mb)?$")


def _mode_of(word: str) -> str | None:
    """The mode a K: mode word names ("m", "min", "Dor", "mixolydian"), or None."""
    lower = word.lower()
    if lower in _MODE_ABBREV:
        return _MODE_ABBREV[lower]
    if len(lower) > 3 and lower[:3] in _MODE_ABBREV and any(f.startswith(lower)
                                                            for f in _FULL_MODES):
        return _MODE_ABBREV[lower[:3]]
    return None


# ABC 2.1 section 4.6: [clef=]<name>[<line>][+8|-8]; "treble8", "+8" are older spellings
_CLEF_RE = re.compile(r"^(?:treble|bass|alto|tenor|perc|none|baritone|soprano|mezzosoprano|mezzo|"
                      r"subbass)[1-5]?(?:[+-]8)?$|^[+-]?8$|^(?:treble|bass)8$", re.IGNORECASE)
_KEY_PARAMS = {"clef", "middle", "transpose", "octave", "stafflines", "staffscale", "t", "m"}
_MIDDLE_RE = re.compile(r"^[\^_=]?[A-Ga-g][,']*$")
_INT_RE = re.compile(r"^[+-]?[0-9]{1,3}$")


def _is_clef(word: str) -> bool:
    """A clef as K:/V: write it: "bass", "alto4", "treble-8", "clef=bass3" (ABC 2.1 4.6)."""
    name, _, value = word.partition("=")
    if value:
        return name.lower() == "clef" and bool(_CLEF_RE.match(value) or value in "GFC")
    return bool(_CLEF_RE.match(word)) or word.lower() in _CLEF_WORDS


def _check_key_param(word: str, raw: str) -> None:
    """ABCError for a clef/middle/transpose/octave/stafflines value that is not one (4.6)."""
    name, _, value = word.partition("=")
    name = name.lower()
    if name == "clef" and not _is_clef(word):
        raise ABCError(f"bad clef {value!r} in K:{raw} (use treble, bass, alto, tenor, perc or "
                       "none, e.g. clef=bass, alto4, treble-8)")
    if name == "middle" and not _MIDDLE_RE.match(value):
        raise ABCError(f"bad middle={value} in K:{raw} (a pitch such as middle=d or middle=B,)")
    if name in ("transpose", "octave", "stafflines") and not _INT_RE.match(value):
        raise ABCError(f"bad {name}={value} in K:{raw} (a whole number, e.g. {name}=-1)")


def octave_shift(value: str) -> int | None:
    """The `octave=` of a K: or V: value (ABC 2.1 4.6: octave=-1 reads C as C,), or None.

    `clef=` (with its +8/-8), `middle=` and `transpose=` change how the music is printed or
    played, not the notes written: events stay at written pitch; only `octave=` moves them."""
    for word in _strip_comment(value).split():
        name, _, number = word.partition("=")
        if name.lower() == "octave" and _INT_RE.match(number):
            return int(number)
    return None


def parse_key(text: str) -> Key:
    """Parse a K: value ("Emin", "E minor", "F#m", "Bb", "HP", "none", "D =c", "C clef=bass",
    "G exp ^f", "D bass", "Am alto4 octave=-1"; ABC 2.1 3.1.14 and 4.6)."""
    raw = _strip_comment(text).strip()
    words = raw.split()
    first = words[0] if words else ""
    if not words or first.lower() == "none" or re.match(r"^[a-z]+=", first) \
            or _is_clef(first):
        key = Key("C", "major", _signature(0), 0)
        rest = words[1:] if words and first.lower() == "none" else words
    elif first in ("HP", "Hp"):
        # Highland pipes: HP has no signature; Hp is F# C# with G natural, tonic A mixolydian
        fifths = 0 if first == "HP" else 2
        key, rest = Key("A", "mixolydian", _signature(fifths), fifths), words[1:]
    else:
        m = _KEY_RE.match(first)
        if not m:
            raise ABCError(f"bad key K:{raw} (write e.g. K:G, K:Emin, K:Ador, K:F#m, K:Bb)")
        letter, acc, mode_word = m.group(1), m.group(2), m.group(3)
        # accidentals glued to the key ("Dmix=c", "D^f_b") are extra key accidentals
        rest = re.findall(r"\^\^|__|[\^_=][A-Ga-g]|[^\^_=]+", first[m.end():]) + words[1:]
        if not mode_word and rest and _mode_of(rest[0]):
            mode_word, rest = rest[0], rest[1:]  # "E minor" written with a space
        mode = _mode_of(mode_word) if mode_word else "major"
        if mode is None:
            raise ABCError(f"bad key mode {mode_word!r} in K:{raw} (use maj, m, dor, mix, phr, "
                           "lyd, loc)")
        fifths = _LETTER_FIFTHS[letter] + (7 if acc == "#" else -7 if acc == "b" else 0)
        fifths += _MODE_OFFSETS[mode]
        key = Key(letter + acc, mode, _signature(fifths), fifths)
    for word in rest:
        am = _KEY_ACC_RE.match(word)
        if am:
            key.accidentals[am.group(2).upper()] = _ACC_VALUES[am.group(1)]
        elif word.lower() == "exp":
            key.accidentals = {ch: 0 for ch in "CDEFGAB"}  # only the listed accidentals
        elif "=" in word:
            if word.partition("=")[0].lower() in _KEY_PARAMS:
                _check_key_param(word, raw)
            continue  # clef=, middle=, transpose=, octave= (see octave_shift); others ignored
        elif _is_clef(word) or _OCTAVE_WORD_RE.match(word):
            continue  # a bare clef name after the key ("K:D bass", "K:C treble-8"), -8va
        else:
            raise ABCError(f"bad key K:{raw}: do not understand {word!r}")
    return key


# --------------------------------------------------------------------------- tunes
_FIELD_RE = re.compile(r"^([A-Za-z+]):(.*)$")


def _strip_comment(text: str) -> str:
    """Drop a trailing % comment (\\% is a literal percent sign)."""
    i = text.find("%")
    while i > 0 and text[i - 1] == "\\":
        i = text.find("%", i + 1)
    return text if i < 0 else text[:i]


@dataclass
class Tune:
    """One parsed tune: header fields in order, the body text, and where the body starts."""

    fields: list[tuple[str, str]]
    body: str
    first_body_line: int = 1
    _cache: Any = field(default=None, repr=False, compare=False)

    def field(self, name: str, default: str | None = None) -> str | None:
        """Value of the first header field `name` (e.g. "T"), or `default`."""
        for k, v in self.fields:
            if k == name:
                return v
        return default

    def _last(self, name: str) -> str | None:
        value = None
        for k, v in self.fields:
            if k == name:
                value = v
        return value

    @property
    def title(self) -> str:
        """First T: field ("" when absent)."""
        return self.field("T", "") or ""

    @property
    def meter(self) -> str:
        """M: as written; "none" (free meter, ABC 2.1 and music21) when absent."""
        value = self._last("M")
        return "none" if value is None or not value.strip() else value.strip()

    @property
    def unit_length(self) -> Fraction:
        """L: as a fraction of a whole note; the ABC 2.1 default from the meter when absent."""
        value = self._last("L")
        return parse_fraction(value) if value else unit_length_of(self.meter)

    @property
    def key(self) -> str:
        """K: as written (the last header field)."""
        return (self._last("K") or "").strip()

    @property
    def tempo(self) -> int | None:
        """Q: as quarter notes per minute, or None when absent or unreadable."""
        value = self._last("Q")
        qpm = None if value is None else parse_tempo(value, self.unit_length)
        return None if qpm is None else round(qpm)


_HEADER_PROPERTIES = {"T": "title", "K": "key", "M": "meter", "L": "unit_length", "Q": "tempo"}


def header_text(tune: Tune, letter: str) -> str:
    """A header value as text: the Tune property when it is text (T:, K:, M:), else the field
    as written (Q: "1/4=120" rather than the parsed 120), else the parsed value (the default
    L: when none is written)."""
    value = getattr(tune, _HEADER_PROPERTIES[letter], None)
    if isinstance(value, str):
        return value.strip()
    raw = tune.field(letter)
    if raw is None:
        return "" if value is None else str(value)
    return raw.strip()


_QUOTED_RE = re.compile(r'"[^"\n]*"')
_BPM_RE = re.compile(r"\s*([0-9]{1,6}(?:\.[0-9]{1,6})?)(?![0-9.])")
_DIGITS_RE = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6})?")


def parse_tempo(value: str, unit: Fraction = Fraction(1, 8)) -> Fraction | None:
    """Quarter notes per minute from a Q: value; None when it names no tempo we can read.

    Reads "1/4=120", "3/8=80" (a dotted quarter: 120), "1/4 3/8=40" (the beat is the sum),
    '"Allegro" 1/4=120' (quoted text is ignored), "C=120" and the legacy "120" (unit notes a
    minute, `unit` being the tune's L:). Numbers have at most 6 ASCII digits (a bpm may have a
    decimal part); anything else ("fast", "1/4=\u00b9\u00b2\u2070", 5,000 digits) is None, never an
    exception. Linear time: the value is split at "=" and each piece is checked once.
    """
    text = _QUOTED_RE.sub(" ", _strip_comment(value)).strip()
    if len(text) > MAX_FIELD_CHARS:
        return None
    pieces = text.split("=")
    for left, right in zip(pieces, pieces[1:]):
        m = _BPM_RE.match(right)
        if m is None:
            continue
        bpm = Fraction(m.group(1))
        words = left.split()
        if words == ["C"]:  # ABC 1.6 "C=120": unit notes a minute
            beat = unit
        else:
            beats = []
            for word in reversed(words):  # the run of fractions just before "="
                if "/" not in word or _FRACTION_RE.match(word) is None:
                    break
                beats.append(parse_fraction(word))
            if not beats:
                continue
            beat = sum(beats, Fraction(0))
        return bpm * beat * 4
    if len(pieces) == 1 and _DIGITS_RE.fullmatch(text):  # old ABC: unit notes per minute
        return Fraction(text) * unit * 4
    return None


def split_tunes(text: str) -> list[str]:
    """Split multi-tune text into tune texts (X: starts a tune, a blank line ends it).

    The file header before the first X: is dropped. Text without any X: line is split at
    blank lines, keeping chunks that hold a K: field.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    lines = text.split("\n")
    tunes: list[str] = []
    current: list[str] | None = None
    has_x = any(line.startswith("X:") for line in lines)
    if not has_x:
        chunk: list[str] = []
        for line in lines + [""]:
            if line.strip():
                chunk.append(line)
            elif chunk:
                if any(re.match(r"^\s*K:", c) or re.search(r"(?:^|\s)K:", c) for c in chunk):
                    tunes.append("\n".join(chunk))
                chunk = []
        return tunes
    for line in lines:
        if line.startswith("X:"):
            if current:
                tunes.append("\n".join(current))
            current = [line]
        elif current is not None:
            if line.strip() == "":
                tunes.append("\n".join(current))
                current = None
            else:
                current.append(line)
    if current:
        tunes.append("\n".join(current))
    return tunes


_HEADER_ONE_LINE = re.compile(r"(?:^|\s)([A-Za-z]):")
# the one-line header form starts with one of these fields (a number or a length, never free text)
ONE_LINE_FIELDS = "XLMQ"
_KEY_CONTINUATION = re.compile(
    r"^\s+((?:maj|min|m|ion|mix|dor|phr|lyd|loc|aeo)[a-z]*\b|(?:clef|middle|transpose|octave|"
    r"stafflines)=\S+|exp\b)", re.IGNORECASE)


def _split_one_line(line: str) -> tuple[list[tuple[str, str]], str] | None:
    """The seed's one-line form `X:1 L:1/8 M:4/4 K:Emin |: E2 ...` -> (fields, body). Only a
    line that starts with a field of values (X: L: M: Q:) is one: a text field runs to the end
    of its line (`T:Mr. D: Bridge's Reel.` is a title, `N: I: ...` a note)."""
    starts = [m for m in _HEADER_ONE_LINE.finditer(line)]
    if len(starts) < 2 or starts[0].start() != 0 or starts[0].group(1) not in ONE_LINE_FIELDS:
        return None
    fields: list[tuple[str, str]] = []
    for i, m in enumerate(starts):
        name = m.group(1)
        begin = m.end()
        if name == "K":
            rest = line[begin:]
            km = re.match(r"\s*(\S*)", rest)
            value = km.group(1) if km else ""
            pos = km.end() if km else 0
            while True:
                cm = _KEY_CONTINUATION.match(rest[pos:])
                if not cm:
                    break
                value += " " + cm.group(1)
                pos += cm.end()
            fields.append(("K", value))
            return fields, rest[pos:].strip()
        end = starts[i + 1].start() if i + 1 < len(starts) else len(line)
        fields.append((name, line[begin:end].strip()))
    return None


def _check_size(text: str) -> None:
    """ABCError for text over MAX_TUNE_CHARS: every reader here is linear, but not free."""
    if len(text) > MAX_TUNE_CHARS:
        raise ABCError(f"tune text is {len(text):,} characters, over the {MAX_TUNE_CHARS:,} this "
                       "parser reads (abc.MAX_TUNE_CHARS): split it into tunes (split_tunes)")


def _comment_text_blocks(lines: list[str]) -> list[str]:
    """Lines of `%%begintext` ... `%%endtext` blocks (ABC 2.1 8.2: free text to typeset, not
    music) turned into % comments, so they keep their line numbers and read as no music."""
    out, in_text = [], False
    for line in lines:
        directive = line.strip().lower()
        if directive.startswith("%%begintext"):
            in_text = True
        elif in_text:
            if directive.startswith("%%endtext"):
                in_text = False
            elif line.strip() and not line.lstrip().startswith("%"):
                line = "%" + line
        out.append(line)
    return out


def parse_tune(text: str) -> Tune:
    """Parse one tune (multi-line, or the one-line `X:1 L:1/8 M:4/4 K:Emin |: ...` form)."""
    if not isinstance(text, str):
        raise ABCError(f"expected ABC text (str), got {type(text).__name__}")
    _check_size(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    lines = _comment_text_blocks(text.split("\n"))
    fields: list[tuple[str, str]] = []
    continued: dict[int, list[str]] = {}  # field index -> its +: continuation values
    body_lines: list[str] = []
    first_body_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped or stripped.startswith("%"):
            if not stripped and fields:
                break  # a blank line after the header started ends the tune (ABC 2.1)
            i += 1
            continue
        m = _FIELD_RE.match(stripped)
        if m:
            one = _split_one_line(stripped) if m.group(1) != "K" else None
            if one is not None:
                fields.extend(one[0])
                if one[1]:
                    body_lines.append(one[1])
                    first_body_line = i + 1
                i += 1
                break
            name, value = m.group(1), _strip_comment(m.group(2)).strip()
            if name == "+":
                if fields:
                    continued.setdefault(len(fields) - 1, []).append(value)
            else:
                fields.append((name, value))
            i += 1
            if name == "K":
                break
            continue
        i += 1  # stray free text in the header: dropped
    for index, more in continued.items():  # joined once: += per line would be quadratic
        fields[index] = (fields[index][0], " ".join([fields[index][1], *more]))
    if not fields or fields[-1][0] != "K":
        raise ABCError("no K: field (the key line ends the header, e.g. K:G)", None, None)
    if not first_body_line:
        first_body_line = i + 1
    while i < len(lines) and lines[i].strip():  # a blank line ends the tune
        body_lines.append(lines[i].rstrip())
        i += 1
    body = "\n".join(body_lines)
    tune = Tune(fields, body, first_body_line)
    _check_header(tune)
    scan = _scan(tune)
    if not scan.events:
        raise ABCError("empty body: the tune has no notes or rests after K:", first_body_line)
    return tune


def _check_header(tune: Tune) -> None:
    for name, value in tune.fields:
        try:
            if name == "M":
                _meter_fraction(value)
            elif name == "L":
                parse_fraction(value)
            elif name == "K":
                parse_key(value)
        except ABCError as err:
            raise ABCError(f"header field {name}: {err.message}") from None


def _as_tune(tune_or_text: Tune | str) -> Tune:
    if isinstance(tune_or_text, Tune):
        _check_size(tune_or_text.body)  # a Tune built by hand meets the same cap
        return tune_or_text
    return parse_tune(tune_or_text)


# --------------------------------------------------------------------------- normalize
_HEADER_FIRST = ("T", "C", "O", "R")
_HEADER_LAST = ("M", "L", "Q")
# bibliographic/notes fields, instructions and user symbols are dropped by normalize
_HEADER_DROPPED = set("NSZHDFBGIAWUX")


def _strip_body_line(line: str) -> str:
    """Remove a % comment outside quotes and trailing spaces."""
    out, in_quote = [], False
    for i, ch in enumerate(line):
        if ch == '"':
            in_quote = not in_quote
        elif ch == "%" and not in_quote and (i == 0 or line[i - 1] != "\\"):
            break
        out.append(ch)
    return "".join(out).rstrip()


def normalize(tune_or_text: Tune | str, x: int = 1) -> str:
    """Canonical multi-line ABC: X, T, C, O, R, kept fields, M, L (always), Q, K; no comments.

    Dropped: N S Z H D F B G I A W U fields (notes, sources, history), comments, directives,
    blank and stray lines. Body lines are kept as written (minus comments/trailing spaces),
    except that a line ending after exactly one full bar with no bar line (Essen phrases) gets
    the " |" our bar check reads there: by ABC 2.1 a line end is no bar line, so without it
    other readers (abc2midi, abcm2ps) join the bar with the next line's first bar. A note after
    it that read an accidental carried over the line end gets that accidental written, so every
    pitch stays as `events` reads it.
    """
    tune = _as_tune(tune_or_text)
    out = [f"X:{x}"]
    for name in _HEADER_FIRST:
        out += [f"{name}:{v}" for k, v in tune.fields if k == name]
    for k, v in tune.fields:
        if k not in _HEADER_FIRST and k not in _HEADER_LAST and k != "K" \
                and k not in _HEADER_DROPPED:
            out.append(f"{k}:{v}")
    if tune._last("M") is not None:
        out.append(f"M:{tune.meter}")
    unit = tune.unit_length
    out.append(f"L:{unit.numerator}/{unit.denominator}")
    if tune._last("Q") is not None:
        out.append(f"Q:{tune._last('Q')}")
    out.append(f"K:{tune.key}")
    scan = _scan(tune)
    carried: dict[int, list[tuple[int, str]]] = {}
    for (number, col0), acc in scan.carried.items():
        carried.setdefault(number, []).append((col0, acc))
    body: list[tuple[int, str]] = []
    for offset, line in enumerate(tune.body.split("\n")):
        if line.lstrip().startswith("%"):
            continue
        number = tune.first_body_line + offset
        for col0, acc in sorted(carried.get(number, ()), reverse=True):
            line = line[:col0] + acc + line[col0:]  # keeps the pitch across the new bar line
        line = _strip_body_line(line)
        if line.strip():
            body.append((number, line))
    for i, (number, line) in enumerate(body):
        if number in scan.line_bars and i < len(body) - 1:
            line += " |"  # the bar line our reading puts there: ABC 2.1 would join the lines
        out.append(line)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- tokenizer
# A token is (kind, col0, end, data). Kinds: note rest mrest spacer bar ending field chord_open
# chord_close grace_open grace_close tuplet slur_open slur_close broken tie deco symbol cont.
_NOTE_RE = re.compile(r"(\^\^|[\^_][0-9]{0,2}/[0-9]{0,2}|\^|__|_|=)?([A-Ga-g])([,']*)([0-9]*)"
                      r"(/*)([0-9]*)")
_REST_RE = re.compile(r"([zx])([0-9]*)(/*)([0-9]*)")
_MREST_RE = re.compile(r"([ZX])([0-9]*)")
_SPACER_RE = re.compile(r"y([0-9]*)(/*)([0-9]*)")
_BAR_RE = re.compile(r"(:*(?:\[\|\]?|\|\]|\|\||\||\.\|):*|::+)([0-9]+(?:[,-][0-9]+)*)?")
_ENDING_RE = re.compile(r"\[([0-9]+(?:[,-][0-9]+)*)")
_INLINE_FIELD_RE = re.compile(r"\[([A-Za-z]):([^\]\n]*)\]")
_TUPLET_RE = re.compile(r"\(([0-9]+)(?::([0-9]*))?(?::([0-9]*))?")
_CHORD_CLOSE_RE = re.compile(r"\]([0-9]*)(/*)([0-9]*)")
_DECO_CHARS = set("~.HLMOPSTuvJR")
_MAX_LEN = 4096  # longer note lengths are typos or noise, not music


def _length(num: str, slashes: str, den: str, line: int, col: int) -> Fraction:
    """Length multiplier of a note: "" 1, "2" 2, "/" 1/2, "//" 1/4, "3/2", "3/" 3/2."""
    if len(num) > 4 or len(den) > 4 or len(slashes) > 12:
        raise ABCError(f"note length {num}{slashes}{den} is too long", line, col)
    n = int(num) if num else 1
    if slashes:
        d = int(den) * 2 ** (len(slashes) - 1) if den else 2 ** len(slashes)
    else:
        d = 1
    if n == 0 or d == 0 or d > _MAX_LEN:
        raise ABCError(f"bad note length {num}{slashes}{den!s} (zero or too small)", line, col)
    return _fraction(n, d)


# Fractions are immutable, and a tune's notes use a handful of lengths: made once each, the
# scanner's arithmetic stops being most of its time (Fraction() and * cost microseconds).
_fraction = functools.lru_cache(maxsize=4096)(Fraction)


@functools.lru_cache(maxsize=4096)
def _quarters(length_num: int, length_den: int, unit_num: int, unit_den: int) -> Fraction:
    """A note's duration in quarter notes: its length multiplier times the unit note length
    (keyed by integers: hashing a Fraction costs as much as the product)."""
    return Fraction(length_num, length_den) * Fraction(unit_num, unit_den) * 4


@functools.lru_cache(maxsize=4096)
def _sum(a_num: int, a_den: int, b_num: int, b_den: int) -> Fraction:
    """a + b for two Fractions given as integers: a bar's running length takes few values."""
    return Fraction(a_num, a_den) + Fraction(b_num, b_den)


class _Token(NamedTuple):
    """One symbol of a music line: its kind, where it stands (0-based, end exclusive), and what
    it says. Kinds: note rest mrest bar ending field chord_open chord_close grace_open
    grace_close tuplet slur_open slur_close broken tie deco symbol cont."""

    kind: str
    start: int
    end: int
    data: Any  # _Note, _Rest, _MultiRest, _Barline, _InlineField; the text or length of others


class _Note(NamedTuple):
    accidental: str  # "", "^", "^^", "=", "_", "__"
    letter: str  # as written: case gives the octave
    octave_marks: str  # "," and "'"
    length: Fraction  # multiplier of the unit length


class _Rest(NamedTuple):
    symbol: str  # z (a rest) or x (an invisible rest)
    length: Fraction


class _MultiRest(NamedTuple):
    symbol: str  # Z or X
    bars: int


class _Barline(NamedTuple):
    token: str  # "|", "||", ":|", "|:", "[|", ...
    ending: str | None  # "1", "2", "1,3" when an ending number follows ("|1")


class _InlineField(NamedTuple):
    name: str  # K M L V P T ...
    value: str


def _tokenize_line(text: str, line: int) -> tuple[_Token, ...]:
    """Split one music line into tokens; ABCError on a symbol that is not ABC (naming `line`).
    Memoised by text: the tokens depend on the line's text only (its number goes into errors,
    which are raised, never cached), and the builders scan the same lines in many texts."""
    try:
        return _line_tokens(text)
    except ABCError:
        return tuple(_tokenize_line_at(text, line))  # raises with this line's number


@functools.lru_cache(maxsize=8192)
def _line_tokens(text: str) -> tuple[_Token, ...]:
    return tuple(_tokenize_line_at(text, 0))


def _tokenize_line_at(text: str, line: int) -> list[_Token]:
    toks: list[_Token] = []
    pos, n = 0, len(text)
    while pos < n:
        c = text[pos]
        if c in " \t`$":
            pos += 1
            continue
        if c == "%":
            break
        if c in "ABCDEFGabcdefg^_=":
            m = _NOTE_RE.match(text, pos)
            if not m:
                raise ABCError(f"accidental {c!r} without a note after it", line, pos + 1)
            length = _length(m.group(4), m.group(5), m.group(6), line, pos + 1)
            toks.append(_Token("note", pos, m.end(),
                               _Note(m.group(1) or "", m.group(2), m.group(3), length)))
            pos = m.end()
            continue
        if c in "zx":
            m = _REST_RE.match(text, pos)
            length = _length(m.group(2), m.group(3), m.group(4), line, pos + 1)
            toks.append(_Token("rest", pos, m.end(), _Rest(c, length)))
            pos = m.end()
            continue
        if c in "ZX":
            m = _MREST_RE.match(text, pos)
            count = m.group(2)
            if len(count) > 4:
                raise ABCError(f"multi-bar rest {m.group(0)} is too long", line, pos + 1)
            toks.append(_Token("mrest", pos, m.end(), _MultiRest(c, int(count) if count else 1)))
            pos = m.end()
            continue
        if c == "y":
            m = _SPACER_RE.match(text, pos)
            pos = m.end()
            continue
        if c == "[":
            m = _INLINE_FIELD_RE.match(text, pos)
            if m:
                field_ = _InlineField(m.group(1), m.group(2).strip())
                toks.append(_Token("field", pos, m.end(), field_))
                pos = m.end()
                continue
            m = _ENDING_RE.match(text, pos)
            if m:
                toks.append(_Token("ending", pos, m.end(), m.group(1)))
                pos = m.end()
                continue
            if pos + 1 < n and text[pos + 1] == "|":
                m = _BAR_RE.match(text, pos)
                toks.append(_Token("bar", pos, m.end(), _Barline(m.group(1), m.group(2))))
                pos = m.end()
                continue
            if pos + 2 < n and text[pos + 1].isalpha() and text[pos + 2] == ":":
                raise ABCError("inline field [X:...] is not closed with ]", line, pos + 1)
            toks.append(_Token("chord_open", pos, pos + 1, None))
            pos += 1
            continue
        if c == "]":
            m = _CHORD_CLOSE_RE.match(text, pos)
            length = _length(m.group(1), m.group(2), m.group(3), line, pos + 1)
            toks.append(_Token("chord_close", pos, m.end(), length))
            pos = m.end()
            continue
        if c in "|:" or (c == "." and text.startswith(".|", pos)):
            m = _BAR_RE.match(text, pos)
            if not m:
                raise ABCError(f"unexpected {c!r} (a barline like | :| |: :: || |] ?)",
                               line, pos + 1)
            toks.append(_Token("bar", pos, m.end(), _Barline(m.group(1), m.group(2))))
            pos = m.end()
            continue
        if c == "&" or text.startswith("(&", pos):
            if text.startswith("(&", pos) or text.startswith("&)", pos):
                raise ABCError("voice overlay (& ... &) across bar lines is unsupported: write "
                               "& in each bar (abc 2.1 7.4)", line, pos + 1)
            toks.append(("overlay", pos, pos + 1, None))
            pos += 1
            continue
        if c == "(":
            m = _TUPLET_RE.match(text, pos)
            if m:
                p = int(m.group(1)[:3])
                q = int(m.group(2)[:3]) if m.group(2) else None
                r = int(m.group(3)[:3]) if m.group(3) else None
                if p < 2 or p > 9 and q is None:
                    raise ABCError(f"tuplet ({m.group(1)} needs 2-9 notes or an explicit "
                                   "(p:q:r)", line, pos + 1)
                toks.append(_Token("tuplet", pos, m.end(), (p, q, r)))
                pos = m.end()
                continue
            toks.append(_Token("slur_open", pos, pos + 1, None))
            pos += 1
            continue
        if c == ")":
            toks.append(_Token("slur_close", pos, pos + 1, None))
            pos += 1
            continue
        if c == "{":
            end = pos + 2 if text.startswith("{/", pos) else pos + 1
            toks.append(_Token("grace_open", pos, end, None))
            pos = end
            continue
        if c == "}":
            toks.append(_Token("grace_close", pos, pos + 1, None))
            pos += 1
            continue
        if c in "<>":
            end = pos
            while end < n and text[end] == c and end - pos < 3:
                end += 1
            toks.append(_Token("broken", pos, end, text[pos:end]))
            pos = end
            continue
        if c == "-":
            toks.append(_Token("tie", pos, pos + 1, None))
            pos += 1
            continue
        if c == '"':
            end = text.find('"', pos + 1)
            if end < 0:
                raise ABCError('chord symbol or annotation "... is not closed with "',
                               line, pos + 1)
            toks.append(_Token("symbol", pos, end + 1, text[pos + 1:end]))
            pos = end + 1
            continue
        if c in "!+":
            end = text.find(c, pos + 1)
            inner = text[pos + 1:end] if end > 0 else ""
            if end > 0 and inner and " " not in inner and "|" not in inner:
                toks.append(_Token("deco", pos, end + 1, inner))
                pos = end + 1
                continue
            if c == "!":  # ABC 2.0 line break
                pos += 1
                continue
            raise ABCError(f"decoration +{inner}... is not closed with +", line, pos + 1)
        if c in _DECO_CHARS:
            toks.append(_Token("deco", pos, pos + 1, c))
            pos += 1
            continue
        if c == "\\":
            if text[pos + 1:].strip() and not text[pos + 1:].lstrip().startswith("%"):
                raise ABCError("line continuation \\ must end the line", line, pos + 1)
            toks.append(_Token("cont", pos, pos + 1, None))
            break
        raise ABCError(f"unknown symbol {c!r} (not an ABC note, rest, bar or decoration)",
                       line, pos + 1)
    return toks


# --------------------------------------------------------------------------- events & bars
@dataclass(frozen=True)
class Event:
    """One note, chord or rest in written order (durations in quarter lengths)."""

    pitch: int | None  # MIDI number (highest note of a chord); None for a rest
    duration: Fraction
    bar: int  # index into check_bars(tune).bars
    line: int
    col: int
    tie: bool = False  # tied to the next event
    pitches: tuple[int, ...] = ()  # every note of a chord (one for a note, none for a rest)
    kind: str = "note"  # note | chord | rest | invisible_rest | measure_rest
    voice: str = ""


@dataclass(slots=True, eq=False)  # eq=False: the scanner tells events apart by identity
class _PendingEvent:
    """An Event while the scanner still fills it in: its bar once the bar closes, `tie` when a
    "-" follows, a longer or shorter `duration` when a broken rhythm (> <) follows."""

    pitch: int | None
    duration: Fraction
    bar: int
    line: int
    col: int
    tie: bool
    pitches: tuple[int, ...]
    kind: str
    voice: str

    def event(self) -> Event:
        return Event(self.pitch, self.duration, self.bar, self.line, self.col, self.tie,
                     self.pitches, self.kind, self.voice)


@dataclass
class Bar:
    """One bar as written: its measured length, the length its meter expects, and its kind."""

    index: int
    duration: Fraction
    expected: Fraction | None  # None: free meter
    line: int
    col: int
    text: str
    left: str = ""  # barline token before the bar ("" at the start of the tune)
    right: str = ""  # barline token that ends the bar ("" implicit or end of tune)
    kind: str = "full"  # full | pickup | section_end | final | ending | free | multi_rest | error
    #                    | overlay_error (the & layers differ in length)
    voice: str = ""
    ending: str = ""  # "1", "2", "1,3" when the bar opens a first/second ending
    line_end: bool = False  # the bar ends at the end of a music line
    break_after: bool = False  # a section break (|| |] :| |: :: [| P:) follows the bar
    layers: tuple[Fraction, ...] = ()  # with & overlays: every layer's length (main first)


@dataclass
class BarError:
    """A bar whose length is wrong even after pickups, endings and section breaks."""

    bar: int
    line: int
    col: int
    duration: Fraction
    expected: Fraction
    message: str


@dataclass
class BarReport:
    """All bars of a tune, the bar-length errors, and how many bars were checked."""

    bars: list[Bar]
    errors: list[BarError]
    checked: int

    @property
    def error_rate(self) -> float:
        """Share of checked bars with a length error (0.0 when nothing was checked)."""
        return len(self.errors) / self.checked if self.checked else 0.0


_SECTION_BARS = {"||", "|]", "[|", "::"}
_SEMITONE = NATURAL_PITCH_CLASS  # semitones above C of each letter: one table, in music.py


def note_midi(letter: str, octave_marks: str, alter: int) -> int:
    """MIDI number of an ABC note: letter case and , ' marks give the octave (C is middle C,
    60; c is 72), `alter` the semitones its accidental (or key, or bar) adds."""
    octave = (1 if letter.islower() else 0) + octave_marks.count("'") - octave_marks.count(",")
    return 60 + _SEMITONE[letter.upper()] + 12 * octave + alter


def note_name(letter: str, octave: int) -> str:
    """ABC letter and octave marks for an upper-case `letter` in scientific `octave` (C4: C,
    C5: c, C6: c', C3: C,); the inverse of `note_midi`'s octave rule."""
    if octave >= 5:
        return letter.lower() + "'" * (octave - 5)
    return letter + "," * (4 - octave)


def note_text(letter: str, octave: int, alter: int | None = None) -> str:
    """An ABC note without its length: the accidental for `alter` when given (0 writes "="),
    then `note_name`: note_text("F", 4, 1) -> "^F", note_text("B", 5, -1) -> "_b"."""
    return ("" if alter is None else _ACC_TEXT[alter]) + note_name(letter, octave)


def _is_section_bar(token: str) -> bool:
    """|| |] [| :| |: :: end or start a section; | .| and the invisible [|] do not."""
    if token == "[|]":
        return False
    return token in _SECTION_BARS or ":" in token or token.startswith("[|") \
        or token.endswith("]") or token.count("|") > 1


def _tuplet_q(p: int, meter: str | None) -> int:
    if p in (2, 4, 8):
        return 3
    if p in (3, 6):
        return 2
    return 3 if _is_compound(meter) else 2


class _Voice:
    """Per-voice reading state."""

    __slots__ = ("name", "key", "meter", "unit", "bar_acc", "bar_events", "bar_dur", "bar_start",
                 "bar_left", "bar_ending", "tuplet", "broken", "last_event", "bar_has_mrest",
                 "expected", "pending_break", "tuplet_open", "repeat_open", "last_bar",
                 "carried", "octave", "layers", "choices")

    def __init__(self, name: str, key: Key, meter: str, unit: Fraction):
        self.name = name
        self.key = key
        self.meter = meter
        self.unit = unit
        self.bar_acc: dict[str, int] = {}
        self.carried: set[str] = set()  # letters whose bar_acc came across a line-end bar
        self.octave = 0  # K:/V: octave=N: the notes sound N octaves from where written
        self.layers: list[Fraction] = []  # lengths of the bar's layers before each & overlay
        self.choices: tuple[Fraction, ...] = meter_choices(meter)  # "2/4 3/4": 2 or 3
        self.bar_events: list[_PendingEvent] = []
        self.bar_dur = Fraction(0)
        self.bar_start: tuple[int, int] | None = None
        self.bar_left = ""
        self.bar_ending = ""
        self.tuplet: list[int] | None = None  # [remaining notes, p, q]
        self.broken: str | None = None  # pending broken rhythm for the next note
        self.last_event: _PendingEvent | None = None
        self.bar_has_mrest = False
        self.expected: Fraction | None = None
        self.pending_break = False
        self.tuplet_open: tuple[int, int] | None = None
        self.repeat_open: tuple[int, int] | None = None
        self.last_bar: Bar | None = None  # the voice's latest closed bar


class _Scan:
    """Result of reading a tune body once: events, bars, and strict-validation findings."""

    __slots__ = ("events", "bars", "problems", "line_bars", "carried")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.bars: list[Bar] = []
        self.problems: list[ABCError] = []  # things only validate() treats as errors
        self.line_bars: set[int] = set()  # lines whose end closed a full bar (no bar line)
        # (line, col0) -> accidental a note reads from across such a line end ("^", "_", "=")
        self.carried: dict[tuple[int, int], str] = {}


_BROKEN = {">": (Fraction(3, 2), Fraction(1, 2)), ">>": (Fraction(7, 4), Fraction(1, 4)),
           ">>>": (Fraction(15, 8), Fraction(1, 8)), "<": (Fraction(1, 2), Fraction(3, 2)),
           "<<": (Fraction(1, 4), Fraction(7, 4)), "<<<": (Fraction(1, 8), Fraction(15, 8))}


def _scan(tune: Tune) -> _Scan:
    """Read the body once: events in written order and bars per voice. Cached on the Tune, and
    by what the scanner reads (`_scan_key`) for the last `_SCANS_KEPT` tunes: the dataset
    builders parse the same few texts several times a chat, each time into a new Tune, and
    rewrite headers (T:, Q:) that change no event. A _Scan is shared: never mutate one."""
    own = (tune.body, tuple(tune.fields), tune.first_body_line)
    _check_size(tune.body)
    if tune._cache is not None and tune._cache[0] == own:
        return tune._cache[1]
    shared = _scan_key(tune)
    with _SCANS_LOCK:
        scan = _SCANS.get(shared)
        if scan is not None:
            _SCANS.move_to_end(shared)
    if scan is None:
        scan = _Scanner(tune).run()
        with _SCANS_LOCK:
            _SCANS[shared] = scan
            while len(_SCANS) > _SCANS_KEPT:
                _SCANS.popitem(last=False)
    tune._cache = (own, scan)
    return scan


def _scan_key(tune: Tune) -> tuple:
    """Everything `_Scanner` reads of a tune: the body and where it starts, the header's meter,
    key and unit length, and its V: definitions (other header fields change no event)."""
    return (tune.body, tune.first_body_line, tune.meter, tune.key, tune.unit_length,
            tuple(value for name, value in tune.fields if name == "V"))


_SCANS: OrderedDict[tuple, _Scan] = OrderedDict()
_SCANS_LOCK = threading.Lock()
_SCANS_KEPT = 256


class _Scanner:
    """One pass over a body: keeps per-voice state, emits events, closes bars."""

    def __init__(self, tune: Tune):
        self.tune = tune
        self.scan = _Scan()
        self.raw_events: list[_PendingEvent] = []
        self.meter = tune.meter
        key = parse_key(tune.key)
        self.voices: dict[str, _Voice] = {}
        self.header_key = key
        self.header_unit = tune.unit_length
        self.header_octave = octave_shift(tune.key) or 0
        self.voice_octaves: dict[str, int] = {}  # header V: definitions with octave=
        for name, value in tune.fields:
            if name == "V" and value.split():
                self._check_voice(value)
                shift = octave_shift(value)
                if shift is not None:
                    self.voice_octaves[value.split()[0]] = shift
        self.voice = self._get_voice("")
        self.lines = tune.body.split("\n")
        self.where = (tune.first_body_line, 0)  # (line, 0-based col) of the current token

    def _get_voice(self, name: str) -> _Voice:
        v = self.voices.get(name)
        if v is None:
            base = self.voices.get("")
            if base is not None and not base.bar_events and base.last_bar is None and name:
                # the default voice was never used: the first V: takes its place
                del self.voices[""]
                base.name = name
                self.voices[name] = base
                return base
            key = Key(self.header_key.tonic, self.header_key.mode,
                      dict(self.header_key.accidentals), self.header_key.fifths)
            v = _Voice(name, key, self.meter if base is None else base.meter,
                       self.header_unit if base is None else base.unit)
            v.expected = meter_duration(v.meter)
            v.octave = self.voice_octaves.get(name, self.header_octave)
            self.voices[name] = v
        return v

    def _check_voice(self, value: str) -> None:
        """ABCError for a bad clef/middle/transpose/octave in a V: field (as in K:)."""
        for word in value.split()[1:]:
            if word.partition("=")[0].lower() in _KEY_PARAMS:
                _check_key_param(word, value)  # name="...", stem=, ... are not checked

    # -- fields inside the body
    def _field(self, name: str, value: str, line: int, col: int) -> None:
        v = self.voice
        try:
            if name == "K":
                v.key = parse_key(value)
                shift = octave_shift(value)
                if shift is not None:
                    v.octave = shift
            elif name == "M":
                # a change mid-bar: the new meter judges the bar it appears in
                v.expected = meter_duration(value)
                v.meter = value.strip() or "none"
                v.choices = meter_choices(v.meter)
            elif name == "L":
                v.unit = parse_fraction(value)
            elif name == "V":
                vname = value.split()[0] if value.split() else ""
                self._check_voice(value)
                shift = octave_shift(value)
                if shift is not None:
                    self.voice_octaves[vname] = shift
                self.voice = self._get_voice(vname)
                if shift is not None:
                    self.voice.octave = shift
            elif name in "PT":  # a new part or title: a section break
                if v.bar_events:
                    v.pending_break = True
                else:
                    self._mark_break_before(v)
        except ABCError as err:
            raise ABCError(f"field {name}:{value}: {err.message}", line, col) from None

    def _mark_break_before(self, v: _Voice) -> None:
        if v.last_bar is not None:
            v.last_bar.break_after = True

    # -- the body
    def run(self) -> _Scan:
        line_no = self.tune.first_body_line
        in_chord: list | None = None
        in_grace = False
        for offset, text in enumerate(self.tune.body.split("\n")):
            line = line_no + offset
            stripped = text.strip()
            if not stripped or stripped.startswith("%"):
                continue
            fm = _FIELD_RE.match(stripped)
            if fm and stripped[0] not in "|[":
                name = fm.group(1)
                if name in "KMLVPT":
                    self._field(name, _strip_comment(fm.group(2)).strip(), line, 1)
                continue  # w: W: N: Q: ... lines: not music
            toks = _tokenize_line(text, line)
            continued = False
            for tok in toks:
                kind, col0, end, data = tok
                col = col0 + 1
                self.where = (line, col0)
                v = self.voice
                if kind == "note" or kind == "rest":
                    if in_chord is not None:
                        if kind == "rest":
                            raise ABCError("rest inside a chord [...]", line, col)
                        in_chord.append(self._pitch(v, data))
                        if in_chord[0] is None:
                            in_chord[0] = (data.length, line, col)
                        continue
                    if in_grace:
                        if kind == "note":
                            self._pitch(v, data)
                        continue
                    if kind == "note":
                        p = self._pitch(v, data)
                        self._emit(v, p, (p,), data.length, line, col, "note")
                    else:
                        self._emit(v, None, (), data.length, line, col,
                                   "rest" if data.symbol == "z" else "invisible_rest")
                elif kind == "chord_open":
                    if in_chord is not None:
                        raise ABCError("chord [ inside a chord (missing ])", line, col)
                    in_chord = [None]
                elif kind == "chord_close":
                    if in_chord is None:
                        raise ABCError("] without an opening [", line, col)
                    if len(in_chord) == 1:
                        raise ABCError("empty chord []", line, col)
                    first_len, cline, ccol = in_chord[0]
                    pitches = tuple(in_chord[1:])
                    if not in_grace:
                        self._emit(v, max(pitches), pitches, first_len * data, cline, ccol,
                                   "chord")
                    in_chord = None
                elif in_chord is not None and kind not in ("tie", "deco", "symbol"):
                    raise ABCError("chord [ is not closed with ] before this symbol", line, col)
                elif kind == "bar":
                    if in_grace:
                        raise ABCError("grace notes { are not closed with }", line, col)
                    self._barline(v, data.token, line, col, end >= len(text.rstrip()))
                    if data.ending:
                        v.bar_ending = data.ending
                elif kind == "ending":
                    if v.bar_events:  # "f2 [1 g2": an ending start also ends the bar
                        self._close_bar(v, "", line_end=False)
                    v.bar_ending = data
                elif kind == "field":
                    self._field(data.name, data.value, line, col)
                elif kind == "tuplet":
                    p, q, r = data
                    if q is None:
                        q = _tuplet_q(p, v.meter)
                    v.tuplet = [r if r is not None else p, p, q]
                    v.tuplet_open = (line, col)
                elif kind == "broken":
                    if v.last_event is None or v.broken:
                        raise ABCError(f"broken rhythm {data} must stand between two notes",
                                       line, col)
                    v.broken = data
                elif kind == "tie":
                    if in_chord is not None:
                        continue
                    if v.last_event is not None:
                        v.last_event.tie = True
                elif kind == "grace_open":
                    if in_grace:
                        raise ABCError("grace notes { inside grace notes", line, col)
                    in_grace = True
                elif kind == "grace_close":
                    if not in_grace:
                        raise ABCError("} without an opening {", line, col)
                    in_grace = False
                elif kind == "mrest":
                    count = data.bars
                    exp = v.expected if v.expected is not None else v.unit * 4
                    self._emit(v, None, (), Fraction(count), line, col, "measure_rest",
                               duration=exp * count)
                    v.bar_has_mrest = True
                elif kind == "overlay":
                    if in_grace or in_chord is not None:
                        raise ABCError("& overlay inside a chord or grace notes", line, col)
                    if not v.bar_events:
                        raise ABCError("& overlay before any note of the bar (write the main "
                                       "layer first: A2 B2 & c2 d2 |)", line, col)
                    v.layers.append(v.bar_dur)  # the next layer starts at the bar's start
                    v.bar_dur = Fraction(0)
                    v.broken = None
                    v.last_event = None
                elif kind == "cont":
                    continued = True
            if in_chord is not None:
                raise ABCError("chord [ is not closed with ] on this line", line, len(text))
            if in_grace:
                raise ABCError("grace notes { are not closed with } on this line", line,
                               len(text))
            v = self.voice
            self.where = (line, len(text))
            if not continued and v.bar_events and v.expected is not None \
                    and v.bar_dur == v.expected and not v.bar_has_mrest:
                # a line ending after exactly one bar acts as a barline (Essen-style phrases);
                # accidentals still carry on, as the standard (and music21) reads no barline
                kept = v.bar_acc
                self._close_bar(v, "", line_end=True)
                v.bar_acc = kept
                v.carried = set(kept)
                self.scan.line_bars.add(line)
            elif not continued and not v.bar_events:
                self._mark_line_end(v)
        for v in self.voices.values():
            if v.bar_events:
                self._close_bar(v, "", line_end=True)
            if v.broken:
                self.scan.problems.append(ABCError("broken rhythm at the end of the tune"))
            if v.tuplet is not None and v.tuplet[0] > 0:
                self.scan.problems.append(ABCError(
                    f"tuplet ({v.tuplet[1]} is missing {v.tuplet[0]} note(s)", *v.tuplet_open))
            if v.repeat_open is not None:
                self.scan.problems.append(ABCError("repeat |: is never closed with :|",
                                                   *v.repeat_open))
        self.scan.events = [r.event() for r in self.raw_events]
        _classify(self.scan)
        return self.scan

    def _mark_line_end(self, v: _Voice) -> None:
        if v.last_bar is not None:
            v.last_bar.line_end = True

    def _pitch(self, v: _Voice, data: _Note) -> int:
        acc, letter, octs, _ = data
        up = letter.upper()
        if acc:
            alter = _alter_of(acc)
            v.bar_acc[up] = alter  # carries through the bar, every octave (ABC 2.1 "pitch")
            v.carried.discard(up)
        else:
            alter = v.bar_acc.get(up)
            if up in v.carried and alter != v.key.accidentals.get(up, 0):
                self.scan.carried[self.where] = _ACC_TEXT[alter]
                v.carried.discard(up)  # once written, the rest of the bar carries it as usual
            if alter is None:
                alter = v.key.accidentals.get(up, 0)
        octave = (1 if letter.islower() else 0) + octs.count("'") - octs.count(",") + v.octave
        return 60 + _SEMITONE[up] + 12 * octave + alter

    def _emit(self, v: _Voice, pitch: int | None, pitches: tuple, length: Fraction, line: int,
              col: int, kind: str, duration: Fraction | None = None) -> None:
        if duration is None:
            duration = _quarters(length.numerator, length.denominator, v.unit.numerator, v.unit.denominator)
            if v.tuplet is not None and v.tuplet[0] > 0:
                duration = duration * v.tuplet[2] / v.tuplet[1]
                v.tuplet[0] -= 1
                if v.tuplet[0] == 0:
                    v.tuplet = None
            if v.broken:
                left, right = _BROKEN[v.broken]
                prev = v.last_event
                if prev is not None:
                    old = prev.duration
                    prev.duration = old * left
                    self._adjust_bar(v, prev, prev.duration - old)
                duration = duration * right
                v.broken = None
        if v.bar_start is None:
            v.bar_start = (line, col)
        voice = f"{v.name}&{len(v.layers)}" if v.layers else v.name  # an & overlay layer
        ev = _PendingEvent(pitch, duration, -1, line, col, False, pitches, kind, voice)
        self.raw_events.append(ev)
        v.bar_events.append(ev)
        v.bar_dur = _sum(v.bar_dur.numerator, v.bar_dur.denominator, duration.numerator, duration.denominator)
        v.last_event = ev

    def _adjust_bar(self, v: _Voice, ev: _PendingEvent, delta: Fraction) -> None:
        # `ev` is the voice's last event: in the open bar it is that bar's last (an identity
        # test; `ev in v.bar_events` compared lists and made long bars quadratic)
        if v.bar_events and v.bar_events[-1] is ev:
            v.bar_dur += delta
        elif ev.bar >= 0:  # broken rhythm across a barline: fix the closed bar
            self.scan.bars[ev.bar].duration += delta

    def _barline(self, v: _Voice, token: str, line: int, col: int, at_line_end: bool) -> None:
        if token.startswith(":"):
            v.repeat_open = None  # :| and :: close a repeat (or repeat from the start)
        if token.endswith(":"):
            v.repeat_open = (line, col)
        if v.bar_events:
            self._close_bar(v, token, line_end=at_line_end)
            return
        # no notes since the last barline ("|\n|:"): this barline belongs to the bar before
        b = v.last_bar
        if b is not None:
            b.break_after = b.break_after or _is_section_bar(token)
            b.line_end = b.line_end or at_line_end
        if not v.bar_left or _is_section_bar(token):
            v.bar_left = token
        v.bar_acc = {}
        v.carried = set()

    def _source(self, line: int, col0: int, end_line: int, end_col0: int) -> str:
        """The body text from (line, col0) up to (end_line, end_col0), for Bar.text."""
        first = self.tune.first_body_line
        if line == end_line:
            return self.lines[line - first][col0:end_col0].strip()
        parts = [self.lines[line - first][col0:]]
        parts += self.lines[line - first + 1:end_line - first]
        parts.append(self.lines[end_line - first][:end_col0])
        return "\n".join(p.strip() for p in parts if p.strip())

    def _close_bar(self, v: _Voice, token: str, line_end: bool) -> None:
        index = len(self.scan.bars)
        for ev in v.bar_events:
            ev.bar = index
        line, col = v.bar_start or (0, 0)
        layers = tuple(v.layers + [v.bar_dur]) if v.layers else ()
        duration = layers[0] if layers else v.bar_dur
        expected = duration if len(v.choices) > 1 and duration in v.choices else v.expected
        bar = Bar(index=index, duration=duration, expected=expected, line=line, col=col,
                  text=self._source(line, col - 1, *self.where), left=v.bar_left, right=token,
                  voice=v.name, ending=v.bar_ending, line_end=line_end,
                  break_after=_is_section_bar(token) or v.pending_break, layers=layers)
        bar.kind = "multi_rest" if v.bar_has_mrest else "full"
        self.scan.bars.append(bar)
        v.last_bar = bar
        v.bar_events = []
        v.bar_dur = Fraction(0)
        v.bar_start = None
        v.bar_left = token
        v.bar_ending = ""
        v.bar_has_mrest = False
        v.pending_break = False
        v.bar_acc = {}
        v.carried = set()
        v.layers = []


def _classify(scan: _Scan) -> None:
    """Give every bar its kind; a bar no musical rule explains gets kind "error".

    Rules, per voice: a bar of the meter's length is full; the first bar may be short (pickup),
    and so may the last (final); a short bar before a section break (|| |] :| |: :: [| or a
    P:/T: field) closes its section (the repeat or the next part supplies the rest); a short bar
    right after a section break is the next part's pickup; two short bars that meet at a section
    break or a line end and add up to one bar are one bar written across it; the first bar of a
    first/second ending may complete the short bar before the endings (or, closing its section,
    do so with the next part's pickup).
    """
    by_voice: dict[str, list[Bar]] = {}
    for b in scan.bars:
        by_voice.setdefault(b.voice, []).append(b)
    for bars in by_voice.values():
        n = len(bars)
        ok = [False] * n
        for i, b in enumerate(bars):
            exp = b.expected
            if exp is None:
                b.kind, ok[i] = "free", True
            elif b.kind == "multi_rest":
                ok[i] = b.duration > 0 and b.duration % exp == 0
            elif b.duration == exp:
                b.kind, ok[i] = ("ending" if b.ending else "full"), True
        for base, starts in _ending_groups(bars):
            b = bars[base]
            exp = b.expected
            if exp is not None and not ok[base] and b.duration < exp and all(
                    bars[s].duration + b.duration == exp or _leads_on(bars, s, b.duration)
                    for s in starts):
                b.kind, ok[base] = "section_end", True
                for s in starts:
                    bars[s].kind, ok[s] = "ending", True
        for i, b in enumerate(bars):
            exp = b.expected
            if ok[i] or exp is None or b.duration > exp:
                continue
            prev = bars[i - 1] if i > 0 else None
            if prev is not None and not ok[i - 1] and prev.expected == exp \
                    and (prev.break_after or prev.line_end) and prev.duration + b.duration == exp:
                prev.kind, b.kind = "section_end", "pickup"
                ok[i - 1] = ok[i] = True
            elif i == 0:
                b.kind, ok[i] = "pickup", True
            elif i == n - 1:
                b.kind, ok[i] = "final", True
            elif b.break_after:
                b.kind, ok[i] = "section_end", True
            elif prev is not None and prev.break_after:
                b.kind, ok[i] = "pickup", True
        for i, b in enumerate(bars):
            if len(set(b.layers)) > 1:
                b.kind = "overlay_error"  # whatever else explains the main layer
            elif not ok[i]:
                b.kind = "error"


def _leads_on(bars: list[Bar], s: int, base: Fraction) -> bool:
    """An ending that closes its section short and the next part's pickup completes the bar:
    `[2 D ||` then `f/g/|` (the last ending leads into the next part, Aird's airs)."""
    return bars[s].break_after and s + 1 < len(bars) and bars[s].expected is not None \
        and base + bars[s].duration + bars[s + 1].duration == bars[s].expected


def _ending_groups(bars: list[Bar]) -> list[tuple[int, list[int]]]:
    """(bar before the endings, [bars opening each ending]) for every [1 [2 ... group."""
    groups: list[tuple[int, list[int]]] = []
    in_region = False
    for j, b in enumerate(bars):
        if b.ending:
            if not in_region and j > 0:
                groups.append((j - 1, []))
                in_region = True
            if in_region:
                groups[-1][1].append(j)
        elif in_region and bars[j - 1].break_after:
            in_region = False
    return groups


def events(tune_or_text: Tune | str) -> list[Event]:
    """The notes, chords and rests in written order (see the module docstring for rules)."""
    return list(_scan(_as_tune(tune_or_text)).events)


def check_bars(tune_or_text: Tune | str) -> BarReport:
    """Measure every bar against its meter; flag only bars that no musical rule explains."""
    tune = _as_tune(tune_or_text)
    scan = _scan(tune)
    errors = []
    checked = 0
    for b in scan.bars:
        if b.expected is None:
            continue
        checked += 1
        if b.kind == "overlay_error":
            lengths = ", ".join(_ql(x) for x in b.layers)
            errors.append(BarError(
                bar=b.index, line=b.line, col=b.col, duration=b.duration, expected=b.expected,
                message=(f"bar {b.index + 1}: its & overlay layers differ in length "
                         f"({lengths} quarter lengths); each layer must fill the bar")))
        elif b.kind == "error":
            what = "too long" if b.duration > b.expected else "too short"
            errors.append(BarError(
                bar=b.index, line=b.line, col=b.col, duration=b.duration, expected=b.expected,
                message=(f"bar {b.index + 1} is {what}: {_ql(b.duration)} quarter lengths, "
                         f"the meter wants {_ql(b.expected)}")))
    return BarReport(bars=scan.bars, errors=errors, checked=checked)


def _ql(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(value)


def bar_duration_errors(tune_or_text: Tune | str) -> list[BarError]:
    """The bar-length errors of a tune (= check_bars(tune).errors)."""
    return check_bars(tune_or_text).errors


def barline_tokens(line: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of each bar line in one music line, read as the parser reads them
    (`|` `||` `|]` `[|` `:|` `|:` `::` `.|`, with their repeat colons; an ending number after
    one is not part of it), passing over quoted text, !decorations!, inline fields [K:...] and
    % comments. Lenient: any other text is skipped, so it serves tools that read broken tunes."""
    tokens, i, n = [], 0, len(line)
    while i < n:
        ch = line[i]
        if ch == "%":
            break
        if ch in '"!':
            close = line.find(ch, i + 1)
            i = n if close < 0 else close + 1
            continue
        if ch == "[" and i + 2 < n and line[i + 1].isalpha() and line[i + 2] == ":":
            close = line.find("]", i)
            i = n if close < 0 else close + 1
            continue
        m = _BAR_RE.match(line, i) if ch in "|:[." else None
        if m:
            tokens.append((m.start(1), m.end(1), m.group(1)))
            i = m.end(1)
            continue
        i += 1
    return tokens


# What stands at a bar's edges in the text and belongs to the bar lines, not to the bar's music:
# white space, bar lines with their repeat colons and ending numbers (read by the parser's
# `_BAR_RE`), a lone ":" or ending number a `bar_segments` cut left behind (|: |2), [1-style
# endings and inline fields ([K:D]); with `lines`, also line continuations and body field lines.
_BAR_EDGE = _BAR_RE.pattern + r"|\[?[0-9]+(?:[,-][0-9]+)*|\[[A-Za-z]:[^\]\n]*\]"
_BAR_LEAD_RE = re.compile(r"(?:[\s:]+|" + _BAR_EDGE + r")*")
_BAR_LEAD_LINES_RE = re.compile(r"(?:[\s:\\]+|" + _BAR_EDGE + r"|^[HIKLMNPQRTUVWw]:[^\n]*\n)*", re.M)
_BAR_TAIL_RE = re.compile(r"(?:" + _BAR_RE.pattern + r")(?:\s*(?:" + _BAR_RE.pattern + r"))*\s*$")


def bar_music_start(text: str, start: int, end: int, lines: bool = True) -> int:
    """Where the music of the bar in `text[start:end]` (a `bar_segments` span) begins: the bar
    lines, ending numbers, inline fields and spaces before it skipped (a chord symbol goes here).
    `lines=True` skips a line continuation (`\\`) and body field lines (P:B) there too;
    `lines=False` leaves them at the bar's start (editing.bar_spans' offsets, as they were)."""
    return (_BAR_LEAD_LINES_RE if lines else _BAR_LEAD_RE).match(text, start, end).end()


def trailing_barlines_start(text: str, start: int = 0, end: int | None = None) -> int:
    """Where the bar lines that `text[start:end]` ends with begin (with their repeat colons and
    ending numbers, spaces between them and after): `end` when it ends with none. Spaces before
    the first one are kept, so `text[:trailing_barlines_start(text)]` is the text unclosed."""
    end = len(text) if end is None else end
    m = _BAR_TAIL_RE.search(text, start, end)
    return m.start() if m else end


def bar_segments(abc_text: str) -> tuple[int, list[tuple[int, int]]]:
    """Where each bar of a tune lies in its text: (offset where the body starts, [(start, end)]
    per bar of the first voice), a bar running from just after the previous bar's closing
    barline to just after its own, so a chord symbol written at a bar's start falls inside it.
    Positions come from `events` (1-based line/col); only barlines are scanned here."""
    body_start, spans = _bar_segments(abc_text)
    return body_start, list(spans)  # a copy: the memoised list stays untouched


@functools.lru_cache(maxsize=2048)
def _bar_segments(abc_text: str) -> tuple[int, list[tuple[int, int]]]:
    tune = parse_tune(abc_text)
    bars = check_bars(tune).bars
    if not bars:
        raise ValueError("tune has no bars")
    voice = bars[0].voice
    wanted = {b.index for b in bars if b.voice == voice}
    line_starts = [0]
    for line in abc_text.split("\n"):
        line_starts.append(line_starts[-1] + len(line) + 1)
    last_event: dict[int, int] = {}
    for ev in events(tune):
        if int(ev.bar) in wanted and 1 <= ev.line < len(line_starts):
            last_event[int(ev.bar)] = line_starts[ev.line - 1] + max(ev.col - 1, 0)
    body_start = line_starts[max(tune.first_body_line - 1, 0)]
    right = {b.index: b.right for b in bars}
    spans, cursor = [], body_start
    for index in sorted(last_event):
        if right.get(index):
            end = _after_barline(abc_text, last_event[index])
        else:  # no barline: the bar ends with its line (Essen style) or with the tune
            newline = abc_text.find("\n", last_event[index])
            end = len(abc_text.rstrip("\n")) if newline < 0 else newline
        spans.append((cursor, end))
        cursor = end
    return body_start, spans


def _after_barline(text: str, pos: int) -> int:
    """Offset just after the first barline at or after `pos` (quoted text skipped), or the end."""
    i, n = pos, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            close = text.find('"', i + 1)
            i = n if close < 0 else close + 1
            continue
        if ch == "|":
            i += 1
            while i < n and text[i] in "|]:":  # the whole token: ||, |], |:
                i += 1
            return i
        if text.startswith("::", i):
            return i + 2
        i += 1
    return len(text.rstrip("\n"))


# --------------------------------------------------------------------------- validate
@dataclass
class ValidationReport:
    """Verdict of the strict validator used to judge model output."""

    ok: bool
    error: ABCError | None
    tune: Tune | None
    bars: BarReport | None

    @property
    def bar_error_rate(self) -> float:
        """Share of checked bars with a length error; 1.0 when the text did not parse."""
        return self.bars.error_rate if self.bars is not None else 1.0


def validate(text: str) -> ValidationReport:
    """Strict check: parses, has K: and M:, one full bar, closed repeats and tuplets.

    Bar-length errors are reported in `.bars` but do not make `ok` False.
    """
    try:
        tune = parse_tune(text)
    except ABCError as err:
        return ValidationReport(False, err, None, None)
    except RecursionError:  # pragma: no cover - defensive
        return ValidationReport(False, ABCError("input too deeply nested"), None, None)
    scan = _scan(tune)
    report = check_bars(tune)
    error: ABCError | None = None
    if tune._last("M") is None:
        error = ABCError("no M: field (add a meter, e.g. M:4/4)")
    elif scan.problems:
        error = scan.problems[0]
    elif not any(b.kind in ("full", "ending", "free", "section_end") and b.duration > 0
                 for b in scan.bars):
        error = ABCError("no complete bar (a tune needs at least one full bar)")
    return ValidationReport(error is None, error, tune, report)


# --------------------------------------------------------------------------- transpose
_LETTERS = "CDEFGAB"
_CHORD_SYMBOL_RE = re.compile(r"^([A-G])([#b]?)([^/\s]*)(?:/([A-G])([#b]?))?$")
# A chord name as written inside quotes ("G", "Am7", "D/F#", "Bbmaj7"), strict enough that text
# annotations such as "DC" (da capo) or "Fine" are not taken for chords.
CHORD_NAME = r"[A-G][#b]?(?:maj|min|dim|aug|sus|add|m|M|\+|o|\d)*(?:/[A-G][#b]?)?"
QUOTED_CHORD_RE = re.compile(r'"(' + CHORD_NAME + r')"')


def _new_key(key: Key, semitones: int) -> Key:
    """The conventional spelling of `key` moved by `semitones` (at most 6 sharps or flats)."""
    f = (key.fifths + semitones * 7 + 6) % 12 - 6  # into -6..5
    if f == -6 and key.fifths >= 0:
        f = 6  # F# rather than Gb when coming from the sharp side
    tonic_fifths = f - _MODE_OFFSETS[key.mode]
    letter = "FCGDAEB"[(tonic_fifths + 1) % 7]
    acc_count = (tonic_fifths + 1) // 7
    tonic = letter + ("#" * acc_count if acc_count > 0 else "b" * -acc_count)
    return Key(tonic, key.mode, _signature(f), f)


@dataclass
class _MovedKey:
    """A K: value before and after transposition, and how note letters move with it."""

    text: str  # the new K: value
    old: Key  # the signature the old text gives
    new: Key  # the signature the new text gives
    letter_shift: int  # scale steps note letters move (tonal transposition)
    prefer_flats: bool


def _move_key(value: str, semitones: int) -> _MovedKey:
    """Transpose a K: value; keyless values (none, HP, Hp, clef only) keep their signature."""
    old = parse_key(value)
    raw = _strip_comment(value).strip()
    m = _KEY_RE.match(raw.split()[0]) if raw.split() else None
    if m is None or raw.split()[0] in ("HP", "Hp"):
        guide = _new_key(Key(old.tonic, old.mode, {}, old.fifths), semitones)
        shift = (_LETTERS.index(guide.tonic[0]) - _LETTERS.index(old.tonic[0])) % 7
        return _MovedKey(raw, old, old, shift, guide.fifths < 0)
    new = _new_key(old, semitones)
    # explicit extra accidentals (K:D =c) are dropped: notes get explicit accidentals instead
    rest = [w for w in raw[m.end():].split() if not _KEY_ACC_RE.match(w) and w != "exp"]
    text = " ".join([new.tonic + m.group(3)] + rest)
    shift = (_LETTERS.index(new.tonic[0]) - _LETTERS.index(old.tonic[0])) % 7
    return _MovedKey(text, old, new, shift, new.fifths < 0)


def _spell(pitch: int, letter_shift: int, old_letter: str, prefer_flats: bool) -> tuple[str, int]:
    """Spell MIDI `pitch` with the letter `letter_shift` steps above `old_letter`."""
    letter = _LETTERS[(_LETTERS.index(old_letter) + letter_shift) % 7]
    natural = _SEMITONE[letter]
    alter = (pitch - natural + 6) % 12 - 6
    if abs(alter) > 2:  # leave tonal spelling when it would need a triple accidental
        for cand in (_LETTERS if not prefer_flats else reversed(_LETTERS)):
            a = (pitch - _SEMITONE[cand] + 6) % 12 - 6
            if abs(a) <= 1:
                return cand, a
    return letter, alter


def _note_text(letter: str, alter: int, pitch: int, write_acc: bool) -> str:
    """ABC text for a note: accidental, letter case and octave marks for MIDI `pitch`."""
    octave = (pitch - alter - _SEMITONE[letter]) // 12 - 1
    return note_text(letter, octave, alter if write_acc else None)


def _transpose_symbol(text: str, semitones: int, letter_shift: int, prefer_flats: bool) -> str:
    """Transpose a chord symbol "Am7/G"; annotations ("^text") are left alone."""
    m = _CHORD_SYMBOL_RE.match(text)
    if not m:
        return text

    def move(letter: str, acc: str) -> str:
        pc = _SEMITONE[letter] + (1 if acc == "#" else -1 if acc == "b" else 0)
        new_letter, alter = _spell(pc + semitones, letter_shift, letter, prefer_flats)
        if abs(alter) > 1:
            new_letter, alter = _spell(pc + semitones, 0, "C", prefer_flats)
            for cand in _LETTERS:
                a = (pc + semitones - _SEMITONE[cand] + 6) % 12 - 6
                if a == 0 or (a == (-1 if prefer_flats else 1)):
                    new_letter, alter = cand, a
                    break
        return new_letter + ("#" if alter == 1 else "b" if alter == -1 else "")

    out = move(m.group(1), m.group(2)) + m.group(3)
    if m.group(4):
        out += "/" + move(m.group(4), m.group(5))
    return out


def transpose(tune_or_text: Tune | str, semitones: int) -> str:
    """Move every note and chord symbol by `semitones`, rewrite K: and re-spell accidentals.

    Returns normalised ABC. The new key is the conventional spelling (at most 6 sharps or
    flats); note letters move with the key (tonal transposition) and accidentals are written
    wherever the new key signature and the bar's earlier accidentals would give a wrong pitch
    (and wherever the original had one).
    """
    tune = _as_tune(tune_or_text)
    if not isinstance(semitones, int) or isinstance(semitones, bool):
        raise ABCError(f"semitones must be an int, got {semitones!r}")
    if semitones == 0:
        return normalize(tune)
    header = _move_key(tune.key, semitones)
    fields = [(k, header.text if k == "K" else v) for k, v in tune.fields]
    body = _transpose_body(tune, semitones, header)
    return normalize(Tune(fields, body, tune.first_body_line))


class _TransposeVoice:
    __slots__ = ("key", "old_acc", "new_acc")

    def __init__(self, key: _MovedKey):
        self.key = key
        self.old_acc: dict[str, int] = {}  # accidentals met in this bar, old text
        self.new_acc: dict[str, int] = {}  # accidentals written in this bar, new text


def _transpose_body(tune: Tune, semitones: int, header: _MovedKey) -> str:
    voices: dict[str, _TransposeVoice] = {}
    current = [""]

    def voice() -> _TransposeVoice:
        if current[0] not in voices:
            voices[current[0]] = _TransposeVoice(header)
        return voices[current[0]]

    out_lines = []
    for offset, text in enumerate(tune.body.split("\n")):
        stripped = text.strip()
        if not stripped or stripped.startswith("%"):
            out_lines.append(text)
            continue
        fm = _FIELD_RE.match(stripped)
        if fm and stripped[0] not in "|[":
            name, value = fm.group(1), _strip_comment(fm.group(2)).strip()
            if name == "K":
                voice().key = _move_key(value, semitones)
                text = f"K:{voice().key.text}"
            elif name == "V":
                current[0] = value.split()[0] if value.split() else ""
            out_lines.append(text)
            continue
        pieces: list[str] = []
        last = 0
        for kind, col0, end, data in _tokenize_line(text, tune.first_body_line + offset):
            v = voice()
            mk = v.key
            if kind == "note":
                acc, letter, octs, _ = data
                up = letter.upper()
                if acc and acc not in _ACC_VALUES:
                    raise ABCError(f"transposing the microtonal accidental {acc} is unsupported "
                                   "(write ^ _ = or transpose by hand)",
                                   tune.first_body_line + offset, col0 + 1)
                if acc:
                    alter = _ACC_VALUES[acc]
                    v.old_acc[up] = alter
                else:
                    alter = v.old_acc.get(up, mk.old.accidentals.get(up, 0))
                pitch = note_midi(letter, octs, alter) + semitones
                new_letter, new_alter = _spell(pitch, mk.letter_shift, up, mk.prefer_flats)
                current_alter = v.new_acc.get(new_letter, mk.new.accidentals.get(new_letter, 0))
                write = bool(acc) or current_alter != new_alter
                if write:
                    v.new_acc[new_letter] = new_alter
                length_text = text[col0 + len(acc) + 1 + len(octs):end]
                pieces += [text[last:col0], _note_text(new_letter, new_alter, pitch, write),
                           length_text]
                last = end
            elif kind == "bar":
                v.old_acc.clear()
                v.new_acc.clear()
            elif kind == "symbol":
                moved = _transpose_symbol(data, semitones, mk.letter_shift, mk.prefer_flats)
                pieces += [text[last:col0], f'"{moved}"']
                last = end
            elif kind == "field" and data.name == "K":
                v.key = _move_key(data.value, semitones)
                pieces += [text[last:col0], f"[K:{v.key.text}]"]
                last = end
            elif kind == "field" and data.name == "V":
                current[0] = data.value.split()[0] if data.value.split() else ""
        pieces.append(text[last:])
        out_lines.append("".join(pieces))
    return "\n".join(out_lines)


# --------------------------------------------------------------------------- music21
def to_music21(tune_or_text: Tune | str) -> Any:
    """A music21 Score read by music21's own ABC reader from our normalised text.

    The text is marked `%abc-2.1` so music21 carries accidentals through the bar as the
    standard (and `events`) does.
    """
    from music21 import converter  # heavy import: only when asked

    text = "%abc-2.1\n" + normalize(_as_tune(tune_or_text))
    try:
        return converter.parse(text, format="abc")
    except Exception as err:  # music21 raises many types; keep one error for users
        raise ABCError(f"music21 could not read this tune: {err}") from err
