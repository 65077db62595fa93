"""Importing users' own music: corpus tunes written by music21 to MusicXML and MIDI read back to
the same notes, performed (jittered) MIDI quantised back, parts and chords reduced to one line,
and hostile files refused with a project error.

What is compared: the (MIDI pitch, duration in quarter lengths) sequence of `abc.events`, with
tied notes merged into one note and neighbouring rests merged (a tie across a bar line is one
note in MIDI, and where the import puts bar lines decides where it writes ties), chords by their
top note, trailing rests dropped. MusicXML is compared with the original tune's events in written
order. MIDI holds a performance: music21 writes repeats played out, so the MIDI import is
compared with music21's `expandRepeats()` of the same tune.
"""
from fractions import Fraction

import pytest

from imelodist_lib import abc
from imelodist_lib.importing import MAX_FILE_BYTES, MusicImportError, import_melody

# (corpus file, X:) with what each one covers
ROUND_TRIP = [
    ("book1.abc", "0001"),  # C| meter, a crotchet pickup, repeats
    ("book1.abc", "0004"),  # 6/8 with a quaver pickup
    ("book1.abc", "0026"),  # 6/8, first and second endings
    ("book2.abc", "0205"),  # 6/8 with ties
    ("book3.abc", "0417"),  # 2/4 with triplets and demisemiquavers
    ("book4.abc", "0613"),  # 2/4 reel with triplets
    ("altdeu10.abc", "6"),  # 3/4 with a pickup
    ("americanfifeopus.abc", "13"),  # 6/8 march, endings
    ("altdeu10.abc", "9"),  # 3/4 without a pickup
    ("book2.abc", "0216"),  # 2/4, L:1/16, ties, a double bar mid-tune
]


def corpus_tune(name: str, x: str) -> str:
    from music21 import corpus

    [path] = [p for p in corpus.getPaths(fileExtensions=("abc",)) if p.name == name]
    for text in abc.split_tunes(path.read_text(encoding="latin-1")):
        if abc.parse_tune(text).field("X") == x:
            return abc.normalize(text)
    raise LookupError(f"{name} has no X:{x}")


def merged(evs) -> list[tuple[int | None, Fraction]]:
    """(pitch, duration) with ties and neighbouring rests merged, trailing rests dropped."""
    out: list[tuple[int | None, Fraction]] = []
    tie = False
    for e in evs:
        if out and ((tie and out[-1][0] == e.pitch) or (e.pitch is None and out[-1][0] is None)):
            out[-1] = (e.pitch, out[-1][1] + e.duration)
        else:
            out.append((e.pitch, e.duration))
        tie = e.tie
    while out and out[-1][0] is None:
        out.pop()
    return out


def music21_merged(score) -> list[tuple[int | None, Fraction]]:
    """The same sequence read from a music21 score (ties stripped by music21)."""
    out: list[tuple[int | None, Fraction]] = []
    for n in score.flatten().stripTies().notesAndRests:
        pitch = None if n.isRest else max(int(round(p.ps)) for p in n.pitches)
        duration = Fraction(n.quarterLength).limit_denominator(100)
        if out and pitch is None and out[-1][0] is None:
            out[-1] = (None, out[-1][1] + duration)
        else:
            out.append((pitch, duration))
    while out and out[-1][0] is None:
        out.pop()
    return out


def assert_clean(report) -> None:
    check = abc.validate(report.abc)
    assert check.ok, check.error
    assert not check.bars.errors, (report.abc, check.bars.errors)


@pytest.mark.parametrize("name,x", ROUND_TRIP)
def test_corpus_tune_round_trips_through_musicxml_and_midi(tmp_path, name, x):
    text = corpus_tune(name, x)
    score = abc.to_music21(text)
    xml, mid = tmp_path / "tune.musicxml", tmp_path / "tune.mid"
    # makeNotation=False: music21 writes the bars as they are (else it pads short bars with rests)
    score.write("musicxml", fp=str(xml), makeNotation=False)
    score.write("midi", fp=str(mid))

    from_xml = import_melody(xml)
    assert from_xml.source == "musicxml" and from_xml.rounded is None
    assert merged(abc.events(from_xml.abc)) == merged(abc.events(text))
    original = abc.parse_tune(text)
    assert from_xml.meter == original.meter.replace("C|", "2/2").replace("C", "4/4")
    first = abc.check_bars(text).bars[0]
    assert from_xml.pickup == (first.duration if first.kind == "pickup" else 0)
    assert_clean(from_xml)

    from_midi = import_melody(mid)
    assert from_midi.source == "midi" and from_midi.rounded.moved == 0
    assert merged(abc.events(from_midi.abc)) == music21_merged(score.expandRepeats())
    assert from_midi.tempo == (original.tempo or 120)  # music21 writes MIDI's default 120 when Q: is absent
    assert_clean(from_midi)


def test_performed_midi_is_quantised_back_and_the_rounding_reported(tmp_path):
    import random

    import pretty_midi

    text = corpus_tune("book1.abc", "0004")  # a 6/8 jig with a pickup, Q:3/8=120 (333 ms a quarter)
    score = abc.to_music21(text)
    score.write("midi", fp=str(tmp_path / "exact.mid"))
    midi = pretty_midi.PrettyMIDI(str(tmp_path / "exact.mid"))
    rng = random.Random(0)
    notes = sorted(midi.instruments[0].notes, key=lambda n: n.start)
    for note in notes:  # a player a few milliseconds early or late
        note.start = max(0.0, note.start + rng.uniform(-0.008, 0.008))
        note.end = note.end + rng.uniform(-0.008, 0.008)
    for note, after in zip(notes, notes[1:]):  # a key is released before it is struck again
        if after.pitch == note.pitch:
            note.end = min(note.end, after.start - 0.001)
    midi.write(str(tmp_path / "played.mid"))

    report = import_melody(tmp_path / "played.mid")
    assert merged(abc.events(report.abc)) == music21_merged(score.expandRepeats())
    assert report.rounded.moved > report.rounded.total // 2
    # what moved was the jitter: 8 ms, 16 ms where a release was pulled before the next strike
    assert 0 < report.rounded.max_ms <= 17
    assert_clean(report)


def test_abc_text_is_normalised_and_the_other_tunes_reported():
    text = corpus_tune("book1.abc", "0004") + "\n" + corpus_tune("book1.abc", "0001")
    report = import_melody(text)
    assert report.source == "abc" and report.part_reason == "the only voice"
    assert report.abc == abc.normalize(corpus_tune("book1.abc", "0004"))
    assert report.dropped == ["1 more tune(s) after the first"]


def _two_part_score():
    from music21 import chord, meter, note, stream

    melody, bass = stream.Part(), stream.Part()
    melody.partName, bass.partName = "Flute", "Bass"
    for p in (melody, bass):
        p.append(meter.TimeSignature("3/4"))
    for name in ("E5", "D5", "C5", "D5", "E5", "E5"):
        melody.append(note.Note(name, quarterLength=1))
    melody.append(chord.Chord(["C5", "E5", "G5"], quarterLength=3))  # a chord: its top note stays
    for name in ("C3", "G2", "C3"):
        bass.append(note.Note(name, quarterLength=3))
    return stream.Score([melody, bass])


def test_several_parts_give_the_top_one_or_the_one_asked_for(tmp_path):
    path = tmp_path / "duet.musicxml"
    _two_part_score().write("musicxml", fp=str(path))
    top = import_melody(path)
    assert top.parts == 2 and top.part == 0 and top.part_name == "Flute"
    assert "highest mean pitch" in top.part_reason
    assert [e.pitch for e in abc.events(top.abc)] == [76, 74, 72, 74, 76, 76, 79]
    assert "1 other part(s)" in top.dropped and any("chord" in d for d in top.dropped)
    bass = import_melody(path, part="Bass")
    assert bass.part == 1 and bass.part_reason == "asked for"
    assert [e.pitch for e in abc.events(bass.abc)] == [48, 43, 48]
    with pytest.raises(MusicImportError, match="no part named"):
        import_melody(path, part="Oboe")


def test_hostile_files_raise_a_project_error(tmp_path):
    import mido

    score = abc.to_music21(corpus_tune("book1.abc", "0004"))
    score.write("midi", fp=str(tmp_path / "good.mid"))
    data = (tmp_path / "good.mid").read_bytes()
    (tmp_path / "truncated.mid").write_bytes(data[: len(data) // 2])
    (tmp_path / "notxml.musicxml").write_text("this is not XML at all")
    (tmp_path / "broken.musicxml").write_text("<?xml version='1.0'?><score-partwise><part id='P1'><measure")
    (tmp_path / "empty.mid").write_bytes(b"")
    (tmp_path / "huge.mid").write_bytes(b"\0" * (MAX_FILE_BYTES + 1))
    (tmp_path / "tune.wav").write_bytes(b"RIFF")
    many = mido.MidiFile()
    track = mido.MidiTrack()
    for i in range(100_000):
        track.append(mido.Message("note_on", note=60 + i % 12, velocity=64, time=0))
        track.append(mido.Message("note_off", note=60 + i % 12, velocity=0, time=1))
    many.tracks.append(track)
    many.save(str(tmp_path / "many.mid"))
    cases = {"truncated.mid": "not a readable MIDI", "notxml.musicxml": "not MusicXML",
             "broken.musicxml": "music21 could not read", "empty.mid": "empty",
             "huge.mid": "over the", "many.mid": "100,000 notes", "tune.wav": "cannot tell the format",
             "missing.mid": "no such file"}
    for name, message in cases.items():
        with pytest.raises(MusicImportError, match=message):
            import_melody(tmp_path / name)
    assert issubclass(MusicImportError, abc.ABCError)


def test_a_lead_sheet_keeps_its_chord_symbols_and_its_bars():
    from music21 import corpus, harmony

    path = corpus.getWork("leadSheet/fosterBrownHair.mxl")
    report = import_melody(path)
    chords = abc.QUOTED_CHORD_RE.findall(report.abc)
    written = [s.figure.replace("-", "b") for s in corpus.parse(path).flatten().getElementsByClass(harmony.ChordSymbol)]
    assert chords == written[: len(chords)] and len(chords) == 40
    assert report.dropped == [] and report.pickup == 0  # the first bar is a half rest and a note
    assert report.abc.splitlines()[5].startswith('z4 d4 |: "F"c6 A2 |')
    assert_clean(report)
