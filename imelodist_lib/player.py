"""See and hear ABC in the notebook, offline: engraved score, audio, downloads.

* `render_svg`, `to_midi`, `to_wav`, `to_musicxml`: one tune -> SVG (verovio), MIDI (verovio:
  repeats and first/second endings expanded, `Q:` honoured), WAV (FluidSynth with the General
  MIDI soundfont pretty_midi ships; a sine-wave fallback when libfluidsynth is missing) and
  MusicXML (music21).
* `Player(abc)` / `show(abc)`: the score as *static HTML* (so it survives in the saved notebook
  and its HTML export) with an `<audio>` element, play/stop, a playback cursor (a small inlined
  script from `static/player.js`), download links (data: URIs), plus tempo/transpose sliders
  (ipywidgets) that re-render and re-synthesise in Python.

Safety: ABC from a model is data, never markup. Everything we embed is escaped; verovio's SVG
is re-written from an allowlist of SVG elements and attributes (`sanitize_svg`) and only the
re-written text is embedded; malformed ABC shows an error panel naming
the line. Verovio runs in a helper process because some inputs crash it (segfault or C++
abort), which would otherwise kill the notebook kernel; implicit start-repeats, the commonest
crash on real folk tunes, are written out before it sees them (`explicit_repeats`).
"""
from __future__ import annotations

import atexit
import base64
import functools
import html
import io
import json
import os
import re
import select
import subprocess
import sys
import threading
import uuid
import warnings
import wave
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from imelodist_lib import abc as abc_lib

STATIC_DIR = Path(__file__).resolve().parent / "static"
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
DEFAULT_QPM = 120  # what verovio and abc2midi assume when a tune has no Q:
RENDER_TIMEOUT_S = 30.0
MUSICXML_TIMEOUT_S = 60.0  # music21 in its helper process (its first request imports music21)
# Output caps: a hostile or mistaken tune must not ask for hours of audio or a huge notebook.
# Past a cap the player renders what fits and says, in the player, what it left out.
MIN_QPM, MAX_QPM = 10, 600  # tempo range played; a Q: outside it is played at the nearest end
MAX_AUDIO_SECONDS = 600  # longest audio synthesised (10 min; ~19 MB of WAV at SAMPLE_RATE)
MAX_REST_BARS = 32  # a longer multi-bar rest (Z99) is played and drawn as this many bars
MAX_EMBED_BYTES = 24_000_000  # score + audio + downloads embedded in one player, raw bytes
MAX_LISTING_CHARS = 20_000  # ABC shown in the error panel
SAMPLE_RATE = 16000  # mono 16-bit: ~1.9 MB a minute (saved notebooks stay small), fine for GM piano

# Verovio layout: a page as wide as a notebook cell (pageWidth * scale% ~ 840 px) and tall
# enough to keep any folk tune on one page; the viewBox lets CSS scale it to the cell.
VEROVIO_OPTIONS = {
    "inputFrom": "abc",
    "svgHtml5": True,  # data-id/data-class instead of id: several scores on one page never clash
    "svgViewBox": True,
    "adjustPageHeight": True,
    "pageHeight": 60000,
    "pageWidth": 2100,
    "scale": 40,
    "breaks": "auto",
    "footer": "none",
    "xmlIdChecksum": True,  # same tune -> same ids -> stable outputs
}


class RenderError(ValueError):
    """The ABC could not be rendered (missing header, renderer crash or timeout)."""


@dataclass(frozen=True)
class Rendering:
    """Everything verovio made from one tune at one tempo and transposition."""

    svg: str  # one <svg> per page, concatenated (folk tunes fit one page)
    pages: int
    midi: bytes
    timemap: tuple[dict, ...]  # verovio's timemap: {"tstamp": ms, "on": [ids], "off": [ids], ...}
    measures: int  # <g class="measure"> elements drawn
    qpm: float  # quarter notes per minute the MIDI was made at
    log: str  # verovio's warnings


# --------------------------------------------------------------------------------------------
# Tempo: verovio reads only "Q:1/4=n" correctly (it takes "Q:3/8=60" as 60 quarters a minute
# and ignores "Q:120"), so we compute quarter notes per minute ourselves and rewrite Q:.
# --------------------------------------------------------------------------------------------
def _header_lines(text: str) -> tuple[list[str], int | None]:
    """Lines of the tune and the index of its first K: line (the header's end), if any."""
    # split at "\n" only, as the abc module does (splitlines() also splits at U+2028, U+0085...)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for i, line in enumerate(lines):
        if line.startswith("K:"):
            return lines, i
    return lines, None


def tempo_qpm(abc: str) -> float | None:
    """Quarter notes per minute written in the tune's header `Q:` field (None when absent or
    unreadable); the Q: value is read by `abc.parse_tempo`, the one tempo parser, with the L:
    written or else the default `abc.unit_length_of` gives for the meter."""
    lines, k = _header_lines(abc)
    header = lines[: k if k is not None else len(lines)]
    unit, meter = None, "none"
    q_value = None
    for line in header:
        if line.startswith("L:"):
            try:
                unit = abc_lib.parse_fraction(line[2:].split("%")[0])
            except abc_lib.ABCError:
                pass
        elif line.startswith("M:"):
            meter = line[2:]
        elif line.startswith("Q:") and q_value is None:
            q_value = line[2:]
    if q_value is None:
        return None
    if unit is None:
        try:
            unit = abc_lib.unit_length_of(meter)
        except abc_lib.ABCError:  # an unreadable M: sets no default: the common L:1/8
            unit = Fraction(1, 8)
    qpm = abc_lib.parse_tempo(q_value, unit)
    return None if qpm is None else float(qpm)


# --------------------------------------------------------------------------------------------
# Repeats: verovio 6.4's ABC reader segfaults on the common folk-tune habit of leaving a
# section's start-repeat implicit ("A|d3 AFD|...:|\n||A|...:|"), and on ":|:", "[|:" and a
# line-initial "||:"; it draws "::" as one bar instead of two. We make every start-repeat
# explicit in the spellings it reads right: "|:" and, for end-and-start, ":| |:".
# A ":|" without "|:" repeats from the last section boundary (double bar, previous repeat end,
# or the start), as abc2midi and abcjs play it.
# --------------------------------------------------------------------------------------------
_FIELD_LINE = re.compile(r"^[A-Za-z+]:")


def _only_space_between(lines: list[str], a: tuple, b: tuple) -> bool:
    """True when nothing but spaces, line breaks and continuations separate tokens a and b."""
    (la, _, ea, _), (lb, sb, _, _) = a, b
    between = lines[la][ea:sb] if la == lb else \
        "".join([lines[la][ea:], *lines[la + 1:lb], lines[lb][:sb]])
    return not between.replace("\\", "").strip()


def explicit_repeats(body: str) -> str:
    """The tune body with every start-repeat written out as "|:" or ":| |:" (see above)."""
    lines = body.split("\n")
    tokens = []  # (line index, start, end, text)
    for li, line in enumerate(lines):
        if _FIELD_LINE.match(line):
            continue
        tokens += [(li, s, e, t) for s, e, t in abc_lib.barline_tokens(line)]
    edits: dict[tuple[int, int, int], str] = {}
    prefix = False
    open_repeat = False
    section_start = None  # None: the start of the body
    previous = None
    for tok in tokens:
        text = tok[3]
        ends, starts = text.startswith(":"), text.endswith(":")
        if ends and not open_repeat:
            if section_start is None:
                prefix = True
            else:
                edits[section_start[:3]] = ":| |:" if section_start[3].startswith(":") else "|:"
        if ends and starts:
            edits[tok[:3]] = ":| |:"
        elif starts and text != "|:":
            edits[tok[:3]] = "|:"
        if ends:
            open_repeat = False
        if starts:
            open_repeat = True
        if not open_repeat and (ends or text.strip(":") in ("||", "|]", "[|", "[|]")):
            section_start = tok
        elif not open_repeat and section_start is not None and text == "|" \
                and previous is section_start and _only_space_between(lines, section_start, tok):
            # ":|\n| A..." : the new section starts at the second bar line. (Only the token
            # right after section_start can have nothing between: checking that one keeps this
            # linear; comparing every later "|" with section_start was quadratic.)
            section_start = tok
        previous = tok
    for (li, s, e), new in sorted(edits.items(), reverse=True):
        lines[li] = lines[li][:s] + new + lines[li][e:]
    if prefix:
        for li, line in enumerate(lines):
            if line.strip() and not _FIELD_LINE.match(line) and not line.lstrip().startswith("%"):
                stripped = line.lstrip()
                lead = line[: len(line) - len(stripped)]
                first = abc_lib.barline_tokens(stripped)[:1]
                if first and first[0][0] == 0 and first[0][2].strip(":") in ("|", "||", "[|"):
                    lines[li] = lead + "|:" + stripped[first[0][1]:]  # "|A|..." -> "|:A|..."
                else:
                    lines[li] = lead + "|:" + stripped
                break
    return "\n".join(lines)


def _renderable(abc: str, qpm: float | None) -> str:
    """The text verovio gets: X: first, a K: line, and the tempo as `Q:1/4=n`.

    Verovio segfaults on text without X: or K:, so both are guaranteed before it sees it.
    """
    if not isinstance(abc, str):
        raise RenderError(f"expected ABC text (str), got {type(abc).__name__}")
    if len(abc) > abc_lib.MAX_TUNE_CHARS:
        raise RenderError(f"tune text is {len(abc):,} characters, over the "
                          f"{abc_lib.MAX_TUNE_CHARS:,} the player reads (abc.MAX_TUNE_CHARS)")
    text = abc.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    lines, k = _header_lines(text)
    if k is None and re.search(r"(^|\s)K:", text):
        # The one-line form "X:1 L:1/8 M:4/4 K:Emin |: E2 EF ...": the abc module unfolds it.
        try:
            text = abc_lib.normalize(text)
        except abc_lib.ABCError as err:
            raise RenderError(f"cannot read this ABC: {err}") from None
        lines, k = _header_lines(text)
    if k is None:
        raise RenderError("no K: (key) line: an ABC tune needs a header ending in a K: field, "
                          "e.g. 'X:1', 'M:4/4', 'L:1/8', 'K:G', then the notes")
    if not lines[0].startswith("X:"):
        lines.insert(0, "X:1")
        k += 1
    qpm = qpm if qpm is not None else tempo_qpm("\n".join(lines))
    qpm = min(max(qpm or DEFAULT_QPM, MIN_QPM), MAX_QPM)
    header = [ln for ln in lines[:k] if not ln.startswith("Q:")]
    header.append(f"Q:1/4={round(qpm)}")
    return "\n".join(header + lines[k:k + 1]) + "\n" + explicit_repeats("\n".join(lines[k + 1:])) + "\n"


# --------------------------------------------------------------------------------------------
# The verovio helper process
# --------------------------------------------------------------------------------------------
def _read_frame(stream) -> Any:
    """One length-prefixed JSON message from a binary stream (None at end of stream)."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    size = int.from_bytes(head, "big")
    body = stream.read(size)
    if len(body) < size:
        return None
    return json.loads(body.decode("utf-8"))


def _write_frame(stream, obj: Any) -> None:
    body = json.dumps(obj).encode("utf-8")
    stream.write(len(body).to_bytes(4, "big") + body)
    stream.flush()


def _verovio_worker() -> None:
    """Helper-process loop (`python -c ...`): render requests from stdin until it closes."""
    import tempfile
    import traceback

    # Messages travel on the original stdout. Verovio prints its warnings to the C stdout and
    # stderr, so both go to a scratch file that is read back as each render's log.
    channel = os.fdopen(os.dup(1), "wb")
    errors = os.fdopen(os.dup(2), "w")
    log = tempfile.TemporaryFile()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        import verovio

        while (message := _read_frame(sys.stdin.buffer)) is not None:
            text, transpose = message
            log.seek(0)
            log.truncate()
            tk = verovio.toolkit()
            tk.setOptions({**VEROVIO_OPTIONS, "transpose": str(transpose) if transpose else ""})
            if not tk.loadData(text):
                _write_frame(channel, {"error": "verovio could not read this ABC"})
                continue
            pages = [tk.renderToSVG(p) for p in range(1, tk.getPageCount() + 1)]
            reply = {"pages": pages, "midi": tk.renderToMIDI(), "timemap": tk.renderToTimemap()}
            sys.stdout.flush()
            log.seek(0)
            reply["log"] = log.read().decode("utf-8", "replace") + tk.getLog()
            _write_frame(channel, reply)
    except Exception:  # say why in the kernel's log; the parent reports the exit code
        traceback.print_exc(file=errors)
        raise


def _musicxml_worker() -> None:
    """Helper-process loop: ABC text in, music21's MusicXML (or why not) out, until stdin closes."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # music21's prints must not corrupt the channel
    from music21 import converter
    from music21.musicxml.m21ToXml import GeneralObjectExporter

    while (message := _read_frame(sys.stdin.buffer)) is not None:
        try:
            score = converter.parse(message[0], format="abc")
            reply = {"xml": GeneralObjectExporter(score).parse().decode("utf-8")}
        except Exception as err:  # music21 raises many types on odd input; one message here
            reply = {"error": f"music21 could not convert this ABC to MusicXML: {err}"}
        _write_frame(channel, reply)


class _HelperProcess:
    """One long-lived helper process running `worker`; restarted after a crash or a timeout.

    A plain subprocess (not multiprocessing) so scripts without an `if __name__ == "__main__"`
    guard work too. Verovio (which can segfault) and music21 (which has no time limit of its
    own) each run in one, so neither can take the notebook kernel down or hang it.
    """

    def __init__(self, worker: str, what: str, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.worker, self.what, self.timeout_s = worker, what, timeout_s

    def _start(self) -> None:
        env = dict(os.environ)
        # the child must import this very package, wherever it was imported from
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"from imelodist_lib.player import {self.worker}; {self.worker}()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            # its own session: Ctrl-C or a kernel interrupt sent to the notebook's process group
            # must not print a KeyboardInterrupt traceback from the helper; it ends when stdin closes
            start_new_session=True)

    def stop(self) -> None:
        """End the helper process (it is restarted on the next render)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=2)

    def ask(self, message: list) -> dict:
        """Send one request, wait for the reply; RenderError on an error reply, crash or timeout."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            proc = self._proc
            timed_out = False
            try:
                _write_frame(proc.stdin, message)
                if os.name == "posix":  # a hung helper must not hang the notebook
                    ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
                    timed_out = not ready
                reply = None if timed_out else _read_frame(proc.stdout)
            except (BrokenPipeError, ConnectionResetError, ValueError):
                reply = None
            if timed_out:  # (raised out here: RenderError is a ValueError, caught just above)
                proc.kill()
                self.stop()
                raise RenderError(f"{self.what} took over {self.timeout_s:g} s on this ABC and "
                                  "was stopped; the text is probably malformed")
            if reply is None:
                code = proc.wait(timeout=5)
                self.stop()
                raise RenderError(f"{self.what} crashed on this ABC (exit code "
                                  f"{code}); the text is probably malformed: check it with "
                                  "imelodist_lib.abc.validate")
        if "error" in reply:
            raise RenderError(reply["error"])
        return reply


_VEROVIO = _HelperProcess("_verovio_worker", "the score renderer (verovio)", RENDER_TIMEOUT_S)
_MUSIC21 = _HelperProcess("_musicxml_worker", "the MusicXML export (music21)", MUSICXML_TIMEOUT_S)
atexit.register(_VEROVIO.stop)
atexit.register(_MUSIC21.stop)

_SVG_NS, _XLINK_NS = "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"
# What verovio 6.4 draws (element -> attributes), and a few plain shapes of the same family.
# Everything else is refused: the browser parses the embedded SVG as HTML, so a blocklist over
# an XML parse (the check this replaces) let a processing instruction smuggle an <img onerror>.
_GEOMETRY = {"transform", "class", "id", "data-id", "data-class", "data-related"}
_PAINT = {"fill", "fill-opacity", "stroke", "stroke-width", "stroke-linecap", "stroke-linejoin",
          "stroke-dasharray", "stroke-opacity", "opacity", "color"}
_FONT = {"font-family", "font-size", "font-style", "font-weight", "font-variant", "text-anchor",
         "letter-spacing"}
SVG_ALLOWED = {
    "svg": _GEOMETRY | _PAINT | _FONT | {"viewBox", "version", "overflow", "width", "height",
                                         "preserveAspectRatio", "x", "y"},
    "g": _GEOMETRY | _PAINT | _FONT,
    "defs": set(), "desc": set(), "title": set(), "style": {"type"},
    "path": _GEOMETRY | _PAINT | {"d"},
    "polygon": _GEOMETRY | _PAINT | {"points"}, "polyline": _GEOMETRY | _PAINT | {"points"},
    "ellipse": _GEOMETRY | _PAINT | {"cx", "cy", "rx", "ry"},
    "circle": _GEOMETRY | _PAINT | {"cx", "cy", "r"},
    "rect": _GEOMETRY | _PAINT | {"x", "y", "width", "height", "rx", "ry"},
    "line": _GEOMETRY | _PAINT | {"x1", "y1", "x2", "y2"},
    "text": _GEOMETRY | _PAINT | _FONT | {"x", "y", "dx", "dy"},
    "tspan": _GEOMETRY | _PAINT | _FONT | {"x", "y", "dx", "dy"},
    "use": _GEOMETRY | _PAINT | {"x", "y", "width", "height", "href"},  # href: "#id" only
}
_STYLE_TEXT = re.compile(r"[A-Za-z0-9#.,:;{}\s_%-]*")  # verovio's CSS: selectors and plain values
# ... and the one @font-face it embeds for its music font (an inline base64 WOFF2, no fetch)
_FONT_FACE = re.compile(r"@font-face \{\s*font-family: '[A-Za-z]+';\s*src: url\(data:application/"
                        r"font-woff2;charset=utf-8;base64,[A-Za-z0-9+/=]+\) format\('woff2'\);\s*"
                        r"font-weight: normal;\s*font-style: normal;\s*\}\s*")
_XML_DECLARATION = re.compile(r'^\s*<\?xml version="1\.[0-9]"(?: encoding="[A-Za-z0-9_-]+")?\s*\?>')


def _attr_name(name: str) -> str:
    """"href" for xlink:href (the only namespaced attribute kept), else the plain name."""
    if name == f"{{{_XLINK_NS}}}href":
        return "href"
    return name if not name.startswith("{") else ""


def sanitize_svg(svg: str) -> str:
    """Verovio's SVG pages re-written from an allowlist; RenderError naming what was refused.

    The text is parsed as XML (no DOCTYPE, entity, comment, CDATA or processing instruction is
    accepted), every element and attribute must be in `SVG_ALLOWED`, links must point inside
    the document ("#id"), <style> may hold only plain CSS (no url(), @import or escapes) or verovio's
own inline @font-face, and
    the result is serialised anew with every text and attribute escaped. The caller embeds
    this output, never the input.
    """
    pages = [_XML_DECLARATION.sub("", page) for page in re.split(r"(?=<svg\b)", svg) if page.strip()]
    text = "".join(pages)
    if "<!" in text or "<?" in text:
        what = "a comment, DOCTYPE or CDATA section" if "<!" in text else "a processing instruction"
        raise RenderError(f"refusing SVG with {what}")
    try:
        root = ET.fromstring(f'<pages xmlns="{_SVG_NS}">{text}</pages>')
    except ET.ParseError as err:
        raise RenderError(f"the renderer produced invalid SVG ({err})") from None
    out: list[str] = []
    for page in root:
        _write_svg_element(page, out, top=True)
    return "\n".join(out)


def _write_svg_element(el: ET.Element, out: list[str], top: bool = False) -> None:
    """Append the allowlisted, escaped serialisation of `el` and its subtree to `out`."""
    ns, _, tag = el.tag.rpartition("}")
    if ns != "{" + _SVG_NS or tag not in SVG_ALLOWED or (top and tag != "svg"):
        raise RenderError(f"refusing SVG with a <{tag}> element")
    attrs = [f'xmlns="{_SVG_NS}" xmlns:xlink="{_XLINK_NS}"'] if top else []
    for name, value in el.attrib.items():
        local = _attr_name(name)
        if local not in SVG_ALLOWED[tag]:
            raise RenderError(f"refusing SVG with attribute {name.rsplit('}', 1)[-1]}="
                              f"{value[:40]!r} on <{tag}>")
        if local == "href" and not re.fullmatch(r"#[A-Za-z0-9_.:-]+", value):
            raise RenderError(f"refusing SVG with a link outside the score: href={value[:40]!r}")
        if re.search(r"(?i)javascript:|url\(|expression\(", value):
            raise RenderError(f"refusing SVG with attribute {local}={value[:40]!r}")
        attrs.append(f'{"xlink:href" if local == "href" else local}="{html.escape(value, quote=True)}"')
    if tag == "style" and not (_STYLE_TEXT.fullmatch(el.text or "")
                               or _FONT_FACE.fullmatch(el.text or "")):
        raise RenderError("refusing SVG with a <style> holding more than plain CSS")
    out.append("<" + " ".join([tag, *attrs]) + ">" + html.escape(el.text or "", quote=False))
    for child in el:
        _write_svg_element(child, out)
        out.append(html.escape(child.tail or "", quote=False))
    out.append(f"</{tag}>")


def _check_svg(svg: str) -> None:
    """RenderError when `svg` holds anything `sanitize_svg` refuses (scripts, handlers, links)."""
    sanitize_svg(svg)


@functools.lru_cache(maxsize=64)
def _render_cached(text: str, transpose: int, qpm: float) -> Rendering:
    reply = _VEROVIO.ask([text, transpose])
    svg = sanitize_svg("".join(reply["pages"]))  # what we embed: the re-written text only
    return Rendering(svg=svg, pages=len(reply["pages"]), midi=base64.b64decode(reply["midi"]),
                     timemap=tuple(reply["timemap"]), measures=count_measures(svg), qpm=qpm,
                     log=_quiet(reply["log"]))


def _quiet(log: str) -> str:
    # We always write Q:1/4=n (which verovio reads right), so its tempo caveat is noise here.
    return "\n".join(ln for ln in log.strip().splitlines() if "Tempo definitions" not in ln)


def count_measures(svg: str) -> int:
    """Number of bars verovio drew (its `<g class="measure">` elements)."""
    return len(re.findall(r'<g\b[^>]*\sclass="measure"', svg))


def render(abc: str, tempo: float | None = None, transpose: int = 0) -> Rendering:
    """Engrave one tune and make its MIDI and timemap (cached); RenderError on unreadable ABC.

    `tempo` overrides the tune's Q: in quarter notes per minute; `transpose` is in semitones
    and moves the key signature too (verovio spells the new key).
    """
    if not isinstance(transpose, int) or not -24 <= transpose <= 24:
        raise ValueError(f"transpose must be a whole number of semitones in -24..24, got {transpose!r}")
    if tempo is not None and not MIN_QPM <= tempo <= MAX_QPM:
        raise ValueError(f"tempo must be {MIN_QPM}..{MAX_QPM} quarter notes per minute, got {tempo!r}")
    text = _renderable(abc, tempo)
    qpm = tempo if tempo is not None else (tempo_qpm(text) or DEFAULT_QPM)
    return _render_cached(text, transpose, float(qpm))


def render_svg(abc: str, transpose: int = 0) -> str:
    """The engraved score as SVG text (one <svg> per page; folk tunes fit one)."""
    return render(abc, transpose=transpose).svg


def to_midi(abc: str, tempo: float | None = None, transpose: int = 0) -> bytes:
    """A Standard MIDI File of the tune: repeats expanded, tempo from Q: or `tempo` (qpm)."""
    return render(abc, tempo=tempo, transpose=transpose).midi


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def audio_backend() -> str:
    """"fluidsynth" when libfluidsynth loads (real instrument sound), else "sine" (fallback)."""
    try:
        import fluidsynth  # noqa: F401  (pyfluidsynth: fails when the C library is missing)

        return "fluidsynth"
    except (ImportError, OSError):
        return "sine"


def soundfont_path() -> Path:
    """The General MIDI soundfont shipped inside pretty_midi (TimGM6mb, ~6 MB)."""
    import pretty_midi

    return Path(pretty_midi.__file__).resolve().parent / "TimGM6mb.sf2"


SINE_NOTE = ("sine-wave fallback: the FluidSynth library is missing, so notes play as plain "
             "tones; install it for instrument sound (Debian/Ubuntu: apt-get install fluidsynth; "
             "conda: conda install -c conda-forge fluidsynth)")


def _read_midi(midi: bytes) -> Any:
    import pretty_midi

    with warnings.catch_warnings():
        # verovio puts the tempo on track 1; pretty_midi warns but reads it correctly
        warnings.filterwarnings("ignore", message="Tempo, Key or Time signature change")
        return pretty_midi.PrettyMIDI(io.BytesIO(midi))


def midi_seconds(midi: bytes) -> float:
    """How long the MIDI plays, in seconds (to its last note or event)."""
    return float(_read_midi(midi).get_end_time())


def midi_to_wav(midi: bytes, sample_rate: int = SAMPLE_RATE,
                max_seconds: float = MAX_AUDIO_SECONDS) -> bytes:
    """Synthesise MIDI bytes to a mono 16-bit WAV (FluidSynth, or sine tones as a fallback).

    At most `max_seconds` are synthesised: later notes are left out, held ones cut there."""
    import numpy as np

    pm = _read_midi(midi)
    for inst in pm.instruments:
        inst.notes = [n for n in inst.notes if n.start < max_seconds]
        for n in inst.notes:
            n.end = min(n.end, max_seconds)
        inst.control_changes = [c for c in inst.control_changes if c.time < max_seconds]
        inst.pitch_bends = [b for b in inst.pitch_bends if b.time < max_seconds]
    if audio_backend() == "fluidsynth":
        audio = pm.fluidsynth(fs=sample_rate, sf2_path=str(soundfont_path()))
    else:
        audio = pm.synthesize(fs=sample_rate)
    audio = np.asarray(audio, dtype=np.float64)[: int(max_seconds * sample_rate)]
    if audio.size == 0:
        audio = np.zeros(sample_rate // 10)
    peak = float(np.max(np.abs(audio))) or 1.0
    pcm = (audio / peak * 0.8 * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def to_wav(abc: str, tempo: float | None = None, transpose: int = 0,
           sample_rate: int = SAMPLE_RATE) -> bytes:
    """The tune as WAV audio (see `audio_backend()` for which synthesiser made it)."""
    return midi_to_wav(to_midi(abc, tempo=tempo, transpose=transpose), sample_rate)


def to_musicxml(abc: str) -> str:
    """The tune as MusicXML text, via music21's ABC reader (for MuseScore, Finale, Sibelius).

    music21 runs in a helper process stopped after MUSICXML_TIMEOUT_S; RenderError says why
    when it fails, crashes or takes too long."""
    return _MUSIC21.ask([_renderable(abc, None)])["xml"]


# --------------------------------------------------------------------------------------------
# The player
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _asset(name: str) -> str:
    return (STATIC_DIR / name).read_text(encoding="utf-8")


def _data_uri(mime: str, data: bytes | str) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _json_for_script(obj: Any) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can end the element or open a tag."""
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def cursor_table(timemap: tuple[dict, ...] | list[dict]) -> list[list]:
    """[[ms, [ids of notes sounding]], ...] from verovio's timemap, for the playback cursor.

    Verovio names the second pass through a repeat "<id>-rend2"; the SVG only has "<id>".
    """
    sounding: dict[str, None] = {}
    table: list[list] = []
    for entry in sorted(timemap, key=lambda e: e.get("tstamp", 0)):
        for nid in entry.get("off", []):
            sounding.pop(re.sub(r"-rend\d+$", "", nid), None)
        for nid in entry.get("on", []):
            sounding[re.sub(r"-rend\d+$", "", nid)] = None
        t = round(float(entry.get("tstamp", 0)), 1)
        if table and table[-1][0] == t:
            table[-1][1] = list(sounding)
        else:
            table.append([t, list(sounding)])
    return table


def _slug(text: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", text or "").strip("_")[:40]
    return slug or "tune"


def _source_listing(text: str, bad_line: int | None) -> str:
    """The ABC as numbered, escaped lines, the offending one highlighted (the first
    MAX_LISTING_CHARS characters; the rest is counted, not shown)."""
    rows = []
    shown, hidden = text[:MAX_LISTING_CHARS], len(text) - MAX_LISTING_CHARS
    lines = shown.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # numbered as abc does
    for n, line in enumerate(lines, start=1):
        row = f"{n:>3}  {html.escape(line)}"
        rows.append(f'<span class="imp-badline">{row}</span>' if n == bad_line else row)
    if hidden > 0:
        rows.append(f"... {hidden:,} more characters not shown (player.MAX_LISTING_CHARS)")
    return '<pre class="imp-source">' + "\n".join(rows) + "</pre>"


def _clock(seconds: float) -> str:
    """"1:05:09" / "10:00" for a duration in seconds."""
    whole = int(seconds)
    h, m, sec = whole // 3600, whole // 60 % 60, whole % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


_MEASURE_REST = re.compile(r"([ZX])([0-9]+)")


def _capped_rests(text: str) -> tuple[str, int]:
    """`text` with every multi-bar rest over MAX_REST_BARS shortened to it, and how many were."""
    try:
        rests = [e for e in abc_lib.events(text) if e.kind == "measure_rest"]
    except abc_lib.ABCError:
        return text, 0
    lines, capped = text.split("\n"), 0
    for ev in reversed(rests):  # right to left: earlier columns stay valid
        line = lines[ev.line - 1]
        m = _MEASURE_REST.match(line, ev.col - 1)
        if m and int(m.group(2)) > MAX_REST_BARS:
            lines[ev.line - 1] = line[:m.start()] + f"{m.group(1)}{MAX_REST_BARS}" + line[m.end():]
            capped += 1
    return "\n".join(lines), capped


class Player:
    """One tune, seen and heard: engraved score, audio, cursor, downloads, tempo/transpose.

    Displaying it shows the player as static HTML (kept in the saved notebook and its HTML
    export) and, below, ipywidgets sliders that re-render it in place. Never raises on bad
    ABC: it shows an error panel naming the line instead.
    """

    def __init__(self, abc: str, title: str | None = None, tempo: float | None = None,
                 transpose: int = 0, sample_rate: int = SAMPLE_RATE, musicxml: bool = True) -> None:
        self.abc = abc if isinstance(abc, str) else repr(abc)
        # lone surrogates (possible in a Python str) cannot be written as UTF-8: shown as "?"
        self.abc = self.abc.encode("utf-8", "replace").decode("utf-8")
        self.title = title
        self.transpose = transpose
        self.sample_rate = sample_rate
        self.musicxml = musicxml
        self.id = "imp-" + uuid.uuid4().hex[:12]
        self.report = None  # abc.ValidationReport
        self.error: str | None = None  # why there is no score (None when it rendered)
        self.error_line: int | None = None
        self.rendering: Rendering | None = None
        self.wav: bytes | None = None
        self._handle = None  # display handle when shown as notebook output
        self._out = None  # ipywidgets.Output when shown as a widget
        self._controls = None
        self._text = self.abc  # what we render: the normalised tune once validated
        self.notes: list[str] = []  # warnings shown above the score
        self._validate()
        written = tempo_qpm(self._text)
        self.tempo = tempo if tempo is not None else min(max(written or DEFAULT_QPM, MIN_QPM), MAX_QPM)
        if tempo is None and written is not None and written != self.tempo:
            self.notes.append(f"the tune's Q: asks for {written:g} quarter notes a minute; played at "
                              f"{self.tempo:g}, the nearest the player allows ({MIN_QPM}..{MAX_QPM})")
        self._html = self._build()

    @property
    def ok(self) -> bool:
        """True when the tune rendered (score and audio are there)."""
        return self.error is None

    def _validate(self) -> None:
        try:
            tunes = abc_lib.split_tunes(self.abc)
        except Exception:  # validate below reports what is wrong with the text
            tunes = []
        text = self.abc
        if len(tunes) > 1:  # one player, one tune: say so rather than run them together
            self.notes.append(f"this text holds {len(tunes)} tunes; showing the first "
                              "(call show() once per tune)")
            text = tunes[0]
        try:
            self.report = abc_lib.validate(text)
        except Exception as err:  # a validator bug must not take the notebook down
            self.error = f"could not check this ABC: {type(err).__name__}: {err}"
            return
        if not self.report.ok:
            err = self.report.error
            self.error = str(err) if err is not None else "not a valid ABC tune"
            self.error_line = getattr(err, "line", None)
            return
        try:
            self._text = abc_lib.normalize(self.report.tune)
        except Exception:  # validated text normalises; if not, render what we were given
            self._text = text
        self._text, capped = _capped_rests(self._text)
        if capped:
            self.notes.append(f"{capped} multi-bar rest(s) longer than {MAX_REST_BARS} bars are "
                              f"played and drawn as {MAX_REST_BARS} bars (player.MAX_REST_BARS)")

    def _fits(self, what: str, size: int) -> bool:
        """Take `size` bytes from this player's embedding budget; False (and a note) if over."""
        if size <= self._budget:
            self._budget -= size
            return True
        self._left_out.append(f"{what} left out ({size / 1e6:.1f} MB; a player embeds at most "
                              f"{MAX_EMBED_BYTES / 1e6:.0f} MB, player.MAX_EMBED_BYTES)")
        return False

    def _build(self) -> str:
        """The whole player as one self-contained HTML string (never raises)."""
        self._budget, self._left_out = MAX_EMBED_BYTES, []
        if self.error is None:
            try:
                self.rendering = render(self._text, tempo=self.tempo, transpose=self.transpose)
                seconds = midi_seconds(self.rendering.midi)
                if seconds > MAX_AUDIO_SECONDS:
                    self._left_out.append(
                        f"audio stops at {_clock(MAX_AUDIO_SECONDS)} of {_clock(seconds)} (a slow "
                        "tempo or long rests; player.MAX_AUDIO_SECONDS); the score shows it all")
                self.wav = midi_to_wav(self.rendering.midi, self.sample_rate)
                if not self._fits("the score", len(self.rendering.svg.encode())):
                    raise RenderError(self._left_out.pop())
                if not self._fits("the audio", len(self.wav)):
                    self.wav = None
            except Exception as err:  # RenderError, or an audio failure: show, don't raise
                self.error = str(err) if isinstance(err, RenderError) else f"{type(err).__name__}: {err}"
        parts = [f'<div class="imelodist-player" id="{self.id}">',
                 f"<style>{_asset('player.css')}</style>"]
        if self.title:
            parts.append(f'<div class="imp-title">{html.escape(self.title)}</div>')
        if self.error is not None:
            where = f" (line {self.error_line})" if self.error_line else ""
            parts.append(f'<div class="imp-error"><b>Cannot show this tune{where}:</b> '
                         f"{html.escape(self.error)}</div>")
            parts.append(_source_listing(self.abc, self.error_line))
            links = self._links(with_media=False)
            parts.extend(f'<div class="imp-warn">{html.escape(note)}</div>' for note in self._left_out)
            parts.append(links)
            parts.append("</div>")
            return "\n".join(parts)
        links = self._links(with_media=True)  # spends the budget; notes what it left out
        parts.extend(f'<div class="imp-warn">{html.escape(note)}</div>'
                     for note in self.notes + self._left_out)
        parts.extend(self._bar_warnings())
        parts.append(f'<div class="imp-score">{self.rendering.svg}</div>')
        audio = (f'<audio controls preload="auto" src="{_data_uri("audio/wav", self.wav)}"></audio>'
                 if self.wav is not None else "")
        parts.append(
            '<div class="imp-transport">'
            '<button type="button" data-act="play">&#9654; Play</button>'
            '<button type="button" data-act="stop">&#9632; Stop</button>'
            f'{audio}'
            f'<span class="imp-note">&#9833; = {round(self.tempo)}'
            f'{f", transposed {self.transpose:+d}" if self.transpose else ""}'
            f" &middot; {self.rendering.measures} bars</span></div>")
        if audio_backend() != "fluidsynth":
            parts.append(f'<div class="imp-note">{html.escape(SINE_NOTE)}</div>')
        parts.append(links)
        parts.append(f'<script type="application/json" class="imp-timemap">'
                     f"{_json_for_script(cursor_table(self.rendering.timemap))}</script>")
        parts.append(f"<script>{_asset('player.js').replace('__IMP_ROOT_ID__', self.id)}</script>")
        parts.append("</div>")
        return "\n".join(parts)

    def _bar_warnings(self) -> list[str]:
        bars = getattr(self.report, "bars", None)
        errors = list(getattr(bars, "errors", []) or [])
        if not errors:
            return []
        shown = "; ".join(f"line {e.line}: {e.message}" for e in errors[:4])
        more = f" and {len(errors) - 4} more" if len(errors) > 4 else ""
        return [f'<div class="imp-warn">{len(errors)} bar(s) have the wrong length: '
                f"{html.escape(shown)}{more}</div>"]

    def _links(self, with_media: bool) -> str:
        stem = html.escape(_slug(self.title or (self.report.tune.title if getattr(self.report, "tune", None)
                                                 else None)), quote=True)
        links = []
        payloads: list[tuple[str, str, Any]] = [(".abc", "text/plain;charset=utf-8", self.abc)]
        if with_media and self.rendering is not None:
            payloads += [(".mid", "audio/midi", self.rendering.midi),
                         (".svg", "image/svg+xml", self.rendering.svg)]
            if self.musicxml:
                try:
                    payloads.append((".musicxml", "application/vnd.recordare.musicxml+xml",
                                     to_musicxml(self._text)))
                except Exception as err:  # MusicXML is a bonus: the player stands without it
                    self._left_out.append(f"no .musicxml download: {err}")
        for label, mime, data in payloads:
            raw = data.encode("utf-8") if isinstance(data, str) else data
            if self._fits(f"the {label} download", len(raw)):
                links.append((f"{stem}{label}", _data_uri(mime, raw), label))
        out = ['<div class="imp-links imp-note">Download:']
        out += [f'<a download="{name}" href="{uri}">{label}</a>' for name, uri, label in links]
        if with_media and self.wav is not None:  # href filled by player.js from the <audio> source
            out.append(f'<a class="imp-wav" download="{stem}.wav" style="display:none">.wav</a>')
        out.append("</div>")
        return " ".join(out)

    # --- display -------------------------------------------------------------------------
    def html(self) -> str:
        """The player as self-contained HTML (score, audio, cursor script, downloads)."""
        return self._html

    def _repr_html_(self) -> str:
        return self._html

    def update(self, tempo: float | None = None, transpose: int | None = None) -> None:
        """Re-render at a new tempo (qpm) and/or transposition; refreshes the displayed player."""
        if tempo is not None:
            self.tempo = tempo
        if transpose is not None:
            self.transpose = transpose
        if self.report is not None and self.report.ok:
            self.error = None
        self.id = "imp-" + uuid.uuid4().hex[:12]  # a fresh root so the new script binds anew
        self._html = self._build()
        from IPython.display import HTML, display

        if self._handle is not None:
            self._handle.update(HTML(self._html))
        if self._out is not None:  # shown as a widget (e.g. inside the playground)
            self._out.clear_output(wait=True)
            with self._out:
                display(HTML(self._html))

    @property
    def controls(self):
        """ipywidgets row: tempo and transpose sliders wired to `update`."""
        if self._controls is None:
            import ipywidgets as widgets

            tempo = widgets.IntSlider(value=round(self.tempo), min=30, max=300, step=5,
                                      description="tempo ♩=", continuous_update=False)
            transpose = widgets.IntSlider(value=self.transpose, min=-12, max=12,
                                          description="transpose", continuous_update=False)
            status = widgets.HTML()

            def changed(_change) -> None:
                self.update(tempo=tempo.value, transpose=transpose.value)
                status.value = (f'<span style="color:#a61e1e">{html.escape(self.error)}</span>'
                                if self.error else "")

            tempo.observe(changed, names="value")
            transpose.observe(changed, names="value")
            self._controls = widgets.HBox([tempo, transpose, status])
            self._controls.tempo, self._controls.transpose = tempo, transpose  # for scripted use
        return self._controls

    def widget(self):
        """The player as one ipywidgets box (score in an Output, then the sliders).

        For placing players inside other widgets: display-handle updates do not reach into an
        Output widget, so here the sliders redraw the Output directly."""
        import ipywidgets as widgets
        from IPython.display import HTML, display

        if self._out is None:
            self._out = widgets.Output()
            with self._out:
                display(HTML(self._html))
        return widgets.VBox([self._out, self.controls] if self.ok else [self._out])

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        self._handle = display(HTML(self._html), display_id=True)
        if self.ok:
            display(self.controls)


def show(abc: str, title: str | None = None, **kwargs) -> Player:
    """Display a player for `abc` in the notebook and return it (never raises on bad ABC)."""
    from IPython.display import display

    player = Player(abc, title=title, **kwargs)
    display(player)
    return player
