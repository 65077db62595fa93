"""Training: continued pretraining (stage 1) and instruction tuning (stage 2) with TRL's SFTTrainer.

One code path for both sizes; only the profile differs:
- cpu: IMelodist-tiny, full training (from a fresh model + tokenizer when
  `profile.train_from_scratch`, so CI proves the pipeline from zero);
- gpu: InternLM2-chat-7B, QLoRA (4-bit NF4 base, LoRA on every projection), bf16,
  gradient checkpointing, 4096-token rows; the adapter is merged into the weights at
  the end so the next stage (and LMDeploy) loads a plain model.

Command line (the same functions):
    python -m imelodist_lib.train --preset tiny-sft-2d     # a checked-in recipe, configs/presets/
    python -m imelodist_lib.train --stage pt  --profile cpu --max-steps 30 --output runs/cpu/pt
    python -m imelodist_lib.train --stage sft --profile cpu --base runs/cpu/pt/final
Several GPUs: `accelerate launch --config_file configs/accelerate_multi_gpu.yaml -m imelodist_lib.train ...`
(or configs/accelerate_deepspeed_zero2.yaml); keep batch_size x grad_accum x GPUs = 128.
A second run into the same --output refuses (--resume continues it, --overwrite replaces it).
IMELODIST_DEVICE=cpu runs the gpu profile's branches on a CPU (tests/test_gpu_rehearsal.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from imelodist_lib.models import (
    CHAT_TEMPLATE,
    IM_END,
    bf16_supported,
    load_model,
    new_tiny_model,
    save_model,
    train_tokenizer,
)
from imelodist_lib.profiles import REPO_ROOT, Profile, checked_value, get_profile, parse_override

# Validation records used on CPU: a fixed subset (the first N) keeps each evaluation to seconds
# and the curves comparable between runs; GPU runs evaluate on the whole validation split.
CPU_EVAL_RECORDS = 48
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# InternLM2's own module names (remote-code checkpoints), used when the base is not converted
INTERNLM2_LORA_TARGETS = ["wqkv", "wo", "w1", "w2", "w3"]


@dataclass
class TrainResult:
    """What one training stage produced: where, how far, and how well."""

    stage: str
    output_dir: Path
    model_dir: Path  # the loadable model this stage wrote (pt: final/, sft: merged/)
    log_history: list[dict] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_loss)
    final_val_loss: float | None = None
    perplexity: float | None = None
    tokens_seen: int = 0
    steps: int = 0
    seconds: float = 0.0
    resumed_from: str | None = None

    def summary(self) -> dict[str, Any]:
        """The headline figures (no history), JSON-ready."""
        d = asdict(self)
        for key in ("log_history", "train_losses", "val_losses"):
            d.pop(key)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# what a stage writes into its output folder; overwrite=True removes exactly these
_RUN_FILES = ("final", "adapter", "merged", "tokenizer", "train_result.json")


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Create the output folder; refuse a fresh run over an older run's checkpoint-* folders
    (checkpoint rotation or a later resume would mix the two runs) unless told which to do:
    resume=True continues the old run, overwrite=True first removes what the old run wrote."""
    if resume and overwrite:
        raise ValueError("resume=True continues the run in the output folder and overwrite=True "
                         "deletes it: choose one")
    output_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(output_dir.glob("checkpoint-*"))
    if resume or not old:
        return output_dir
    if not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a training run ({', '.join(p.name for p in old[-2:])}): "
            "continue it with resume=True (CLI --resume), replace it with overwrite=True (CLI "
            "--overwrite), or write elsewhere (another output_dir / --output, or delete the folder)")
    for path in old + [output_dir / name for name in _RUN_FILES]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # ignore: another rank may be removing it too
        else:
            path.unlink(missing_ok=True)
    return output_dir


def _latest_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def _sft_config(profile: Profile, output_dir: Path, stage: str, max_steps: int | None,
                progress: bool, has_eval: bool, is_peft: bool, flash_attention: bool = False):
    from trl import SFTConfig

    if max_steps is None:
        max_steps = profile.pt_max_steps if stage == "pt" else profile.sft_max_steps
    epochs = profile.pt_epochs if stage == "pt" else profile.sft_epochs
    # Packing strategies, measured (benchmarks/bench_train.py): best-fit packing is "padding-free",
    # one flattened row per batch with position ids restarting per document. Only FlashAttention
    # turns that into per-document attention cheaply; with SDPA/eager (CPU, InternLM2 remote code)
    # the mask is dense over the whole batch and a step costs 1.5-2.5x a plain batch. So:
    # - pt: "wrapped" packing, documents joined with EOS and cut into max_seq_len rows, as GPT-style
    #   pretraining does (a tune may continue into the next row; attention may cross a document end);
    # - sft: best-fit packing (whole chats, never cut) when FlashAttention is present, else one
    #   chat per row, padded per batch, so every answer keeps its request in view.
    packing, strategy = profile.packing, "wrapped"
    if stage == "sft":
        packing, strategy = profile.packing and flash_attention, "bfd"
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps if max_steps is not None else -1,
        num_train_epochs=epochs,
        per_device_train_batch_size=profile.batch_size,
        per_device_eval_batch_size=profile.batch_size,
        gradient_accumulation_steps=profile.grad_accum,
        learning_rate=profile.learning_rate,
        lr_scheduler_type=profile.lr_scheduler,
        warmup_steps=profile.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=profile.weight_decay,
        optim="adamw_torch",
        logging_steps=max(1, min(10, profile.eval_steps // 2)),
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=profile.eval_steps,
        save_strategy="steps",
        save_steps=profile.save_steps,
        save_total_limit=2,
        # the device decides (TRL defaults bf16=True): mixed precision is torch.autocast to bf16 on
        # CUDA or on the CPU (Trainer accepts bf16 with use_cpu); the cpu profile stays in fp32
        bf16=bool(profile.bf16 and bf16_supported(profile.device)),
        use_cpu=not profile.is_gpu,
        # transformers 5 renamed gradient_checkpointing; TRL reads the mirrored old name
        activation_checkpointing=profile.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if profile.gradient_checkpointing else None,
        max_length=profile.max_seq_len,
        packing=packing,
        packing_strategy=strategy,
        # unpacked chats: batch similar lengths together (short phrase chats beside full tunes
        # would otherwise pad to the longest row in the batch)
        train_sampling_strategy="random" if packing else "group_by_length",
        dataset_text_field="text",
        assistant_only_loss=(stage == "sft"),
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        seed=profile.seed,
        data_seed=profile.seed,
        disable_tqdm=not progress or bool(os.environ.get("TQDM_DISABLE")),
        dataloader_num_workers=0,
        save_only_model=False,  # optimizer + scheduler + RNG states make resume exact
        ddp_find_unused_parameters=False if is_peft else None,
    )


def _lora_config(profile: Profile, model):
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names] or [t for t in INTERNLM2_LORA_TARGETS if t in names]
    if not targets:
        raise ValueError(f"no LoRA target modules found in {type(model).__name__}: expected Llama "
                         f"({LORA_TARGETS}) or InternLM2 ({INTERNLM2_LORA_TARGETS}) projections")
    return LoraConfig(r=profile.lora_r, lora_alpha=profile.lora_alpha,
                      lora_dropout=profile.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def _collect(trainer, stage: str, output_dir: Path, model_dir: Path, seconds: float,
             resumed_from: str | None) -> TrainResult:
    history = list(trainer.state.log_history)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    final = val[-1][1] if val else None
    return TrainResult(
        stage=stage, output_dir=output_dir, model_dir=model_dir, log_history=history,
        train_losses=train, val_losses=val, final_val_loss=final,
        perplexity=math.exp(final) if final is not None and final < 50 else None,
        tokens_seen=int(trainer.state.num_input_tokens_seen or 0),
        steps=int(trainer.state.global_step), seconds=seconds, resumed_from=resumed_from)


def reload_unquantized(base: str, profile: Profile):
    """The training base again, unquantized, through load_model (no remote code; bf16 where the
    device computes in it, else the checkpoint's dtype; in CPU memory): a 4-bit base cannot
    absorb an adapter, so QLoRA merges into this copy."""
    model, _ = load_model(base, dataclasses.replace(profile, load_in_4bit=False))
    return model


def _save_trained(trainer, tokenizer, profile: Profile, base: str, target: Path) -> Path:
    """Write the trained weights as one plain model: LoRA adapters are saved (target/../adapter),
    then merged; a 4-bit base is reloaded unquantized first and the adapter merged there."""
    from peft import PeftModel

    model = trainer.model
    if not trainer.is_world_process_zero():
        return target  # under `accelerate launch` rank 0 writes the model, once
    if isinstance(model, PeftModel):
        adapter_dir = target.parent / "adapter"
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        if getattr(model, "is_loaded_in_4bit", False) or profile.load_in_4bit:
            del trainer.model, model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            model = PeftModel.from_pretrained(reload_unquantized(base, profile), adapter_dir)
        model = model.merge_and_unload()
    model.config.use_cache = True
    return save_model(model, tokenizer, target)


def _records_for_steps(train_ds, max_steps: int, rows_per_step: int, seed: int):
    """The training records a run can reach. An "sft" run of a fixed number of steps (one chat
    per row, unpacked) reads at most `max_steps` x `rows_per_step` chats (batch x accumulation x
    processes), so it gets a seeded random sample of that many instead of the whole split: TRL
    tokenizes every record it is given before the first step, and at the cpu profile's 15 steps
    that was most of the run (about 40,000 chats for 120). (Packed rows hold several records and
    full-epoch runs, max_steps <= 0, read everything: those keep the whole split.)"""
    need = max_steps * rows_per_step
    if max_steps <= 0 or len(train_ds) <= need:
        return train_ds
    return train_ds.shuffle(seed=seed).select(range(need))


def make_trainer(stage: str, profile: Profile, data, model, tokenizer, output_dir: Path,
                 max_steps: int | None = None, progress: bool = True, callbacks: list | None = None,
                 eval_records: int | None = None):
    """The configured TRL SFTTrainer for one stage ("pt": packed text, "sft": assistant-only loss)."""
    from trl import SFTTrainer

    peft_config = _lora_config(profile, model) if profile.use_lora else None
    has_eval = "validation" in data and len(data["validation"]) > 0
    flash = "flash" in str(getattr(model.config, "_attn_implementation", "") or "")
    config = _sft_config(profile, Path(output_dir), stage, max_steps, progress, has_eval,
                         peft_config is not None, flash)
    columns = ["text"] if stage == "pt" else ["messages"]
    unpacked_chats = stage == "sft" and not (profile.packing and flash)  # see _sft_config
    train_ds = data["train"].select_columns(columns)
    if unpacked_chats:
        rows_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
        train_ds = _records_for_steps(train_ds, config.max_steps, rows_per_step, profile.seed)
    eval_ds = data["validation"].select_columns(columns) if has_eval else None
    if eval_ds is not None and eval_records is not None and len(eval_ds) > eval_records:
        eval_ds = eval_ds.select(range(eval_records))
    model.config.use_cache = False  # a KV cache would hide packed-sequence boundaries from the mask
    return SFTTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def _run(stage: str, profile: Profile, data, model, tokenizer, base: str, output_dir: Path,
         target: Path, max_steps: int | None, resume: bool, progress: bool,
         callbacks: list | None) -> TrainResult:
    eval_records = None if profile.is_gpu else CPU_EVAL_RECORDS
    trainer = make_trainer(stage, profile, data, model, tokenizer, output_dir, max_steps,
                           progress, callbacks, eval_records)
    checkpoint = _latest_checkpoint(output_dir) if resume else None
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    if trainer.eval_dataset is not None and (not evaluated or evaluated[-1] != trainer.state.global_step):
        trainer.evaluate()  # the final validation loss, whatever eval_steps said
    seconds = time.perf_counter() - start
    result_model = _save_trained(trainer, tokenizer, profile, base, target)
    result = _collect(trainer, stage, output_dir, result_model, seconds, checkpoint)
    (output_dir / "train_result.json").write_text(
        json.dumps({**result.summary(), "log_history": result.log_history}, indent=1, default=str))
    return result


def _stage_data(profile: Profile, datasets, stage: str, column: str, progress: bool):
    """The DatasetDict a stage trains on (`datasets[stage]`, built by load_datasets when None),
    checked for a 'train' split of `column` records."""
    if datasets is None:
        from imelodist_lib.instructions import load_datasets

        datasets = load_datasets(profile, progress=progress)
    data = datasets[stage] if stage in datasets else datasets
    if "train" not in data or column not in data["train"].column_names:
        what = "continued pretraining" if stage == "pt" else "instruction tuning"
        raise ValueError(f"{what} needs a DatasetDict with a 'train' split of '{column}' "
                         "records: build it with notebook 01 / instructions.load_datasets(profile)")
    return data


def continued_pretraining(profile: Profile | None = None, output_dir: str | Path | None = None,
                          max_steps: int | None = None, resume: bool = False,
                          progress: bool = True, datasets=None, callbacks: list | None = None,
                          tiny_sizes: dict | None = None, overwrite: bool = False) -> TrainResult:
    """Stage 1: next-token training on the {"text"} records (packed); writes output_dir/final.

    An output_dir holding an older run's checkpoints needs resume=True or overwrite=True."""
    profile = profile or get_profile()
    output_dir = prepare_output_dir(Path(output_dir) if output_dir else profile.run_dir / "pt",
                                    resume, overwrite)
    data = _stage_data(profile, datasets, "pt", "text", progress)
    from transformers import PreTrainedTokenizerFast, set_seed

    set_seed(profile.seed)
    base = str(profile.base_model)
    if profile.train_from_scratch:
        # the tokenizer is saved before training so a resumed run reuses exactly the same vocabulary
        tok_dir = output_dir / "tokenizer"
        if resume and (tok_dir / "tokenizer.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
            tokenizer.chat_template = CHAT_TEMPLATE
        else:
            tokenizer = train_tokenizer(data["train"]["text"], profile.tokenizer_vocab_size)
            tokenizer.save_pretrained(tok_dir)
        sizes = {"max_position_embeddings": max(1024, profile.max_seq_len), **(tiny_sizes or {})}
        model = new_tiny_model(tokenizer, seed=profile.seed, **sizes)
        base = str(tok_dir)
    else:
        model, tokenizer = load_model(base, profile, for_training=True)
    return _run("pt", profile, data, model, tokenizer, base, output_dir, output_dir / "final",
                max_steps, resume, progress, callbacks)


def instruction_tuning(profile: Profile | None = None, base_dir: str | Path | None = None,
                       output_dir: str | Path | None = None, max_steps: int | None = None,
                       resume: bool = False, progress: bool = True, datasets=None,
                       callbacks: list | None = None, overwrite: bool = False) -> TrainResult:
    """Stage 2: SFT on the {"messages"} chats, loss on assistant tokens only; writes output_dir/merged.

    An output_dir holding an older run's checkpoints needs resume=True or overwrite=True."""
    profile = profile or get_profile()
    base_dir = Path(base_dir) if base_dir else profile.run_dir / "pt" / "final"
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"no stage-1 model at {base_dir}: run continued pretraining first "
                                "(notebook 02 or python -m imelodist_lib.train --stage pt) or pass base_dir")
    output_dir = prepare_output_dir(Path(output_dir) if output_dir else profile.run_dir / "sft",
                                    resume, overwrite)
    data = _stage_data(profile, datasets, "sft", "messages", progress)
    from transformers import set_seed

    set_seed(profile.seed)
    model, tokenizer = load_model(base_dir, profile, for_training=True)
    return _run("sft", profile, data, model, tokenizer, str(base_dir), output_dir,
                output_dir / "merged", max_steps, resume, progress, callbacks)


# ---------------------------------------------------------------- looking at the results

def plot_losses(result: TrainResult, ax=None):
    """Training and validation loss against step, as a matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    if result.train_losses:
        ax.plot(*zip(*result.train_losses), label="train", color="tab:blue")
    if result.val_losses:
        ax.plot(*zip(*result.val_losses), "o-", label="validation", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    title = {"pt": "continued pretraining", "sft": "instruction tuning"}.get(result.stage, result.stage)
    if result.perplexity is not None:
        title += f" - val perplexity {result.perplexity:.2f}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


@dataclass
class SamplePair:
    """One request answered by the model before and after a training stage."""

    task: str
    prompt: str
    before: str
    after: str


def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int = 256,
                    temperature: float = 0.8, top_p: float = 0.95, seed: int = 0) -> str:
    """One chat answer with model.generate (InternLM2 chat format, stops at <|im_end|>)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None,
                             top_p=top_p if temperature > 0 else None,
                             eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def sample_before_after(before_dir: str | Path, after_dir: str | Path, requests: list,
                        max_new_tokens: int = 256, seed: int = 0,
                        profile: Profile | None = None) -> list[SamplePair]:
    """Answer each ComposeRequest with the model before and after tuning, for side-by-side reading."""
    from imelodist_lib.instructions import render_prompt

    prompts = [(getattr(r, "task", "?"), render_prompt(r, template_index=0)) for r in requests]
    answers: dict[str, list[str]] = {}
    for label, directory in (("before", before_dir), ("after", after_dir)):
        model, tokenizer = load_model(directory, profile)
        answers[label] = [generate_answer(model, tokenizer, p, max_new_tokens, seed=seed)
                          for _, p in prompts]
        del model
    return [SamplePair(task, prompt, b, a)
            for (task, prompt), b, a in zip(prompts, answers["before"], answers["after"])]


def loss_mask_preview(tokenizer, messages: list[dict], mark: str = "⟦⟧") -> str:
    """The chat as the model sees it, with the tokens that carry the SFT loss inside ⟦...⟧."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    text, inside = "", False
    for token, trained in zip(out["input_ids"], out["assistant_masks"]):
        if trained and not inside:
            text += mark[0]
        elif not trained and inside:
            text += mark[1]
        inside = bool(trained)
        text += tokenizer.decode([token])
    return text + (mark[1] if inside else "")


def sample_continuation(model_dir: str | Path, prefix: str, max_new_tokens: int = 120,
                        temperature: float = 0.8, seed: int = 0) -> str:
    """Let a (pretrained, not yet chat-tuned) model continue raw text such as a tune header."""
    model, tokenizer = load_model(model_dir)
    ids = tokenizer(prefix, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_p=0.95,
                             pad_token_id=tokenizer.pad_token_id)
    return prefix + tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------- presets

PRESETS_DIR = REPO_ROOT / "configs" / "presets"
_PRESET_KEYS = {"stage", "profile", "max_steps", "base", "output", "set"}


@dataclass(frozen=True)
class Preset:
    """A named, checked-in training recipe (configs/presets/NAME.toml): the stage, the size
    switch, where to read and write, and the profile fields it changes (type-checked)."""

    name: str
    stage: str
    profile: str | None = None
    max_steps: int | None = None
    base: str | None = None
    output: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def preset_names() -> list[str]:
    """The presets checked in under configs/presets/."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name: str | Path) -> Preset:
    """A preset by name (configs/presets/NAME.toml) or by path, its fields checked against
    Profile's types; an unknown name, key or field is an error naming the choices."""
    import tomllib

    path = Path(name)
    if path.suffix != ".toml":
        path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no preset {str(name)!r}: choose one of {preset_names()} "
                                f"(files in {PRESETS_DIR}) or give a .toml path")
    with path.open("rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"preset {path}: {err}") from None
    unknown = set(data) - _PRESET_KEYS
    if unknown:
        raise ValueError(f"preset {path}: unknown key(s) {sorted(unknown)}; a preset holds "
                         f"{sorted(_PRESET_KEYS)}")
    if data.get("stage") not in ("pt", "sft"):
        raise ValueError(f"preset {path}: stage must be \"pt\" or \"sft\", got {data.get('stage')!r}")
    try:
        settings = {key: checked_value(key, value) for key, value in data.get("set", {}).items()}
    except TypeError as err:
        raise TypeError(f"preset {path}: {err}") from None
    return Preset(name=path.stem, stage=data["stage"], profile=data.get("profile"),
                  max_steps=data.get("max_steps"), base=data.get("base"), output=data.get("output"),
                  settings=settings)


# ---------------------------------------------------------------- command line

@dataclass(frozen=True)
class RunPlan:
    """What one command line asks for, after the preset and the flags are combined."""

    stage: str
    profile: Profile
    base: str | None
    output: str | None
    max_steps: int | None


def plan_run(args: argparse.Namespace) -> RunPlan:
    """The preset (if any), then the flags over it: a flag given wins, `--set` adds to the
    preset's fields. Raises ValueError/TypeError/FileNotFoundError with a message for the user."""
    preset = load_preset(args.preset) if args.preset else None
    overrides = dict(preset.settings) if preset else {}
    overrides.update(parse_override(item) for item in args.set)
    stage = args.stage or (preset.stage if preset else None)
    if stage is None:
        raise ValueError("give --stage pt|sft or --preset NAME")

    def pick(flag, key):
        return flag if flag is not None else (getattr(preset, key) if preset else None)

    return RunPlan(stage=stage, profile=get_profile(pick(args.profile, "profile"), **overrides),
                   base=pick(args.base, "base"), output=pick(args.output, "output"),
                   max_steps=pick(args.max_steps, "max_steps"))


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (python -m imelodist_lib.train --help)."""
    parser = argparse.ArgumentParser(prog="python -m imelodist_lib.train", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=None,
                        help=f"a checked-in recipe (configs/presets/NAME.toml: {', '.join(preset_names())}) "
                             f"or a .toml path; the flags below override it")
    parser.add_argument("--stage", choices=["pt", "sft"], default=None)
    parser.add_argument("--profile", choices=["cpu", "gpu"], default=None,
                        help="size switch (default: IMELODIST_PROFILE, else gpu when CUDA is present)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="optimizer steps (-1: the profile's epochs; default: the profile's)")
    parser.add_argument("--output", default=None, help="output dir (default runs/<profile>/pt|sft)")
    parser.add_argument("--base", default=None, help="sft: the stage-1 model dir (default runs/<profile>/pt/final)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an older run in --output (its checkpoints, final/merged model)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a profile field (type-checked), e.g. --set eval_steps=200")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m imelodist_lib.train --preset NAME | --stage pt|sft [--profile cpu|gpu] ..."""
    args = build_parser().parse_args(argv)
    plan = plan_run(args)  # a wrong preset or field raises, naming it
    if plan.stage == "pt":
        result = continued_pretraining(plan.profile, plan.output, plan.max_steps, args.resume,
                                       not args.no_progress, overwrite=args.overwrite)
    else:
        result = instruction_tuning(plan.profile, plan.base, plan.output, plan.max_steps, args.resume,
                                    not args.no_progress, overwrite=args.overwrite)
    print(json.dumps(result.summary(), indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
