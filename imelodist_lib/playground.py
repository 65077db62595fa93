"""Notebook 05's playground: ask the composer from a form, or bring your own tune and edit it.

* `Playground(composer, profile)`: the prompt form (request fields, sampling knobs, a Compose
  button, results in players, a history exported as ABC and JSONL) and, below it, *your own
  tune*: upload a file (.mid .midi .musicxml .mxl .abc) or paste ABC; the import
  (`importing.import_melody`) shows in a player with what it decided; choose bars by number and
  press **Regenerate** (those bars written anew, every other byte kept), **Continue** (new bars
  after the tune), **Harmonise** (a chord per bar, every note kept) or **Describe**. Each result
  goes into the history saying what was kept and what is new.

Everything a person can click is reachable from code (`form`, `own`, `*_button.click()`, setting
`own.upload.value`), which is how CI drives it. A click never raises: the cause is shown by the
buttons in one short line.
"""
from __future__ import annotations

import dataclasses
import html
import json
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from imelodist_lib.player import Player

UPLOAD_SUFFIXES = (".mid", ".midi", ".musicxml", ".mxl", ".abc")


@dataclass
class HistoryEntry:
    """One answer the playground got: what was asked, how it was sampled, what came back."""

    request: dict  # ComposeRequest.to_dict(), or {"task": "regenerate", "bars": [first, last], ...}
    settings: dict  # temperature, top_p, top_k, max_new_tokens, seed, constrained
    text: str  # the model's whole answer
    abc: str | None  # the tune extracted from it (normalised), None for prose / no tune
    ok: bool  # tune parses with every bar the right length
    error: str | None  # why not, when not ok
    seconds: float
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    kept: str | None = None  # what of your tune the answer keeps ("bars 1-4, 7-8 byte for byte")
    new: str | None = None  # what the model wrote ("bars 5-6", "chords G | D | ...")

    @classmethod
    def from_composition(cls, comp: Any, request: dict, settings: dict, kept: str | None = None,
                         new: str | None = None) -> "HistoryEntry":
        """Record an `inference.Composition` (duck-typed: abc, text, report, seconds)."""
        report = getattr(comp, "report", None)
        error = None
        if report is not None and report.error is not None:
            error = str(report.error)
        elif report is not None and report.bars is not None and report.bars.errors:
            error = f"{len(report.bars.errors)} bar(s) with the wrong length"
        elif comp.abc is None and request.get("task") != "describe":
            error = "no ABC tune found in the answer"
        ok = comp.abc is not None and error is None
        return cls(request=request, settings={**settings, "seed": getattr(comp, "seed", settings.get("seed"))},
                   text=comp.text, abc=comp.abc, ok=ok, error=error, seconds=float(comp.seconds),
                   kept=kept, new=new)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (one JSONL line of the exported history)."""
        return dataclasses.asdict(self)


def _none_if_blank(value: str) -> str | None:
    value = (value or "").strip()
    return value or None


def parse_chords(text: str) -> list[str] | None:
    """'G C D G' / 'G, C | D G' -> ['G', 'C', 'D', 'G'] (None when blank)."""
    chords = [c for c in re.split(r"[\s,|;]+", text or "") if c]
    return chords or None


def bar_list(numbers: list[int]) -> str:
    """[1, 2, 3, 7, 8] -> 'bars 1-3, 7-8' (1-based bar numbers, as the playground shows them)."""
    if not numbers:
        return "no bars"
    runs, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ("bar " if len(numbers) == 1 else "bars ") + ", ".join(runs)


def import_upload(name: str, content: bytes, part: int | str | None = None) -> Any:
    """An uploaded file as an `importing.ImportReport`: its name says the format (and, for MIDI
    and MusicXML without a title, the title); the bytes go through `import_melody`."""
    from imelodist_lib.importing import MusicImportError, import_melody

    suffix = Path(name).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise MusicImportError(f"cannot read {Path(name).name!r}: upload a {', '.join(UPLOAD_SUFFIXES)} file")
    stem = re.sub(r"[^\w .-]+", "_", Path(name).stem).strip(" .")[:60] or "upload"
    with tempfile.TemporaryDirectory(prefix="imelodist-upload-") as folder:
        path = Path(folder) / f"{stem}{suffix}"
        path.write_bytes(content)
        return import_melody(path, part=part)


def import_notes(report: Any) -> list[str]:
    """What an import decided, one short line each (shown under the imported tune)."""
    notes = [f"{report.source}: {report.notes} notes, K:{report.key} M:{report.meter}"
             + (f" Q:1/4={report.tempo}" if report.tempo else "")
             + (f", a pickup of {report.pickup} quarter(s)" if report.pickup else "")]
    if report.parts > 1 or report.part is not None:
        notes.append(f"part {report.part_name or report.part}: {report.part_reason}")
    if report.rounded is not None and report.rounded.moved:
        r = report.rounded
        ms = f" ({r.max_ms:.0f} ms)" if r.max_ms is not None else ""
        notes.append(f"quantised to {r.grid}: {r.moved} of {r.total} onsets/ends moved, "
                     f"at most {r.max_quarters:g} quarter{ms}")
    notes += [f"left out: {d}" for d in report.dropped]
    notes += [f"guessed: {e}" for e in report.estimated]
    return notes


def _error_html(err: BaseException) -> str:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (f'<span style="color:#a61e1e">{html.escape(type(err).__name__)}: '
            f'{html.escape(message[:400])}</span>')


class Playground:
    """Notebook 05's form: build a ComposeRequest, sample, show answers in players, keep history;
    and your own tune: import it, then regenerate chosen bars, continue, harmonise or describe it.

    `composer` is an `inference.Composer` (anything with its `compose`, `regenerate` and
    `harmonise`). Everything a person can click is reachable from code too (`form`, `own`,
    `compose_button.click()`, `regenerate_button.click()`, `export_abc()`, `export_jsonl()`),
    which is how CI exercises the form.
    """

    TASK_LABELS = [("emotion: a tune with a mood/style", "emotion"),
                   ("chords: a melody over a chord progression", "chords"),
                   ("theme + chords: a titled tune over chords", "theme_chords"),
                   ("continue: carry on from given bars", "continue"),
                   ("describe: talk about a given tune", "describe")]

    def __init__(self, composer: Any, profile: Any = None, out_dir: str | Path | None = None,
                 seed_abc: str = "") -> None:
        import ipywidgets as W

        if profile is None:
            from imelodist_lib.profiles import get_profile

            profile = get_profile()
        self.composer = composer
        self.profile = profile
        self.out_dir = Path(out_dir) if out_dir is not None else Path(profile.run_dir) / "playground"
        self.history: list[HistoryEntry] = []
        self.shown: list[Any] = []  # the views (Player or HTML) shown under the form, in order
        self.tune: str | None = None  # your tune, as imported (ABC)
        self.import_report: Any = None  # its importing.ImportReport
        self.tune_player: Player | None = None
        wide = W.Layout(width="420px")
        style = {"description_width": "110px"}
        f = self.form = SimpleNamespace()  # the fields, by name, for scripted use
        f.task = W.Dropdown(options=self.TASK_LABELS, value="emotion", description="task", layout=wide, style=style)
        f.lang = W.ToggleButtons(options=[("中文", "zh"), ("English", "en")], value="zh", description="language", style=style)
        f.emotion = W.Combobox(options=["欢快", "忧伤", "平静", "激昂", "joyful", "sad", "calm", "heroic"],
                               value="欢快", description="emotion", layout=wide, style=style)
        f.style = W.Combobox(options=["jig", "reel", "hornpipe", "waltz", "march", "polka", "中国民歌"],
                             value="", description="style", layout=wide, style=style)
        f.chords = W.Text(value="G C D G", description="chords (1/bar)", layout=wide, style=style)
        f.theme = W.Text(value="", description="theme / title", layout=wide, style=style)
        f.key = W.Combobox(options=["C", "G", "D", "A", "F", "Am", "Em", "Dm", "Edor", "Ador", "Gmix"],
                           value="", description="key (K:)", layout=wide, style=style)
        f.meter = W.Combobox(options=["4/4", "3/4", "2/4", "6/8", "9/8", "2/2"], value="",
                             description="meter (M:)", layout=wide, style=style)
        f.tempo = W.BoundedIntText(value=0, min=0, max=400, description="tempo ♩ (0=any)", style=style)
        f.bars = W.BoundedIntText(value=8, min=0, max=128, description="bars (0=any)", style=style)
        f.seed_abc = W.Textarea(value=seed_abc, description="seed tune", placeholder="ABC for continue/describe",
                                layout=W.Layout(width="600px", height="120px"), style=style)
        f.temperature = W.FloatSlider(value=float(getattr(profile, "temperature", 0.8)), min=0.0, max=2.0, step=0.05, description="temperature", style=style)
        f.top_p = W.FloatSlider(value=0.95, min=0.05, max=1.0, step=0.05, description="top-p", style=style)
        f.top_k = W.IntSlider(value=50, min=0, max=200, description="top-k (0=off)", style=style)
        f.max_new_tokens = W.IntSlider(value=int(getattr(profile, "max_new_tokens", 512)), min=16,
                                       max=4096, step=16, description="max tokens", style=style)
        f.n = W.IntSlider(value=1, min=1, max=8, description="samples", style=style)
        f.seed = W.BoundedIntText(value=-1, min=-1, max=2**31 - 1, description="seed (-1 random)", style=style)
        # on by default: a small model sampled freely gets many bars wrong (model card); untick to
        # hear what the model writes on its own
        f.constrained = W.Checkbox(value=True, description="guaranteed-valid ABC (grammar)", indent=False)
        self.compose_button = W.Button(description="Compose", button_style="primary", icon="music")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", layout=W.Layout(width="200px"))
        self.status = W.HTML()
        self.results = W.VBox()  # one child per answer, newest last
        self.history_label = W.HTML("history: 0 answers")
        self.export_abc_button = W.Button(description="Export ABC", icon="download")
        self.export_jsonl_button = W.Button(description="Export JSONL", icon="download")
        self.compose_button.on_click(self._on_compose)
        self.export_abc_button.on_click(lambda _b: self._on_export(self.export_abc))
        self.export_jsonl_button.on_click(lambda _b: self._on_export(self.export_jsonl))
        f.task.observe(lambda _c: self._show_relevant(), names="value")
        f.lang.observe(self._translate_emotion, names="value")
        self._rows = {
            "what": W.VBox([f.task, f.lang, f.emotion, f.style, f.theme, f.chords]),
            "form": W.VBox([f.key, f.meter, f.tempo, f.bars]),
            "sampling": W.VBox([f.temperature, f.top_p, f.top_k, f.max_new_tokens, f.n, f.seed, f.constrained]),
        }
        self._build_own(W, style)
        self.widget = W.VBox([
            W.HTML("<b>Request</b>"),
            W.HBox([self._rows["what"], self._rows["form"]]),
            f.seed_abc,
            W.HTML("<b>Sampling</b>"),
            self._rows["sampling"],
            W.HBox([self.compose_button, self.progress, self.status]),
            W.HTML("<b>Your own tune</b> (sampling knobs above apply; Regenerate and Harmonise "
                   "always keep to their grammar)"),
            self.own_widget,
            self.results,
            W.HBox([self.history_label, self.export_abc_button, self.export_jsonl_button]),
        ])
        self._show_relevant()

    # --- your own tune: the widgets ------------------------------------------------------
    def _build_own(self, W: Any, style: dict) -> None:
        o = self.own = SimpleNamespace()  # upload, paste, part, bars, more_bars, notes, score
        o.upload = W.FileUpload(accept=",".join(UPLOAD_SUFFIXES), multiple=False,
                                description="Upload tune")
        o.paste = W.Textarea(value="", placeholder="…or paste an ABC tune here and press Import",
                             layout=W.Layout(width="600px", height="100px"))
        o.part = W.Text(value="", description="part", placeholder="blank: the highest part",
                        style=style, layout=W.Layout(width="300px"))
        o.import_button = W.Button(description="Import pasted", icon="paste")
        o.notes = W.HTML()  # what the import decided, or why it failed
        o.score = W.VBox()  # the imported tune's player
        o.bars = W.IntRangeSlider(value=(1, 1), min=1, max=1, description="bars", disabled=True,
                                  style=style, layout=W.Layout(width="420px"))
        o.more_bars = W.BoundedIntText(value=4, min=1, max=32, description="new bars", style=style)
        self.regenerate_button = W.Button(description="Regenerate bars", icon="refresh", disabled=True)
        self.continue_button = W.Button(description="Continue", icon="forward", disabled=True)
        self.harmonise_button = W.Button(description="Harmonise", icon="music", disabled=True)
        self.describe_button = W.Button(description="Describe", icon="comment", disabled=True)
        self.edit_status = W.HTML()
        o.upload.observe(self._on_upload, names="value")
        o.import_button.on_click(lambda _b: self._guarded(o.notes, lambda: self.use_tune(o.paste.value)))
        for button, action in ((self.regenerate_button, self.regenerate), (self.continue_button, self.continue_tune),
                               (self.harmonise_button, self.harmonise), (self.describe_button, self.describe)):
            button.on_click(lambda _b, act=action: self._on_edit(act))
        self.own_widget = W.VBox([
            W.HBox([o.upload, o.part]), o.paste, o.import_button, o.notes, o.score,
            W.HBox([o.bars, self.regenerate_button]),
            W.HBox([o.more_bars, self.continue_button, self.harmonise_button, self.describe_button]),
            self.edit_status,
        ])

    def _part(self) -> int | str | None:
        text = self.own.part.value.strip()
        return None if not text else int(text) if text.isdigit() else text

    def _on_upload(self, change) -> None:
        """Upload handler: import the newest file (ipywidgets 8: a tuple of {name, content})."""
        files = change["new"]
        if not files:
            return
        item = files[-1]
        self._guarded(self.own.notes, lambda: self.use_tune(
            import_upload(item["name"], bytes(item["content"]), self._part())))

    def _guarded(self, status: Any, act) -> bool:
        """Run one click's work; an error becomes one short line in `status`, never a traceback."""
        try:
            act()
            return True
        except Exception as err:  # a click must never raise: show the cause by the widget
            status.value = _error_html(err)
            return False

    def use_tune(self, source: Any) -> str:
        """Make `source` your tune: ABC text, a file path, or an `ImportReport`; it is imported
        (`importing.import_melody`), shown in a player with the import's notes, and the bar
        selection covers its bars. Returns the tune's ABC."""
        from imelodist_lib.editing import bar_spans
        from imelodist_lib.importing import MusicImportError, import_melody

        if isinstance(source, str) and not source.strip():
            raise MusicImportError("nothing to import: paste an ABC tune (X:, M:, L:, K: and bars) "
                                   "or upload a file")
        report = source if hasattr(source, "abc") and hasattr(source, "notes") else \
            import_melody(source, part=self._part())
        spans = bar_spans(report.abc)  # refuses several voices, bars it cannot place
        self.tune, self.import_report = report.abc, report
        self.tune_player = Player(report.abc, title=f"your tune · {len(spans)} bars")
        self.own.score.children = (self.tune_player.widget(),)
        self.own.notes.value = "<br>".join(html.escape(n) for n in import_notes(report))
        n = len(spans)
        o = self.own
        o.bars.disabled = False
        o.bars.max = max(n, 1)
        first = max(1, n // 2)
        o.bars.value = (first, min(n, first + 1))
        for button in (self.regenerate_button, self.continue_button, self.harmonise_button,
                       self.describe_button):
            button.disabled = False
        self.edit_status.value = ""
        return report.abc

    def _need_tune(self) -> str:
        if self.tune is None:
            raise ValueError("no tune yet: upload a file or paste ABC and press Import")
        return self.tune

    def _edit_settings(self) -> dict:
        """The sampling knobs an edit uses; a random seed is drawn here so it can be recorded."""
        settings = self.settings()
        if settings["seed"] is None:
            settings["seed"] = random.randrange(2**31)
        return settings

    # --- your own tune: the actions --------------------------------------------------------
    def regenerate(self) -> HistoryEntry:
        """Write the selected bars anew (`Composer.regenerate`), every other byte of your tune kept."""
        from imelodist_lib.editing import bar_spans

        tune = self._need_tune()
        first, last = self.own.bars.value
        s = {**self._edit_settings(), "constrained": True}
        start = time.perf_counter()
        [r] = self.composer.regenerate(tune, range(first - 1, last), seed=s["seed"],
                                       temperature=s["temperature"])
        seconds = time.perf_counter() - start
        n = len(bar_spans(tune))
        kept = [k for k in range(1, n + 1) if not first <= k <= last]
        report = r.report
        error = str(report.error) if report.error is not None else (
            f"{len(report.bars.errors)} bar(s) with the wrong length" if report.bars.errors else None)
        return self._add(HistoryEntry(
            request={"task": "regenerate", "lang": self.form.lang.value, "bars": [first, last]},
            settings=s, text=r.abc, abc=r.abc, ok=error is None, error=error, seconds=seconds,
            kept=f"{bar_list(kept)} byte for byte" if kept else "the header",
            new=f"{bar_list(list(range(first, last + 1)))}: " + " | ".join(r.new_bars)))

    def continue_tune(self) -> HistoryEntry:
        """New bars after your tune (task "continue", `own.more_bars` of them under the grammar)."""
        from imelodist_lib.abc import ABCError
        from imelodist_lib.editing import bar_spans
        from imelodist_lib.instructions import ComposeRequest

        tune = self._need_tune()
        n = len(bar_spans(tune))
        seed_abc = re.sub(r"\|\]\s*$", "|", tune.rstrip()) + "\n"  # the end bar line would stop it
        request = ComposeRequest("continue", self.form.lang.value, seed_abc=seed_abc,
                                 bars=n + int(self.own.more_bars.value))
        s = self._edit_settings()
        kwargs = dict(s)
        if s["constrained"]:
            kwargs["max_new_tokens"] = None  # the grammar's budget: the whole tune is written again
        [comp] = self.composer.compose(request, n=1, **kwargs)
        prefix = seed_abc.rstrip()
        same = comp.text.startswith(prefix)
        try:
            total = len(bar_spans(comp.abc)) if comp.abc else 0
        except (ValueError, ABCError):  # a freely sampled answer may not place its bars
            total = 0
        return self._add(HistoryEntry.from_composition(
            comp, request.to_dict(), s,
            kept=f"{bar_list(list(range(1, n + 1)))} byte for byte" if same else
            "the given bars were rewritten (free sampling: untick guaranteed-valid to see this)",
            new=bar_list(list(range(n + 1, total + 1))) if same and total > n else "the answer"))

    def harmonise(self) -> HistoryEntry:
        """A chord symbol per bar of your tune (`Composer.harmonise`), every note kept."""
        tune = self._need_tune()
        s = {**self._edit_settings(), "constrained": True}
        start = time.perf_counter()
        h = self.composer.harmonise(tune, lang=self.form.lang.value, seed=s["seed"],
                                    temperature=s["temperature"])
        seconds = time.perf_counter() - start
        report = h.report
        error = str(report.error) if report.error is not None else (
            f"{len(report.bars.errors)} bar(s) with the wrong length" if report.bars.errors else None)
        return self._add(HistoryEntry(
            request={"task": "harmonise", "lang": self.form.lang.value}, settings=s, text=h.abc,
            abc=h.abc, ok=error is None, error=error, seconds=seconds,
            kept="every note and bar line (chord symbols of the tune replaced)",
            new="chords " + " | ".join(h.chords)))

    def describe(self) -> HistoryEntry:
        """A few sentences about your tune (task "describe")."""
        from imelodist_lib.instructions import ComposeRequest

        request = ComposeRequest("describe", self.form.lang.value, seed_abc=self._need_tune())
        s = {**self._edit_settings(), "constrained": False}
        [comp] = self.composer.compose(request, n=1, **s)
        return self._add(HistoryEntry.from_composition(comp, request.to_dict(), s, kept="your tune as given",
                                                       new="a description"))

    def _add(self, entry: HistoryEntry) -> HistoryEntry:
        self.history.append(entry)
        self.history_label.value = f"history: {len(self.history)} answers"
        return entry

    def _on_edit(self, action) -> None:
        """Button handler for the four edits: run it, show the answer; errors by the buttons."""
        buttons = (self.regenerate_button, self.continue_button, self.harmonise_button, self.describe_button)
        for b in buttons:
            b.disabled = True
        self.edit_status.value = "working…"
        try:
            ok = self._guarded(self.edit_status, action)
        finally:
            for b in buttons:
                b.disabled = self.tune is None
        if ok:
            entry = self.history[-1]
            self.edit_status.value = html.escape(f"#{len(self.history)} {entry.request['task']}: "
                                                 f"{'valid' if entry.ok else entry.error}, {entry.seconds:.1f} s")
            self._show([entry])

    # --- the form -> a request -----------------------------------------------------------
    EMOTIONS = (("欢快", "joyful"), ("忧伤", "sad"), ("平静", "calm"), ("激昂", "heroic"))

    def _translate_emotion(self, change) -> None:
        """Switching language swaps a listed emotion word for its translation (欢快 <-> joyful)."""
        pairs = {zh: en for zh, en in self.EMOTIONS} if change["new"] == "en" else \
            {en: zh for zh, en in self.EMOTIONS}
        self.form.emotion.value = pairs.get(self.form.emotion.value, self.form.emotion.value)

    def _show_relevant(self) -> None:
        """Grey out fields the chosen task ignores (they would be rejected or unused)."""
        f, task = self.form, self.form.task.value
        f.chords.disabled = task not in ("chords", "theme_chords")
        f.seed_abc.disabled = task not in ("continue", "describe")
        for name in ("emotion", "style", "key", "meter", "tempo", "bars", "theme"):
            getattr(f, name).disabled = task == "describe"

    def request(self):
        """The `ComposeRequest` the form describes (ValueError naming the field when incomplete)."""
        from imelodist_lib.instructions import ComposeRequest

        f, task = self.form, self.form.task.value
        describe = task == "describe"
        return ComposeRequest(
            task=task, lang=f.lang.value,
            emotion=None if describe else _none_if_blank(f.emotion.value),
            style=None if describe else _none_if_blank(f.style.value),
            chords=parse_chords(f.chords.value) if task in ("chords", "theme_chords") else None,
            theme=None if describe else _none_if_blank(f.theme.value),
            key=None if describe else _none_if_blank(f.key.value),
            meter=None if describe else _none_if_blank(f.meter.value),
            tempo=None if describe or not f.tempo.value else int(f.tempo.value),
            bars=None if describe or not f.bars.value else int(f.bars.value),
            seed_abc=_none_if_blank(f.seed_abc.value) if task in ("continue", "describe") else None)

    def settings(self) -> dict:
        """Sampling knobs as `Composer.compose` keywords (seed None = random)."""
        f = self.form
        return {"temperature": float(f.temperature.value), "top_p": float(f.top_p.value),
                "top_k": int(f.top_k.value), "max_new_tokens": int(f.max_new_tokens.value),
                "seed": None if f.seed.value < 0 else int(f.seed.value),
                "constrained": bool(f.constrained.value) and f.task.value != "describe"}

    # --- composing -----------------------------------------------------------------------
    def compose(self) -> list[HistoryEntry]:
        """Ask the composer for `n` answers to the form's request; append them to the history.

        Samples are drawn one at a time (seed, seed+1, ...) so the progress bar moves."""
        request = self.request()
        settings = self.settings()
        n = int(self.form.n.value)
        self.progress.max, self.progress.value = n, 0
        entries = []
        for i in range(n):
            kwargs = dict(settings)
            if kwargs["seed"] is not None:
                kwargs["seed"] += i
            for comp in self.composer.compose(request, n=1, **kwargs):
                entry = HistoryEntry.from_composition(comp, request.to_dict(), kwargs)
                self.history.append(entry)
                entries.append(entry)
            self.progress.value = i + 1
        self.history_label.value = f"history: {len(self.history)} answers"
        return entries

    def _on_compose(self, _button=None) -> None:
        """Button handler: compose, show each answer in a player; errors go to the status line."""
        self.compose_button.disabled = True
        self.compose_button.description = "Composing…"
        self.status.value = ""
        try:
            entries = self.compose()
        except Exception as err:  # show the cause by the button; a click must never raise
            self.status.value = f'<span style="color:#a61e1e">{html.escape(type(err).__name__)}: {html.escape(str(err))}</span>'
            return
        finally:
            self.compose_button.disabled = False
            self.compose_button.description = "Compose"
        good = sum(e.ok for e in entries)
        self.status.value = html.escape(f"{len(entries)} answer(s), {good} valid, "
                                        f"{sum(e.seconds for e in entries):.1f} s")
        self._show(entries)

    def _show(self, entries: list[HistoryEntry]) -> None:
        """Put each entry's view under the form, newest last (what was kept/new above an edit's)."""
        import ipywidgets as W

        first = len(self.history) - len(entries) + 1
        boxes = []
        for number, entry in enumerate(entries, start=first):
            view = self.entry_view(entry, number)
            self.shown.append(view)
            box = view.widget() if isinstance(view, Player) else W.HTML(view.data)
            if entry.kept is not None:
                box = W.VBox([W.HTML(html.escape(f"#{number} kept: {entry.kept} · new: {entry.new}")), box])
            boxes.append(box)
        self.results.children = (*self.results.children, *boxes)

    def entry_view(self, entry: HistoryEntry, number: int):
        """How one answer is shown: a player for a tune, escaped prose for a description."""
        from IPython.display import HTML

        s = entry.settings
        title = (f"#{number} · {entry.request['task']} · T={s['temperature']:g} top-p={s['top_p']:g}"
                 f"{' · grammar' if s.get('constrained') else ''} · seed {s.get('seed')} · {entry.seconds:.1f} s")
        if entry.abc is not None:
            return Player(entry.abc, title=title)
        if entry.request.get("task") == "describe":
            return HTML(f'<div class="imelodist-player"><b>{html.escape(title)}</b>'
                        f'<div style="white-space:pre-wrap">{html.escape(entry.text)}</div></div>')
        return Player(entry.text, title=title + " · no tune found")

    def table(self):
        """The history as a pandas DataFrame: one row per answer, its settings and verdict."""
        import pandas as pd

        rows = [{"#": i, "task": e.request["task"], "lang": e.request["lang"],
                 "temperature": e.settings["temperature"], "top_p": e.settings["top_p"],
                 "top_k": e.settings["top_k"], "seed": e.settings.get("seed"),
                 "grammar": e.settings.get("constrained"), "valid": e.ok, "error": e.error,
                 "kept": e.kept, "new": e.new,
                 "seconds": round(e.seconds, 2)} for i, e in enumerate(self.history, start=1)]
        return pd.DataFrame(rows)

    # --- history export ------------------------------------------------------------------
    def export_abc(self, path: str | Path | None = None) -> Path:
        """Write every tune in the history to one .abc file (X: numbered, request as a comment)."""
        path = Path(path) if path is not None else self.out_dir / "history.abc"
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks, x = [], 0
        for entry in self.history:
            if entry.abc is None:
                continue
            x += 1
            req = {k: v for k, v in entry.request.items() if v is not None and k not in ("seed_abc", "melody")}
            body = re.sub(r"\AX:[^\n]*", f"X:{x}", entry.abc.strip(), count=1)
            if not body.startswith("X:"):
                body = f"X:{x}\n{body}"
            kept = f"% kept: {entry.kept} · new: {entry.new}\n" if entry.kept is not None else ""
            chunks.append(f"% request: {json.dumps(req, ensure_ascii=False)}\n"
                          f"% settings: {json.dumps(entry.settings)}  valid: {entry.ok}\n{kept}{body}\n")
        path.write_text("\n".join(chunks), encoding="utf-8")
        return path

    def export_jsonl(self, path: str | Path | None = None) -> Path:
        """Write the whole history (requests, settings, answers, verdicts) as JSON lines."""
        path = Path(path) if path is not None else self.out_dir / "history.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for entry in self.history:
                fh.write(json.dumps(entry.to_dict(), ensure_ascii=False) + "\n")
        return path

    def _on_export(self, export) -> None:
        try:
            path = export()
            self.status.value = f"wrote <code>{html.escape(str(path))}</code>"
        except OSError as err:
            self.status.value = f'<span style="color:#a61e1e">{html.escape(str(err))}</span>'

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
