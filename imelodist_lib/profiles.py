"""The one size switch: every notebook, test and command line reads its sizes from here.

`cpu` is the size CI and laptops run in minutes (open corpus, IMelodist-tiny);
`gpu` is IMelodist's published recipe (InternLM2-chat-7B, QLoRA, full data).
The switch is `IMELODIST_PROFILE=cpu|gpu`; unset, it is `gpu` when CUDA is present, else `cpu`.
Anything can be overridden per call: `get_profile("cpu", pt_max_steps=50)`.
The device is a field like any other, and it alone decides where weights live and how they are
stored: `IMELODIST_DEVICE=cpu` (or `get_profile("gpu", device="cpu")`) runs the GPU recipe's own
branches (4-bit NF4 QLoRA, bf16, gradient checkpointing, packing) on a CPU, which is how CI
rehearses it (tests/test_gpu_rehearsal.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROFILE_ENV = "IMELODIST_PROFILE"
DEVICE_ENV = "IMELODIST_DEVICE"
DEVICES = ("cpu", "cuda")
REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
KNOWLEDGE_DIR = DATA_DIR / "knowledge"
SHIPPED_MODEL_DIR = DATA_DIR / "models" / "imelodist-tiny"
SYSTEM_PROMPT = "你是专业的音乐作曲家 IMelodist"


@dataclass(frozen=True)
class Profile:
    """Every size the pipeline needs, for one machine class."""

    name: str
    device: str  # "cpu" | "cuda": where the weights live (models.load_model, train._sft_config)
    # --- data (notebook 01) ---
    corpus_sources: tuple[str, ...] = ("music21",)
    max_tunes: int | None = None  # cap on tunes kept after cleaning (None: all)
    max_tune_chars: int = 3000  # longer tunes are dropped (counted) in cleaning
    min_bars: int = 4
    max_bar_errors: int | None = 0  # tunes with more bars of the wrong length are dropped
    transpositions: tuple[int, ...] = ()  # augmentation, train split only
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    instructions_per_tune: int = 1
    # extra short chats per train tune: "a 4- or 8-bar phrase in key K, meter M", answered with
    # the tune's opening transposed to a random key (instructions.phrase_records)
    phrase_chats_per_tune: int = 0
    # share of the train split's ordinary chats whose tune is first moved to a random key (the
    # request then names the new key), so the request, not the melody, decides K:
    transposed_chat_share: float = 0.0
    # train tunes the pretraining and instruction sets are built from (0: the whole train split;
    # otherwise a seeded sample of that many, counted in the manifest): the CPU size's notebooks
    # train a few steps, so building chats for all 10,000 train tunes only made students wait
    dataset_train_tunes: int = 0
    seed: int = 0
    # --- models and training (notebooks 02, 03) ---
    base_model: str = str(SHIPPED_MODEL_DIR)  # local path or hub id
    train_from_scratch: bool = False  # IMelodist-tiny in CI: a fresh model proves the pipeline
    tokenizer_vocab_size: int = 2048
    max_seq_len: int = 1024
    packing: bool = True
    pt_max_steps: int = -1  # -1: run pt_epochs
    pt_epochs: float = 1.0
    sft_max_steps: int = -1
    sft_epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    eval_steps: int = 50
    save_steps: int = 100
    use_lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    load_in_4bit: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    # --- inference and evaluation (notebooks 04-06) ---
    backend: str = "transformers"  # "auto" | "transformers" | "lmdeploy" | "openai"
    composer_model: str = str(SHIPPED_MODEL_DIR)
    max_new_tokens: int = 512
    # the sampling temperature a composer uses unless told otherwise (notebooks, playground,
    # benchmarks); cpu: chosen for IMelodist-tiny on validation prompts (its model card)
    temperature: float = 1.0
    eval_requests: int = 8
    eval_samples_per_request: int = 1
    probe_per_kind: int = 25  # knowledge probe: composers / works asked per direction and language
    workdir: Path | None = None  # None: $IMELODIST_RUNS when set, else <repo>/runs

    @property
    def run_dir(self) -> Path:
        """Where this profile's notebooks write datasets, checkpoints and results: under the
        `workdir` given, else under $IMELODIST_RUNS, else under the repository's runs/."""
        root = self.workdir if self.workdir is not None else os.environ.get("IMELODIST_RUNS") or REPO_ROOT / "runs"
        return Path(root) / self.name

    @property
    def is_gpu(self) -> bool:
        return self.device == "cuda"


CPU = Profile(
    name="cpu",
    device="cpu",
    max_tunes=None,
    transpositions=(),
    phrase_chats_per_tune=2,  # dense key/meter/length signal for a small model (model card)
    dataset_train_tunes=2000,  # notebooks 02/03 train 15 steps; the presets build from all
    train_from_scratch=True,
    max_seq_len=512,
    pt_max_steps=15,  # CI proves the pipeline from zero; the shipped model trained longer
    sft_max_steps=15,
    batch_size=8,
    learning_rate=2e-3,
    eval_steps=5,
    save_steps=5,
    eval_requests=8,
    probe_per_kind=5,
    max_new_tokens=400,
    temperature=0.6,
)

GPU = Profile(
    name="gpu",
    device="cuda",
    transpositions=(-5, -3, -2, 2, 3, 5),
    instructions_per_tune=2,
    base_model=os.environ.get("IMELODIST_BASE_MODEL", "internlm/internlm2-chat-7b"),
    tokenizer_vocab_size=0,  # the base model's own tokenizer
    max_seq_len=4096,
    pt_epochs=3.0,
    sft_epochs=3.0,
    batch_size=4,
    grad_accum=32,  # effective batch 128, as IMelodist trained
    learning_rate=2e-4,
    eval_steps=200,
    save_steps=500,
    use_lora=True,
    load_in_4bit=True,
    bf16=True,
    gradient_checkpointing=True,
    backend="auto",
    composer_model=os.environ.get("IMELODIST_COMPOSER_MODEL", str(REPO_ROOT / "runs" / "gpu" / "sft" / "merged")),
    max_new_tokens=1024,
    eval_requests=200,
    eval_samples_per_request=4,
)

PROFILES = {"cpu": CPU, "gpu": GPU}


def default_profile_name() -> str:
    """`IMELODIST_PROFILE` when set, else `gpu` where CUDA is available, else `cpu`."""
    name = os.environ.get(PROFILE_ENV, "").strip().lower()
    if name:
        return name
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def get_profile(name: str | None = None, **overrides) -> Profile:
    """Resolve the size switch, then apply `IMELODIST_DEVICE` and per-call overrides (unknown keys
    are an error; an explicit `device=` wins over the environment)."""
    name = (name or default_profile_name()).lower()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)} "
                         f"(set {PROFILE_ENV}=cpu or gpu)")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Profile)}
    if unknown:
        raise TypeError(f"Profile has no field(s) {sorted(unknown)}")
    overrides = {key: checked_value(key, value) for key, value in overrides.items()}
    device = os.environ.get(DEVICE_ENV, "").strip().lower()
    if device and "device" not in overrides:
        overrides["device"] = device
    if overrides.get("device", PROFILES[name].device) not in DEVICES:
        raise ValueError(f"unknown device {overrides['device']!r}: choose one of {list(DEVICES)} "
                         f"(device= or {DEVICE_ENV})")
    return dataclasses.replace(PROFILES[name], **overrides)


@functools.cache
def _field_types() -> dict[str, Any]:
    """Each Profile field's declared type (the annotations are strings under `annotations`)."""
    return typing.get_type_hints(Profile)


def _matches(kind: Any, value: Any) -> tuple[bool, Any]:
    """Whether `value` fits the declared type `kind`, and the value as the field stores it
    (an int where a float is declared, a list where a tuple is, a str where a Path is)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            ok, stored = _matches(option, value)
            if ok:
                return True, stored
        return False, value
    if kind is type(None):
        return value is None, value
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if kind is str:
        return isinstance(value, str), value
    if kind is Path:
        return isinstance(value, (str, Path)), Path(value) if isinstance(value, (str, Path)) else value
    if origin is tuple:
        (item, *_) = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            return False, value
        checked = [_matches(item, v) for v in value]
        return all(ok for ok, _ in checked), tuple(v for _, v in checked)
    return isinstance(value, kind), value


def _type_name(kind: Any) -> str:
    """`int`, `int | None`, `tuple[int, ...]`: a declared type as it reads in the source."""
    if typing.get_origin(kind) is None and hasattr(kind, "__name__"):
        return kind.__name__
    return str(kind).replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")


def checked_value(name: str, value: Any) -> Any:
    """`value` as Profile field `name` stores it, or a TypeError naming the field, the type it
    takes and what was given (so `batch_size="8"` or `transpositions=2` fails at once, not
    deep inside training); an unknown field is a TypeError naming the fields there are."""
    fields = _field_types()
    if name not in fields:
        raise TypeError(f"Profile has no field {name!r}: choose one of {sorted(fields)}")
    kind = fields[name]
    ok, stored = _matches(kind, value)
    if not ok:
        raise TypeError(f"Profile field {name!r} takes {_type_name(kind)}, got {value!r} "
                        f"({type(value).__name__})")
    return stored


def parse_override(text: str) -> tuple[str, Any]:
    """One `FIELD=VALUE` from a command line, as (field, value) checked against the field's type.
    VALUE is read as JSON (numbers, true/false, null, lists), else as plain text."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set {text!r}: write FIELD=VALUE, e.g. --set batch_size=16")
    kind = _field_types().get(key)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if kind is not None and not isinstance(value, str) and not _matches(kind, value)[0] \
            and _matches(kind, raw)[0]:
        value = raw  # a text field given what reads as JSON, e.g. --set base_model=123
    return key, checked_value(key, value)
