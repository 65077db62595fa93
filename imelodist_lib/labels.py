"""The corpus labeller: derived labels for each tune, every one naming its method.

`label_tunes` (step 4 of `corpus.assemble_corpus`) fills in what a record lacks:
* chords per bar: the chord symbols written in the tune, else fitted from the melody
  (`fit_chords`: diatonic triads scored per bar) and written into `labels["abc_with_chords"]`;
* style: the R: field, else words in the title, else the source collection;
* mode (the K: mode, or the mode the final note tells), pace (Q:, dance type or note density)
  and an emotion from the rule table `EMOTION_RULES` (mode family x pace x meter family);
* theme: the title, cleaned (`clean_title`).
Labels are heuristics, not annotations: `labels["methods"]` says how each was decided.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from imelodist_lib import abc
from imelodist_lib.music import MODE_STEPS, mode_family, pitch_class, pitch_class_name

if TYPE_CHECKING:  # records are corpus.TuneRecord; corpus calls this module, not the reverse
    from imelodist_lib.corpus import TuneRecord

# Human names of the Essen sub-collections (file stem without digits) -> (style en, region).
_ESSEN_SETS: dict[str, tuple[str, str]] = {
    "han": ("chinese folk song", "China (Han)"), "altdeu": ("german folk song", "Germany"),
    "ballad": ("german folk song", "Germany"), "boehme": ("german folk song", "Germany"),
    "dva": ("german folk song", "Germany"), "erk": ("german folk song", "Germany"),
    "fink": ("german folk song", "Germany"), "kinder": ("german folk song", "Germany"),
    "zuccal": ("german folk song", "Germany"), "variant": ("german folk song", "Germany"),
    "folkHaydn": ("folk song", "Austria/Croatia (Haydn's folk songs)"),
    "irl": ("irish folk tune", "Ireland"), "lot": ("folk song", "Lorraine"),
    "lux": ("folk song", "Luxembourg"), "test": ("folk song", "Essen test set"),
}


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Chord:
    name: str
    pcs: tuple[int, int, int]  # root, third, fifth
    prior: float  # small preference: tonic > dominant > subdominant > others


def _key_facts(key_text: str) -> tuple[int, str, bool]:
    """(tonic pitch class, mode, prefer flats) of a K: value; C major when unreadable."""
    try:
        k = abc.parse_key(key_text or "C")
    except abc.ABCError:
        return 0, "major", False
    return pitch_class(k.tonic or "C"), (k.mode if k.mode in MODE_STEPS else "major"), k.fifths < 0


def diatonic_triads(key_text: str) -> list[_Chord]:
    """The major and minor triads built on the key's scale degrees (diminished ones left out;
    in minor the harmonic-minor dominant V is added)."""
    tonic, mode, flats = _key_facts(key_text)
    steps = MODE_STEPS[mode]
    priors = {0: 0.12, 4: 0.08, 3: 0.06}  # I, V, IV
    chords = []
    for deg in range(7):
        root, third, fifth = ((tonic + steps[(deg + k) % 7]) % 12 for k in (0, 2, 4))
        q3, q5 = (third - root) % 12, (fifth - root) % 12
        if q5 != 7:
            continue  # diminished/augmented: rare as a folk-tune bar chord
        name = pitch_class_name(root, flats) + ("" if q3 == 4 else "m")
        chords.append(_Chord(name, (root, third, fifth), priors.get(deg, 0.0)))
    if mode in ("minor", "aeolian"):
        root = (tonic + 7) % 12
        chords.append(_Chord(pitch_class_name(root, flats), (root, (root + 4) % 12, (root + 7) % 12), 0.07))
    return chords


def _bar_length(meter: str) -> Fraction | None:
    try:
        return abc.meter_duration(meter)
    except Exception:
        return None


def fit_chords(tune_or_text: Any, key: str | None = None) -> list[tuple[int, str]]:
    """One chord per bar, fitted from the melody: [(bar number, chord name), ...].

    Method: each bar's notes are scored against the diatonic triads of the key
    (`diatonic_triads`). A note adds weight = duration x (2 on the downbeat, 1.5 on the
    half-bar, 1 elsewhere) x (1 root, 0.9 third, 0.8 fifth, -0.5 non-chord tone); a small prior
    favours I > V > IV, and the last bar prefers the tonic. A pickup bar gets no downbeat
    weight; bars holding only rests get no chord.
    """
    tune = abc.parse_tune(tune_or_text) if isinstance(tune_or_text, str) else tune_or_text
    key = key if key is not None else abc.header_text(tune, "K")
    chords = diatonic_triads(key)
    # Each chord as a 12-entry weight per pitch class, so a bar scores as one dot product.
    profiles = [[1.0 if pc == ch.pcs[0] else 0.9 if pc == ch.pcs[1] else 0.8 if pc == ch.pcs[2] else -0.5
                 for pc in range(12)] for ch in chords]
    bar_len = _bar_length(abc.header_text(tune, "M"))
    half = float(bar_len) / 2 if bar_len else -1.0
    notes: dict[int, list[tuple[float, float, int]]] = defaultdict(list)  # bar -> (pos, dur, pc)
    length: dict[int, float] = {}
    for e in abc.events(tune):  # floats from here on: Fraction arithmetic was the slow part
        b, d = int(e.bar), float(e.duration)
        pos = length.get(b, 0.0)
        for pitch in (e.pitches or ((e.pitch,) if e.pitch is not None else ())):  # all chord notes
            notes[b].append((pos, d, pitch % 12))
        length[b] = pos + d
    bars = sorted(length)
    hist: dict[int, list[float]] = {}
    for idx, b in enumerate(bars):
        # A short first bar is a pickup: its notes lead into the next bar, no downbeat weight.
        pickup = idx == 0 and bar_len is not None and length[b] < float(bar_len) - 1e-9
        h = hist[b] = [0.0] * 12
        for pos, d, pc in notes[b]:
            h[pc] += d if pickup else d * (2.0 if pos == 0.0 else 1.5 if abs(pos - half) < 1e-9 else 1.0)
    out: list[tuple[int, str]] = []
    for idx, b in enumerate(bars):
        if not notes[b]:
            continue  # a bar of rests gets no chord: chord list and chord symbols stay 1:1
        h, size = hist[b], (length[b] or 1.0)
        best, best_score = chords[0], float("-inf")
        for ch, prof in zip(chords, profiles):
            score = ch.prior * size + sum(x * y for x, y in zip(h, prof))
            if idx == len(bars) - 1 and ch is chords[0]:
                score += 0.5 * size  # tunes end on the tonic
            if score > best_score + 1e-9:
                best, best_score = ch, score
        out.append((b, best.name))
    return out


_CHORD_IN_TEXT = abc.QUOTED_CHORD_RE


def _given_chords(text: str) -> list[str]:
    """Chord symbols already written in a tune (e.g. the Nottingham tunes), in order."""
    body = "\n".join(l for l in text.splitlines() if not re.match(r"^[A-Za-z]:", l))
    return _CHORD_IN_TEXT.findall(body)


def _note_start(line: str, col: int) -> int:
    """Column where the note at `col` really starts: before its accidentals, decorations,
    grace notes, an opening chord bracket `[`, slur `(` or tuplet `(3` — a chord symbol goes
    in front of all of them (ABC 2.1 order)."""
    i = col
    while i > 0:
        ch = line[i - 1]
        if ch in "^_=~.":
            i -= 1
        elif ch == "}":  # grace notes {..}
            j = line.rfind("{", 0, i)
            i = j if j >= 0 else i - 1
        elif ch == "!" or ch == "+":  # !trill! / +trill+ decorations
            j = line.rfind(ch, 0, i - 1)
            i = j if j >= 0 else i - 1
        elif ch == "[":  # chord bracket [CEG] (an ending "[1" would have stopped us at its digit)
            i -= 1
        elif ch == "(" or (ch.isdigit() and i >= 2 and line[i - 2] == "("):
            i -= 1 if ch == "(" else 2  # slur "(" or tuplet "(3"
        elif ch == '"':  # an existing annotation: place the chord before it
            j = line.rfind('"', 0, i - 1)
            i = j if j >= 0 else i - 1
        elif ch in "HIJKLMNOPQRSTUVWhijklmnopqrstuvw" and i - 1 > 0 and line[i - 2] in " |:[(.~":
            i -= 1  # single-letter decoration such as "T" (trill) or "u"/"v" (bowing)
        else:
            break
    return i


def add_chord_symbols(abc_text: str, chords: Sequence[tuple[int, str]] | None = None,
                      tune: Any = None) -> str:
    """The tune with a chord symbol `"G"` inserted before the first note of each bar.

    `chords` defaults to `fit_chords(abc_text)`. Tunes that already carry chord symbols are
    returned unchanged. The result re-parses (checked in the tests). `tune` may pass the
    already parsed `abc_text` to save a parse."""
    if _given_chords(abc_text):
        return abc_text
    tune = tune if tune is not None else abc.parse_tune(abc_text)
    chords = list(chords) if chords is not None else fit_chords(tune)
    chord_of = dict(chords)
    first: dict[int, tuple[int, int]] = {}
    for e in abc.events(tune):
        if e.pitch is not None and int(e.bar) not in first:
            first[int(e.bar)] = (int(e.line), int(e.col))
    lines = abc_text.split("\n")
    inserts: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for bar, (ln, col) in first.items():
        # Event line/col are 1-based (abc's convention); col points at the accidental/letter.
        if bar in chord_of and 1 <= ln <= len(lines):
            inserts[ln - 1].append((_note_start(lines[ln - 1], col - 1), chord_of[bar]))
    for ln, items in inserts.items():
        line = lines[ln]
        for col, name in sorted(items, reverse=True):  # right to left keeps columns valid
            line = line[:col] + f'"{name}"' + line[col:]
        lines[ln] = line
    return "\n".join(lines)


# Emotion from mode and pace: the rule table (first matching row wins). zh names follow
# IMelodist's prompts. Documented in notebook 01.
EMOTION_RULES: list[tuple[str, str, str, str, str]] = [
    # (mode family, pace, meter family, zh, en) ; "*" matches anything
    ("major", "fast", "compound", "活泼", "lively"),
    ("major", "fast", "*", "欢快", "joyful"),
    ("major", "moderate", "*", "明朗", "bright"),
    ("major", "slow", "*", "抒情", "tender"),
    ("minor", "fast", "*", "激昂", "passionate"),
    ("minor", "moderate", "*", "忧郁", "melancholic"),
    ("minor", "slow", "*", "忧伤", "sad"),
    ("modal", "fast", "*", "热烈", "spirited"),
    ("modal", "*", "*", "古朴", "rustic"),
]
_FAST_STYLES = {"reel", "jig", "slip jig", "hornpipe", "polka", "slide", "march", "strathspey"}
_SLOW_STYLES = {"air", "slow air", "song"}
_RHYTHM_WORDS = [  # (word in R: or title, style en); longest first
    ("slip jig", "slip jig"), ("slow air", "slow air"), ("set dance", "set dance"),
    ("country dance", "country dance"), ("hornpipe", "hornpipe"), ("strathspey", "strathspey"),
    ("schottische", "schottische"), ("barndance", "barndance"), ("mazurka", "mazurka"),
    ("quickstep", "march"), ("quick step", "march"), ("march", "march"), ("reel", "reel"),
    ("jig", "jig"), ("polka", "polka"), ("waltz", "waltz"), ("slide", "slide"),
    ("minuet", "dance"), ("air", "air"), ("song", "song"),
]
STYLE_ZH = {"jig": "吉格舞曲", "reel": "里尔舞曲", "hornpipe": "角笛舞曲", "polka": "波尔卡",
             "waltz": "圆舞曲", "march": "进行曲", "strathspey": "斯特拉斯佩舞曲",
             "slip jig": "滑步吉格", "slide": "滑步舞曲", "air": "抒情曲", "slow air": "慢板抒情曲",
             "song": "歌曲", "country dance": "乡村舞曲", "mazurka": "玛祖卡",
             "schottische": "苏格兰慢步舞曲", "barndance": "谷仓舞曲", "set dance": "定式舞曲",
             "chinese folk song": "中国民歌", "german folk song": "德国民歌", "folk song": "民歌",
             "irish folk tune": "爱尔兰民间曲调", "scottish folk tune": "苏格兰民间曲调",
             "english folk tune": "英格兰民间曲调", "renaissance": "文艺复兴风格", "dance": "舞曲",
             "tune": "曲子"}
_SOURCE_STYLE = {"oneills1850": "irish folk tune", "ryansMammoth": "tune", "airdsAirs": "scottish folk tune",
                 "miscFolk": "folk song", "nottingham-dataset": "english folk tune"}


def quarter_bpm(tempo: str) -> int | None:
    """Quarter notes per minute from a Q: value ("1/4=120", "3/8=80", "120"); None if unknown
    or outside 10..400 (`abc.parse_tempo` reads it; a bare number counts quarters here)."""
    qpm = abc.parse_tempo(str(tempo or ""), Fraction(1, 4))
    bpm = None if qpm is None else round(qpm)
    return bpm if bpm is not None and 10 <= bpm <= 400 else None


# Many transcriptions (all of Essen) write K: as a key *signature* only; the final note then
# tells the mode: a K:G tune that ends on E is in E minor. Keys: semitones above the K: tonic.
_FINAL_DEGREE_MODE = {9: "minor", 2: "dorian", 4: "phrygian"}
# Chinese pentatonic modes by the final's degree above gong (the signature's major tonic).
CHINESE_MODES = {0: ("宫调式", "gong"), 2: ("商调式", "shang"), 4: ("角调式", "jue"),
                 7: ("徵调式", "zhi"), 9: ("羽调式", "yu")}


def effective_mode(key: str, final_pitch: int | None) -> tuple[str, str]:
    """(mode, how decided): the K: mode, except that a major K: whose tune ends on its 6th, 2nd
    or 3rd degree is read as minor, Dorian or Phrygian (the signature was written, not the mode)."""
    tonic, mode, _ = _key_facts(key)
    if final_pitch is None or mode not in ("major", "ionian"):
        return mode, "K: field"
    degree = (final_pitch - tonic) % 12
    if degree in _FINAL_DEGREE_MODE:
        return _FINAL_DEGREE_MODE[degree], f"final note (degree {degree} above K:{key.strip()})"
    return mode, "K: field"


def _final_pitch(tune: abc.Tune | None) -> int | None:
    if tune is None:
        return None
    pitched = [e for e in abc.events(tune) if e.pitch is not None]
    return min(pitched[-1].pitches or (pitched[-1].pitch,)) if pitched else None


def _meter_family(meter: str) -> str:
    """compound (6/8, 9/8, 12/8: the emotion rules' lilt) or simple (everything else)."""
    try:
        parts = abc.meter_parts(meter or "")
    except abc.ABCError:
        parts = None
    return "compound" if parts is not None and parts[1] == 8 and parts[0] in (6, 9, 12) else "simple"


def _pace(record: TuneRecord, style_en: str, bpm: int | None = None) -> tuple[str, str]:
    """(fast|moderate|slow, how it was decided): Q: tempo, else the dance type, else note density."""
    bpm = bpm if bpm is not None else quarter_bpm(record.tempo)
    if bpm is not None:
        return ("fast" if bpm >= 110 else "slow" if bpm < 76 else "moderate"), f"Q: {bpm} quarter/min"
    if style_en in _FAST_STYLES:
        return "fast", f"dance type {style_en}"
    if style_en in _SLOW_STYLES:
        return "slow", f"type {style_en}"
    # Note density: notes per bar relative to beats per bar. Many short notes -> busy, lively.
    bar_len = _bar_length(record.meter) or Fraction(4)
    per_quarter = record.n_notes / max(1.0, record.n_bars * float(bar_len))
    pace = "fast" if per_quarter >= 2.0 else "slow" if per_quarter < 1.0 else "moderate"
    return pace, f"density {per_quarter:.2f} notes/quarter"


def _style(record: TuneRecord) -> tuple[str, str]:
    """(style en, method): R: field, else words in the title, else the source collection."""
    rhythm = ""
    m = re.search(r"^R:\s*(.*)$", record.abc, re.M)
    if m:
        rhythm = m.group(1).lower()
    for where, text in (("R: field", rhythm), ("title", record.title.lower())):
        for word, style in _RHYTHM_WORDS:
            if re.search(rf"\b{word}s?\b", text):
                return style, where
    if record.source == "essenFolksong":
        stem = re.sub(r"\d+$", "", Path(record.file).stem)
        return _ESSEN_SETS.get(stem, ("folk song", ""))[0], "source (Essen set)"
    if record.source in _SOURCE_STYLE:
        return _SOURCE_STYLE[record.source], "source"
    if "6/8" in record.meter:
        return "jig", "meter"
    return "tune", "default"


def clean_title(title: str) -> str:
    """A theme text from a T: field: trailing dance type, numbering and punctuation removed."""
    t = re.sub(r"\s+--\s+.*$", "", title or "")  # Ryan's "Acacia -- Reel"
    t = re.sub(r"^\s*(No\.?\s*)?\d+[.)]?\s+", "", t)
    t = re.sub(r"[\s.,;:]+$", "", t)
    t = re.sub(r"\s*[\[(][^\])]*[\])]\s*$", "", t)
    for word, style in _RHYTHM_WORDS:
        if style not in ("song", "air", "slow air", "dance"):  # "Cradle Song" keeps its noun
            t = re.sub(rf"\s+{word}s?$", "", t, flags=re.I)
    t = re.sub(r"^(The|A|An)\s+(.*)$", r"\2", t.strip()) if len(t.split()) > 2 else t.strip()
    return t.strip(" .,'\"")


def label_record(record: TuneRecord) -> TuneRecord:
    """One record with derived labels filled in where missing (methods recorded in labels)."""
    labels = dict(record.labels)
    methods = dict(labels.get("methods", {}))
    given = _given_chords(record.abc)
    try:
        tune = abc.parse_tune(record.abc)
    except abc.ABCError:
        tune = None
    if "chords" not in labels:
        if given:
            labels["chords"], methods["chords"] = given, "given (chord symbols in the ABC)"
        else:
            try:
                if tune is None:
                    raise abc.ABCError("tune did not parse")
                fitted = fit_chords(tune, key=record.key)
                labels["chords"] = [c for _, c in fitted]
                labels["abc_with_chords"] = add_chord_symbols(record.abc, fitted, tune=tune)
                methods["chords"] = "fitted: diatonic triads scored per bar (fit_chords)"
            except abc.ABCError:
                labels["chords"], methods["chords"] = [], "none (tune did not parse)"
    style_en, how = _style(record)
    if "style" not in labels:
        labels["style"] = {"en": style_en, "zh": STYLE_ZH.get(style_en, style_en)}
        methods["style"] = how
    if "emotion" not in labels:
        final = _final_pitch(tune)
        mode, mode_how = effective_mode(record.key, final)
        pace, pace_how = _pace(record, style_en, tune.tempo if tune is not None else None)
        family, meter = mode_family(mode), _meter_family(record.meter)
        for rm, rp, rmt, zh, en in EMOTION_RULES:
            if rm in ("*", family) and rp in ("*", pace) and rmt in ("*", meter):
                labels["emotion"] = {"en": en, "zh": zh}
                break
        labels["pace"], labels["mode"] = pace, mode
        methods["mode"] = mode_how
        methods["emotion"] = (f"rule table: mode {mode} ({family}), pace {pace} ({pace_how}), "
                              f"meter {meter}")
        if style_en == "chinese folk song" and final is not None:
            degree = (final - _key_facts(record.key)[0]) % 12
            if degree in CHINESE_MODES:
                zh, en = CHINESE_MODES[degree]
                labels["chinese_mode"] = {"zh": zh, "en": en}
                methods["chinese_mode"] = f"final note on degree {degree} above gong (K: tonic)"
    if "theme" not in labels:
        theme = clean_title(record.title)
        labels["theme"] = theme
        methods["theme"] = "title (pinyin for Chinese songs)" if style_en == "chinese folk song" else "title"
    labels["methods"] = methods
    return dataclasses.replace(record, labels=labels)


def label_tunes(records: Sequence[TuneRecord], progress: bool = False,
                workers: int | None = None) -> list[TuneRecord]:
    """Derived labels (chords, style, emotion, theme) for every record that lacks them, in
    `workers` processes (`parallel.map_chunks`; None: one per core), each record on its own."""
    from imelodist_lib.parallel import map_chunks

    return map_chunks(_label_chunk, records, workers=workers, desc="label" if progress else None)


def _label_chunk(records: Sequence[TuneRecord], first: int) -> list[TuneRecord]:
    return [label_record(r) for r in records]


