"""The GPU recipe rehearsed on a CPU: profile "gpu" with only its sizes and its device changed.

`get_profile("gpu", device="cpu", ...)` (or IMELODIST_DEVICE=cpu) takes the very branches a CUDA
machine takes: 4-bit NF4 double-quantized base through bitsandbytes (its CPU backend here),
bf16 autocast, gradient checkpointing, LoRA r=64/alpha=16/dropout 0.1 on all seven projections,
packed pretraining rows, the adapter saved and merged into an unquantized reload of the base,
and `accelerate launch --config_file configs/accelerate_multi_gpu.yaml` around the CLI.
What a CPU cannot rehearse, and why:
- several processes on several GPUs (NCCL): the launch runs one process (`--num_processes 1
  --cpu`), so DDP's gradient all-reduce is not exercised; every line around it is;
- best-fit ("bfd") packing of SFT chats: it is switched on only with FlashAttention, which is
  CUDA-only; without it (here, and on a GPU without flash-attn) SFT pads one chat per row;
- bf16 speed: this CPU (AVX2) has no native bf16, torch emulates it (correct, ~5x slower than fp32);
- a 7B base: InternLM2-chat-7B is replaced by a tiny random Llama of the same layout (below).

Notebooks 02/03 call exactly `train.continued_pretraining(profile, ...)` and
`train.instruction_tuning(profile, base_dir=..., ...)`, as `pt_run`/`sft_run` do here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from test_train import PROMPTS, corpus_tunes
from transformers import TrainerCallback

from imelodist_lib import models, train
from imelodist_lib.instructions import ComposeRequest
from imelodist_lib.profiles import GPU, REPO_ROOT, SYSTEM_PROMPT, get_profile

# Only sizes (and the device) differ from the GPU profile; learning rate and warm-up are raised
# so that a random tiny base learns visibly in a few dozen steps.
SIZES = {"max_seq_len": 128, "batch_size": 2, "grad_accum": 2, "eval_steps": 10, "save_steps": 10,
         "learning_rate": 1e-2, "warmup_ratio": 0.0}
PT_STEPS, SFT_STEPS = 24, 6
SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="session")
def rehearsal_base(internlm2_checkpoint) -> Path:
    """The stand-in for InternLM2-chat-7B: a tiny random InternLM2 in the hub's layout (remote-code
    files that raise if run, SentencePiece tokenizer.model), which load_model converts to Llama."""
    return internlm2_checkpoint


@pytest.fixture(scope="module", autouse=True)
def converted_cache(internlm2_converted):
    """load_model's conversion cache pointed at the fixture's copy: loading the base is a lookup.
    One torch thread meanwhile: a model this small only waits on a second, shared, CI core."""
    from imelodist_lib import internlm2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(internlm2.CACHE_ENV, str(internlm2_converted.parent))
        yield internlm2_converted
    torch.set_num_threads(threads)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint (all its safetensors shards)."""
    return {k: v for shard in sorted(directory.glob("*.safetensors")) for k, v in load_file(shard).items()}


@pytest.fixture(scope="module")
def profile(rehearsal_base, tmp_path_factory):
    return get_profile("gpu", device="cpu", base_model=str(rehearsal_base),
                       workdir=tmp_path_factory.mktemp("runs"), **SIZES)


@pytest.fixture(scope="module")
def data() -> dict:
    tunes = [t for t in corpus_tunes(80) if len(t) < 400]
    # short answers (header + first line) keep whole chats inside 128-token rows
    answers = ["\n".join(t.splitlines()[:6]) for t in tunes]
    chats = [[{"role": "system", "content": SYSTEM_PROMPT},
              {"role": "user", "content": PROMPTS[i % 2]},
              {"role": "assistant", "content": a}] for i, a in enumerate(answers)]
    cut = len(tunes) - 4
    return {"pt": DatasetDict(train=Dataset.from_dict({"text": tunes[:cut]}),
                              validation=Dataset.from_dict({"text": tunes[cut:]})),
            "sft": DatasetDict(train=Dataset.from_dict({"messages": chats[:cut]}),
                               validation=Dataset.from_dict({"messages": chats[cut:]}))}


class Inspect(TrainerCallback):
    """Notes what the trainer really trains: the model's layers, its packed rows, and whether a
    projection's forward pass runs under bf16 autocast."""

    def __init__(self):
        self.facts: dict = {}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        import bitsandbytes as bnb

        lora = {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}
        base = {name: m.base_layer for name, m in lora.items()}
        first = next(iter(base.values()))
        self.facts.update(
            args=args,
            trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
            lora_shapes={name: (b.in_features, b.out_features) for name, b in base.items()},
            lora_r={m.r["default"] for m in lora.values()},
            lora_scaling={m.scaling["default"] for m in lora.values()},
            lora_dropout={m.lora_dropout["default"].p for m in lora.values()},
            all_4bit=all(isinstance(b, bnb.nn.Linear4bit) for b in base.values()),
            quant_type=first.weight.quant_state.quant_type,
            double_quant=first.weight.quant_state.nested,
            compute_dtype=first.compute_dtype,
            weight_device=first.weight.device.type,
            checkpointing=model.base_model.model.is_gradient_checkpointing,
            row_lengths=[len(r["input_ids"]) for r in train_dataloader.dataset],
        )
        # a plain nn.Linear (LoRA's A) shows the autocast dtype; a Linear4bit casts back to its input's
        next(iter(lora.values())).lora_A["default"].register_forward_hook(self._autocast_hook)

    def _autocast_hook(self, module, inputs, output):
        self.facts.setdefault("autocast", (torch.is_autocast_enabled("cpu"),
                                           torch.get_autocast_dtype("cpu"), output.dtype))


@pytest.fixture(scope="module")
def pt_run(profile, data, tmp_path_factory):
    inspect = Inspect()
    result = train.continued_pretraining(profile, tmp_path_factory.mktemp("pt"), max_steps=PT_STEPS,
                                         progress=False, datasets=data, callbacks=[inspect])
    return result, inspect.facts


@pytest.fixture(scope="module")
def sft_run(profile, data, pt_run, tmp_path_factory):
    inspect = Inspect()
    result = train.instruction_tuning(profile, pt_run[0].model_dir, tmp_path_factory.mktemp("sft"),
                                      max_steps=SFT_STEPS, progress=False, datasets=data,
                                      callbacks=[inspect])
    return result, inspect.facts


def logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


# ------------------------------------------------------------------ the profile and its device

def test_rehearsal_profile_is_the_gpu_recipe_with_sizes_and_device_changed(profile, monkeypatch):
    changed = {f.name for f in dataclasses.fields(GPU) if getattr(GPU, f.name) != getattr(profile, f.name)}
    assert changed == {"device", "base_model", "workdir", *SIZES}
    assert (profile.use_lora, profile.load_in_4bit, profile.bf16, profile.gradient_checkpointing,
            profile.packing, profile.lora_r, profile.lora_alpha, profile.lora_dropout) == \
        (True, True, True, True, True, 64, 16, 0.1)
    monkeypatch.setenv("IMELODIST_DEVICE", "cpu")
    assert get_profile("gpu").device == "cpu" and get_profile("gpu", device="cuda").device == "cuda"
    monkeypatch.setenv("IMELODIST_DEVICE", "tpu")
    with pytest.raises(ValueError, match="unknown device"):
        get_profile("gpu")


def test_device_decides_quantization_and_placement(profile):
    kwargs = models.weights_kwargs(profile)
    q = kwargs["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant,
            q.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    assert kwargs["device_map"] == {"": "cpu"} and kwargs["dtype"] == torch.bfloat16
    assert models.weights_kwargs(get_profile("cpu")) == {}  # the cpu profile: fp32, unquantized
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="IMELODIST_DEVICE=cpu"):
            models.weights_kwargs(get_profile("gpu", device="cuda"))


# ------------------------------------------------------------------ what the trainer trains

def test_trainer_trains_4bit_nf4_base_with_lora_on_all_seven_projections(profile, pt_run):
    _, facts = pt_run
    assert facts["all_4bit"] and facts["quant_type"] == "nf4" and facts["double_quant"]
    assert facts["compute_dtype"] == torch.bfloat16 and facts["weight_device"] == "cpu"
    assert {name.rsplit(".", 1)[-1] for name in facts["lora_shapes"]} == SEVEN
    assert facts["lora_r"] == {64} and facts["lora_scaling"] == {16 / 64} and facts["lora_dropout"] == {0.1}
    # LoRA adds A (r x in) and B (out x r) per targeted linear, nothing else trains
    assert facts["trainable"] == sum(64 * (i + o) for i, o in facts["lora_shapes"].values())
    assert facts["checkpointing"]
    args = facts["args"]
    assert args.bf16 and args.use_cpu and args.gradient_checkpointing
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 4
    assert facts["autocast"] == (True, torch.bfloat16, torch.bfloat16)


def test_pretraining_rows_are_packed(pt_run):
    lengths = pt_run[1]["row_lengths"]
    # wrapped packing: tunes joined and cut into full max_seq_len rows (only the last is shorter)
    assert len(lengths) > 10 and set(lengths[:-1]) == {SIZES["max_seq_len"]}


def test_loss_falls_over_a_few_dozen_qlora_steps(pt_run):
    result, _ = pt_run
    losses = [loss for _, loss in result.train_losses]
    assert result.steps == PT_STEPS and len(losses) >= 4
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1, losses
    assert result.final_val_loss is not None and result.final_val_loss < losses[0]


# ------------------------------------------------------------------ the merge

def test_adapter_and_merged_model_saved_and_merged_weights_moved(profile, pt_run, converted_cache):
    result, _ = pt_run
    adapter = result.output_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (config["r"], config["lora_alpha"], set(config["target_modules"])) == (64, 16, SEVEN)
    merged_config = json.loads((result.model_dir / "config.json").read_text())
    assert "quantization_config" not in merged_config and "auto_map" not in merged_config
    merged, base = weights(result.model_dir), weights(converted_cache)  # base: InternLM2 as Llama
    assert merged.keys() == base.keys() and not any(".lora_" in k for k in merged)
    for key, tensor in base.items():
        moved = not torch.allclose(merged[key].float(), tensor.float(), atol=1e-2)
        # LoRA changes exactly the seven projections; embeddings and norms stay the base's
        assert moved == (key.split(".")[-2] in SEVEN), key
    # notebook 02's closing cells on this result: the loss plot and a raw continuation
    assert len(train.plot_losses(result).axes[0].lines) == 2
    assert train.sample_continuation(result.model_dir, "X:1\nT:", max_new_tokens=8).startswith("X:1\nT:")


def test_merged_logits_equal_the_adapter_on_the_unquantized_reload(profile, pt_run):
    """The 4-bit base cannot absorb the adapter: _save_trained merges it into the bf16 reload of
    the base (train.reload_unquantized: load_model, no remote code), so the reference is that
    reload wrapped with the saved adapter. Both are compared in fp32 arithmetic, which leaves
    one difference: the merged weights W + BA are stored in bf16 (8 mantissa bits), worth a few
    hundredths on these logits (measured 0.027 at |logit| <= 4; bf16 arithmetic adds ~0.1)."""
    from peft import PeftModel

    result, _ = pt_run
    text = corpus_tunes(1)[0][:200]
    merged, tokenizer = models.load_model(result.model_dir)
    reference = PeftModel.from_pretrained(train.reload_unquantized(profile.base_model, profile),
                                          result.output_dir / "adapter").eval()
    assert merged.dtype == torch.bfloat16 and reference.base_model.model.dtype == torch.bfloat16
    merged_logits, adapter_logits = logits(merged.float(), tokenizer, text), logits(reference.float(), tokenizer, text)
    with reference.disable_adapter():
        base_logits = logits(reference, tokenizer, text)
    gap = (merged_logits - adapter_logits).abs().max().item()
    moved = (adapter_logits - base_logits).abs().max().item()
    assert gap < 0.06 and gap < moved / 20, (gap, moved)
    assert (merged_logits.argmax(-1) == adapter_logits.argmax(-1)).float().mean() > 0.95


# ------------------------------------------------------------------ stage 2 and composing

def test_instruction_tuning_rehearsal_merges_and_composes_a_valid_tune(profile, pt_run, sft_run):
    from imelodist_lib.inference import Composer

    result, facts = sft_run
    assert facts["all_4bit"] and facts["args"].bf16 and facts["checkpointing"]
    assert facts["trainable"] == sum(64 * (i + o) for i, o in facts["lora_shapes"].values())
    assert result.steps == SFT_STEPS and (result.output_dir / "adapter").is_dir()
    assert (result.model_dir / "model.safetensors").is_file()
    # notebook 03's cells on this result: the loss mask on the stage-1 tokenizer, before/after answers
    _, tokenizer = models.load_model(pt_run[0].model_dir)
    chat = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": "X:1\nK:G\nGAB|"}]
    assert train.loss_mask_preview(tokenizer, chat).endswith("⟦X:1\nK:G\nGAB|<|im_end|>⟧\n")
    request = ComposeRequest("emotion", emotion="欢快", style="jig", meter="6/8", key="G", bars=4)
    [pair] = train.sample_before_after(pt_run[0].model_dir, result.model_dir, [request], max_new_tokens=8)
    assert pair.task == "emotion" and isinstance(pair.before, str) and isinstance(pair.after, str)
    # the GPU profile's composer: the merged model, loaded as the profile says (4-bit NF4 here)
    composer = Composer(model=result.model_dir, backend="transformers", profile=profile)
    assert composer.engine.model.is_loaded_in_4bit
    [tune] = composer.compose(request, seed=3, constrained=True)
    assert tune.constrained and tune.ok and tune.bar_errors == 0, tune.text


# ------------------------------------------------------------------ the launcher

def test_accelerate_launch_runs_the_gpu_profile_cli_to_a_merged_model(rehearsal_base, converted_cache,
                                                                       tmp_path, monkeypatch):
    """README's GPU commands, with one CPU process instead of four GPUs (`--num_processes 1
    --cpu`) and IMELODIST_DEVICE=cpu; the CLI reads its datasets the library's own way
    (instructions.load_datasets under IMELODIST_RUNS), built here from 16 O'Neill tunes."""
    from imelodist_lib import corpus, instructions

    runs = tmp_path / "runs"
    monkeypatch.setenv("IMELODIST_RUNS", str(runs))
    # the subprocess resolves the same profile (the data settings decide whether files are fresh)
    cli_profile = get_profile("gpu", device="cpu", **SIZES)
    records = [corpus.TuneRecord(id=f"oneills1850#{i}", abc=tune, source="oneills1850")
               for i, tune in enumerate(corpus_tunes(16))]
    instructions.build_datasets(cli_profile, corpus.assemble_corpus(cli_profile, progress=False,
                                                                    records=records), progress=False)
    out = runs / "gpu" / "pt"
    sets = [arg for key, value in SIZES.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO_ROOT / "configs" / "accelerate_multi_gpu.yaml"),
               "--num_processes", "1", "--cpu",
               "-m", "imelodist_lib.train", "--stage", "pt", "--profile", "gpu",
               "--max-steps", "2", "--no-progress", *sets]
    env = {**os.environ, "IMELODIST_DEVICE": "cpu", "IMELODIST_BASE_MODEL": str(rehearsal_base),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "train_result.json").read_text())
    assert summary["steps"] == 2 and summary["model_dir"] == str(out / "final")
    assert summary["tokens_seen"] > 0 and summary["final_val_loss"] is not None
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    model, _ = models.load_model(out / "final")
    assert not getattr(model, "is_loaded_in_4bit", False) and model.dtype == torch.bfloat16
    merged, base = weights(out / "final"), weights(converted_cache)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"].float(),
                           base["model.layers.0.self_attn.q_proj.weight"].float())
    # README's second command, its defaults included (--base runs/gpu/pt/final, --output
    # runs/gpu/sft), in this process: the launcher around it was just proven
    monkeypatch.setenv("IMELODIST_DEVICE", "cpu")
    assert train.main(["--stage", "sft", "--profile", "gpu", "--max-steps", "1", "--no-progress", *sets]) == 0
    sft = json.loads((runs / "gpu" / "sft" / "train_result.json").read_text())
    assert sft["steps"] == 1 and (runs / "gpu" / "sft" / "merged" / "model.safetensors").is_file()
    assert sft["final_val_loss"] < 20  # a number, not NaN (no chat lost all its answer tokens)
