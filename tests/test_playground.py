"""The playground of notebook 05, driven from code: the prompt form (a tiny untrained model), and
your own tune (the shipped IMelodist-tiny, guaranteed-valid): files made by music21 from a corpus
tune uploaded as real bytes, bars regenerated with every other bar byte for byte, continued,
harmonised and described, each result in the history saying what was kept and what is new."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from imelodist_lib import abc, playground
from imelodist_lib.editing import bar_spans, strip_chords

MUSIC21_CORPUS = Path(__import__("music21").__file__).parent / "corpus"
# Halewyn (altdeu10.abc, X:9): 12 bars of 3/4, no pickup, no repeats, so MIDI keeps its bars
HALEWYN_X = "9"


def halewyn() -> str:
    text = (MUSIC21_CORPUS / "essenFolksong" / "altdeu10.abc").read_text(encoding="latin-1")
    [tune] = [t for t in abc.split_tunes(text) if abc.parse_tune(t).field("X") == HALEWYN_X]
    return abc.normalize(tune)


# bar lines at every line end: the continuation grammar counts bars by their bar lines (a line
# end that closes a bar, as Essen tunes write them, is not counted there: asked for 2 new bars,
# Halewyn gets 4; the history says so truthfully)
PASTED = ("X:1\nT:Pasted waltz\nM:3/4\nL:1/8\nK:G\nG2 B2 d2|c2 A2 F2|G2 B2 d2|e4 d2|\n"
          "c2 A2 F2|G2 B2 d2|c2 A2 F2|G6|]\n")


def upload_item(name: str, data: bytes) -> dict:
    """One file as ipywidgets 8's FileUpload holds it after a person picks it."""
    return {"name": name, "type": "", "size": len(data), "content": memoryview(data),
            "last_modified": datetime.now(timezone.utc)}


def contents(text: str) -> list[str]:
    return [text[s.start:s.end] for s in bar_spans(text)]


# ------------------------------------------------------------------------------ the prompt form
@pytest.fixture(scope="module")
def tiny_composer():
    """A real (untrained) IMelodist-tiny-shaped model: under the grammar it still writes valid ABC."""
    from imelodist_lib import models
    from imelodist_lib.inference import Composer
    from imelodist_lib.profiles import get_profile

    texts = [p.read_text(errors="replace") for p in sorted((MUSIC21_CORPUS / "ryansMammoth").glob("*.abc"))[:20]]
    tokenizer = models.train_tokenizer(texts, vocab_size=400)
    model = models.new_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64)
    return Composer(model=model, tokenizer=tokenizer, backend="transformers", profile=get_profile("cpu"))


def test_playground_composes_shows_and_exports(tiny_composer, tmp_path):
    from imelodist_lib.profiles import get_profile

    pg = playground.Playground(tiny_composer, get_profile("cpu"), out_dir=tmp_path)
    f = pg.form
    f.task.value, f.lang.value, f.meter.value, f.key.value = "chords", "en", "3/4", "D"
    f.chords.value = "D | G, A D"
    f.bars.value, f.seed.value, f.n.value = 4, 7, 2
    f.constrained.value, f.max_new_tokens.value = True, 256
    request = pg.request()
    assert request.chords == ["D", "G", "A", "D"] and request.meter == "3/4" and request.emotion == "joyful"
    pg.compose_button.click()
    assert "2 answer(s), 2 valid" in pg.status.value, pg.status.value
    assert [e.settings["seed"] for e in pg.history] == [7, 8]
    assert all(e.ok and e.abc.startswith("X:1") for e in pg.history)
    assert pg.progress.value == 2
    assert [type(v).__name__ for v in pg.shown] == ["Player", "Player"] and all(v.ok for v in pg.shown)
    assert len(pg.results.children) == 2  # each answer's player sits under the form
    pg.shown[0].controls.transpose.value = 3  # a slider inside the playground re-renders
    assert pg.shown[0].transpose == 3 and pg.shown[0].ok
    abc_file, jsonl_file = pg.export_abc(), pg.export_jsonl()
    exported = abc.split_tunes(abc_file.read_text(encoding="utf-8"))
    assert len(exported) == 2 and all(abc.validate(t).ok for t in exported)
    assert re.search(r"^X:2$", abc_file.read_text(encoding="utf-8"), re.M)
    rows = [json.loads(line) for line in jsonl_file.read_text(encoding="utf-8").splitlines()]
    assert [r["request"]["chords"] for r in rows] == [["D", "G", "A", "D"]] * 2


def test_playground_click_reports_bad_form_instead_of_raising(tiny_composer, tmp_path):
    pg = playground.Playground(tiny_composer, out_dir=tmp_path)
    pg.form.task.value = "continue"  # needs a seed tune, none given
    pg.compose_button.click()
    assert "seed_abc" in pg.status.value and not pg.history
    assert not pg.compose_button.disabled


def test_parse_chords_and_bar_list():
    assert playground.parse_chords("G, C | D;G") == ["G", "C", "D", "G"] and playground.parse_chords(" ") is None
    assert playground.bar_list([1, 2, 3, 7, 8, 10]) == "bars 1-3, 7-8, 10"
    assert playground.bar_list([4]) == "bar 4" and playground.bar_list([]) == "no bars"


# ------------------------------------------------------------------------------ your own tune
@pytest.fixture()
def pg(composer, tmp_path):
    from imelodist_lib.profiles import get_profile

    pg = playground.Playground(composer, get_profile("cpu"), out_dir=tmp_path)
    pg.form.seed.value, pg.form.max_new_tokens.value, pg.form.lang.value = 3, 64, "en"
    return pg


def test_uploaded_midi_is_imported_shown_and_regenerated_keeping_every_other_bar(pg, tmp_path):
    mid = tmp_path / "Halewyn.mid"
    abc.to_music21(halewyn()).write("midi", fp=str(mid))
    pg.own.upload.value = (upload_item("Halewyn.mid", mid.read_bytes()),)
    assert pg.tune is not None, pg.own.notes.value
    assert pg.own.notes.value.startswith("midi: ") and "K:" in pg.own.notes.value
    assert pg.tune_player.ok and len(pg.own.score.children) == 1
    n = len(bar_spans(pg.tune))
    assert n == 12 and pg.own.bars.max == 12 and not pg.regenerate_button.disabled
    assert abc.parse_tune(pg.tune).title == "Halewyn"  # MIDI has no title: the file's name
    pg.own.bars.value = (5, 6)
    pg.regenerate_button.click()
    [entry] = pg.history
    assert entry.ok, (pg.edit_status.value, entry.error)
    assert entry.request == {"task": "regenerate", "lang": "en", "bars": [5, 6]}
    assert entry.kept == "bars 1-4, 7-12 byte for byte" and entry.new.startswith("bars 5-6: ")
    old, new = contents(pg.tune), contents(entry.abc)
    assert len(new) == n and all(old[k] == new[k] for k in range(n) if k not in (4, 5))
    old_spans, new_spans = bar_spans(pg.tune), bar_spans(entry.abc)
    assert entry.abc[: new_spans[4].start] == pg.tune[: old_spans[4].start]  # header + bars 1-4
    assert entry.abc[new_spans[5].end:] == pg.tune[old_spans[5].end:]  # bars 7-12, bar lines
    assert [s.duration for s in new_spans] == [s.duration for s in old_spans]
    assert entry.settings["seed"] == 3 and entry.settings["constrained"]
    assert pg.shown[-1].ok and len(pg.results.children) == 1
    assert "kept: bars 1-4, 7-12" in pg.results.children[0].children[0].value
    exported = pg.export_abc().read_text(encoding="utf-8")
    assert "% kept: bars 1-4, 7-12 byte for byte" in exported


def test_uploaded_musicxml_is_harmonised_with_every_note_kept(pg, tmp_path):
    xml = tmp_path / "halewyn.musicxml"
    abc.to_music21(halewyn()).write("musicxml", fp=str(xml), makeNotation=False)
    pg.own.upload.value = (upload_item("halewyn.musicxml", xml.read_bytes()),)
    assert pg.own.notes.value.startswith("musicxml: "), pg.own.notes.value
    pg.harmonise_button.click()
    [entry] = pg.history
    assert entry.ok, pg.edit_status.value
    assert strip_chords(entry.abc) == strip_chords(pg.tune)  # every note and bar line kept
    chords = abc.QUOTED_CHORD_RE.findall(entry.abc)
    assert len(chords) == 12 and entry.new == "chords " + " | ".join(chords)
    assert entry.kept.startswith("every note")


def test_pasted_tune_is_continued_and_described(pg):
    pg.own.paste.value = PASTED
    pg.own.import_button.click()
    assert pg.tune == PASTED and pg.own.notes.value.startswith("abc: "), pg.own.notes.value
    pg.own.more_bars.value = 2
    pg.continue_button.click()
    pg.describe_button.click()
    cont, desc = pg.history
    assert cont.ok, (pg.edit_status.value, cont.error)
    assert cont.request["task"] == "continue" and cont.request["bars"] == 10
    assert cont.kept == "bars 1-8 byte for byte" and cont.new == "bars 9-10"
    assert contents(cont.abc)[:8] == contents(PASTED) and len(contents(cont.abc)) == 10
    assert desc.request["task"] == "describe" and desc.abc is None and desc.text.strip()
    assert [type(v).__name__ for v in pg.shown] == ["Player", "HTML"]
    assert list(pg.table()["task"]) == ["continue", "describe"]


def test_bad_files_and_clicks_show_a_short_message_never_a_traceback(pg):
    pg.regenerate_button.click()  # no tune yet
    assert "no tune yet" in pg.edit_status.value and not pg.history
    for name, data, cause in [("broken.mid", b"MThd\x00\x00\x00\x06 not a MIDI file", "MusicImportError"),
                              ("noise.wav", b"RIFF....WAVE", "upload a .mid"),
                              ("empty.musicxml", b"<?xml version='1.0'?><score-partwise><part", "MusicImportError")]:
        pg.own.upload.value = (upload_item(name, data),)
        message = pg.own.notes.value
        assert cause in message and "Traceback" not in message and len(message) < 600, message
        assert pg.tune is None and pg.regenerate_button.disabled
    for pasted, cause in [("", "nothing to import"), ("just some words", "MusicImportError"),
                          ("X:1\nM:4/4\nL:1/8\nK:C\nCDEF GA[Bc|]\n", "line 5, col 11: chord [ is not closed")]:
        pg.own.paste.value = pasted
        pg.own.import_button.click()
        assert pg.tune is None and cause in pg.own.notes.value, pg.own.notes.value
        assert "Traceback" not in pg.own.notes.value
    pg.own.paste.value = "X:1\nT:two voices\nM:2/4\nL:1/8\nK:C\nV:1\ncdef|g4|]\nV:2\nCDEF|G4|]\n"
    pg.own.import_button.click()  # one melody: the top voice, and the notes say so
    assert abc.events(pg.tune)[0].pitch == 72 and "highest mean pitch" in pg.own.notes.value
    pg.own.part.value = "1"  # the part asked for (0-based, as the notes count them)
    pg.own.import_button.click()
    assert abc.events(pg.tune)[0].pitch == 60 and "part 1: asked for" in pg.own.notes.value, pg.own.notes.value
