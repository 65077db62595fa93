"""Music theory the workbench needs, written once: pitch classes, pitch spelling, scales and the
mode family. Nothing here knows ABC; `abc` (how ABC writes notes, keys, meters, tempi and bar
lines) builds on it, and every other module asks one of the two.

Decisions:

* Pitch classes count semitones above C (C 0 ... B 11); MIDI 60 is middle C (C4).
* Spelling a pitch outside the key: the natural when there is one, else a sharp in sharp keys
  and a flat in flat keys (`spell_pitch`); in-key pitches take the key's own letter.
* Mode family, the three classes labels and metrics share (`mode_family`): **major** (major,
  ionian, lydian: a major third and a major seventh), **minor** (minor, aeolian: the minor
  key of common practice) and **modal** (dorian, phrygian, mixolydian, locrian). Dorian is
  "modal", not "minor": the corpus labeller's emotion rules name it "rustic" apart from the
  minor keys, and the n-gram baseline conditions on the same three families, so a label and a
  metric never judge one tune's family differently.
"""
from __future__ import annotations

from typing import Mapping

__all__ = ["NATURAL_PITCH_CLASS", "SHARP_NAMES", "FLAT_NAMES", "MODE_STEPS", "MODE_FAMILIES",
           "pitch_class", "pitch_class_name", "spell_pitch", "mode_family"]

# Semitones above C of each natural note letter.
NATURAL_PITCH_CLASS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
# Pitch-class names for sharp keys and for flat keys (index: pitch class).
SHARP_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FLAT_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
# Scale steps (semitones above the tonic) of each mode `abc.parse_key` names.
MODE_STEPS = {
    "major": (0, 2, 4, 5, 7, 9, 11), "ionian": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10), "aeolian": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10), "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "lydian": (0, 2, 4, 6, 7, 9, 11), "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "locrian": (0, 1, 3, 5, 6, 8, 10),
}
MODE_FAMILIES = ("major", "minor", "modal")
_ALTERATION = {"#": 1, "♯": 1, "b": -1, "♭": -1}
# The spelling of each pitch class outside the key: naturals, else sharps / flats.
_SHARP_SPELLING = tuple((name[0], len(name) - 1) for name in SHARP_NAMES)
_FLAT_SPELLING = tuple((name[0], 1 - len(name)) for name in FLAT_NAMES)


def pitch_class(name: str) -> int:
    """'F#' -> 6, 'Bb' -> 10, 'c' -> 0: a note or tonic name (#, b, ♯, ♭) as a pitch class."""
    text = name.strip()
    if not text or text[0].upper() not in NATURAL_PITCH_CLASS:
        raise ValueError(f"not a tonic: {name!r} (expected a letter A-G with optional # or b)")
    pc = NATURAL_PITCH_CLASS[text[0].upper()]
    for ch in text[1:]:
        pc += _ALTERATION.get(ch, 0)
    return pc % 12


def pitch_class_name(pc: int, flats: bool = False) -> str:
    """6 -> 'F#' (or 'Gb' with `flats`): the name a pitch class has in sharp or flat keys."""
    return (FLAT_NAMES if flats else SHARP_NAMES)[pc % 12]


def spell_pitch(pitch: int, signature: Mapping[str, int], prefer_flats: bool) -> tuple[str, int, int]:
    """(letter, alteration, octave) for a MIDI pitch: the key's own letter when the pitch is in
    the key (`signature`: alteration per letter), else the natural, else a sharp (or a flat with
    `prefer_flats`). Octaves are scientific: MIDI 60 is C4."""
    pc = pitch % 12
    for letter, natural in NATURAL_PITCH_CLASS.items():
        alter = signature.get(letter, 0)
        if (natural + alter) % 12 == pc:
            break
    else:
        letter, alter = (_FLAT_SPELLING if prefer_flats else _SHARP_SPELLING)[pc]
    return letter, alter, (pitch - NATURAL_PITCH_CLASS[letter] - alter) // 12 - 1


def mode_family(mode: str) -> str:
    """'major', 'minor' or 'modal' for a mode name as `abc.parse_key` gives it (see above)."""
    if mode in ("major", "ionian", "lydian"):
        return "major"
    return "minor" if mode in ("minor", "aeolian") else "modal"
