"""Users' own music in: one melody from a MIDI, MusicXML (.musicxml/.xml/.mxl) or ABC file as
the project's ABC, with a report of every choice and loss.

    report = import_melody("my_tune.mid")       # or .musicxml, .mxl, .abc, or ABC text
    report.abc, report.part_reason, report.rounded, report.dropped

music21 reads MIDI and MusicXML; ABC is written here (music21 cannot write it). What the
import keeps: key, meter, unit length (ABC 2.1's default for the meter), tempo, title, one
melodic line, ties across bar lines, triplets (`(3`, or `(3:2:n` for n notes), a pickup bar,
MusicXML's bars as written (short ones, repeat signs, first/second endings) and a lead sheet's
chord symbols (each on the first note at or after it).

Decisions (each one lands in the `ImportReport`, never silently):

* Several parts (a score, a piano's two staves): the part with the highest mean pitch, unless
  `part=` names one (index or part name). Chords and notes under a sounding higher note are
  reduced to the top line ("skyline"); grace notes are dropped.
* MIDI is read unquantised and rounded here to the nearest sensible grid: the coarsest of
  `GRIDS` (quavers ... 32nd notes and sixteenth triplets) that moves nothing by more than
  `GRID_TOLERANCE`; every moved onset or end is counted and the largest move reported, in
  quarter lengths and milliseconds. MusicXML and ABC are exact: nothing moves.
* MIDI has no bar lines: leading silence shorter than a bar becomes the start of a pickup, and
  with no silence the pickup is the shift that puts the most note weight on strong beats
  (`pickup=` overrides). MIDI from music21 holds repeats expanded, so the ABC has them played out.
* Limits against hostile files: `MAX_FILE_BYTES` on disk (and uncompressed inside .mxl),
  `MAX_NOTES` notes, checked before music21 parses the file. Every failure is a
  `MusicImportError` (an `abc.ABCError`) naming the cause.
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from imelodist_lib import abc
from imelodist_lib.music import NATURAL_PITCH_CLASS, spell_pitch

MAX_FILE_BYTES = 4 * 1024 * 1024  # a long folk-tune score is well under 1 MB
MAX_NOTES = 20_000  # a melody of a few hundred notes; a symphony is not one melody
# Grids MIDI may be rounded to, coarsest first, as divisions of a quarter note: (4, 3) is
# sixteenths or quaver triplets. The first grid that moves no onset or end by more than
# GRID_TOLERANCE is used, so a plain tune is not bent onto a triplet grid by a player's timing.
GRIDS = ((2,), (4,), (4, 3), (4, 6), (8, 6))
GRID_TOLERANCE = Fraction(1, 32)  # quarter lengths: 16 ms at 120 beats per minute
BARS_PER_LINE = 4
KINDS = ("midi", "musicxml", "abc")
_SUFFIX_KIND = {".mid": "midi", ".midi": "midi", ".musicxml": "musicxml", ".xml": "musicxml",
                ".mxl": "musicxml", ".abc": "abc"}
_MODE_SUFFIX = {"major": "", "minor": "m", "dorian": "Dor", "mixolydian": "Mix", "phrygian": "Phr",
                "lydian": "Lyd", "locrian": "Loc", "aeolian": "m", "ionian": ""}


class MusicImportError(abc.ABCError):
    """A file that cannot become a melody: unreadable, too big, or holding no notes."""

    def __reduce__(self):
        return (MusicImportError, (self.message, self.line, self.col))


@dataclass
class Rounding:
    """What quantisation moved: onsets and note ends, in quarter lengths and milliseconds."""

    grid: tuple[int, ...]  # the grid used, as divisions of a quarter (4: sixteenths, 3: quaver triplets)
    moved: int  # onsets and ends that moved
    total: int  # onsets and ends looked at
    max_quarters: float  # the largest move
    max_ms: float | None  # the same at the file's tempo (None when it has none)


@dataclass
class ImportReport:
    """The imported melody as ABC and everything the import decided on the way."""

    abc: str  # normalised ABC, passes abc.validate
    source: str  # "midi" | "musicxml" | "abc"
    part: int | None  # index of the part used (None: the source had one line)
    part_name: str
    part_reason: str  # why this part ("the only part", "highest mean pitch of 2 parts", "asked for")
    parts: int  # parts in the source
    key: str
    meter: str
    pickup: Fraction  # quarter lengths before the first bar line (0: none)
    tempo: int | None
    notes: int  # notes in the melody written
    rounded: Rounding | None  # None: nothing was quantised (MusicXML, ABC)
    dropped: list[str] = field(default_factory=list)  # what did not make it into the ABC, counted
    estimated: list[str] = field(default_factory=list)  # facts the file lacked and we guessed


@dataclass
class _Note:
    onset: Fraction
    end: Fraction
    pitch: int | None  # MIDI number (top note of a chord); None: rest
    spelling: tuple[str, int, int] | None = None  # (letter, alteration, octave) when the source spells


@dataclass
class _BarSpan:
    start: Fraction
    end: Fraction
    left: str = ""  # "|:" when a repeat starts here
    right: str = "|"  # "|", ":|", "||", "|]"
    ending: str = ""  # "1", "2" when the bar opens a first/second ending


# --------------------------------------------------------------------------- reading sources
def import_melody(source: str | Path, kind: str | None = None, part: int | str | None = None,
                  pickup: Fraction | float | None = None, title: str | None = None) -> ImportReport:
    """Read one melody from a file path (.mid .midi .musicxml .xml .mxl .abc) or ABC text.

    kind: "midi" | "musicxml" | "abc" when the suffix does not say. part: index or name of the
    part to take (default: the highest). pickup: quarter lengths before the first bar line
    (default: from the file, estimated for MIDI). title: T: (default: the file's title or name).
    """
    if isinstance(source, str) and ("\n" in source or "K:" in source) and kind in (None, "abc"):
        return _import_abc_text(source, part, title)
    path = Path(source)
    if kind is None:
        kind = _SUFFIX_KIND.get(path.suffix.lower())
        if kind is None:
            raise MusicImportError(f"cannot tell the format of {path.name!r}: name it .mid, .musicxml, "
                                   f".mxl or .abc, or pass kind= one of {list(KINDS)}")
    if kind not in KINDS:
        raise MusicImportError(f"unknown kind {kind!r}: choose one of {list(KINDS)}")
    data = _read_capped(path)
    if kind == "abc":
        return _import_abc_text(data.decode("utf-8", errors="replace"), part, title or None)
    if kind == "midi":
        _check_midi_notes(data, path.name)
    else:
        data = _musicxml_bytes(data, path)
    score = _parse_with_music21(data, kind, path)
    name = title or _score_title(score) or path.stem
    return _import_score(score, kind, part, pickup, name)


def _read_capped(path: Path) -> bytes:
    if not path.is_file():
        raise MusicImportError(f"no such file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise MusicImportError(f"{path.name} is empty")
    if size > MAX_FILE_BYTES:
        raise MusicImportError(f"{path.name} is {size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit "
                               f"for one melody (importing.MAX_FILE_BYTES): export just the tune")
    return path.read_bytes()


def _check_midi_notes(data: bytes, name: str) -> None:
    """Count note-ons with mido before music21 builds a stream (which is slow for huge files)."""
    import mido

    try:
        midi = mido.MidiFile(file=io.BytesIO(data))
        count = sum(1 for track in midi.tracks for msg in track
                    if msg.type == "note_on" and msg.velocity > 0)
    except Exception as err:  # mido raises EOFError, OSError, ValueError, KeyError on bad bytes
        raise MusicImportError(f"{name} is not a readable MIDI file ({type(err).__name__}: {err})") from None
    if count == 0:
        raise MusicImportError(f"{name} holds no notes")
    if count > MAX_NOTES:
        raise MusicImportError(f"{name} has {count:,} notes, over the {MAX_NOTES:,}-note limit for one "
                               f"melody (importing.MAX_NOTES): export just the tune")


def _musicxml_bytes(data: bytes, path: Path) -> bytes:
    """The score XML: unzipped from .mxl (uncompressed size capped) and its notes counted."""
    if data[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = [i for i in archive.infolist()
                           if not i.filename.startswith("META-INF") and i.filename.endswith((".xml", ".musicxml"))]
                if not members:
                    raise MusicImportError(f"{path.name}: the .mxl archive holds no score XML")
                if members[0].file_size > MAX_FILE_BYTES:
                    raise MusicImportError(f"{path.name} unpacks to {members[0].file_size:,} bytes, over "
                                           f"the {MAX_FILE_BYTES:,}-byte limit (importing.MAX_FILE_BYTES)")
                data = archive.read(members[0])
        except zipfile.BadZipFile as err:
            raise MusicImportError(f"{path.name} is not a readable .mxl archive ({err})") from None
    head = data[:2000].lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"<") or (b"score-partwise" not in data and b"score-timewise" not in data):
        raise MusicImportError(f"{path.name} is not MusicXML (no <score-partwise> or <score-timewise>)")
    count = data.count(b"<note")
    if count > MAX_NOTES:
        raise MusicImportError(f"{path.name} has {count:,} notes, over the {MAX_NOTES:,}-note limit for one "
                               f"melody (importing.MAX_NOTES): export just the tune")
    return data


def _parse_with_music21(data: bytes, kind: str, path: Path) -> Any:
    from music21 import converter

    try:
        if kind == "midi":
            return converter.parse(data, format="midi", quantizePost=False)
        return converter.parse(data.decode("utf-8", errors="replace"), format="musicxml")
    except Exception as err:  # music21 raises many types; the user gets one
        raise MusicImportError(f"music21 could not read {path.name} as {kind} "
                               f"({type(err).__name__}: {str(err)[:200]})") from None


def _score_title(score: Any) -> str | None:
    meta = getattr(score, "metadata", None)
    title = getattr(meta, "title", None) if meta is not None else None
    return str(title).strip() if title else None


def _import_abc_text(text: str, part: int | str | None, title: str | None) -> ImportReport:
    """ABC in: the first tune, normalised; several voices go through music21 like a score."""
    tunes = abc.split_tunes(text)
    if not tunes:
        raise MusicImportError("no ABC tune found (a tune needs a K: line and notes after it)")
    dropped = [f"{len(tunes) - 1} more tune(s) after the first"] if len(tunes) > 1 else []
    tune = abc.parse_tune(tunes[0])
    voices = {ev.voice for ev in abc.events(tune)}
    if len(voices) > 1:
        score = abc.to_music21(tune)
        report = _import_score(score, "abc", part, None, title or tune.title or "Imported")
        report.dropped = dropped + report.dropped
        return report
    if title:
        tune.fields = [(k, v) for k, v in tune.fields if k != "T"]
        tune.fields.insert(0, ("T", title))
    text_out = abc.normalize(tune)
    _require_valid(text_out)
    bars = abc.check_bars(text_out).bars
    pickup = bars[0].duration if bars and bars[0].kind == "pickup" else Fraction(0)
    notes = sum(1 for ev in abc.events(tune) if ev.pitch is not None)
    return ImportReport(abc=text_out, source="abc", part=None, part_name="", part_reason="the only voice",
                        parts=1, key=tune.key, meter=tune.meter, pickup=pickup, tempo=tune.tempo,
                        notes=notes, rounded=None, dropped=dropped)


# --------------------------------------------------------------------------- score -> line
def _import_score(score: Any, kind: str, part: int | str | None, pickup: Fraction | float | None,
                  title: str) -> ImportReport:
    parts = list(getattr(score, "parts", [])) or [score]
    lines = []
    for p in parts:
        notes, graces = _part_notes(p)
        lines.append((p, notes, graces))
    index, reason = _choose_part(lines, part)
    chosen, notes, graces = lines[index]
    dropped = []
    if len(parts) > 1:
        dropped.append(f"{len(parts) - 1} other part(s)")
    if graces:
        dropped.append(f"{graces} grace note(s)")
    rounding = None
    flat = chosen.flatten()
    tempo = _tempo(score)
    if kind == "midi":
        notes, rounding = _quantise(notes, tempo)
    line, below, chord_tops = _top_line(notes)
    if below:
        dropped.append(f"{below} note(s) under a sounding higher note (top line kept)")
    if chord_tops:
        dropped.append(f"the lower notes of {chord_tops} chord(s) (top note kept)")
    estimated: list[str] = []
    meter = _meter(flat, estimated)
    key_text, prefer_flats = _key(flat, chosen, estimated)
    bar = abc.meter_duration(meter)
    start = line[0].onset
    if kind == "midi":
        lead = start % bar
        if start >= bar:
            dropped.append(f"{float(start - lead):g} quarter lengths of silence before the first note")
        shift = start - lead
        line = [_Note(n.onset - shift, n.end - shift, n.pitch, n.spelling) for n in line]
        if pickup is None:
            if lead:
                pickup = bar - lead
                line = [_Note(n.onset - lead, n.end - lead, n.pitch, n.spelling) for n in line]
            else:
                pickup = _estimate_pickup(line, meter)
                if pickup:
                    estimated.append(f"pickup of {pickup} quarter lengths (strong-beat fit; pass pickup=)")
    spans = None if kind == "midi" or pickup is not None else _measure_spans(chosen, bar)
    if spans:
        pickup = spans[0].end - spans[0].start if spans[0].end - spans[0].start < bar else Fraction(0)
    else:
        pickup = Fraction(pickup or 0).limit_denominator(48) % bar
        spans = _grid_spans(line[-1].end, bar, pickup)
    unit = abc.unit_length_of(meter)
    chords = _chord_symbols(flat, line, dropped)
    body = _write_body(line, meter, spans, unit, prefer_flats, key_text, chords)
    header = ["X:1", f"T:{_one_line(title)}", f"M:{meter}", f"L:{unit.numerator}/{unit.denominator}"]
    if tempo:
        header.append(f"Q:1/4={tempo}")
    header.append(f"K:{key_text}")
    text = "\n".join(header) + "\n" + body + "\n"
    _require_valid(text)
    first = abc.check_bars(text).bars[0]
    pickup = first.duration if first.kind == "pickup" else Fraction(0)
    name = str(getattr(chosen, "partName", "") or "")
    return ImportReport(abc=text, source=kind, part=index if len(parts) > 1 else None, part_name=name,
                        part_reason=reason, parts=len(parts), key=key_text, meter=meter, pickup=pickup,
                        tempo=tempo, notes=sum(1 for n in line if n.pitch is not None), rounded=rounding,
                        dropped=dropped, estimated=estimated)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:80] or "Imported"


def _part_notes(part: Any) -> tuple[list[tuple[Fraction, Fraction, list[tuple[int, Any]]]], int]:
    """[(onset, end, [(midi, pitch object), ...])] of one part with ties merged; grace notes counted."""
    from music21 import harmony

    notes, graces = [], 0
    for n in part.stripTies().flatten().notes:
        if isinstance(n, harmony.ChordSymbol):
            continue  # a lead sheet's chord symbol: written as "G", not as notes
        if n.duration.isGrace or n.quarterLength == 0:
            graces += 1
            continue
        onset = Fraction(n.offset).limit_denominator(10_000)
        end = onset + Fraction(n.quarterLength).limit_denominator(10_000)
        pitches = [(int(round(p.ps)), p) for p in n.pitches]
        if pitches:
            notes.append((onset, end, pitches))
    return notes, graces


def _chord_symbols(flat: Any, line: list[_Note], dropped: list[str]) -> dict[Fraction, str]:
    """Chord symbols of the part (a lead sheet's), each moved to the first note at or after it."""
    from music21 import harmony

    onsets = sorted(n.onset for n in line)
    out: dict[Fraction, str] = {}
    lost = 0
    for symbol in flat.getElementsByClass(harmony.ChordSymbol):
        name = re.sub(r"^([A-G])-", r"\1b", str(symbol.figure or ""))
        name = re.sub(r"/([A-G])-", r"/\1b", name)
        at = Fraction(symbol.offset).limit_denominator(10_000)
        target = next((t for t in onsets if t >= at), None)
        if target is None or target in out or not abc.QUOTED_CHORD_RE.fullmatch(f'"{name}"'):
            lost += 1
            continue
        out[target] = name
    if lost:
        dropped.append(f"{lost} chord symbol(s) that ABC cannot place or write")
    return out


def _choose_part(lines: list, part: int | str | None) -> tuple[int, str]:
    with_notes = [i for i, (_, notes, _) in enumerate(lines) if notes]
    if not with_notes:
        raise MusicImportError("the file holds no notes")
    if part is not None:
        if isinstance(part, int):
            if not 0 <= part < len(lines):
                raise MusicImportError(f"part={part} but the file has {len(lines)} part(s) (0..{len(lines) - 1})")
            if not lines[part][1]:
                raise MusicImportError(f"part {part} holds no notes")
            return part, "asked for"
        names = [str(getattr(p, "partName", "") or "") for p, _, _ in lines]
        if part not in names:
            raise MusicImportError(f"no part named {part!r}; the parts are {names}")
        return names.index(part), "asked for"
    if len(lines) == 1:
        return 0, "the only part"

    def mean_pitch(i: int) -> float:
        tops = [max(m for m, _ in ps) for _, _, ps in lines[i][1]]
        return sum(tops) / len(tops)

    best = max(with_notes, key=mean_pitch)
    return best, f"highest mean pitch ({mean_pitch(best):.1f}) of {len(lines)} parts; pass part= to choose"


def _snap(value: Fraction, grid: tuple[int, ...]) -> Fraction:
    """The nearest point of any grid (ties: the first grid, sixteenths)."""
    best = None
    for div in grid:
        point = Fraction(round(value * div), div)
        if best is None or abs(point - value) < abs(best - value):
            best = point
    return best


def _quantise(notes: list, tempo: int | None) -> tuple[list, Rounding]:
    """Round onsets and ends to the coarsest grid within tolerance (see GRIDS)."""
    points = [t for onset, end, _ in notes for t in (onset, end)]
    grid = GRIDS[-1]
    for candidate in GRIDS:
        if all(abs(_snap(t, candidate) - t) <= GRID_TOLERANCE for t in points):
            grid = candidate
            break
    out, moved, biggest = [], 0, Fraction(0)
    step = Fraction(1, max(grid))
    for onset, end, pitches in notes:
        q_on, q_end = _snap(onset, grid), _snap(end, grid)
        if q_end <= q_on:
            q_end = q_on + step  # a note shorter than the grid keeps the smallest length
        for raw, q in ((onset, q_on), (end, q_end)):
            if abs(raw - q) > Fraction(1, 10_000):
                moved += 1
                biggest = max(biggest, abs(raw - q))
        out.append((q_on, q_end, pitches))
    ms = float(biggest) * 60_000 / tempo if tempo else None
    return out, Rounding(grid, moved, 2 * len(notes), float(biggest), ms)


def _top_line(notes: list) -> tuple[list[_Note], int, int]:
    """The highest note at each onset; a note starting under a sounding higher note is dropped,
    a lower-or-equal note ends at the next onset; gaps become rests."""
    by_onset: dict[Fraction, list] = {}
    for onset, end, pitches in notes:
        by_onset.setdefault(onset, []).append((end, pitches))
    kept: list[_Note] = []
    below = chord_tops = 0
    for onset in sorted(by_onset):
        group = by_onset[onset]
        chord_tops += sum(1 for _, ps in group if len(ps) > 1)
        below += len(group) - 1
        end, pitches = max(group, key=lambda g: max(m for m, _ in g[1]))
        midi, pitch = max(pitches, key=lambda mp: mp[0])
        if kept and onset < kept[-1].end:
            if midi < kept[-1].pitch:
                below += 1
                continue
            kept[-1].end = onset
        spelling = (pitch.step, int(pitch.accidental.alter) if pitch.accidental else 0, int(pitch.octave))
        kept.append(_Note(onset, end, midi, spelling))
    line: list[_Note] = []
    for note in kept:
        if line and note.onset > line[-1].end:
            line.append(_Note(line[-1].end, note.onset, None))
        line.append(note)
    return line, below, chord_tops


def _tempo(score: Any) -> int | None:
    from music21 import tempo

    marks = list(score.flatten().getElementsByClass(tempo.MetronomeMark))
    for mark in marks:
        bpm = mark.getQuarterBPM()
        if bpm:
            return int(round(bpm))
    return None


def _meter(flat: Any, estimated: list[str]) -> str:
    from music21 import meter

    sigs = list(flat.getElementsByClass(meter.TimeSignature))
    if sigs:
        text = sigs[0].ratioString
        if abc.meter_duration(text):
            return text
    estimated.append("meter 4/4 (the file names none)")
    return "4/4"


def _key(flat: Any, part: Any, estimated: list[str]) -> tuple[str, bool]:
    """The K: value and whether to spell black keys as flats."""
    from music21 import key

    sigs = list(flat.getElementsByClass(key.KeySignature))
    found = sigs[0] if sigs else None
    if found is None:
        try:
            found = part.analyze("key")
            estimated.append(f"key {found.tonic.name} {found.mode} (analysed; the file names none)")
        except Exception:  # analysis needs pitches; a line of rests has none
            found = key.Key("C")
            estimated.append("key C (the file names none)")
    if not isinstance(found, key.Key):
        found = found.asKey("major")
    tonic = found.tonic.name.replace("-", "b")
    text = tonic + _MODE_SUFFIX.get(found.mode, "")
    try:
        parsed = abc.parse_key(text)
    except abc.ABCError:
        text, parsed = "C", abc.parse_key("C")
    return text, parsed.fifths < 0


def _measure_spans(part: Any, bar: Fraction) -> list[_BarSpan] | None:
    """The source's own bars (short ones included) with repeat signs and first/second endings."""
    from music21 import bar as m21bar, spanner, stream

    measures = list(part.getElementsByClass(stream.Measure))
    if not measures:
        return None
    endings: dict[int, str] = {}
    for bracket in part.spanners.getElementsByClass(spanner.RepeatBracket):
        spanned = bracket.getSpannedElements()
        if spanned:
            endings[id(spanned[0])] = str(bracket.number or "1")
    spans = []
    for m in measures:
        start = Fraction(m.offset).limit_denominator(10_000)
        end = start + Fraction(m.duration.quarterLength).limit_denominator(10_000)
        if end <= start:
            continue
        span = _BarSpan(start, end, ending=endings.get(id(m), ""))
        left, right = m.leftBarline, m.rightBarline
        if isinstance(left, m21bar.Repeat) and left.direction == "start":
            span.left = "|:"
        if isinstance(right, m21bar.Repeat) and right.direction == "end":
            span.right = ":|"
        elif right is not None and right.type in ("final", "light-heavy"):
            span.right = "|]"
        elif right is not None and right.type in ("double", "light-light"):
            span.right = "||"
        spans.append(span)
    return spans or None


def _grid_spans(end: Fraction, bar: Fraction, pickup: Fraction) -> list[_BarSpan]:
    """Bars of the meter from the first bar line (after a pickup) to the end of the line."""
    spans, start = [], Fraction(0)
    edge = pickup if pickup else bar
    while True:
        spans.append(_BarSpan(start, edge))
        if edge >= end:
            break
        start, edge = edge, edge + bar
    spans[-1].end = end  # the last bar may be short (a final bar)
    return spans


def _strong_beats(meter: str) -> list[tuple[Fraction, float]]:
    bar = abc.meter_duration(meter)
    num = int(meter.split("/")[0]) if "/" in meter else 4
    compound = num > 3 and num % 3 == 0
    beat = Fraction(3, 2) if compound and meter.endswith("/8") else bar / num
    return [(i * beat, 2.0 if i == 0 else 1.0) for i in range(int(bar / beat))]


def _estimate_pickup(line: list[_Note], meter: str) -> Fraction:
    """The shift (a pickup's length) that puts the most note time on strong beats, 0 if tied."""
    bar = abc.meter_duration(meter)
    beats = _strong_beats(meter)
    step = Fraction(1, 2)
    best, best_score = Fraction(0), None
    for k in range(int(bar / step)):
        shift = k * step
        pickup = (bar - shift) % bar
        score = 0.0
        for n in line:
            if n.pitch is None:
                continue
            pos = (n.onset + shift) % bar
            score += sum(w for b, w in beats if b == pos) * float(n.end - n.onset)
        if best_score is None or score > best_score + 1e-9:
            best, best_score = pickup, score
    return best


# --------------------------------------------------------------------------- line -> ABC
def _is_triplet(duration: Fraction) -> bool:
    return duration.denominator % 3 == 0


def _write_bar(pieces: list[tuple[_Note, Fraction, bool, Fraction]], unit: Fraction, key: abc.Key,
               prefer_flats: bool, beat: Fraction, start: Fraction, chords: dict[Fraction, str]) -> str:
    """One bar's notes: explicit accidentals where the key or the bar so far says otherwise;
    a space after each beat (`start`: where in the bar the first note falls, for a pickup)."""
    state = dict(key.accidentals)
    out: list[str] = []
    position = start
    i = 0
    while i < len(pieces):
        run = 1
        if pieces[i][3] in chords:
            out.append(f'"{chords[pieces[i][3]]}"')
        if _is_triplet(pieces[i][1]):
            while i + run < len(pieces) and _is_triplet(pieces[i + run][1]):
                run += 1
            out.append("(3" if run == 3 else f"(3:2:{run}")
        for j, (note, dur, tie, onset) in enumerate(pieces[i:i + run]):
            if j and onset in chords:
                out.append(f'"{chords[onset]}"')
            shown = dur * Fraction(3, 2) if run > 1 or _is_triplet(dur) else dur
            length = abc.length_suffix(shown / (4 * unit))
            if note.pitch is None:
                out.append("z" + length)
            else:
                spelled = spell_pitch(note.pitch, key.accidentals, prefer_flats)
                letter, alter, octave = note.spelling or spelled
                if NATURAL_PITCH_CLASS[letter] + alter + 12 * (octave + 1) != note.pitch:  # spelling off: respell
                    letter, alter, octave = spelled
                explicit = state.get(letter, 0) != alter
                if explicit:
                    state[letter] = alter
                out.append(abc.note_text(letter, octave, alter if explicit else None) + length
                           + ("-" if tie else ""))
            position += dur
            if position % beat == 0:
                out.append(" ")
        i += run
    return "".join(out).strip()


def _write_body(line: list[_Note], meter: str, spans: list[_BarSpan], unit: Fraction,
                prefer_flats: bool, key_text: str, chords: dict[Fraction, str] | None = None) -> str:
    """Cut the line at the bar lines (a tie where a note crosses one) and write the bars."""
    key = abc.parse_key(key_text)
    bar = abc.meter_duration(meter)
    beats = _strong_beats(meter)
    beat = beats[1][0] if len(beats) > 1 else bar
    spans[-1].end = max(spans[-1].end, line[-1].end)
    if line[0].onset > spans[0].start:  # the first bar opens with a rest
        line = [_Note(spans[0].start, line[0].onset, None), *line]
    pieces: list[list[tuple[_Note, Fraction, bool, Fraction]]] = [[] for _ in spans]
    index = 0
    for note in line:
        t = note.onset
        while t < note.end:
            while index < len(spans) - 1 and t >= spans[index].end:
                index += 1
            stop = min(note.end, spans[index].end) if index < len(spans) - 1 else note.end
            pieces[index].append((note, stop - t, stop < note.end and note.pitch is not None, t))
            t = stop
    bars = [(span, bar_pieces, i) for i, (span, bar_pieces) in enumerate(zip(spans, pieces)) if bar_pieces]
    texts = []
    for span, bar_pieces, i in bars:
        length = span.end - span.start
        start = bar - length if i == 0 and length < bar else Fraction(0)
        text = _write_bar(bar_pieces, unit, key, prefer_flats, beat, start % beat, chords or {})
        texts.append((f"[{span.ending} " if span.ending else "") + text)
    body = "|: " if bars[0][0].left else ""
    for k, (span, _, _) in enumerate(bars):
        nxt = bars[k + 1][0] if k + 1 < len(bars) else None
        if nxt is None:
            sep = ":|" if span.right == ":|" else "|]"
        elif nxt.left:
            sep = "::" if span.right == ":|" else "|:"
        else:
            sep = span.right
        gap = "" if nxt is None else "\n" if (k + 1) % BARS_PER_LINE == 0 else " "
        body += f"{texts[k]} {sep}{gap}"
    return body


def _require_valid(text: str) -> None:
    report = abc.validate(text)
    if not report.ok:
        raise MusicImportError(f"the imported melody is not valid ABC ({report.error}); "
                               f"please report the file")
