"""Second half of the data stage: prompt templates (zh/en), `ComposeRequest`, and the builders
that turn the tune corpus (and the knowledge text of `knowledge`) into the two training sets.

* continued pretraining (`pt_*.jsonl`): `{"text": ...}` — every tune as ABC text, plus music
  knowledge (ABC guide, music history, composer/work names zh<->en, identity dialogues) in the
  train split only, so validation loss measures music and nothing else;
* instruction tuning (`sft_*.jsonl`): chat records `{"messages": [system, user, assistant],
  "task", "request", "tune_id"}` over five task kinds, balanced across kinds and languages,
  plus XTuner's `{"conversation": [{"system", "input", "output"}]}` export of the train split.

The request record `ComposeRequest` is shared with inference, the grammar and evaluation: a
prompt is rendered from it (`render_prompt`), and a tune's ground-truth answer comes from
`target_for(record, request)`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from imelodist_lib import abc, jsonl
from imelodist_lib.knowledge import load_knowledge, read_identity
from imelodist_lib.labels import STYLE_ZH, add_chord_symbols
from imelodist_lib.music import pitch_class_name
from imelodist_lib.parallel import map_chunks
from imelodist_lib.profiles import KNOWLEDGE_DIR, SYSTEM_PROMPT, Profile

TASKS = ("emotion", "chords", "theme_chords", "continue", "describe", "harmonise")
# the kinds the SFT build deals (harmonise has no records: the shipped model was trained without
# them, and in guaranteed-valid mode its grammar forces the notes, so only the chords are asked)
SFT_TASKS = ("emotion", "chords", "theme_chords", "continue", "describe")
COMPOSE_TASKS = ("emotion", "chords", "theme_chords", "continue")
LANGS = ("zh", "en")
SPLITS = ("train", "validation", "test")
IDENTITY_TASK = "identity"
_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Request fields are data
# --------------------------------------------------------------------------------------------
# Characters that would end an ABC header line or start a new one: every separator
# str.splitlines knows (NEL U+0085 and U+2028/U+2029 included) and the other C0 controls and DEL.
# C1 controls other than NEL stay: they are Latin-1 mojibake of old files (363 Essen titles
# carry \x81 for "ü") and change no line.
_NOT_ONE_LINE = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
# Text a chat tokenizer would read as a special token: <|im_start|>, <|im_end|>, InternLM2's
# <|action_start|> and the like, and <s> </s> <pad> <unk>.
_SPECIAL_TOKEN = re.compile(r"<(?=\|[^<>|\s]{1,40}\|>|/?s>|pad>|unk>)")
ZERO_WIDTH_SPACE = "\u200b"


def check_one_line(name: str, value: str | None) -> None:
    """Refuse a request field that would change the ABC it lands in (a newline in a theme
    would add header lines to a guaranteed-valid tune), naming the field."""
    if value is not None and _NOT_ONE_LINE.search(str(value)):
        bad = _NOT_ONE_LINE.search(str(value)).group()
        raise ValueError(f"{name} {value!r} holds {bad!r} (a line break or control character): "
                         f"give {name} as one line of plain text")


def neutralize_special_tokens(text: str) -> str:
    """User text with special-token look-alikes broken by a zero-width space after '<', so
    '<|im_end|>' typed in a request tokenises as plain text, never as a real chat marker."""
    return _SPECIAL_TOKEN.sub("<" + ZERO_WIDTH_SPACE, text)


def user_turns_as_data(messages: Sequence[dict]) -> list[dict]:
    """The chat with every user turn's content passed through `neutralize_special_tokens`."""
    return [dict(m, content=neutralize_special_tokens(m["content"]))
            if m.get("role") == "user" and isinstance(m.get("content"), str) else m for m in messages]


# --------------------------------------------------------------------------------------------
# The request record
# --------------------------------------------------------------------------------------------
@dataclass
class ComposeRequest:
    """What a user asks the composer for; the one record prompts, targets and evaluation share."""

    task: str  # "emotion" | "chords" | "theme_chords" | "continue" | "describe" | "harmonise"
    lang: str = "zh"  # "zh" | "en"
    emotion: str | None = None  # e.g. "欢快" / "joyful"
    style: str | None = None  # e.g. "jig", "中国民歌"
    chords: list[str] | None = None  # one chord symbol per bar, e.g. ["G", "C", "D", "G"]
    theme: str | None = None  # a title/theme text
    key: str | None = None  # ABC K: value, e.g. "G", "Edor", "Am"
    meter: str | None = None  # ABC M: value, e.g. "6/8"
    tempo: int | None = None  # quarter notes per minute (Q:)
    bars: int | None = None  # requested length in bars
    seed_abc: str | None = None  # tune to continue (task "continue") or to describe
    melody: str | None = None  # ABC melody to give one chord per bar (task "harmonise")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: choose one of {list(TASKS)}")
        if self.lang not in LANGS:
            raise ValueError(f"unknown lang {self.lang!r}: choose 'zh' or 'en'")
        if self.chords is not None:
            self.chords = [str(c) for c in self.chords]
            if not self.chords or any(not c.strip() for c in self.chords):
                raise ValueError("chords must be a non-empty list of chord symbols, e.g. ['G','C']")
        if self.task in ("chords", "theme_chords") and not self.chords:
            raise ValueError(f"task {self.task!r} needs chords=[...] (one chord symbol per bar)")
        if self.task == "theme_chords" and not self.theme:
            raise ValueError("task 'theme_chords' needs theme='...' (a title or theme text)")
        if self.task in ("continue", "describe") and not self.seed_abc:
            raise ValueError(f"task {self.task!r} needs seed_abc='...' (the ABC tune to use)")
        if self.task == "harmonise" and not self.melody:
            raise ValueError("task 'harmonise' needs melody='...' (the ABC melody to harmonise)")
        for name in ("theme", "key", "meter"):
            check_one_line(name, getattr(self, name))
        for i, chord in enumerate(self.chords or ()):
            check_one_line(f"chords[{i}]", chord)
        for name in ("tempo", "bars"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value is not None:
                setattr(self, name, int(value))

    def to_dict(self) -> dict:
        """Plain JSON-able dict (every field, None included, so dataset columns line up; `melody`
        only when set, so requests without it keep their dicts, ids and dataset rows)."""
        d = dataclasses.asdict(self)
        if d["melody"] is None:
            del d["melody"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ComposeRequest":
        """Inverse of `to_dict`; unknown keys are an error (they would be silently lost)."""
        return jsonl.dataclass_from_dict(cls, d)


# --------------------------------------------------------------------------------------------
# Words: keys, modes, styles in both languages
# --------------------------------------------------------------------------------------------
_MODE_EN = {"major": "major", "minor": "minor", "dorian": "Dorian", "phrygian": "Phrygian",
            "lydian": "Lydian", "mixolydian": "Mixolydian", "locrian": "Locrian"}
_MODE_ZH = {"major": "大调", "minor": "小调", "dorian": "多利亚调式", "phrygian": "弗里几亚调式",
            "lydian": "利底亚调式", "mixolydian": "混合利底亚调式", "locrian": "洛克里亚调式"}
# Style names as the corpus labels them (English) -> Chinese; unknown styles pass through.
_STYLE_ZH = STYLE_ZH
_STYLE_EN = {v: k for k, v in _STYLE_ZH.items()}


def key_name(key: str, lang: str) -> str:
    """Human name of an ABC K: value, e.g. ("Edor", "en") -> "E Dorian", ("Am", "zh") -> "A小调"."""
    try:
        k = abc.parse_key(key)
    except abc.ABCError:
        return key  # "none"/"HP" and the like: show the value as written
    mode = getattr(k, "mode", "major") or "major"
    tonic = str(getattr(k, "tonic", key))
    if lang == "zh":
        return f"{tonic}{_MODE_ZH.get(mode, mode)}"
    return f"{tonic} {_MODE_EN.get(mode, mode)}"


def _label_text(value: Any, lang: str) -> str | None:
    """A corpus label in the wanted language: labels may be {"zh":..,"en":..} dicts or strings."""
    if value is None:
        return None
    if isinstance(value, dict):
        for k in (lang, "name", "label", "zh" if lang == "en" else "en"):
            if isinstance(value.get(k), str) and value[k].strip():
                return value[k].strip()
        return None
    text = str(value).strip()
    return text or None


_PROPER = {"german", "chinese", "irish", "scottish", "english", "american", "welsh", "french",
           "northumbrian", "shetland", "breton", "swedish", "norwegian", "renaissance"}


def _style_in(style: str, lang: str) -> str:
    """Translate a known style name into the request language (unknown ones pass through);
    English nationality words get their capital ("German folk song")."""
    if lang == "zh":
        return _STYLE_ZH.get(style.lower(), style)
    style = _STYLE_EN.get(style, style)
    return " ".join(w.capitalize() if w.lower() in _PROPER else w for w in style.split(" "))


# --------------------------------------------------------------------------------------------
# Templates. Placeholders: {desc} {constraints} {chords} {theme} {seed} {melody}. Constraint clauses are
# optional; each template reads naturally with or without them.
# --------------------------------------------------------------------------------------------
TEMPLATES: dict[str, dict[str, list[str]]] = {
    "emotion": {
        "zh": [
            "请创作一首{desc}{constraints}，用ABC记谱法写出。",
            "写一首{desc}{constraints}，请以ABC格式输出。",
            "我想要一首{desc}{constraints}，请用ABC记谱法为我谱写。",
            "作为作曲家，请为我写一首{desc}{constraints}，给出完整的ABC乐谱。",
            "用ABC记谱法作一首{desc}{constraints}。",
        ],
        "en": [
            "Compose {desc}{constraints}, written in ABC notation.",
            "Write {desc} in ABC notation{constraints}.",
            "Please create {desc}{constraints}. Answer with the ABC score.",
            "I'd like {desc}{constraints}. Give it to me in ABC notation.",
            "As a composer, write me {desc}{constraints}; reply with the full ABC tune.",
        ],
    },
    "chords": {
        "zh": [
            "请根据和弦进行 {chords} 创作一段旋律{constraints}，每小节一个和弦，用ABC记谱法写出。",
            "按照下面的和弦走向写一首曲子{constraints}：{chords}。请输出带和弦标记的ABC乐谱。",
            "和弦进行：{chords}。请在这些和弦上谱写旋律{constraints}，以ABC格式给出。",
            "给定和弦 {chords}（每小节一个），请作一段相配的旋律{constraints}。",
        ],
        "en": [
            "Write a melody over the chord progression {chords}{constraints}, one chord per bar, in ABC notation.",
            "Compose a tune on these chords{constraints}: {chords}. Give the ABC score with the chord symbols.",
            "Chord progression: {chords}. Set a melody to it{constraints} and answer in ABC notation.",
            "Here is a progression, one chord per bar: {chords}. Write a fitting tune{constraints}.",
        ],
    },
    "theme_chords": {
        "zh": [
            "以《{theme}》为题，按和弦进行 {chords} 创作一首曲子{constraints}，用ABC记谱法写出。",
            "请写一首题为《{theme}》的乐曲{constraints}，和弦进行为 {chords}（每小节一个）。",
            "主题：{theme}；和弦：{chords}。请据此谱写旋律{constraints}，输出ABC乐谱。",
            "为《{theme}》这个主题作曲{constraints}，使用和弦 {chords}，给出带和弦标记的ABC谱。",
        ],
        "en": [
            "Compose a tune titled \"{theme}\" over the chord progression {chords}{constraints}, in ABC notation.",
            "Write a piece called \"{theme}\"{constraints}; its chords, one per bar, are {chords}.",
            "Theme: {theme}. Chords: {chords}. Write the melody{constraints} and answer in ABC notation.",
            "Set the theme \"{theme}\" to music over {chords}{constraints}; give the ABC score with chord symbols.",
        ],
    },
    "continue": {
        "zh": [
            "请续写下面这段旋律{constraints}，保持原有风格，输出完整的ABC乐谱：\n{seed}",
            "这是一首曲子的开头，请把它写完{constraints}：\n{seed}",
            "下面是用ABC记谱法写的前几小节，请接着往下写{constraints}：\n{seed}",
            "根据以下开头续写旋律{constraints}（保留原有小节）：\n{seed}",
        ],
        "en": [
            "Continue this tune{constraints}, keeping its style; answer with the complete ABC score:\n{seed}",
            "Here is the opening of a tune. Finish it{constraints}:\n{seed}",
            "These are the first bars in ABC notation. Carry on from where they stop{constraints}:\n{seed}",
            "Complete the melody that begins like this{constraints} (keep the given bars):\n{seed}",
        ],
    },
    "describe": {
        "zh": [
            "请分析下面这首ABC乐谱，说说它的调式、拍号、速度、长度和风格：\n{seed}",
            "这首曲子是什么样的？请描述一下：\n{seed}",
            "请用几句话介绍这段ABC旋律的音乐特点：\n{seed}",
            "读一读这份乐谱，告诉我它的调性、节拍、音域和情绪：\n{seed}",
        ],
        "en": [
            "Describe this ABC tune: its key, meter, tempo, length and style.\n{seed}",
            "What kind of tune is this? Please describe it.\n{seed}",
            "Tell me about the musical character of this melody in a few sentences:\n{seed}",
            "Read this score and tell me its key, time signature, range and mood:\n{seed}",
        ],
    },
    "harmonise": {
        "zh": [
            "为下面这段旋律配和弦，每小节开头写一个和弦记号，旋律不变：\n{melody}",
            "请给这首曲子的每一小节配一个和弦（用ABC和弦记号），音符保持原样：\n{melody}",
            "给这段ABC旋律加上和弦标记，每小节一个，不要改动任何音符：\n{melody}",
            "请为以下旋律编配和声：在每小节开头写一个和弦，输出完整的ABC乐谱：\n{melody}",
        ],
        "en": [
            "Add one chord symbol at the start of every bar; keep the melody as it is:\n{melody}",
            "Harmonise this melody with one chord per bar, written as ABC chord symbols; do not change a note:\n{melody}",
            "Write chord symbols over this tune, one at the start of each bar, and give back the whole ABC score:\n{melody}",
            "Here is a melody without chords. Choose a chord for every bar and write it in, leaving the notes as they are:\n{melody}",
        ],
    },
}

# Optional constraint clauses, several phrasings each (index chosen with the template's rng).
_CLAUSES: dict[str, dict[str, list[str]]] = {
    "key": {"zh": ["{name}（K:{key}）", "调号为K:{key}（{name}）"],
            "en": ["in {name} (K:{key})", "in the key of {name} (K:{key})"]},
    "meter": {"zh": ["{meter}拍（M:{meter}）", "拍号M:{meter}"],
              "en": ["in {meter} time (M:{meter})", "with time signature M:{meter}"]},
    "tempo": {"zh": ["速度为每分钟{tempo}拍（Q:1/4={tempo}）", "速度Q:1/4={tempo}"],
              "en": ["at {tempo} quarter notes per minute (Q:1/4={tempo})", "with tempo Q:1/4={tempo}"]},
    "bars": {"zh": ["共{bars}小节", "长度为{bars}小节"],
             "en": ["{bars} bars long", "with {bars} bars"]},
}


def template_count(task: str, lang: str) -> int:
    """How many phrasings `render_prompt` can choose from for this task and language."""
    return len(TEMPLATES[task][lang])


def _desc(request: ComposeRequest) -> str:
    """The noun phrase of the emotion/style task: "a joyful jig" / "欢快的吉格舞曲"."""
    emotion = (request.emotion or "").strip()
    style = _style_in(request.style.strip(), request.lang) if request.style else ""
    if request.lang == "zh":
        noun = style or "曲子"
        if emotion:
            return f"{emotion}的{noun}"
        return noun if style else "曲子"
    noun = style or "tune"
    if style and style.lower() not in ("tune", "melody") and not emotion:
        phrase = f"{noun}"
    else:
        phrase = f"{emotion} {noun}".strip()
    article = "an" if phrase[:1].lower() in "aeiou" else "a"
    return f"{article} {phrase}"


def _constraints(request: ComposeRequest, rng: random.Random, include: Sequence[str]) -> str:
    """The optional clause: key, meter, tempo, length, joined in the request's language."""
    parts = []
    for name in include:
        value = getattr(request, name)
        if value is None:
            continue
        phrasing = rng.choice(_CLAUSES[name][request.lang])
        parts.append(phrasing.format(key=request.key, name=key_name(str(request.key), request.lang)
                                     if name == "key" else "", meter=request.meter,
                                     tempo=request.tempo, bars=request.bars))
    if not parts:
        return ""
    if request.lang == "zh":
        return "，要求" + "、".join(parts)
    return " " + ", ".join(parts) if len(parts) < 3 else " " + ", ".join(parts[:-1]) + " and " + parts[-1]


def _chord_text(chords: Sequence[str]) -> str:
    return " | ".join(chords)


def render_prompt(request: ComposeRequest, template_index: int | None = None,
                  rng: random.Random | None = None) -> str:
    """The user message for a request, in its language. Phrasing: `template_index` if given,
    else drawn from `rng`, else the first template (so a bare call is reproducible). Special-token
    text in the fields is neutralised (`neutralize_special_tokens`): request fields are data."""
    options = TEMPLATES[request.task][request.lang]
    if template_index is None:
        template_index = rng.randrange(len(options)) if rng is not None else 0
    if not 0 <= template_index < len(options):
        raise IndexError(f"template_index {template_index} out of range: task {request.task!r} "
                         f"in {request.lang!r} has {len(options)} templates (0..{len(options) - 1})")
    # Clause phrasing follows the template choice unless an rng was given: same input, same text.
    clause_rng = rng if rng is not None else random.Random(template_index)
    if request.task in ("continue", "describe", "harmonise"):
        include: tuple[str, ...] = ("bars", "tempo") if request.task == "continue" else ()
    elif request.task in ("chords", "theme_chords"):
        include = ("key", "meter", "tempo")  # the chords already fix the length
    else:
        include = ("key", "meter", "tempo", "bars")
    return neutralize_special_tokens(options[template_index].format(
        desc=_desc(request) if request.task == "emotion" else "",
        constraints=_constraints(request, clause_rng, include),
        chords=_chord_text(request.chords or []),
        theme=request.theme or "",
        seed=(request.seed_abc or "").strip(),
        melody=(request.melody or "").strip(),
    ))


# --------------------------------------------------------------------------------------------
# From a tune to a request and its ground-truth answer
# --------------------------------------------------------------------------------------------
_CHORD_RE = abc.QUOTED_CHORD_RE  # "^text", "DC", "Fine" are annotations, not chords


def _text_of(record_or_text: Any) -> str:
    return record_or_text if isinstance(record_or_text, str) else getattr(record_or_text, "abc")


@functools.lru_cache(maxsize=2048)
def _parse(text: str) -> abc.Tune:
    """abc.parse_tune, memoised: building one record looks at the same few texts many times
    (request, target, seed, bar count). Callers must not mutate the returned Tune."""
    return abc.parse_tune(text)


@functools.lru_cache(maxsize=256)
def _normalized(text: str) -> str:
    """abc.normalize, memoised (a tune's phrase chats all start from its normalised text)."""
    return abc.normalize(text)


def _tune_of(record_or_text: Any) -> abc.Tune:
    return _parse(_text_of(record_or_text))


def _with_header(tune: abc.Tune, *, title: str | None = None, tempo: int | None = None) -> str:
    """The tune as normalised ABC with one T: (`title` when given), M:, L:, K: and Q: exactly
    `tempo` (Q:1/4=tempo) or absent — so the answer carries exactly the requested header.

    Source fields nobody asked for (O: origin, R: rhythm, C:, further T: lines) are left out:
    a small model would learn to invent them instead of copying the requested key and meter."""
    first_title = next((v for k, v in tune.fields if k == "T"), None)
    fields = [(k, v) for k, v in tune.fields if k in ("M", "L", "K")]
    if title is not None or first_title is not None:
        fields.insert(0, ("T", title if title is not None else first_title))
    if tempo is not None:
        fields.insert(len(fields) - 1 if fields and fields[-1][0] == "K" else len(fields),
                      ("Q", f"1/4={tempo}"))
    # normalize() only formats a Tune it is given (no re-parse): the body is unchanged.
    return abc.normalize(abc.Tune(fields=fields, body=tune.body, first_body_line=tune.first_body_line))


def chords_per_bar(abc_text: str) -> list[str | None]:
    """The first chord symbol ("G", "Am7"...) in each bar of a tune, None where a bar has none."""
    _, spans = abc.bar_segments(abc_text)
    return [(m.group(1) if (m := _CHORD_RE.search(abc_text[a:b])) else None) for a, b in spans]


def count_bars(abc_text: str) -> int:
    """Bars holding notes or rests (first voice): the unit of `ComposeRequest.bars`."""
    return len(abc.bar_segments(abc_text)[1])


def _chorded_text(record: Any) -> str:
    """The tune's ABC with one chord symbol per bar: kept if the source has them, else the
    corpus labeller's `labels["abc_with_chords"]` (when it is this very tune plus chord
    symbols, i.e. not stale after a transposition), else fitted now by `labels.add_chord_symbols`.
    Source chords that skip bars (a chord holds until the next one) are written into those bars."""
    text = _text_of(record)
    chords = chords_per_bar(text)
    if chords and all(chords):
        return text
    if not any(chords):
        labelled = _labelled_chords(record)
        if labelled is not None:
            text = labelled
        else:
            text = add_chord_symbols(text)
    # Bars left without a symbol (only rests, or a source that writes a chord only when it
    # changes) get the chord still sounding.
    return _hold_chords(text)


def _labelled_chords(record: Any) -> str | None:
    """The corpus labeller's `labels["abc_with_chords"]` when it is this very tune plus chord
    symbols (not stale after a transposition), else None."""
    labelled = _labels(record).get("abc_with_chords")
    if isinstance(labelled, str) and _CHORD_RE.sub("", labelled) == _CHORD_RE.sub("", _text_of(record)):
        return labelled
    return None


def _hold_chords(text: str) -> str:
    """Write the chord that is still sounding into each bar that has no chord symbol of its own
    (lead-sheet reading: a chord holds until the next); a leading pickup takes the first chord."""
    _, spans = abc.bar_segments(text)
    per_bar = [_CHORD_RE.findall(text[a:b]) for a, b in spans]
    first = next((c[0] for c in per_bar if c), None)
    if first is None:
        raise ValueError("tune has no chord symbols to hold")
    if all(per_bar):
        return text
    held, inserts = first, []
    for (a, b), found in zip(spans, per_bar):
        if not found:
            inserts.append((abc.bar_music_start(text, a, b), held))
        else:
            held = found[-1]
    for at, name in reversed(inserts):
        text = text[:at] + f'"{name}"' + text[at:]
    if not all(chords_per_bar(text)):
        raise ValueError("could not write a chord symbol into every bar")
    return text


def _labels(record: Any) -> dict:
    return dict(getattr(record, "labels", None) or {})


def _title(record: Any, tune: abc.Tune) -> str | None:
    title = getattr(record, "title", None) or tune.title
    title = title.strip().rstrip(".").strip() if isinstance(title, str) else ""
    return title or None


def _seed_bars(target: str, n_bars: int) -> str:
    """The target's header plus its first `n_bars` bars (cut after that bar's closing barline),
    so the target text starts with the seed text."""
    _, spans = abc.bar_segments(target)
    if len(spans) <= n_bars:
        raise ValueError(f"tune has {len(spans)} bars; cannot take {n_bars} as the opening")
    return target[:spans[n_bars - 1][1]].rstrip() + "\n"


def request_from_tune(record: Any, task: str, lang: str, rng: random.Random) -> ComposeRequest:
    """A request this tune answers: fields from its labels and header, optional constraint
    clauses (key, meter, tempo, length) drawn from `rng`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {list(TASKS)}")
    if task == "harmonise":
        raise ValueError("no training requests for 'harmonise' (see SFT_TASKS): ask with "
                         "ComposeRequest('harmonise', melody=...) or editing.harmonise")
    tune = _tune_of(record)
    labels = _labels(record)
    key, meter = tune.key, tune.meter
    tempo = tune.tempo if isinstance(tune.tempo, int) and tune.tempo > 0 else None
    n_bars = count_bars(_text_of(record))
    want = lambda p: rng.random() < p  # noqa: E731 - a tiny local helper reads best here
    if task == "emotion":
        emotion = _label_text(labels.get("emotion"), lang)
        style = _label_text(labels.get("style"), lang)
        pick = rng.random()
        if emotion and style:
            emotion, style = (emotion, style) if pick < 0.5 else (
                (emotion, None) if pick < 0.75 else (None, style))
        return ComposeRequest(task, lang, emotion=emotion, style=style,
                              key=key if want(0.5) else None, meter=meter if want(0.4) else None,
                              tempo=tempo if tempo and want(0.6) else None,
                              bars=n_bars if want(0.3) else None)
    if task in ("chords", "theme_chords"):
        per_bar = chords_per_bar(_chorded_text(record))
        if not all(per_bar):
            raise ValueError(f"tune {getattr(record, 'id', '?')} has bars without a chord symbol")
        chords = [str(c) for c in per_bar]
        theme = None
        if task == "theme_chords":
            theme = _label_text(labels.get("theme"), lang) or _title(record, tune)
            if not theme:
                raise ValueError(f"tune {getattr(record, 'id', '?')} has no title or theme "
                                 "label: use task 'chords' for it")
        return ComposeRequest(task, lang, chords=chords, theme=theme,
                              style=_label_text(labels.get("style"), lang) if task == "chords"
                              and want(0.3) else None,
                              key=key if want(0.5) else None, meter=meter if want(0.4) else None,
                              tempo=tempo if tempo and want(0.4) else None)
    if task == "continue":
        take = 2 if n_bars < 12 else rng.choice((2, 4))
        first = abc.check_bars(tune).bars[0]
        take += first.kind == "pickup"  # a pickup bar doesn't count as one of the given bars
        if n_bars < take + 2:
            raise ValueError(f"tune {getattr(record, 'id', '?')} has {n_bars} bars: too short to continue")
        ask_tempo = tempo if tempo and want(0.5) else None
        seed = _seed_bars(_with_header(tune, tempo=ask_tempo), take)
        return ComposeRequest(task, lang, key=key, meter=meter, tempo=ask_tempo,
                              bars=n_bars if want(0.5) else None, seed_abc=seed)
    # describe: the tune as written (normalised, tempo kept when it has one)
    return ComposeRequest(task, lang, seed_abc=_with_header(tune, tempo=tempo))


def target_for(record: Any, request: ComposeRequest) -> str:
    """The assistant's answer: the tune in normalised ABC with exactly the requested header
    (T: theme, Q: only when asked), chord symbols per bar for chord tasks, the given bars first
    for "continue"; for "describe", prose about the tune in the request's language."""
    tune = _tune_of(record)
    if request.task == "describe":
        return describe_tune(record, request.lang)
    for name, have in (("key", tune.key), ("meter", tune.meter)):
        asked = getattr(request, name)
        if asked is not None and asked.replace(" ", "") != str(have).replace(" ", ""):
            raise ValueError(f"request asks {name} {asked!r} but the tune is in {have!r}: "
                             "build the request with request_from_tune(record, ...)")
    if request.task in ("chords", "theme_chords"):
        chorded = _parse(_chorded_text(record))
        title = request.theme if request.task == "theme_chords" else None
        text = _with_header(chorded, title=title, tempo=request.tempo)
        got = chords_per_bar(text)
        if request.chords is not None and got != list(request.chords):
            raise ValueError("request chords differ from the tune's chords per bar: "
                             "build the request with request_from_tune(record, ...)")
        return text
    text = _with_header(tune, tempo=request.tempo)
    if request.task == "continue" and request.seed_abc and not text.startswith(
            request.seed_abc.rstrip("\n")):
        raise ValueError("seed_abc is not the opening of this tune: build the request with "
                         "request_from_tune(record, 'continue', ...)")
    return text


# --------------------------------------------------------------------------------------------
# "describe": prose from the tune's facts
# --------------------------------------------------------------------------------------------
_INTERVAL_EN = ["a unison", "a minor second", "a major second", "a minor third", "a major third",
                "a perfect fourth", "a tritone", "a perfect fifth", "a minor sixth",
                "a major sixth", "a minor seventh", "a major seventh", "an octave"]
_INTERVAL_ZH = ["同度", "小二度", "大二度", "小三度", "大三度", "纯四度", "三全音", "纯五度",
                "小六度", "大六度", "小七度", "大七度", "八度"]


def pitch_name(midi: int, flats: bool = False) -> str:
    """Scientific pitch name of a MIDI number (60 -> "C4"), flats for flat keys."""
    return f"{pitch_class_name(midi, flats)}{midi // 12 - 1}"


def interval_name(semitones: int, lang: str) -> str:
    """A span in words: 14 -> "an octave and a major second" / "八度加大二度"."""
    octaves, rest = divmod(max(0, semitones), 12)
    table = _INTERVAL_ZH if lang == "zh" else _INTERVAL_EN
    if octaves == 0:
        return table[rest]
    if lang == "zh":
        head = "八度" if octaves == 1 else f"{'两' if octaves == 2 else octaves}个八度"
        return head if rest == 0 else f"{head}加{table[rest]}"
    head = "an octave" if octaves == 1 else f"{'two' if octaves == 2 else octaves} octaves"
    return head if rest == 0 else f"{head} and {table[rest]}"


@dataclass
class TuneFacts:
    """What `describe_tune` says about a tune, computed from its ABC."""

    title: str | None
    key: str
    mode: str
    meter: str
    tempo: int | None
    bars: int
    notes: int
    lowest: str | None
    highest: str | None
    span: int
    pickup: bool
    style: str | None
    emotion: str | None


def tune_facts(record: Any, lang: str = "en") -> TuneFacts:
    """Key/mode, meter, tempo, length, range, pickup and labels of a tune (labels in `lang`)."""
    tune = _tune_of(record)
    try:
        key = abc.parse_key(tune.key)
        mode, flats = key.mode, key.fifths < 0
    except abc.ABCError:
        mode, flats = "", False
    pitches: list[int] = []
    evs = abc.events(tune)
    for ev in evs:
        chord = getattr(ev, "pitches", None) or ((ev.pitch,) if ev.pitch is not None else ())
        pitches.extend(p for p in chord if p is not None)
    all_bars = abc.check_bars(tune).bars
    bars = [b for b in all_bars if b.voice == all_bars[0].voice] if all_bars else []
    labels = _labels(record)
    return TuneFacts(
        title=_title(record, tune) if not isinstance(record, str) else tune.title,
        key=tune.key, mode=mode, meter=tune.meter,
        tempo=tune.tempo if isinstance(tune.tempo, int) else None,
        bars=len(bars),
        notes=sum(1 for ev in evs if ev.pitch is not None),
        lowest=pitch_name(min(pitches), flats) if pitches else None,
        highest=pitch_name(max(pitches), flats) if pitches else None,
        span=(max(pitches) - min(pitches)) if pitches else 0,
        pickup=bool(bars) and getattr(bars[0], "kind", "") == "pickup",
        style=_label_text(labels.get("style"), lang),
        emotion=_label_text(labels.get("emotion"), lang),
    )


def describe_tune(record: Any, lang: str = "en") -> str:
    """A few sentences about a tune (the "describe" task's answer), from `tune_facts`; the
    phrasing varies per tune but is fixed for a given tune id."""
    f = tune_facts(record, lang)
    tune_id = getattr(record, "id", None) or hashlib.sha256(str(record).encode()).hexdigest()
    rng = random.Random(f"describe/{tune_id}/{lang}")
    key = key_name(f.key, lang)
    style = _style_in(f.style, lang) if f.style else None
    if lang == "zh":
        kind = style or "曲子"
        opening = rng.choice([f"这是一首{kind}，", f"这首作品是{kind}，", f"这段旋律属于{kind}，"])
        if f.title:
            opening = rng.choice([f"这首《{f.title}》是{kind}，", f"《{f.title}》是一首{kind}，"])
        parts = [opening + f"采用{key}（K:{f.key}），{f.meter}拍，共{f.bars}小节、{f.notes}个音符。"]
        if f.tempo:
            parts.append(f"速度为每分钟{f.tempo}个四分音符。")
        if f.lowest:
            parts.append(f"旋律音域从{f.lowest}到{f.highest}，跨度为{interval_name(f.span, 'zh')}。")
        if f.pickup:
            parts.append("乐曲以弱起小节开始。")
        if f.emotion:
            parts.append(rng.choice([f"整体情绪{f.emotion}。", f"听起来{f.emotion}。"]))
        return "".join(parts)
    kind = style or "tune"
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    opening = rng.choice([f"This is {article} {kind}", f"This piece is {article} {kind}",
                          f"The melody is {article} {kind}"])
    if f.title:
        opening = rng.choice([f"\"{f.title}\" is {article} {kind}", f"This {kind} is called \"{f.title}\""])
    parts = [f"{opening} in {key} (K:{f.key}) and {f.meter} time, {f.bars} bars long with "
             f"{f.notes} notes."]
    if f.tempo:
        parts.append(f"Its tempo is {f.tempo} quarter notes per minute.")
    if f.lowest:
        parts.append(f"The melody ranges from {f.lowest} to {f.highest}, a span of "
                     f"{interval_name(f.span, 'en')}.")
    if f.pickup:
        parts.append("It begins with a pickup (anacrusis).")
    if f.emotion:
        parts.append(rng.choice([f"Its mood is {f.emotion}.", f"It sounds {f.emotion}."]))
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Dataset builders
# --------------------------------------------------------------------------------------------
def build_pretraining_records(records: Iterable[Any], knowledge_docs: Sequence[str] = ()) -> list[dict]:
    """`{"text": ...}` rows: each tune's normalised ABC, then the knowledge documents."""
    rows = [{"text": r.abc.strip() + "\n"} for r in records]
    rows.extend({"text": doc.strip() + "\n"} for doc in knowledge_docs if doc.strip())
    return rows


def chat_record(request: ComposeRequest | None, user: str, answer: str, tune_id: str | None,
                task: str | None = None) -> dict:
    """One chat record: system prompt, user message, assistant answer, plus task/request/tune_id."""
    return {
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": user},
                     {"role": "assistant", "content": answer}],
        "task": task or (request.task if request else IDENTITY_TASK),
        "request": request.to_dict() if request else None,
        "tune_id": tune_id,
    }


def with_turns(chat: dict, user: str, answer: str, **fields: Any) -> dict:
    """A copy of a chat record (`chat_record`) with its user and assistant turns replaced (its
    system prompt kept) and any other top-level `fields` set."""
    system = chat["messages"][0]["content"]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]
    return {**chat, **fields, "messages": messages}


def _feasible(record: Any, task: str) -> bool:
    """Cheap checks for what a task needs (the expensive ones fail inside request_from_tune)."""
    n_bars = getattr(record, "n_bars", 0) or 0
    if task == "continue":
        return n_bars >= 4
    if task == "theme_chords":
        labels = _labels(record)
        return bool(getattr(record, "title", None) or labels.get("theme"))
    return True


def _as_rng(rng: random.Random | int | None, profile: Profile) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    return random.Random(profile.seed if rng is None else rng)


PHRASE_SHIFTS = tuple(range(-5, 7))  # semitones: every key a tune can be moved to, 0 included


def transposed(record: Any, semitones: int, chorded: bool = True) -> Any:
    """The tune (a TuneRecord or ABC text) moved by `semitones`, the same kind of thing back.
    A record keeps its labels; its labeller's chorded copy moves with it, so chord tasks don't
    fit chords anew (`chorded=False`: the copy is dropped instead, for requests without chords)."""
    if not semitones:
        return record
    text = abc.transpose(_text_of(record), semitones)
    if not (dataclasses.is_dataclass(record) and not isinstance(record, type)):
        return text
    labels = _labels(record)
    chorded_copy = _labelled_chords(record) if chorded else None
    if chorded_copy is not None:
        labels["abc_with_chords"] = abc.transpose(chorded_copy, semitones)
    else:
        labels.pop("abc_with_chords", None)
    return dataclasses.replace(record, abc=text, labels=labels)


def build_instruction_records(records: Sequence[Any], profile: Profile,
                              rng: random.Random | int | None = None, *,
                              identity: Sequence[dict] | None = None,
                              transposed_share: float = 0.0,
                              progress: bool = False, workers: int | None = None) -> list[dict]:
    """Chat records, `profile.instructions_per_tune` per tune, task kinds and languages dealt
    round-robin (a seeded order) so they stay balanced; identity Q&A appended when given
    (build_datasets passes it for the train split only). A tune that cannot serve its dealt
    task (too short to continue, no title for a theme...) takes the next kind in the deal.
    A `transposed_share` of the chats (build_datasets: the train split's,
    `profile.transposed_chat_share`) move their tune to a random other key first; that draw has
    its own rng, so every other chat is the same bytes at any share. Built in `workers`
    processes (`parallel.map_chunks`; None: one per core) with the same bytes as in one."""
    if not 0.0 <= transposed_share <= 1.0:
        raise ValueError(f"transposed_share must be in [0, 1], got {transposed_share!r}")
    rng = _as_rng(rng, profile)
    base = rng.randrange(2**32)  # per-tune rngs hang off this, so one tune's draws don't shift others
    deal = [(t, lang) for t in SFT_TASKS for lang in LANGS]
    rng.shuffle(deal)
    job = functools.partial(_instruction_chats, profile=profile, base=base, deal=tuple(deal),
                            transposed_share=transposed_share)
    out = map_chunks(job, records, workers=workers, desc="instructions" if progress else None)
    for pair in identity or ():
        out.append(chat_record(None, pair["question"], pair["answer"], None, IDENTITY_TASK))
    return out


def _instruction_chats(records: Sequence[Any], first: int, *, profile: Profile, base: int,
                       deal: tuple[tuple[str, str], ...], transposed_share: float) -> list[dict]:
    """build_instruction_records' chats for `records`, the tunes from index `first` on: the
    deal turns once per chat slot, so a chunk starts at turn `first * instructions_per_tune`."""
    per_tune = max(1, profile.instructions_per_tune)
    out: list[dict] = []
    turn = first * per_tune
    for record in records:
        for j in range(per_tune):
            tune_rng = random.Random(f"{base}/{record.id}/{j}")
            key_rng = random.Random(f"{base}/{record.id}/{j}/key")
            source = record
            if transposed_share and key_rng.random() < transposed_share:
                try:
                    source = transposed(record, key_rng.choice([s for s in PHRASE_SHIFTS if s]))
                except abc.ABCError:
                    source = record  # a tune transpose cannot read stays in its own key
            for attempt in range(len(deal)):
                task, lang = deal[(turn + attempt) % len(deal)]
                if not _feasible(source, task):
                    continue
                try:
                    request = request_from_tune(source, task, lang, tune_rng)
                    answer = target_for(source, request)
                except (ValueError, abc.ABCError):
                    continue  # this tune cannot serve this task: deal it the next kind
                user = render_prompt(request, rng=tune_rng)
                out.append(chat_record(request, user, answer, record.id))
                break
            turn += 1
    return out


PHRASE_TASK = "phrase"  # the records' task tag; their requests are ordinary "emotion" requests
PHRASE_BARS = (4, 8)


def phrase_request(record: Any, lang: str, rng: random.Random) -> tuple[ComposeRequest, str]:
    """One short chat's request and answer: the tune moved by a random interval, its opening
    4 or 8 bars (4 when the tune is shorter than 9) as the answer, and an "emotion" request that always names key and meter and
    asks for exactly that many bars. Raises ValueError when the tune is too short.

    Only the opening is moved (its bars plus one, header whole): a bar's transposition depends
    only on what comes before it, so the answer is the same bytes as when the whole tune is moved,
    at a fraction of the cost (this builder was most of notebook 01's dataset build)."""
    shift = rng.choice(PHRASE_SHIFTS)
    text = _normalized(_text_of(record))  # what transposing writes, bar for bar
    record = text if isinstance(record, str) else dataclasses.replace(record, abc=text)
    pickup = abc.check_bars(_tune_of(text)).bars[0].kind == "pickup"
    n_bars = count_bars(text)
    fits = [n for n in PHRASE_BARS if n_bars >= n + pickup + 1]  # a phrase, not the tune
    if not fits:
        raise ValueError(f"tune {getattr(record, 'id', '?')} is too short for a "
                         f"{PHRASE_BARS[0]}-bar phrase")
    take = rng.choice(fits) + pickup
    moved_record = transposed(_opening(record, take + 1), shift, chorded=False)
    moved = _tune_of(moved_record)
    request = request_from_tune(moved_record, "emotion", lang, rng)
    request = dataclasses.replace(request, key=moved.key, meter=moved.meter, bars=None)
    answer = close_phrase(_seed_bars(target_for(moved_record, request), take))
    return dataclasses.replace(request, bars=count_bars(answer)), answer


def _opening(record: Any, n_bars: int) -> Any:
    """The record (or text) cut at the end of the line that holds its `n_bars`-th bar (lines
    continued with a backslash go with it), header and labels kept."""
    text = _text_of(record)
    _, spans = abc.bar_segments(text)
    if len(spans) <= n_bars:
        return record
    cut = text.find("\n", max(end for _, end in spans[:n_bars]))
    while cut >= 0 and text[:cut].rstrip().endswith("\\"):
        cut = text.find("\n", cut + 1)
    if cut < 0:
        return record
    head = text[:cut + 1]
    return head if isinstance(record, str) else dataclasses.replace(record, abc=head)


def close_phrase(text: str) -> str:
    """A tune's opening bars made a tune of their own: the barline they were cut at becomes a
    final `|]`, or `:|` where a repeat is still open (a cut at `::` or inside `|: ... :|`), so
    the strict validator accepts it. Raises ValueError when neither gives valid ABC, and for a
    cut just after a repeat opens (`|:`): such phrases were never closed, and closing them now
    would change which tunes give phrase chats (the datasets' bytes)."""
    body = text.rstrip()
    if not (body.endswith(":") and not body.endswith("::")):  # not cut just after a |:
        body = body[:abc.trailing_barlines_start(body)]
        for closing in ("|]", ":|"):
            if abc.validate(body + closing + "\n").ok:
                return body + closing + "\n"
    raise ValueError("cannot close the phrase with |] or :|")


def phrase_records(records: Sequence[Any], profile: Profile,
                   rng: random.Random | int | None = None, *, progress: bool = False,
                   workers: int | None = None) -> list[dict]:
    """`profile.phrase_chats_per_tune` short chats per tune (train split only, like identity).

    Why: a full-tune answer carries its key and meter in two header tokens out of hundreds, and a
    small model trained for an hour learns to ignore the request (see the model card's prompt
    test). These chats are short, always state key, meter and length, and move the tune to a
    random key so the request, not the melody, decides K:. Tunes too short for a phrase are
    skipped (none of the corpus's are: its tunes have >= `min_bars` bars). Built in `workers`
    processes (`parallel.map_chunks`; None: one per core) with the same bytes as in one."""
    rng = _as_rng(rng, profile)
    job = functools.partial(_phrase_chats, profile=profile, base=rng.randrange(2**32))
    return map_chunks(job, records, workers=workers, desc="phrases" if progress else None)


def _phrase_chats(records: Sequence[Any], first: int, *, profile: Profile, base: int) -> list[dict]:
    """phrase_records' chats for `records` (each tune's draws hang off `base` and its id only)."""
    out: list[dict] = []
    for record in records:
        for j in range(profile.phrase_chats_per_tune):
            tune_rng = random.Random(f"{base}/{record.id}/phrase{j}")
            lang = LANGS[tune_rng.randrange(len(LANGS))]
            try:
                request, answer = phrase_request(record, lang, tune_rng)
            except (ValueError, abc.ABCError):
                continue
            user = render_prompt(request, rng=tune_rng)
            out.append(chat_record(request, user, answer, record.id, PHRASE_TASK))
    return out


def to_xtuner(chat_records: Iterable[dict]) -> list[dict]:
    """XTuner's single-turn custom-dataset form `{"conversation": [{"system","input","output"}]}`
    (what its docs recommend for custom data and what `openai_map_fn` produces from
    `{"messages": ...}`; use it with `dataset_map_fn=None`). The flat Alpaca variant
    (`instruction`/`input`/`output`, mapped by `alpaca_map_fn`) has no system field, so we
    don't write it."""
    rows = []
    for rec in chat_records:
        system, turns, pending = "", [], None
        for msg in rec["messages"]:
            if msg["role"] == "system":
                system = msg["content"]
            elif msg["role"] == "user":
                pending = msg["content"]
            elif msg["role"] == "assistant" and pending is not None:
                turn = {"input": pending, "output": msg["content"]}
                if not turns:
                    turn = {"system": system, **turn}
                turns.append(turn)
                pending = None
        rows.append({"conversation": turns})
    return rows


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class DatasetFiles:
    """Where `build_datasets` wrote the two training sets and their manifest."""

    data_dir: Path
    pt_train: Path
    pt_validation: Path
    pt_test: Path
    sft_train: Path
    sft_validation: Path
    sft_test: Path
    xtuner_sft_train: Path
    manifest: Path
    reused: bool = dataclasses.field(default=False, compare=False)  # build_datasets found them made

    def as_dict(self) -> dict[str, str]:
        """Name -> path string (for printing in a notebook)."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "reused"}

    @classmethod
    def under(cls, data_dir: Path) -> "DatasetFiles":
        """The standard file names under a data folder."""
        d = Path(data_dir)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("data_dir", "manifest", "reused")]
        return cls(data_dir=d, manifest=d / "datasets_manifest.json",
                   **{n: d / f"{n}.jsonl" for n in names})


def _settings(profile: Profile, knowledge_dir: Path) -> dict:
    """The knobs that shape the datasets: a change here means the files must be rebuilt."""
    keys = ("corpus_sources", "max_tunes", "max_tune_chars", "min_bars", "max_bar_errors",
            "transpositions",
            "val_fraction", "test_fraction", "instructions_per_tune", "phrase_chats_per_tune",
            "transposed_chat_share", "dataset_train_tunes", "seed")
    out: dict[str, Any] = {k: getattr(profile, k) for k in keys}
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
    out["knowledge_dir"] = Path(knowledge_dir).name  # name only: paths differ between machines
    out["knowledge_in"] = "pt_train only (validation/test are tunes only, so their loss measures music)"
    out["identity_in"] = "sft_train only"
    return out


def corpus_digest(records: Iterable[Any]) -> str:
    """sha256 over the tune records (every field, in order): the datasets' provenance, so
    `load_datasets` can tell when tunes.jsonl changed under them."""
    h = hashlib.sha256()
    for r in records:
        # a record's fields as they are: the JSON of dataclasses.asdict, without its deep copy
        row = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)} \
            if dataclasses.is_dataclass(r) else dict(r)
        h.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
    return h.hexdigest()


def knowledge_digest(knowledge_dir: Path | str = KNOWLEDGE_DIR) -> str:
    """sha256 over the knowledge documents and identity pairs the datasets were built from."""
    payload = {"docs": load_knowledge(knowledge_dir), "identity": read_identity(Path(knowledge_dir))}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def dataset_counts(rows: Iterable[dict]) -> dict:
    """Counts per task kind, per language and per (task, language) of chat records; for
    `{"text"}` rows, the count and characters."""
    rows = list(rows)
    if rows and "messages" not in rows[0]:
        return {"records": len(rows), "chars": sum(len(r.get("text", "")) for r in rows)}
    lang = [((r.get("request") or {}).get("lang") or _lang_of(r)) for r in rows]
    return {
        "records": len(rows),
        "by_task": dict(sorted(Counter(r["task"] for r in rows).items())),
        "by_lang": dict(sorted(Counter(lang).items())),
        "by_task_lang": {f"{t}/{lg}": n for (t, lg), n in
                         sorted(Counter(zip((r["task"] for r in rows), lang)).items())},
    }


def _lang_of(row: dict) -> str:
    user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
    return "zh" if re.search(r"[\u4e00-\u9fff]", user) else "en"


def build_datasets(profile: Profile, corpus_result: Any, progress: bool = True,
                   knowledge_dir: Path | str = KNOWLEDGE_DIR, use_cache: bool = True) -> DatasetFiles:
    """Write both training sets under `profile.run_dir/"data"`: pt_{split}.jsonl (knowledge in
    train only), sft_{split}.jsonl (identity Q&A in train only), xtuner_sft_train.jsonl and
    datasets_manifest.json (counts, sha256 per file, settings). Same inputs, same bytes. Each
    file is written atomically, the manifest last, and builds of one folder take turns (a lock
    file in it), so two notebooks building at once never truncate each other's files.
    Same inputs, same bytes, so a second build is a lookup: when the folder holds a build from
    the same tunes, knowledge, settings and builder code (`builder_digest`) whose files still
    match their sha256, it is reused (`files.reused`; `use_cache=False` rebuilds)."""
    records = list(getattr(corpus_result, "records", corpus_result))
    unknown = sorted({r.split for r in records} - set(SPLITS))
    if unknown:
        raise ValueError(f"records with split {unknown}: run corpus.split_by_family first "
                         "(or corpus.assemble_corpus, which does)")
    files = DatasetFiles.under(profile.run_dir / "data")
    with jsonl.folder_lock(files.data_dir):
        why = _stale_reason(profile, files, knowledge_dir, records) if use_cache else "use_cache=False"
        if why is None:
            _log.info("reusing the datasets in %s: same tunes, knowledge, settings and code", files.data_dir)
            files.reused = True
            return files
        _log.info("building the datasets in %s: %s", files.data_dir, why)
        _write_datasets(profile, records, files, progress, knowledge_dir)
    return files


def _build_stamp(profile: Profile, records: Sequence[Any] | None, knowledge_dir: Path | str,
                 loading: bool = False) -> dict:
    """The manifest entries that say what a build was made from (compared before reusing it).
    `loading=True` is load_datasets' view of them (see `_stale_reason`): without the builder's
    code and system prompt, without the knowledge when its folder is not there, and (as for
    any caller) without the tunes when `records` is None."""
    stamp: dict[str, Any] = {"settings": _settings(profile, Path(knowledge_dir))}
    if records is not None:
        stamp["corpus_sha256"] = corpus_digest(records)
    if not loading or Path(knowledge_dir).is_dir():
        stamp["knowledge_sha256"] = knowledge_digest(knowledge_dir)
    if not loading:
        stamp.update(builder_sha256=builder_digest(), system_prompt=SYSTEM_PROMPT)
    return stamp


# What a changed `_build_stamp` entry means, as `_stale_reason` says it.
_STAMP_CHANGED = {"settings": "built with other profile settings",
                  "corpus_sha256": "tunes.jsonl changed since they were built (other tunes)",
                  "knowledge_sha256": "data/knowledge changed since they were built",
                  "builder_sha256": "the builder's code changed since they were built (builder_digest)",
                  "system_prompt": "SYSTEM_PROMPT changed since they were built"}


def _stale_reason(profile: Profile, files: DatasetFiles, knowledge_dir: Path | str,
                  records: Sequence[Any] | None = None, loading: bool = False) -> str | None:
    """Why the dataset files under `files` are not the build these inputs make (None: they are,
    every file there and matching its sha256): each `_build_stamp` entry that differs from the
    manifest's, the tunes being `records`.

    build_datasets compares all of it. load_datasets (`loading=True`) reads the tunes from the
    data folder's tunes.jsonl (not compared when it is missing), compares the knowledge only
    when its folder is there, and never compares the code (`builder_digest`, SYSTEM_PROMPT): a
    code change that leaves the bytes as they were (most do) should not force a full
    rebuild before notebook 02; notebook 01's build_datasets is where a code change rebuilds."""
    manifest, why = _manifest_and_files_check(files)
    if why:
        return why
    if loading:
        from imelodist_lib import corpus

        tunes = files.data_dir / "tunes.jsonl"
        records = corpus.read_jsonl(tunes) if tunes.exists() else None
    stamp = _build_stamp(profile, records, knowledge_dir, loading=loading)
    return "; ".join(_STAMP_CHANGED[k] for k, v in stamp.items() if manifest.get(k) != v) or None


@functools.lru_cache(maxsize=1)
def builder_digest() -> str:
    """sha256 over the source of this module and every project module it imports (transitively,
    lazy imports included): a change to the code that writes the datasets makes old files stale."""
    import ast

    package = Path(__file__).parent
    todo, seen = [Path(__file__).stem], set()
    while todo:
        name = todo.pop()
        if name in seen or not (package / f"{name}.py").is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name):
                parts = node.module.split(".")
                todo += [a.name for a in node.names] if len(parts) == 1 else [parts[1]]
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith(package.name + ".")]
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(name.encode() + b"\n" + (package / f"{name}.py").read_bytes())
    return h.hexdigest()


def dataset_train_sample(train: Sequence[Any], profile: Profile) -> list:
    """The train tunes the datasets are built from: all of them, or (profile.dataset_train_tunes
    > 0) a seeded sample of that many, in corpus order."""
    k = profile.dataset_train_tunes
    if k < 0:
        raise ValueError(f"dataset_train_tunes must be >= 0 (0: all), got {k}")
    if not k or k >= len(train):
        return list(train)
    keep = sorted(random.Random(f"{profile.seed}/dataset-train-tunes").sample(range(len(train)), k))
    return [train[i] for i in keep]


def _write_datasets(profile: Profile, records: list, files: DatasetFiles, progress: bool,
                    knowledge_dir: Path | str) -> None:
    """build_datasets' work, under its folder lock: each file atomically, the manifest last."""
    by_split = {s: [r for r in records if r.split == s] for s in SPLITS}
    in_train = len(by_split["train"])
    by_split["train"] = dataset_train_sample(by_split["train"], profile)
    knowledge = load_knowledge(knowledge_dir)
    identity = read_identity(Path(knowledge_dir))
    counts: dict[str, Any] = {"pt": {}, "sft": {},
                              "train_tunes": {"in_split": in_train, "used": len(by_split["train"])}}
    for split in SPLITS:
        pt_rows = build_pretraining_records(by_split[split], knowledge if split == "train" else ())
        counts["pt"][split] = {"records": jsonl.write_jsonl(pt_rows, getattr(files, f"pt_{split}")),
                               "tunes": len(by_split[split]),
                               "knowledge_docs": len(knowledge) if split == "train" else 0}
        sft_rows = build_instruction_records(
            by_split[split], profile, random.Random(f"{profile.seed}/{split}"),
            identity=identity if split == "train" else None, progress=progress,
            transposed_share=profile.transposed_chat_share if split == "train" else 0.0)
        phrases = phrase_records(by_split[split], profile, random.Random(f"{profile.seed}/phrase"),
                                 progress=progress) if split == "train" else []
        sft_rows += phrases
        jsonl.write_jsonl(sft_rows, getattr(files, f"sft_{split}"))
        counts["sft"][split] = dataset_counts(sft_rows)
        # Nothing vanishes uncounted: tunes that could serve no task kind at all.
        made = sum(r["task"] not in (IDENTITY_TASK, PHRASE_TASK) for r in sft_rows)
        counts["sft"][split]["tunes_without_instruction"] = (
            len(by_split[split]) * max(1, profile.instructions_per_tune) - made)
        if split == "train":
            counts["sft"][split]["phrase_skipped"] = (
                len(by_split[split]) * profile.phrase_chats_per_tune - len(phrases))
        if split == "train":
            counts["xtuner_sft_train"] = jsonl.write_jsonl(to_xtuner(sft_rows), files.xtuner_sft_train)
    manifest = {
        **_build_stamp(profile, records, knowledge_dir),  # what the build was made from
        "counts": counts,
        "files": {name: {"path": Path(p).name, "sha256": _sha256(p)}
                  for name, p in files.as_dict().items() if name not in ("data_dir", "manifest")},
        "xtuner_format": "conversation: [{system, input, output}] (XTuner custom dataset, dataset_map_fn=None)",
    }
    jsonl.write_text_atomic(files.manifest, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")


def load_datasets(profile: Profile, build_if_missing: bool = True, progress: bool = True) -> dict:
    """{"pt": DatasetDict(train/validation/test of {"text"}), "sft": DatasetDict(chat records)}
    read from `profile.run_dir/"data"`. When the files are missing, were made with other
    settings, or tunes.jsonl changed since, they are rebuilt first (corpus.assemble_corpus +
    build_datasets), so notebooks 02/03 run even when 01 was not."""
    from datasets import Dataset, DatasetDict

    files = DatasetFiles.under(profile.run_dir / "data")
    with jsonl.folder_lock(files.data_dir):  # a build in another process finishes first
        stale = _stale_reason(profile, files, KNOWLEDGE_DIR, loading=True)
        if stale:
            if not build_if_missing:
                raise FileNotFoundError(f"datasets under {files.data_dir}: {stale}; run notebook 01 "
                                        "(or load_datasets(profile, build_if_missing=True))")
            from imelodist_lib import corpus

            _log.warning("%s the datasets in %s: %s", "building" if stale.startswith("missing")
                         else "rebuilding", files.data_dir, stale)
            build_datasets(profile, corpus.assemble_corpus(profile, progress=progress), progress=progress,
                           knowledge_dir=KNOWLEDGE_DIR)
        rows = {(kind, split): jsonl.read_jsonl(getattr(files, f"{kind}_{split}"))
                for kind in ("pt", "sft") for split in SPLITS}
    return {kind: DatasetDict({split: Dataset.from_list(rows[kind, split]) for split in SPLITS})
            for kind in ("pt", "sft")}


def _manifest_and_files_check(files: DatasetFiles) -> tuple[dict, str | None]:
    """The manifest, and why the files can't be trusted (None: all there, each its sha256)."""
    missing = [Path(p).name for n, p in files.as_dict().items() if n != "data_dir" and not Path(p).exists()]
    if missing:
        return {}, f"missing {', '.join(missing)}"
    try:
        manifest = json.loads(files.manifest.read_text(encoding="utf-8"))
        recorded = {entry["path"]: entry["sha256"] for entry in manifest["files"].values()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return {}, f"{files.manifest.name} is unreadable ({type(e).__name__}: {e})"
    for name, want in sorted(recorded.items()):
        have = _sha256(files.data_dir / name) if (files.data_dir / name).exists() else "missing"
        if have != want:
            return manifest, (f"{name} changed since it was built (sha256 {have[:12]} on disk, "
                              f"{want[:12]} in {files.manifest.name})")
    return manifest, None
