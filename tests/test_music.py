"""One home per music fact: each test pins the single implementation (`music`, or `abc` for
how ABC writes it) against what the rest of the workbench reads."""
from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import pytest

from imelodist_lib import abc, corpus, evaluation, grammar, labels, music, player
from imelodist_lib.instructions import ComposeRequest, pitch_name


def test_natural_pitch_classes_are_what_the_abc_reader_hears():
    pitches = [e.pitch for e in abc.events("X:1\nM:none\nL:1/4\nK:C\nC D E F G A B\n")]
    assert [p - 60 for p in pitches] == list(music.NATURAL_PITCH_CLASS.values())


@pytest.mark.parametrize("name, pc", [("C", 0), ("F#", 6), ("Bb", 10), ("c", 0), ("F♯", 6),
                                      ("E♭", 3), ("Cb", 11), ("B#", 0)])
def test_pitch_class_reads_tonic_and_chord_root_spellings(name, pc):
    assert music.pitch_class(name) == pc


def test_pitch_class_refuses_a_name_that_is_no_note():
    with pytest.raises(ValueError, match="not a tonic"):
        music.pitch_class("H")


@pytest.mark.parametrize("key", ["C", "G", "D", "A", "E", "B", "F#", "C#", "F", "Bb", "Eb", "Ab",
                                 "Db", "Gb", "Cb", "Am", "F#m", "Ebm", "Ador", "Bbmix"])
def test_every_key_tonic_has_the_pitch_class_of_its_tonic_note(key):
    parsed = abc.parse_key(key)
    letter = parsed.tonic[0]
    (tonic_note,) = abc.events(f"X:1\nM:none\nL:1/4\nK:{key}\n{letter}\n")
    assert music.pitch_class(parsed.tonic) == tonic_note.pitch % 12
    assert evaluation.key_info(key).tonic_pc == tonic_note.pitch % 12


def test_pitch_class_names_follow_the_key_side():
    assert [music.pitch_class_name(pc) for pc in (1, 3, 6, 8, 10)] == ["C#", "D#", "F#", "G#", "A#"]
    assert [music.pitch_class_name(pc, flats=True) for pc in (1, 3, 6, 8, 10)] == ["Db", "Eb", "Gb", "Ab", "Bb"]
    assert pitch_name(61) == "C#4" and pitch_name(61, flats=True) == "Db4"  # instructions' words
    assert [c.name for c in labels.diatonic_triads("F")][:2] == ["F", "Gm"]  # the labeller's chords


@pytest.mark.parametrize("key", ["C", "G", "F#", "Bb", "Eb", "Am", "Dm", "Ebm"])
def test_a_spelled_pitch_written_as_abc_reads_back_as_the_same_pitch(key):
    parsed = abc.parse_key(key)
    for pitch in range(43, 90):
        letter, alter, octave = music.spell_pitch(pitch, parsed.accidentals, parsed.fifths < 0)
        assert music.NATURAL_PITCH_CLASS[letter] + alter + 12 * (octave + 1) == pitch
        text = abc.note_text(letter, octave, alter)  # accidental written: no key doubt
        (event,) = abc.events(f"X:1\nM:none\nL:1/4\nK:{key}\n{text}\n")
        assert event.pitch == pitch, (pitch, text)


def test_spelling_prefers_the_key_then_naturals_then_the_key_side():
    g_major = abc.parse_key("G").accidentals
    assert music.spell_pitch(66, g_major, False) == ("F", 1, 4)  # in the key
    assert music.spell_pitch(65, g_major, False) == ("F", 0, 4)  # a natural
    assert music.spell_pitch(61, g_major, False) == ("C", 1, 4)  # sharp side
    assert music.spell_pitch(61, abc.parse_key("F").accidentals, True) == ("D", -1, 4)  # flat side


@pytest.mark.parametrize("letter, marks, alter, midi", [("C", "", 0, 60), ("c", "", 0, 72),
                                                        ("c", "'", 0, 84), ("C", ",", 0, 48),
                                                        ("B", ",,", -1, 46), ("f", "", 1, 78)])
def test_note_midi_is_the_number_the_abc_events_carry(letter, marks, alter, midi):
    natural = midi - alter
    written = abc.note_text(letter.upper(), natural // 12 - 1, alter or None)
    (event,) = abc.events(f"X:1\nM:none\nL:1/4\nK:C\n{written}\n")
    assert abc.note_midi(letter, marks, alter) == event.pitch == midi
    assert abc.note_name(letter.upper(), natural // 12 - 1) == f"{letter}{marks}"  # the inverse


def test_meter_parts_is_the_one_meter_reader():
    assert abc.meter_parts("6/8") == (6, 8) and abc.meter_parts("(2+2+3)/8") == (7, 8)
    assert abc.meter_parts("C") == (4, 4) and abc.meter_parts("C|") == (2, 2)
    assert abc.meter_parts("none") is None and abc.meter_parts("") is None
    with pytest.raises(abc.ABCError, match="bad meter"):
        abc.meter_parts("fast")
    # the metrics read meters as the bar checker does ("6 / 8" is 6/8 to both)
    assert evaluation.meter_fraction("6 / 8") == abc.meter_parts("6 / 8") == (6, 8)
    assert abc.meter_duration("6 / 8") == Fraction(3)
    assert evaluation.meter_fraction("fast") is None


def test_the_unit_length_default_rule_is_abcs_everywhere():
    # M:2/4 with no L: means 1/16 notes (ABC 2.1): Q:120 is 120 sixteenths = 30 quarters a minute
    text = "X:1\nM:2/4\nQ:120\nK:C\nCDEF GABc|\n"
    assert abc.parse_tune(text).unit_length == abc.unit_length_of("2/4") == Fraction(1, 16)
    assert abc.parse_tune(text).tempo == 30
    assert player.tempo_qpm(text) == 30.0
    seed = "X:1\nM:2/4\nK:C\nCDEF GABc|\n"
    request = ComposeRequest("continue", "en", seed_abc=seed)
    assert grammar._request_grammar_args(request)["unit_length"] == "1/16"
    # a written L: wins, and without M: the default is 1/8
    assert player.tempo_qpm("X:1\nL:1/4\nQ:120\nK:C\nC|\n") == 120.0
    assert player.tempo_qpm("X:1\nQ:120\nK:C\nC|\n") == 60.0


def test_the_tempo_parser_is_abcs_for_the_player_and_the_labels():
    for q in ("1/4=120", "3/8=80", '"Allegro" 1/2=100', "C=120", "fast"):
        qpm = abc.parse_tempo(q, Fraction(1, 4))
        assert labels.quarter_bpm(q) == (None if qpm is None else round(qpm))
        assert player.tempo_qpm(f"X:1\nL:1/4\nQ:{q}\nK:C\nC|\n") == (None if qpm is None else float(qpm))


def test_header_text_is_the_header_as_written_or_as_abc_defaults_it():
    tune = abc.parse_tune("X:1\nT:Air\nM:3/4\nQ:1/4=90\nK:Ador\nA3|\n")
    assert [abc.header_text(tune, f) for f in "TKMLQ"] == ["Air", "Ador", "3/4", "1/8", "1/4=90"]


@pytest.mark.parametrize("mode, family", [("major", "major"), ("ionian", "major"), ("lydian", "major"),
                                          ("minor", "minor"), ("aeolian", "minor"),
                                          ("dorian", "modal"), ("phrygian", "modal"),
                                          ("mixolydian", "modal"), ("locrian", "modal")])
def test_mode_family(mode, family):
    assert music.mode_family(mode) == family


@pytest.fixture(scope="module")
def every_corpus_tune():
    """Every tune of the music21 ABC corpus, labelled for its mode only (chords, style and theme
    given as placeholders, so the labeller skips the chord fitting: one parse a tune)."""
    placeholders = {"chords": [], "style": {"en": "tune", "zh": "曲子"}, "theme": ""}
    out = []
    for record in corpus.load_music21_corpus():
        labelled = labels.label_record(dataclasses.replace(record, labels=dict(placeholders)))
        out.append((record, labelled.labels))
    return out


def test_labels_and_metrics_agree_on_mode_family_for_every_corpus_tune(every_corpus_tune):
    assert len(every_corpus_tune) > 10_000
    seen = set()
    for record, derived in every_corpus_tune:
        label_family = re.search(r"mode \w+ \((\w+)\)", derived["methods"]["emotion"]).group(1)
        # the metrics read the K: field; where the labeller read the mode from the final note,
        # they are asked about that same mode
        from_k = derived["methods"]["mode"] == "K: field"
        try:
            info = evaluation.key_info(record.key if from_k else f"C {derived['mode']}")
        except abc.ABCError:
            continue  # no metric reads an unreadable K: (the labeller falls back to C major)
        assert info.family == label_family, (record.id, record.key, derived["mode"])
        seen.add(label_family)
    assert seen == set(music.MODE_FAMILIES)
