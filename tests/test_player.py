"""Player: engraving, MIDI, audio and safety, on real tunes (the playground: test_playground.py)."""
from __future__ import annotations

import io
import re
import warnings
import wave
from pathlib import Path

import pretty_midi
import pytest

from imelodist_lib import abc, player

MUSIC21_CORPUS = Path(__import__("music21").__file__).parent / "corpus"
REEL = (MUSIC21_CORPUS / "ryansMammoth" / "7thRegimentReel.abc").read_text()

# 4 bars of 6/8; the first two repeated -> 6 bars played, 18 quarter notes
JIG = """X:1
T:Little Jig
M:6/8
L:1/8
Q:3/8=60
K:G
|:GAB c2d|e2f g3:|"C"cde "D"d2c|B3 G3|]
"""
HOSTILE = JIG.replace("T:Little Jig", 'T:</script><img src=x onerror="document.title=1"> & <b>bold</b>')


def midi_notes(midi: bytes) -> list[pretty_midi.Note]:
    with warnings.catch_warnings():  # verovio writes the tempo on track 1; pretty_midi reads it fine
        warnings.simplefilter("ignore", RuntimeWarning)
        pm = pretty_midi.PrettyMIDI(io.BytesIO(midi))
    return sorted((n for inst in pm.instruments for n in inst.notes), key=lambda n: (n.start, n.pitch))


def test_tempo_is_read_in_quarter_notes_per_minute():
    assert player.tempo_qpm(JIG) == 90.0  # dotted quarter = 60 -> 90 quarters a minute
    assert player.tempo_qpm('X:1\nQ:"Allegro" 1/4=150\nK:G\nG|') == 150.0
    assert player.tempo_qpm("X:1\nL:1/8\nQ:200\nK:G\nG|") == 100.0  # legacy: unit notes a minute
    assert player.tempo_qpm("X:1\nK:G\nG|") is None


def test_midi_expands_repeats_in_order_and_honours_q():
    notes = midi_notes(player.to_midi(JIG))
    # verovio plays bars 1-2, 1-2 again, then 3-4: compare with the written pitches
    written = [e.pitch for e in abc.events(JIG) if e.pitch is not None]
    first_two_bars = written[:8]  # G A B c d | e f g
    assert [n.pitch for n in notes] == first_two_bars + first_two_bars + written[8:]
    # 18 quarter notes at 90 qpm = 12 s; the last note ends there
    assert notes[-1].end == pytest.approx(12.0, abs=0.01)
    faster = midi_notes(player.to_midi(JIG, tempo=180))
    assert faster[-1].end == pytest.approx(6.0, abs=0.01)


def test_transpose_moves_pitches_and_key_signature():
    up = midi_notes(player.to_midi(JIG, transpose=2))
    base = midi_notes(player.to_midi(JIG))
    assert [n.pitch - 2 for n in up] == [n.pitch for n in base]
    svg_g, svg_a = player.render_svg(JIG), player.render_svg(JIG, transpose=2)
    # G major has one sharp; A major three: count accidental glyphs in the key signature
    assert svg_g.count('data-class="keyAccid"') == 1
    assert svg_a.count('data-class="keyAccid"') == 3


def test_real_reel_renders_all_bars_on_one_page():
    rendering = player.render(REEL)
    report = abc.validate(REEL)
    assert report.ok
    assert rendering.pages == 1
    assert rendering.measures == len(report.bars.bars) == 16
    assert rendering.svg.startswith("<svg")


def test_wav_is_real_audio_of_the_right_length():
    data = player.to_wav(JIG, sample_rate=8000)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        seconds = w.getnframes() / w.getframerate()
        frames = w.readframes(w.getnframes())
    assert 12.0 <= seconds <= 15.0  # 12 s of music plus the synthesiser's release tail
    import numpy as np

    pcm = np.frombuffer(frames, dtype="<i2")
    assert np.abs(pcm).max() > 10000  # loud, not silence
    assert player.audio_backend() in ("fluidsynth", "sine")


def test_musicxml_round_trips_through_music21():
    from music21 import converter, harmony

    score = converter.parseData(player.to_musicxml(JIG), format="musicxml")
    notes = [n for n in score.recurse().notes if not isinstance(n, harmony.ChordSymbol)]
    assert [n.pitch.midi for n in notes] == [e.pitch for e in abc.events(JIG) if e.pitch is not None]
    assert len([n for n in score.recurse().notes if isinstance(n, harmony.ChordSymbol)]) == 2  # "C" "D"


def test_hostile_title_is_text_in_svg_and_html():
    p = player.Player(HOSTILE, title='<script>alert("t")</script>')
    page = p.html()
    assert p.ok
    assert "<img" not in page and 'alert("t")</script>' not in page
    assert "&lt;/script&gt;&lt;img src=x onerror=" in p.rendering.svg  # verovio escaped the T:
    assert "&lt;script&gt;alert(&quot;t&quot;)&lt;/script&gt;" in page  # our caption escaped
    # exactly our two script elements: the cursor table (JSON) and player.js
    assert len(re.findall(r"<script\b", page)) == 2


def test_svg_with_active_content_is_refused():
    with pytest.raises(player.RenderError, match="script"):
        player._check_svg('<svg xmlns="http://www.w3.org/2000/svg"><script>x()</script></svg>')
    with pytest.raises(player.RenderError, match="onload"):
        player._check_svg('<svg xmlns="http://www.w3.org/2000/svg" onload="x()"></svg>')
    with pytest.raises(player.RenderError, match="href"):
        player._check_svg('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
                          '<use xlink:href="http://evil/x.svg#a"/></svg>')
    player._check_svg(player.render_svg(JIG))  # verovio's own output passes


SVG_OPEN = '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'


@pytest.mark.parametrize("payload", [
    # failed before: the XML parse saw one processing instruction, the browser's HTML parser an
    # <img onerror>; the blocklist passed it and the page ran the script
    '<?x ><img src=x onerror=alert(1)>?>',
    "<!-- --><img src=x onerror=alert(1)> -->",
    '<foreignObject><body xmlns="http://www.w3.org/1999/xhtml" onload="alert(1)"/></foreignObject>',
    '<a xlink:href="javascript:alert(1)"><text>x</text></a>',
    '<use href="data:image/svg+xml;base64,PHN2Zz48L3N2Zz4="/>',
    '<use xlink:href="javascript:alert(1)"/>',
    '<animate attributeName="href" to="javascript:alert(1)"/>',
    '<set attributeName="onmouseover" to="alert(1)"/>',
    '<style>@import url(http://evil/x.css);</style>',
    '<style>g { background: url(javascript:alert(1)) }</style>',
    '<g style="background:url(javascript:alert(1))"/>',
    '<path d="M0 0" fill="url(http://evil/#p)"/>',
    '<image href="x" onerror="alert(1)"/>',
    '<script xmlns="http://www.w3.org/1999/xhtml">alert(1)</script>',
    '<![CDATA[<img src=x onerror=alert(1)>]]>',
])
def test_svg_outside_the_allowlist_is_refused(payload):
    with pytest.raises(player.RenderError, match="refusing|invalid"):
        player.sanitize_svg(SVG_OPEN + payload + "</svg>")
    with pytest.raises(player.RenderError):
        player.sanitize_svg('<!DOCTYPE svg [<!ENTITY x "y">]>' + SVG_OPEN + "&x;</svg>")


def test_sanitized_svg_escapes_text_and_keeps_verovio_output_unchanged_in_appearance():
    out = player.sanitize_svg(SVG_OPEN + "<text>&lt;img src=x onerror=alert(1)&gt; &amp;</text></svg>")
    assert "<img" not in out and "&lt;img src=x onerror=alert(1)&gt; &amp;" in out
    import xml.etree.ElementTree as ET

    tunes = abc.split_tunes(REEL) + [JIG, HOSTILE] + abc.split_tunes(
        (MUSIC21_CORPUS / "oneills1850" / "0001-0050.abc").read_text("latin-1"))[:3]
    for text in tunes:
        pages = player._VEROVIO.ask([player._renderable(text, None), 3])["pages"]
        clean = player.sanitize_svg("".join(pages))
        before = [(el.tag, el.attrib, (el.text or "").strip()) for p in pages for el in ET.fromstring(p).iter()]
        after = [(el.tag, el.attrib, (el.text or "").strip())
                 for el in ET.fromstring(f"<r>{clean}</r>").iter()][1:]
        assert len(after) == len(before) > 100 and after == before


def test_malformed_abc_shows_an_error_panel_naming_the_line():
    bad = "X:1\nT:broken\nM:4/4\nL:1/8\nK:G\nGABc dedB|\nGA[Bc d2|]\n"
    p = player.Player(bad)
    assert not p.ok and p.error_line == 7
    page = p.html()
    assert 'class="imp-error"' in page and "(line 7)" in page
    assert '<span class="imp-badline">  7  GA[Bc d2|]</span>' in page
    assert "<audio" not in page
    # free text from a model (no tune at all) is an error panel too, never an exception
    assert not player.Player("I am sorry, I cannot compose </div><script>x</script>").ok


def test_wrong_bar_lengths_are_flagged_above_the_score():
    short_bar = "X:1\nT:t\nM:4/4\nL:1/8\nK:C\nCDEF GABc|CDEF GAB|CDEF GABc|]\n"
    p = player.Player(short_bar)
    assert p.ok and "1 bar(s) have the wrong length: line 6: bar 2 is too short" in p.html()
    assert 'class="imp-warn"' not in player.Player(JIG).html()


def test_renderer_crash_is_contained_and_the_next_tune_still_renders():
    # verovio 6.4 aborts on an unclosed quote; it runs in a helper process, so we get an error
    with pytest.raises(player.RenderError, match="crashed"):
        player.render('X:1\nT:x\nM:4/4\nL:1/8\nK:C\n"""CD|')
    assert player.render(JIG).measures == 4


def test_implicit_start_repeats_are_written_out():
    # a real O'Neill tune whose second section repeats without "|:" (crashed verovio before)
    body = "A|d3 AFD|AFD D2:|\n||A|d3 ceA|AFD D2:|"
    assert player.explicit_repeats(body) == "|:A|d3 AFD|AFD D2:|\n|:A|d3 ceA|AFD D2:|"
    assert player.explicit_repeats("|:ab:|:cd:|") == "|:ab:| |:cd:|"
    assert player.explicit_repeats("|:ab::cd:|") == "|:ab:| |:cd:|"
    # "::" used to be drawn as one bar: both bars must be drawn
    assert player.render("X:1\nM:3/4\nL:1/4\nK:C\n|:CDE::FGA:|\n").measures == 2
    assert player.explicit_repeats('|:a "x|y" b:|') == '|:a "x|y" b:|'  # bars inside quotes ignored
    oneill = (MUSIC21_CORPUS / "oneills1850" / "0701-0720.abc").read_text()
    first = abc.split_tunes(oneill)[0]
    assert player.render(abc.normalize(first)).measures > 30


def test_cursor_table_follows_the_timemap():
    rendering = player.render(JIG)
    table = player.cursor_table(rendering.timemap)
    assert table[0][0] == 0 and len(table[0][1]) == 1
    assert all(not nid.endswith("-rend2") for _, ids in table for nid in ids)
    for _, ids in table:  # every highlighted id is a note drawn in the SVG
        for nid in ids:
            assert f'data-id="{nid}"' in rendering.svg
    assert [t for t, _ in table] == sorted(t for t, _ in table)


def test_update_changes_tempo_and_transposition():
    p = player.Player(JIG)
    first_wav = len(p.wav)
    p.update(tempo=180)
    assert p.ok and len(p.wav) < first_wav * 0.7
    p.update(transpose=-5)
    assert p.transpose == -5 and p.rendering.svg.count('data-class="keyAccid"') == 2  # G -> D major
    assert p.controls.tempo.value == 180 and p.controls.transpose.value == -5  # sliders start at the state


# ------------------------------------------------------------------------------ output caps
def _wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


def test_long_multibar_rest_is_capped_and_said():
    # failed before: Z9999 asked the synthesiser for 20,002 s (5.6 h) of audio, all embedded
    p = player.Player("X:1\nM:4/4\nL:1/8\nK:G\nGABc dedB|Z9999|c8|]\n")
    assert p.ok and _wav_seconds(p.wav) <= (2 + player.MAX_REST_BARS) * 2 + 1
    assert f"played and drawn as {player.MAX_REST_BARS} bars" in p.html()


def test_tiny_tempo_is_played_at_the_slowest_allowed_and_said():
    # failed before: Q:1/4=1 played 16 minutes for 4 bars; Q:1/64=1 was written as Q:1/4=0
    p = player.Player("X:1\nM:4/4\nL:1/8\nQ:1/4=1\nK:G\nGABc dedB|c8|]\n")
    assert p.ok and p.tempo == player.MIN_QPM
    assert "asks for 1 quarter notes a minute; played at 10" in p.html()
    assert _wav_seconds(p.wav) == pytest.approx(8 * 60 / player.MIN_QPM, abs=2)


def test_audio_longer_than_the_cap_stops_there_and_says_so():
    p = player.Player("X:1\nM:4/4\nL:1/8\nQ:1/4=10\nK:G\n" + "c8|" * 27 + "]\n", musicxml=False)
    assert p.ok and _wav_seconds(p.wav) == pytest.approx(player.MAX_AUDIO_SECONDS, abs=0.01)
    assert "audio stops at 10:00 of 10:47" in p.html() and p.rendering.measures == 27


def test_embedding_budget_leaves_out_what_does_not_fit_and_says_so(monkeypatch):
    full = player.Player(JIG, musicxml=False)
    budget = len(full.rendering.svg.encode()) + len(full.wav) + 100
    monkeypatch.setattr(player, "MAX_EMBED_BYTES", budget)
    p = player.Player(JIG, musicxml=False)
    page = p.html()
    assert p.ok and "<audio" in page and 'download="Little_Jig.svg"' not in page
    assert "the .svg download left out" in page and "player.MAX_EMBED_BYTES" in page


def test_musicxml_export_runs_with_a_time_limit_and_its_failure_is_shown(monkeypatch):
    # failed before: music21 ran in the kernel with no time limit; any failure vanished
    monkeypatch.setattr(player._MUSIC21, "timeout_s", 0.01)
    try:
        p = player.Player(JIG)
        assert p.ok and ".musicxml</a>" not in p.html()
        assert "no .musicxml download: the MusicXML export (music21) took over" in p.html()
    finally:
        player._MUSIC21.stop()
    monkeypatch.undo()
    assert ".musicxml</a>" in player.Player(JIG).html()  # a fresh helper process serves again


def test_huge_text_shows_a_short_error_panel():
    text = JIG + "GAB cBA|" * 40_000
    p = player.Player(text)
    assert not p.ok and "MAX_TUNE_CHARS" in p.error
    assert "more characters not shown" in p.html()
    with pytest.raises(player.RenderError, match="MAX_TUNE_CHARS"):
        player.render(text)


@pytest.mark.parametrize("text", [
    "X:1\nM:4/4\nL:1/8\nQ:1/" + "120/" * 40 + "\nK:G\nGABc dedB|c8|]\n",  # failed before: hung
    "X:1\nM:4/4\nL:1/8\nQ:¹²⁰\nK:G\nGABc dedB|c8|]\n",
    "X:1\nT:a\u2028K:C\u2028b\nM:4/4\nL:1/8\nK:G\nGABc dedB|c8|]\n",
    "X:1\nT:\ud800\x00\u202e\nM:4/4\nL:1/8\nK:G\nGABc dedB|c8|]\n",  # failed before: UnicodeEncodeError
    "X:1\nM:4/4\nL:1/8\nK:G\n" + "A>B" * 3000 + "|\n",
])
def test_player_on_hostile_text_answers_with_a_player_or_a_panel(text):
    p = player.Player(text, musicxml=False)
    page = p.html()
    assert page.startswith('<div class="imelodist-player"')
    page.encode("utf-8")  # writable into the notebook
    assert p.ok or "Cannot show this tune" in page


def test_explicit_repeats_is_linear_after_a_section_bar():
    # failed before: every "|" after a "||" was compared with it by slicing all the text
    # between (20,000 bars: 0.6 s, 50,000: 3.1 s, x5 per x2.5; now 0.2 s at 50,000)
    from test_abc_hostile import finishes_within

    body = "||" + "A|" * 150_000 + "B:|"
    with finishes_within(3):
        out = player.explicit_repeats(body)
    assert out.startswith("|:A|A|") and out.endswith("B:|")
    assert player.explicit_repeats("A2 B2:|\n| c2 d2 :|") == "|:A2 B2:|\n|: c2 d2 :|"
