"""One composer, several engines: transformers (any local model, CPU too), LMDeploy in-process
(TurboMind / PyTorch engine, optional 4-bit AWQ) and any OpenAI-compatible server
(`lmdeploy serve api_server`, vLLM).

    composer = Composer()                       # the profile's model and backend
    [c] = composer.compose(ComposeRequest("emotion", emotion="欢快", meter="6/8"), seed=0)
    c.abc, c.report.ok, c.report.bars.error_rate

`compose(..., constrained=True)` decodes under the request's grammar (`imelodist_lib.grammar`),
so every bar closes at exactly the meter's length. Every answer comes back as a `Composition`
with the extracted, normalised ABC, its validation report, token counts, timings and the seed
that reproduces it.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imelodist_lib import abc
from imelodist_lib.grammar import (check_against_grammar, grammar_for_request, grammar_logits_processor,
                                   lmdeploy_response_format, stop_token_ids, token_budget,
                                   vllm_structured_outputs)
from imelodist_lib.instructions import (ComposeRequest, neutralize_special_tokens, render_prompt,
                                        user_turns_as_data)
from imelodist_lib.profiles import SYSTEM_PROMPT, Profile, get_profile

BACKENDS = ("auto", "transformers", "lmdeploy", "openai")
SERVERS = ("lmdeploy", "vllm", "generic")  # what an OpenAI-compatible server is, for its grammar field
DEFAULT_BASE_URL = "http://127.0.0.1:23333/v1"
SERVED_MODEL_NAME = "imelodist"
CONSTRAINED_MIN_NEW_TOKENS = 1024  # default budget in constrained mode: room for a 32-bar tune
SERVE_HINT = ("serve_lmdeploy(MODEL_DIR) (it runs .venv-lmdeploy/bin/lmdeploy serve api_server MODEL_DIR "
              "--model-name imelodist --chat-template internlm2 --server-name 127.0.0.1 --server-port 23333 "
              "--api-keys KEY; make lmdeploy-env first)")
GUIDED_ROUTES = ("Composer(backend='lmdeploy') in LMDeploy's own environment (its in-process pipeline "
                 "compiles the grammar), a vLLM server with Composer(server='vllm'), or "
                 "backend='transformers'")


class GrammarNotEnforcedError(RuntimeError):
    """A constrained answer that is not in the request's grammar: the engine dropped the grammar."""


@dataclass
class Composition:
    """One answer: the extracted ABC, the raw text and how it was made."""

    abc: str | None  # first tune in the answer, normalised (None: no parseable tune)
    text: str  # the full answer as generated
    request: ComposeRequest | None
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # wall time of the call that produced it (shared by a batch of n)
    first_token_seconds: float | None  # time until the first generated token
    report: Any = None  # abc.ValidationReport of `abc` (None for prose or no tune)
    backend: str = ""
    constrained: bool = False
    seed: int | None = None
    finish_reason: str = "stop"  # "stop" (EOS) or "length" (hit max_new_tokens)
    messages: list[dict] = field(default_factory=list)  # the conversation incl. this answer

    @property
    def ok(self) -> bool:
        """True when the answer holds a tune that parses and has no bar-duration errors."""
        return self.report is not None and bool(self.report.ok) and not self.report.bars.errors

    @property
    def bar_errors(self) -> int | None:
        """Bars whose length differs from the meter's (None when no tune parsed)."""
        if self.report is None or self.report.bars is None:
            return None
        return len(self.report.bars.errors)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Raw:
    """What an engine returns for one sample, before ABC extraction."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    first_token_seconds: float | None
    finish_reason: str


@dataclass
class _Sampling:
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int


# ------------------------------------------------------------------------------ ABC extraction

MAX_ANSWER_CHARS = 300_000  # longest answer extract_abc reads (~100x a model answer; ~10 s worst)
_FENCE_INFO = re.compile(r"[A-Za-z0-9_-]*")  # a fence's language word ("abc", "", "text")
_FIELD_LINE = re.compile(r"^\s*[A-Za-z]:")
_INLINE_FIELD = re.compile(r"(?<!\S)([A-Za-z]):")


def _split_inline_header(line: str) -> str:
    """'X:1 L:1/8 M:4/4 K:Emin |: E2 EF ...' -> one field per line, then the body. Only a line
    holding a whole header (its fields up to K:) that starts with a field of values (X: L: M:
    Q:) is split: a title is free text ('T:The M: line', 'T:Gr. K: Lee.' are titles)."""
    marks = list(_INLINE_FIELD.finditer(line))
    if len(marks) < 2 or marks[0].start() != len(line) - len(line.lstrip()) \
            or marks[0].group(1) not in abc.ONE_LINE_FIELDS or not any(m.group(1) == "K" for m in marks[1:]):
        return line
    out = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(line)
        value = line[mark.end():end].strip()
        if mark.group(1) == "K":
            key, _, body = value.partition(" ")
            # a mode word may follow the key ("K:E minor"); music starts at the first bar line/note run
            if body and re.match(r"^(maj|min|m|dor|phr|lyd|mix|aeo|loc|major|minor)\w*\b", body, re.I):
                mode, _, body = body.partition(" ")
                key = f"{key} {mode}"
            out.append(f"K:{key}")
            if body.strip():
                out.append(body.strip())
            return "\n".join(out)
        out.append(f"{mark.group(1)}:{value}")
    return "\n".join(out)


def _looks_like_music(line: str) -> bool:
    """A body line: bar lines or fields, or no prose word (prose words have letters that are no
    note, rest or decoration: 'This', 'the'; note runs such as 'DDDG' or 'TBcd' are music)."""
    stripped = line.strip()
    if not stripped:
        return False
    if "|" in stripped or _FIELD_LINE.match(stripped) or stripped.startswith("%"):
        return True
    # chord symbols, annotations, !decorations! and inline fields may hold any letters
    # (an inline field stops at the next "[": "[A:[A:[A:..." with no "]" stays linear)
    clean = re.sub(r'"[^"]*"|![^!]*!|\+[^+]*\+|\[[A-Za-z]:[^\]\[]*\]', " ", stripped)
    prose = [w for w in re.findall(r"[A-Za-z]{2,}", clean) if len(re.findall(r"[H-WYh-wy]", w)) >= 2]
    return not prose and bool(re.search(r"[A-Ga-gz]", clean))


def _tune_candidates(block: str) -> list[str]:
    """Cut one text block into tune texts: each starts at an X: (or a header run ending in K:)."""
    lines = [_split_inline_header(l) for l in block.replace("\r\n", "\n").split("\n")]
    lines = "\n".join(lines).split("\n")
    tunes, current, in_body = [], [], False
    for line in lines:
        stripped = line.strip()
        starts_tune = bool(re.match(r"^X:\s*\d*", stripped))
        if starts_tune and current:
            tunes.append(current)
            current, in_body = [], False
        if not current:
            if _FIELD_LINE.match(stripped) and not stripped.startswith("%"):
                current = [stripped]
            continue
        if not in_body:
            if _FIELD_LINE.match(stripped):
                current.append(stripped)
                in_body = stripped.startswith("K:")
            elif stripped:
                current = [] if not any(c.startswith("K:") for c in current) else current
            continue
        if _looks_like_music(line):
            current.append(line.rstrip())
        else:
            tunes.append(current)
            current, in_body = [], False
    if current:
        tunes.append(current)
    texts = []
    for tune in tunes:
        if not any(l.startswith("K:") for l in tune):
            continue
        if not tune[0].startswith("X:"):
            tune = ["X:1", *tune]
        texts.append("\n".join(tune))
    return texts


def _fenced_blocks(text: str) -> list[str]:
    """The contents of ```-fenced blocks (an unclosed fence runs to the end), in one pass.

    A fence opens with three backticks, an optional language word and a line break; it closes
    at the next three backticks. (The regex this replaces was quadratic on a fence followed by
    a long run of spaces.)
    """
    blocks: list[str] = []
    pos = 0
    while (start := text.find("```", pos)) >= 0:
        run_end = start + 3
        while run_end < len(text) and text[run_end] == "`":
            run_end += 1  # in a longer run of backticks only the last three can open a fence
        line_end = text.find("\n", run_end)
        if line_end < 0:
            break
        if _FENCE_INFO.fullmatch(text[run_end:line_end].strip(" \t")) is None:
            pos = run_end
            continue
        close = text.find("```", line_end + 1)
        blocks.append(text[line_end + 1:] if close < 0 else text[line_end + 1:close])
        pos = len(text) if close < 0 else close + 3
    return blocks


def extract_abc(text: str) -> list[str]:
    """Every parseable ABC tune in a free-form answer, normalised (code fences, several tunes,
    prose around them, the one-line 'X:1 L:1/8 M:4/4 K:Emin |: E2 EF ...' form).

    Linear in the text; abc.ABCError for text over MAX_ANSWER_CHARS."""
    if not isinstance(text, str):
        raise abc.ABCError(f"expected the answer as text (str), got {type(text).__name__}")
    if len(text) > MAX_ANSWER_CHARS:
        raise abc.ABCError(f"answer is {len(text):,} characters, over the {MAX_ANSWER_CHARS:,} "
                           "extract_abc reads (inference.MAX_ANSWER_CHARS)")
    blocks = _fenced_blocks(text) or [text]
    found = []
    for block in blocks:
        for candidate in _tune_candidates(block):
            try:
                found.append(abc.normalize(candidate))
            except (abc.ABCError, ValueError):
                continue
    return found


# ------------------------------------------------------------------------------ engines


def _friendly_oom(err: BaseException) -> MemoryError:
    return MemoryError("the GPU ran out of memory while generating: lower n (the batch), "
                       "max_new_tokens or LMDeploy's cache_max_entry_count (e.g. 0.2), or load "
                       f"4-bit AWQ weights (model_format='awq'). ({str(err).splitlines()[0]})")


def _is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError"


class _FirstTokenClock:
    """A no-op logits processor that notes when the first token's logits are ready."""

    def __init__(self, start: float):
        self.start, self.first = start, None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter() - self.start
        return scores


SMALL_MODEL_PARAMS = 50_000_000
LEAN_BATCH_ROWS = 16  # rows decoded at once on the lean path (answers beyond wait for a free row)


@contextmanager
def _torch_threads(threads: int | None):
    """Run a block with `threads` intra-op CPU threads, then restore the setting."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _TransformersEngine:
    name = label = "transformers"

    def __init__(self, model, tokenizer, profile: Profile, cpu_threads: int | None = None,
                 fast_decode: bool = True):
        import torch

        if isinstance(model, (str, Path)):
            from imelodist_lib.models import load_model

            model, tokenizer = load_model(model, profile)
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: Composer(model=model, tokenizer=tokenizer)")
        self.model, self.tokenizer = model, tokenizer
        if profile.is_gpu and torch.cuda.is_available() and model.device.type == "cpu" \
                and not getattr(model, "hf_device_map", None):
            self.model = model.to("cuda")
        self.stop_ids = stop_token_ids(tokenizer)
        # A few-million-parameter model decodes fastest on one CPU thread: its matrices are too
        # small to split, and extra threads only wait on each other (measured: 20x slower on 2
        # busy cores). Bigger models keep torch's default.
        small = sum(p.numel() for p in self.model.parameters()) < SMALL_MODEL_PARAMS
        self.threads = cpu_threads or (1 if self.model.device.type == "cpu" and small else None)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # A small Llama on the CPU decodes through the lean loop (imelodist_lib.fast_decode): same
        # tokens, several times faster, and many answers at once; everything else uses generate.
        self.lean = None
        if fast_decode and small and self.model.device.type == "cpu":
            from imelodist_lib import fast_decode as lean

            if lean.supports(self.model) is None:
                self.lean = lean.LeanLlama(self.model)

    @property
    def utf8_table(self):
        """The UTF-8 mask's transition table for this tokenizer (imelodist_lib.utf8), built once:
        every answer on this engine stays valid UTF-8, whatever the model's byte tokens say."""
        if getattr(self, "_utf8_table", None) is None:
            from imelodist_lib.utf8 import build_table

            self._utf8_table = build_table(self.tokenizer, self.model.config.vocab_size)
        return self._utf8_table

    def _lean_model(self):
        """The lean copy of the weights, read again when the model changed (e.g. was trained)."""
        from imelodist_lib.fast_decode import LeanLlama

        if self.lean.stale():
            self.lean = LeanLlama(self.model)
        return self.lean

    def _lean_rows(self, jobs: list[tuple[list[dict], str | None, int]], n: int, sampling: _Sampling):
        """One fast_decode.Row per answer: n per (messages, grammar, seed) job, seeds seed..seed+n-1."""
        from imelodist_lib.fast_decode import Row
        from imelodist_lib.grammar import compile_grammar

        rows = []
        for messages, grammar, seed in jobs:
            prompt = self._inputs(messages)["input_ids"][0].tolist()
            compiled = None if grammar is None else compile_grammar(
                self.tokenizer, grammar, vocab_size=self.model.config.vocab_size)
            rows += [Row(prompt, seed + i, compiled) for i in range(n)]
        return rows

    def _lean_sampling(self, sampling: _Sampling):
        from imelodist_lib.fast_decode import Sampling

        return Sampling(sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens)

    def generate_many(self, jobs: list[tuple[list[dict], str | None, int]], n: int, sampling: _Sampling,
                      budgets: list[int] | None = None) -> list[list[_Raw]]:
        """n answers to each (messages, grammar, seed) job, job j with at most budgets[j] new
        tokens (None: sampling's); one batch on the lean path (answer i of a job is what
        seed + i gives alone), one generate call per job otherwise."""
        budgets = budgets or [sampling.max_new_tokens] * len(jobs)
        if self.lean is None:
            return [self.generate(messages, n, _Sampling(sampling.temperature, sampling.top_p, sampling.top_k,
                                                         budget, seed), grammar)
                    for (messages, grammar, seed), budget in zip(jobs, budgets)]
        from imelodist_lib.fast_decode import decode

        rows = self._lean_rows(jobs, n, sampling)
        for j, budget in enumerate(budgets):
            for row in rows[j * n:(j + 1) * n]:
                row.max_new_tokens = budget
        start = time.perf_counter()
        with _torch_threads(self.threads):
            results = decode(self._lean_model(), rows, self._lean_sampling(sampling), self.stop_ids,
                             batch_size=LEAN_BATCH_ROWS, utf8=self.utf8_table)
        seconds = time.perf_counter() - start
        raws = []
        for row, result in zip(rows, results):
            stopped = result.finish_reason == "stop"
            tokens = result.tokens[:-1] if stopped else result.tokens
            raws.append(_Raw(self.tokenizer.decode(tokens, skip_special_tokens=True), len(row.prompt),
                             len(result.tokens), seconds, result.first_token_seconds, result.finish_reason))
        return [raws[i * n:(i + 1) * n] for i in range(len(jobs))]

    def _lean_stream(self, messages: list[dict], sampling: _Sampling, grammar: str | None) -> Iterator[str]:
        """The lean path's answer as text pieces, a piece whenever a token completes characters."""
        from imelodist_lib.fast_decode import iter_decode

        rows = self._lean_rows([(messages, grammar, sampling.seed)], 1, sampling)
        tokens, shown = [], 0
        with _torch_threads(self.threads):
            for _, token in iter_decode(self._lean_model(), rows, self._lean_sampling(sampling), self.stop_ids,
                                        utf8=self.utf8_table):
                if token in self.stop_ids:
                    break
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > shown and not text.endswith("\ufffd"):  # wait for a whole character
                    yield text[shown:]
                    shown = len(text)

    def _inputs(self, messages: list[dict]):
        if not getattr(self.tokenizer, "chat_template", None):
            from imelodist_lib.models import CHAT_TEMPLATE

            self.tokenizer.chat_template = CHAT_TEMPLATE
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_dict=True, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in enc.items()}

    def _gen_kwargs(self, sampling: _Sampling, grammar: str | None, n: int, start: float):
        import torch
        from transformers import LogitsProcessorList

        from imelodist_lib.utf8 import Utf8LogitsProcessor

        clock = _FirstTokenClock(start)
        processors = [Utf8LogitsProcessor(self.tokenizer, table=self.utf8_table), clock]
        if grammar is not None:
            processors.insert(0, grammar_logits_processor(
                self.tokenizer, grammar, vocab_size=self.model.config.vocab_size))
        torch.manual_seed(sampling.seed)
        sample = sampling.temperature > 0
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                      num_return_sequences=n, eos_token_id=self.stop_ids,
                      pad_token_id=self.tokenizer.pad_token_id,
                      logits_processor=LogitsProcessorList(processors))
        if sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        return kwargs, clock

    def generate(self, messages: list[dict], n: int, sampling: _Sampling, grammar: str | None) -> list[_Raw]:
        import torch

        if self.lean is not None:
            return self.generate_many([(messages, grammar, sampling.seed)], n, sampling)[0]
        inputs = self._inputs(messages)
        start = time.perf_counter()
        kwargs, clock = self._gen_kwargs(sampling, grammar, n, start)
        try:
            with torch.no_grad(), _torch_threads(self.threads):
                out = self.model.generate(**inputs, **kwargs)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if _is_oom(err):
                raise _friendly_oom(err) from err
            raise
        seconds = time.perf_counter() - start
        prompt_len = inputs["input_ids"].shape[1]
        raws = []
        for row in out[:, prompt_len:].tolist():
            stop_at = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            tokens = row if stop_at is None else row[:stop_at]
            raws.append(_Raw(self.tokenizer.decode(tokens, skip_special_tokens=True), prompt_len,
                             len(tokens) + (stop_at is not None), seconds, clock.first,
                             "length" if stop_at is None else "stop"))
        return raws

    def stream(self, messages: list[dict], sampling: _Sampling, grammar: str | None) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        if self.lean is not None:
            yield from self._lean_stream(messages, sampling, grammar)
            return
        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs, _ = self._gen_kwargs(sampling, grammar, 1, time.perf_counter())
        errors: list[BaseException] = []

        def run():
            try:
                with _torch_threads(self.threads):
                    self.model.generate(**inputs, **kwargs, streamer=streamer)
            except BaseException as err:  # surfaced in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if errors:
            raise _friendly_oom(errors[0]) if _is_oom(errors[0]) else errors[0]


class _LMDeployEngine:
    """LMDeploy in-process: `lmdeploy.pipeline` with the InternLM2 chat template (CUDA only)."""

    name = label = "lmdeploy"

    def __init__(self, model: str, engine: str = "turbomind", model_format: str | None = None,
                 cache_max_entry_count: float = 0.5, session_len: int = 4096, tp: int = 1):
        if importlib.util.find_spec("lmdeploy") is None:
            raise ImportError("lmdeploy is not installed in this environment (it pins torch<=2.12.1, "
                              "peft<=0.14): run `make lmdeploy-env` and use .venv-lmdeploy, or use "
                              "backend='openai' against `lmdeploy serve api_server` / backend='transformers'")
        if not Path(str(model)).expanduser().is_dir() and not re.match(r"^[\w.-]+/[\w.-]+$", str(model)):
            raise FileNotFoundError(f"model directory {model} does not exist: pass the merged model "
                                    "folder (runs/gpu/sft/merged) or set IMELODIST_COMPOSER_MODEL")
        from lmdeploy import ChatTemplateConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline

        if engine == "turbomind":
            config = TurbomindEngineConfig(model_format=model_format, tp=tp, session_len=session_len,
                                           cache_max_entry_count=cache_max_entry_count)
        elif engine == "pytorch":
            config = PytorchEngineConfig(tp=tp, session_len=session_len,
                                         cache_max_entry_count=cache_max_entry_count)
        else:
            raise ValueError(f"unknown LMDeploy engine {engine!r}: choose 'turbomind' or 'pytorch'")
        template = ChatTemplateConfig(model_name="internlm2", meta_instruction=SYSTEM_PROMPT)
        try:
            self.pipe = pipeline(str(model), backend_config=config, chat_template_config=template)
        except (RuntimeError, MemoryError) as err:
            if _is_oom(err):
                raise _friendly_oom(err) from err
            raise

    @staticmethod
    def _config(sampling: _Sampling, seed: int, grammar: str | None = None):
        from lmdeploy import GenerationConfig

        # do_sample must be set explicitly: LMDeploy's default is greedy decoding. The grammar goes
        # in as an xgrammar structural tag; TurboMind decodes unconstrained (with a logged warning)
        # when a format fails to compile, which the check on arrival (Composer._finish) catches.
        return GenerationConfig(do_sample=sampling.temperature > 0, temperature=max(sampling.temperature, 1e-5),
                                top_p=sampling.top_p, top_k=sampling.top_k,
                                max_new_tokens=sampling.max_new_tokens, random_seed=seed,
                                response_format=lmdeploy_response_format(grammar) if grammar else None)

    def generate(self, messages: list[dict], n: int, sampling: _Sampling, grammar: str | None) -> list[_Raw]:
        start = time.perf_counter()
        try:
            outs = [self.pipe([messages], gen_config=self._config(sampling, sampling.seed + i, grammar))[0]
                    for i in range(n)]
        except RuntimeError as err:
            if _is_oom(err):
                raise _friendly_oom(err) from err
            raise
        seconds = time.perf_counter() - start
        return [_Raw(o.text, o.input_token_len, o.generate_token_len, seconds, None,
                     "length" if o.finish_reason == "length" else "stop") for o in outs]

    def stream(self, messages: list[dict], sampling: _Sampling, grammar: str | None) -> Iterator[str]:
        for out in self.pipe.stream_infer([messages], gen_config=self._config(sampling, sampling.seed, grammar)):
            if out.text:
                yield out.text


class _OpenAIEngine:
    """Any OpenAI-compatible chat server. A grammar travels as the server kind takes it: vLLM's
    `structured_outputs.grammar`, `extra_body[grammar_field]` for others; LMDeploy's api_server
    takes none (its response_format has no grammar type, and the ABC grammar has no regex of
    workable size: benchmarks/results/guided_payloads.json)."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str, model: str | None, timeout: float,
                 grammar_field: str | None, server: str | None = None):
        import openai

        if server is not None and server not in SERVERS:
            raise ValueError(f"unknown server kind {server!r}: choose one of {list(SERVERS)} "
                             "(None: read it from GET /v1/models)")
        self.openai, self.base_url = openai, base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.owner = None
        if model is None or server is None:
            model, self.owner = self._served_model(model)
        self.model = model
        self.server = server or (self.owner if self.owner in ("lmdeploy", "vllm") else "generic")
        default_field = {"vllm": "structured_outputs.grammar", "generic": "guided_grammar"}.get(self.server)
        self.grammar_field = default_field if grammar_field is None else grammar_field
        self.label = f"{'the' if self.server == 'generic' else self.server} server at {self.base_url}"

    def _explain(self, err: Exception) -> Exception:
        if isinstance(err, self.openai.APITimeoutError):
            return TimeoutError(f"the server at {self.base_url} did not answer in time: raise "
                                "Composer(timeout=...) or lower max_new_tokens")
        if isinstance(err, self.openai.APIConnectionError):
            return ConnectionError(f"cannot reach an OpenAI-compatible server at {self.base_url}: start "
                                   f"one with `{SERVE_HINT}` (or vLLM), or pass base_url=...")
        if isinstance(err, self.openai.AuthenticationError):
            return PermissionError(f"the server at {self.base_url} refused the API key: pass "
                                   "Composer(api_key=...) with the key it was started with "
                                   "(serve_lmdeploy(...).composer() sends it)")
        if isinstance(err, self.openai.NotFoundError):
            return LookupError(f"the server at {self.base_url} does not serve model {getattr(self, 'model', None)!r}: "
                               "pass Composer(served_model=...) with a name from GET /v1/models")
        if isinstance(err, self.openai.APIStatusError):
            return RuntimeError(f"the server at {self.base_url} refused the request "
                                f"({err.status_code}): {str(err)[:300]}")
        return err

    def _served_model(self, wanted: str | None) -> tuple[str, str | None]:
        """The model to ask for (`wanted`, else "imelodist", else the first served) and who serves
        it (GET /v1/models' `owned_by`: "lmdeploy" and "vllm" name themselves)."""
        try:
            models = self.client.models.list().data
        except self.openai.OpenAIError as err:
            raise self._explain(err) from err
        if not models:
            raise LookupError(f"the server at {self.base_url} serves no model")
        ids = [m.id for m in models]
        model = wanted or (SERVED_MODEL_NAME if SERVED_MODEL_NAME in ids else ids[0])
        owner = next((m.owned_by for m in models if m.id == model), models[0].owned_by)
        return model, str(owner).lower() if owner else None

    def grammar_fields(self, grammar: str) -> dict:
        """The request fields that carry `grammar` to this server (raises where it takes none)."""
        if self.server == "vllm" and self.grammar_field == "structured_outputs.grammar":
            return vllm_structured_outputs(grammar)
        if not self.grammar_field:
            if self.server == "lmdeploy":
                raise NotImplementedError(
                    f"LMDeploy's api_server ({self.base_url}) takes no grammar: its response_format "
                    "knows json_schema and regex_schema only, and the ABC grammar has no regex of "
                    "workable size. For guaranteed-valid ABC use " + GUIDED_ROUTES)
            raise NotImplementedError("this server takes no grammar: pass Composer(server='vllm') "
                                      "for vLLM, grammar_field=... for another server, or use " + GUIDED_ROUTES)
        fields: dict = {}
        node = fields
        *parents, leaf = self.grammar_field.split(".")  # e.g. "structured_outputs.grammar"
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = grammar
        return fields

    def _body(self, messages, sampling: _Sampling, seed: int, grammar: str | None, stream: bool) -> dict:
        extra: dict = {"top_k": sampling.top_k}
        if grammar is not None:
            extra.update(self.grammar_fields(grammar))
        return dict(model=self.model, messages=messages, temperature=sampling.temperature,
                    top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=seed,
                    stream=stream, extra_body=extra)

    def generate(self, messages: list[dict], n: int, sampling: _Sampling, grammar: str | None) -> list[_Raw]:
        raws = []
        for i in range(n):  # one request per sample: not every server honours n>1
            start = time.perf_counter()
            pieces, first, usage, finish = [], None, None, "stop"
            try:
                stream = self.client.chat.completions.create(
                    **self._body(messages, sampling, sampling.seed + i, grammar, True),
                    stream_options={"include_usage": True})
                for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            first = first if first is not None else time.perf_counter() - start
                            pieces.append(choice.delta.content)
                        if choice.finish_reason:
                            finish = choice.finish_reason
            except self.openai.OpenAIError as err:
                raise self._explain(err) from err
            text = "".join(pieces)
            raws.append(_Raw(text, usage.prompt_tokens if usage else 0,
                             usage.completion_tokens if usage else len(pieces),
                             time.perf_counter() - start, first, finish))
        return raws

    def stream(self, messages: list[dict], sampling: _Sampling, grammar: str | None) -> Iterator[str]:
        try:
            for chunk in self.client.chat.completions.create(
                    **self._body(messages, sampling, sampling.seed, grammar, True)):
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        yield choice.delta.content
        except self.openai.OpenAIError as err:
            raise self._explain(err) from err


def resolve_backend(backend: str) -> str:
    """'auto' -> 'lmdeploy' where CUDA and lmdeploy are importable, else 'transformers'."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    if importlib.util.find_spec("lmdeploy") is not None:
        import torch

        if torch.cuda.is_available():
            return "lmdeploy"
    return "transformers"


class Composer:
    """Compose, chat and stream with one model over one backend (see the module docstring).

    model: a local directory or hub id (default: the profile's `composer_model`), or a loaded
    transformers model with `tokenizer=`. backend: "transformers" | "lmdeploy" | "openai" |
    "auto" (default: the profile's; "openai" when `base_url` is given). OpenAI: `base_url`,
    `api_key`, `served_model` (default: "imelodist" or the server's first model), `timeout`,
    `server` (what the server is: "lmdeploy" | "vllm" | "generic"; None: read from GET
    /v1/models), `grammar_field` (request field for EBNF grammars; None: the server's own, i.e.
    vLLM's "structured_outputs.grammar", "guided_grammar" for a generic server, none for
    LMDeploy's api_server; "guided_grammar" for vLLM older than `structured_outputs`; "" where the
    server takes none).
    LMDeploy: `engine` ("turbomind" | "pytorch"), `model_format` ("awq" for 4-bit AWQ weights),
    `cache_max_entry_count` (share of free GPU memory for the KV cache).
    transformers: `fast_decode` (default True) decodes a small Llama on the CPU through
    `imelodist_lib.fast_decode` (same tokens, several times faster, batched); False: `generate`.

    Every constrained answer is checked on arrival against its grammar and `abc.validate`: an
    engine that dropped the grammar raises `GrammarNotEnforcedError` naming it.
    """

    def __init__(self, model: Any = None, backend: str | None = None, profile: Profile | None = None,
                 tokenizer: Any = None, base_url: str | None = None, api_key: str = "EMPTY",
                 served_model: str | None = None, timeout: float = 120.0,
                 grammar_field: str | None = None, engine: str = "turbomind",
                 model_format: str | None = None, cache_max_entry_count: float = 0.5,
                 cpu_threads: int | None = None, server: str | None = None, fast_decode: bool = True):
        self.profile = profile or get_profile()
        backend = backend or ("openai" if base_url else self.profile.backend)
        self.backend = resolve_backend(backend)
        model = self.profile.composer_model if model is None else model
        if self.backend == "transformers":
            self.engine: Any = _TransformersEngine(model, tokenizer, self.profile, cpu_threads, fast_decode)
        elif self.backend == "lmdeploy":
            self.engine = _LMDeployEngine(str(model), engine=engine, model_format=model_format,
                                          cache_max_entry_count=cache_max_entry_count,
                                          session_len=max(4096, self.profile.max_seq_len))
        else:
            self.engine = _OpenAIEngine(base_url or DEFAULT_BASE_URL, api_key, served_model,
                                        timeout, grammar_field, server)

    # -- helpers
    def messages_for(self, request: ComposeRequest | str, template_index: int | None = None) -> list[dict]:
        """The chat (system + user) a request is sent as."""
        user = request if isinstance(request, str) else render_prompt(request, template_index)
        user = neutralize_special_tokens(user)  # request fields are data, never chat markers
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def _sampling(self, temperature, top_p, top_k, max_new_tokens, seed) -> _Sampling:
        temperature = self.profile.temperature if temperature is None else temperature
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"{temperature}, {top_p}, {top_k}")
        seed = random.randrange(2**31) if seed is None else int(seed)
        return _Sampling(float(temperature), float(top_p), int(top_k),
                         int(max_new_tokens or self.profile.max_new_tokens), seed)

    def _check_arrival(self, text: str, finish_reason: str, grammar: str) -> None:
        """Refuse a constrained answer the grammar does not hold: the engine dropped the grammar.

        An answer cut off by the token limit that keeps to the grammar so far is let through
        (it comes back with finish_reason "length" and `.ok` False)."""
        answer = text
        if finish_reason == "length":  # a cut can split a character's bytes: drop the half
            answer = answer.rstrip("\ufffd")
        # the text as it came, then without the white space a server may pad it with (a grammar
        # can end in its own, such as a harmonised melody's closing line break)
        checks = [check_against_grammar(grammar, c) for c in dict.fromkeys([answer, answer.strip()])]
        if any(c.accepted or (c.refused_at is None and finish_reason == "length") for c in checks):
            return
        check = checks[0]  # the message speaks of the text as it came
        label = getattr(self.engine, "label", self.backend)
        if check.refused_at is None:
            where = f"it stops after {len(answer)} characters, before the tune is complete"
        else:
            i = check.refused_at
            where = f"it leaves the request's grammar at character {i}: {answer[max(0, i - 30):i + 30]!r}"
        raise GrammarNotEnforcedError(
            f"{label} decoded unconstrained: {where}. The engine ignored the grammar (LMDeploy logs "
            "'Failed to initialize guided decoding'; a server drops request fields it does not know). "
            "For guaranteed-valid ABC use " + GUIDED_ROUTES)

    def _finish(self, raws: list[_Raw], messages: list[dict], request: ComposeRequest | None,
                grammar: str | None, seed: int) -> list[Composition]:
        out = []
        prose = request is not None and request.task == "describe"
        label = getattr(self.engine, "label", self.backend)
        for raw in raws:
            if grammar is not None:
                self._check_arrival(raw.text, raw.finish_reason, grammar)
            tunes = [] if prose else extract_abc(raw.text)
            tune = tunes[0] if tunes else None
            report = abc.validate(tune) if tune else None
            if grammar is not None and request is not None and raw.finish_reason != "length" and (
                    report is None or not report.ok or report.bars.errors):
                # in the grammar yet not a valid tune: a grammar bug, never a silent "valid" answer
                raise GrammarNotEnforcedError(
                    f"{label}: the answer keeps to the request's grammar but fails abc.validate "
                    f"({report.error if report else 'no tune found'}): please report this grammar bug")
            out.append(Composition(
                abc=tune, text=raw.text, request=request, prompt_tokens=raw.prompt_tokens,
                completion_tokens=raw.completion_tokens, seconds=raw.seconds,
                first_token_seconds=raw.first_token_seconds,
                report=report, backend=self.backend,
                constrained=grammar is not None, seed=seed, finish_reason=raw.finish_reason,
                messages=[*messages, {"role": "assistant", "content": raw.text}]))
        return out

    # -- public API
    def default_budget(self, request: Any, constrained: bool, max_new_tokens: int | None = None) -> int | None:
        """max_new_tokens for an answer to `request`: the one given; else, constrained, room for
        the longest tune the grammar allows (`grammar.token_budget`: bars, meter, unit length; at
        least CONSTRAINED_MIN_NEW_TOKENS, since a tune the limit cuts off is invalid); else, for a
        request that states its length, room for that many bars, never less than the profile's
        `max_new_tokens`; else None (the profile's limit, also for a plain-text message). So a
        request for 32 bars of 12/8 is not cut off at 400 tokens by a limit sized for 16 bars of
        4/4, and a request without a length keeps the profile's limit as its bound."""
        if max_new_tokens is not None or not isinstance(request, ComposeRequest):
            return max_new_tokens
        if constrained:
            return max(self.profile.max_new_tokens, CONSTRAINED_MIN_NEW_TOKENS, token_budget(request))
        return max(self.profile.max_new_tokens, token_budget(request)) if request.bars else None

    def compose(self, request: ComposeRequest | str, n: int = 1, temperature: float | None = None,
                top_p: float = 0.95, top_k: int = 50, max_new_tokens: int | None = None,
                seed: int | None = None, constrained: bool = False,
                template_index: int | None = None) -> list[Composition]:
        """n answers to one request (a ComposeRequest, or a plain user message).

        temperature None: the profile's (`Profile.temperature`, 0.6 for IMelodist-tiny).
        constrained=True decodes under the request's grammar: the tune parses and every bar is
        exactly full (needs a ComposeRequest for a composing task)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        grammar = None
        if constrained:
            if not isinstance(request, ComposeRequest):
                raise ValueError("constrained=True needs a ComposeRequest (the grammar is built from "
                                 "its meter, key, chords and length), not a plain string")
            grammar = grammar_for_request(request)
        messages = self.messages_for(request, template_index)
        max_new_tokens = self.default_budget(request, constrained, max_new_tokens)
        sampling = self._sampling(temperature, top_p, top_k, max_new_tokens, seed)
        raws = self.engine.generate(messages, n, sampling, grammar)
        req = request if isinstance(request, ComposeRequest) else None
        return self._finish(raws, messages, req, grammar, sampling.seed)

    def chat(self, messages: list[dict] | str, temperature: float | None = None, top_p: float = 0.95,
             top_k: int = 50, max_new_tokens: int | None = None, seed: int | None = None,
             grammar: str | None = None) -> Composition:
        """One more assistant turn for a conversation; `.messages` of the result holds the history.

        Continue with `composer.chat(c.messages + [{"role": "user", "content": "..."}])`."""
        messages = self._conversation(messages)
        sampling = self._sampling(temperature, top_p, top_k, max_new_tokens, seed)
        [raw] = self.engine.generate(messages, 1, sampling, grammar)
        return self._finish([raw], messages, None, grammar, sampling.seed)[0]

    def stream(self, request_or_messages: ComposeRequest | list[dict] | str, temperature: float | None = None,
               top_p: float = 0.95, top_k: int = 50, max_new_tokens: int | None = None,
               seed: int | None = None, constrained: bool = False) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        grammar = None
        if isinstance(request_or_messages, ComposeRequest):
            if constrained:
                grammar = grammar_for_request(request_or_messages)
            messages = self.messages_for(request_or_messages)
        else:
            if constrained:
                raise ValueError("constrained=True needs a ComposeRequest to build the grammar from")
            messages = self._conversation(request_or_messages)
        max_new_tokens = self.default_budget(request_or_messages, grammar is not None, max_new_tokens)
        sampling = self._sampling(temperature, top_p, top_k, max_new_tokens, seed)
        if grammar is None:
            yield from self.engine.stream(messages, sampling, grammar)
            return
        pieces = []
        for piece in self.engine.stream(messages, sampling, grammar):
            pieces.append(piece)
            yield piece
        text = "".join(pieces)  # checked on arrival, like compose (no finish reason: a cut-off
        # stream that kept to the grammar passes; one that left it raises)
        self._check_arrival(text, "length", grammar)

    def compose_many(self, requests: list[ComposeRequest], n: int = 1, temperature: float | None = None,
                     top_p: float = 0.95, top_k: int = 50, max_new_tokens: int | None = None,
                     seed: int | None = None, constrained: bool = False) -> list[list[Composition]]:
        """n answers to each of many requests, decoded as one batch where the engine can (the
        transformers engine's lean path; other engines answer one request after another).

        Request i is answered as `compose(requests[i], n, seed=seed + i, ...)` would answer it
        (same seeds; on the lean path the same tokens), each under its own grammar when
        constrained. `.seconds` of every answer is the wall time of the whole batch."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if constrained and not all(isinstance(r, ComposeRequest) for r in requests):
            raise ValueError("constrained=True needs ComposeRequests (each grammar is built from one)")
        base = self._sampling(temperature, top_p, top_k, max_new_tokens, seed)
        jobs, budgets = [], []
        for i, request in enumerate(requests):
            grammar = grammar_for_request(request) if constrained else None
            budget = self.default_budget(request, constrained, max_new_tokens)  # compose's, request by request
            jobs.append((self.messages_for(request), grammar, base.seed + i))
            budgets.append(budget or base.max_new_tokens)
        if not hasattr(self.engine, "generate_many"):
            return [self.compose(r, n, temperature, top_p, top_k, budget, base.seed + i, constrained)
                    for i, (r, budget) in enumerate(zip(requests, budgets))]
        sampling = _Sampling(base.temperature, base.top_p, base.top_k, max(budgets, default=1), base.seed)
        raws = self.engine.generate_many(jobs, n, sampling, budgets)
        return [self._finish(answers, messages, request if isinstance(request, ComposeRequest) else None,
                             grammar, seed_i)
                for answers, request, (messages, grammar, seed_i) in zip(raws, requests, jobs)]

    def regenerate(self, abc: str, bars: range, n: int = 1, seed: int | None = None,
                   temperature: float | None = None, rank_by_suffix: bool = False,
                   candidates: int = 4, max_new_tokens: int | None = None) -> list:
        """n versions of the tune `abc` with bars `bars` (0-based) written anew and every other
        byte kept; see `editing.regenerate` (the suffix after the range is kept, not seen)."""
        from imelodist_lib import editing  # editing builds on this module: imported when used

        return editing.regenerate(self, abc, bars, n=n, seed=seed, temperature=temperature,
                                  rank_by_suffix=rank_by_suffix, candidates=candidates,
                                  max_new_tokens=max_new_tokens)

    def harmonise(self, melody: str, vocabulary: str = "key", lang: str = "zh",
                  seed: int | None = None, temperature: float | None = None,
                  max_new_tokens: int | None = None):
        """The melody with one chord symbol per bar chosen by the model, every note kept; see
        `editing.harmonise` (vocabulary: "key" or "all")."""
        from imelodist_lib import editing  # editing builds on this module: imported when used

        return editing.harmonise(self, melody, vocabulary=vocabulary, lang=lang, seed=seed,
                                 temperature=temperature, max_new_tokens=max_new_tokens)

    @staticmethod
    def _conversation(messages: list[dict] | str) -> list[dict]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not messages or any(not isinstance(m, dict) or "role" not in m or "content" not in m
                               for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
        return user_turns_as_data(messages)


_NOTE_LETTERS = frozenset("ABCDEFGabcdefgz")


def first_bar_seconds(pieces: Iterator[str]) -> tuple[float | None, str]:
    """Consume a stream; return the seconds until the first complete bar of music was on screen
    (a note, then a bar line, after the line that holds the K: field) and the whole text.

    Each piece is read once (a small state machine), so a long stream stays linear."""
    start, parts, seen = time.perf_counter(), [], None
    state, matched = "key", 0  # key: looking for "\nK:"; eol: its line end; note; bar
    for piece in pieces:
        parts.append(piece)
        if seen is not None:
            continue
        for ch in piece:
            if state == "key":
                matched = matched + 1 if ch == "\nK:"[matched] else (1 if ch == "\n" else 0)
                if matched == 3:
                    state = "eol"
            elif state == "eol":
                state = "note" if ch == "\n" else state
            elif state == "note":
                state = "bar" if ch in _NOTE_LETTERS else state
            elif ch == "|":
                seen = time.perf_counter() - start
                break
    return seen, "".join(parts)


# ------------------------------------------------------------------------------ measuring


def seed_openings(count: int, bars: int = 2) -> list[str]:
    """Opening bars (header + first `bars` bars) of real tunes from music21's bundled corpus."""
    from music21 import corpus

    seeds = []
    for path in sorted(corpus.getPaths(fileExtensions=("abc",)), key=str)[::7]:
        for text in abc.split_tunes(Path(path).read_text(encoding="latin-1"))[:3]:
            try:
                tune = abc.normalize(text)
                report = abc.validate(tune)
                _, spans = abc.bar_segments(tune)
            except (abc.ABCError, ValueError):
                continue
            if not report.ok or report.bars.errors or len(spans) < 8 or "V:" in tune:
                continue
            seeds.append(tune[:spans[bars - 1][1]].rstrip() + "\n")
            break
        if len(seeds) == count:
            break
    return seeds


def benchmark_requests(continuations: int = 3) -> list[ComposeRequest]:
    """The fixed benchmark request set: every composing task, meters 2/4 3/4 4/4 6/8 9/8,
    zh and en, and continuations of real tunes from music21's corpus."""
    requests = [
        ComposeRequest("emotion", emotion="欢快", style="jig", meter="6/8", key="G", bars=8),
        ComposeRequest("emotion", lang="en", emotion="calm", meter="3/4", key="D", bars=8),
        ComposeRequest("emotion", emotion="悲伤", meter="4/4", key="Am"),
        ComposeRequest("emotion", lang="en", style="reel", meter="4/4", key="Edor", bars=8),
        ComposeRequest("emotion", emotion="激昂", meter="2/4", key="C", bars=8),
        ComposeRequest("chords", chords=["G", "C", "D", "G", "Em", "C", "D", "G"], meter="4/4", key="G"),
        ComposeRequest("chords", lang="en", chords=["D", "G", "A", "D"], meter="6/8", key="D"),
        ComposeRequest("theme_chords", theme="春天", chords=["C", "F", "G", "C"], meter="3/4", key="C"),
        ComposeRequest("theme_chords", lang="en", theme="The Harbour", chords=["Am", "Dm", "E", "Am"],
                       meter="9/8", key="Am"),
    ]
    langs = ("zh", "en") * continuations
    requests += [ComposeRequest("continue", lang=lang, seed_abc=seed, bars=8)
                 for lang, seed in zip(langs, seed_openings(continuations))]
    return requests


def measure(composer: Composer, requests: list[ComposeRequest], samples: int = 2,
            constrained: bool = False, temperature: float | None = None, max_new_tokens: int | None = None,
            seed: int = 1000, first_bar: bool = True, batched: bool = True) -> dict:
    """Validity and speed over a request set: parse rate, valid rate (no bar errors), bar error
    rate, tokens/s, tunes/s and the median time to the first complete bar in the stream.
    temperature None: the composer profile's. batched: every answer in one `compose_many` call
    (False: one `compose` call per request; the same seeds, so the same answers on the lean path)."""
    temperature = composer.profile.temperature if temperature is None else temperature
    parsed = valid = tunes = tokens = checked = wrong = truncated = 0
    seconds = 0.0
    first_bars: list[float] = []
    options = dict(n=samples, constrained=constrained, temperature=temperature, max_new_tokens=max_new_tokens)
    if batched:
        answers = composer.compose_many(requests, seed=seed, **options)
        seconds = answers[0][0].seconds if answers else 0.0  # one call for every answer
    else:
        answers = [composer.compose(request, seed=seed + i, **options) for i, request in enumerate(requests)]
        seconds = sum(comps[0].seconds for comps in answers)  # one call per request (its n samples)
    for i, (request, comps) in enumerate(zip(requests, answers)):
        for c in comps:
            tunes += 1
            tokens += c.completion_tokens
            truncated += c.finish_reason == "length"
            if c.report is not None and c.report.ok:
                parsed += 1
                valid += c.ok
                checked += c.report.bars.checked
                wrong += len(c.report.bars.errors)
        if first_bar:
            first, _ = first_bar_seconds(composer.stream(
                request, seed=seed + 1000 + i, constrained=constrained, temperature=temperature,
                max_new_tokens=max_new_tokens))
            if first is not None:
                first_bars.append(first)
    return {
        "constrained": constrained,
        "temperature": temperature,
        "tunes": tunes,
        "parse_rate": round(parsed / tunes, 4),
        "valid_rate": round(valid / tunes, 4),
        "bar_error_rate": round(wrong / checked, 4) if checked else None,
        "bars_checked": checked,
        "truncated": truncated,
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "tunes_per_second": round(tunes / seconds, 3) if seconds else None,
        "first_bar_seconds_median": round(statistics.median(first_bars), 3) if first_bars else None,
        "first_bar_seen": f"{len(first_bars)}/{len(requests)}" if first_bar else None,
        "batched": batched,
    }


# ------------------------------------------------------------------------------ serving


def _what_answers(host: str, port: int) -> str | None:
    """What listens on host:port, in words (None: nothing accepts a connection there)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            pass
    except OSError:
        return None
    url = f"http://{host}:{port}/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            models = json.loads(response.read() or b"{}").get("data", [])
            names = ", ".join(f"{m.get('id')} (owned by {m.get('owned_by')})" for m in models) or "none"
            return f"an OpenAI-compatible server serving {names}"
    except urllib.error.HTTPError as err:
        return f"an HTTP server answering GET /v1/models with {err.code} {err.reason}"
    except (OSError, ValueError) as err:
        return f"a program that accepts connections but is no OpenAI-compatible server ({err})"


def _connect_host(server_name: str) -> str:
    """Where a client on this machine reaches a server bound to `server_name`."""
    return "127.0.0.1" if server_name in ("0.0.0.0", "", "::") else server_name


@dataclass
class LMDeployServer:
    """A running `lmdeploy serve api_server`: its URL, its API key and its process.

    Use as a context manager, or call `.stop()`; `.composer()` is a Composer that talks to it."""

    url: str  # the OpenAI base URL, e.g. http://127.0.0.1:23333/v1
    api_key: str
    process: subprocess.Popen
    log_path: Path
    model_name: str = SERVED_MODEL_NAME

    def composer(self, **kwargs) -> "Composer":
        """A Composer on this server (key sent; LMDeploy's api_server takes no grammar, so
        constrained=True raises with the routes that do)."""
        return Composer(backend="openai", base_url=self.url, api_key=self.api_key,
                        served_model=self.model_name, server="lmdeploy", **kwargs)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Terminate the server, wait for it (kill it after `timeout` s) and return its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode

    def __enter__(self) -> "LMDeployServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _lmdeploy_command() -> str | None:
    """.venv-lmdeploy's `lmdeploy` (make lmdeploy-env), else one on PATH."""
    candidates = (Path(".venv-lmdeploy/bin/lmdeploy"),
                  Path(__file__).resolve().parent.parent / ".venv-lmdeploy/bin/lmdeploy")
    return next((str(p) for p in candidates if p.is_file()), shutil.which("lmdeploy"))


def serve_lmdeploy(model_dir: str | Path, port: int = 23333, model_name: str = SERVED_MODEL_NAME,
                   lmdeploy_bin: str | None = None, wait_seconds: float = 600.0,
                   extra_args: tuple[str, ...] = (), server_name: str = "127.0.0.1",
                   api_key: str | None = None) -> LMDeployServer:
    """Start `lmdeploy serve api_server` as a subprocess and wait until /v1/models answers.

    It binds `server_name` (127.0.0.1: only this machine reaches it) and requires an API key
    (`api_key`, else a fresh random one) that `.composer()` sends. Refuses to start when something
    already answers on the port. Stop it with `.stop()` or a `with` block. The binary is
    .venv-lmdeploy's (make lmdeploy-env) or `lmdeploy` on PATH; the log goes to
    `<model_dir>/../lmdeploy_server.log`."""
    binary = lmdeploy_bin or _lmdeploy_command()
    if not binary:
        raise FileNotFoundError("no lmdeploy command: run `make lmdeploy-env` (creates .venv-lmdeploy) "
                                "or conda env create -f environment-lmdeploy.yml")
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist: merge the adapter first "
                                "(notebook 03) or set IMELODIST_COMPOSER_MODEL")
    host = _connect_host(server_name)
    taken = _what_answers(host, port)
    if taken:
        raise RuntimeError(f"port {port} on {host} is taken: {taken} answers there. Stop it, or "
                           f"pass serve_lmdeploy(port=...) a free port")
    api_key = api_key or secrets.token_hex(24)  # hex: never starts with "-", which argparse would misread
    log_path = Path(model_dir).resolve().parent / "lmdeploy_server.log"
    with open(log_path, "w") as log:  # the child keeps its own handle; ours closes here
        process = subprocess.Popen([binary, "serve", "api_server", str(model_dir), "--model-name", model_name,
                                    "--chat-template", "internlm2", "--server-name", server_name,
                                    "--server-port", str(port), "--api-keys", api_key, *extra_args],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LMDeployServer(f"http://{host}:{port}/v1", api_key, process, log_path, model_name)
    ready = urllib.request.Request(f"{server.url}/models", headers={"Authorization": f"Bearer {api_key}"})
    deadline = time.monotonic() + wait_seconds
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"lmdeploy api_server exited with code {process.returncode}: "
                                   f"see {log_path}")
            try:
                with urllib.request.urlopen(ready, timeout=2):
                    return server
            except urllib.error.HTTPError as err:
                raise RuntimeError(f"lmdeploy api_server at {server.url} answered GET /models with "
                                   f"{err.code} {err.reason} to its own key: see {log_path}") from err
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"lmdeploy api_server did not answer at {server.url} within "
                           f"{wait_seconds:.0f} s: see {log_path}")
    except BaseException:  # a failed start (or Ctrl-C while waiting) leaves no server behind
        server.stop(timeout=10)
        raise
