"""Training pipeline on a real (very small) IMelodist-tiny and real tunes from music21's corpus.

Covers: an interrupted run resumed from its checkpoint ends where an uninterrupted one does;
SFT trains on assistant tokens only (checked on the trainer's own prepared data); every output
directory loads back with models.load_model and generates.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import music21
import pytest
from datasets import Dataset, DatasetDict
from transformers import TrainerCallback

from imelodist_lib import train
from imelodist_lib.models import IM_END, load_model
from imelodist_lib.profiles import SYSTEM_PROMPT, get_profile

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128}
PROMPTS = ["请创作一首欢快的吉格舞曲，G大调，6/8拍。", "Compose a reel in D major, 8 bars."]


def corpus_tunes(n: int) -> list[str]:
    """The first n tunes of music21's bundled O'Neill collection, as ABC text."""
    folder = Path(music21.__file__).parent / "corpus" / "oneills1850"
    tunes: list[str] = []
    for path in sorted(folder.glob("*.abc")):
        text = path.read_text(encoding="latin-1")
        tunes += ["X:" + t.strip() for t in text.split("\nX:")[1:]]
        if len(tunes) >= n:
            break
    return tunes[:n]


@pytest.fixture(scope="module")
def data() -> dict:
    tunes = [t for t in corpus_tunes(80) if len(t) < 500]
    chats = [[{"role": "system", "content": SYSTEM_PROMPT},
              {"role": "user", "content": PROMPTS[i % 2]},
              {"role": "assistant", "content": t}] for i, t in enumerate(tunes)]
    cut = len(tunes) - 6
    return {"pt": DatasetDict(train=Dataset.from_dict({"text": tunes[:cut]}),
                              validation=Dataset.from_dict({"text": tunes[cut:]})),
            "sft": DatasetDict(train=Dataset.from_dict({"messages": chats[:cut]}),
                               validation=Dataset.from_dict({"messages": chats[cut:]}))}


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return get_profile("cpu", batch_size=4, max_seq_len=512, eval_steps=2, save_steps=2,
                       tokenizer_vocab_size=400, workdir=tmp_path_factory.mktemp("runs"))


class CrashAt(TrainerCallback):
    """Simulates a killed job: raises once `step` has finished (its checkpoint is not yet written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated interruption after step {self.step}")


@pytest.fixture(scope="module")
def pt_result(profile, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt_full")
    return train.continued_pretraining(profile, out, max_steps=4, progress=False, datasets=data,
                                       tiny_sizes=SMALL)


def test_resumed_run_matches_uninterrupted(profile, data, pt_result, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train.continued_pretraining(profile, tmp_path, max_steps=4, progress=False, datasets=data,
                                    tiny_sizes=SMALL, callbacks=[CrashAt(3)])
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "final").exists()
    resumed = train.continued_pretraining(profile, tmp_path, max_steps=4, resume=True,
                                          progress=False, datasets=data, tiny_sizes=SMALL)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.steps == pt_result.steps == 4
    # same data order, optimizer and scheduler state: the losses agree to float noise
    assert math.isclose(resumed.train_losses[-1][1], pt_result.train_losses[-1][1], rel_tol=1e-3)
    assert math.isclose(resumed.final_val_loss, pt_result.final_val_loss, rel_tol=1e-3)
    assert resumed.tokens_seen == pt_result.tokens_seen > 0


def test_pretraining_learns_and_reports(pt_result):
    losses = [loss for _, loss in pt_result.train_losses]
    assert losses[-1] < losses[0], "four steps at lr 2e-3 must lower the loss of a fresh model"
    assert pt_result.perplexity == pytest.approx(math.exp(pt_result.final_val_loss))
    assert (pt_result.output_dir / "train_result.json").is_file()
    assert (pt_result.model_dir / "model.safetensors").is_file()
    fig = train.plot_losses(pt_result)
    assert len(fig.axes[0].lines) == 2


def test_sft_masks_only_assistant_tokens(profile, data, pt_result, tmp_path):
    model, tokenizer = load_model(pt_result.model_dir, profile, for_training=True)
    trainer = train.make_trainer("sft", profile, data["sft"], model, tokenizer, tmp_path,
                                 max_steps=1, progress=False)
    # packing concatenates whole chats; split a packed row back at each chat's <s>
    row = trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    starts = [i for i, t in enumerate(ids) if t == tokenizer.bos_token_id] + [len(ids)]
    assert len(starts) >= 2
    answers = {m[-1]["content"] + IM_END for m in data["sft"]["train"]["messages"]}
    for a, b in zip(starts, starts[1:]):
        chat_ids, chat_labels = ids[a:b], labels[a:b]
        trained = tokenizer.decode([t for t, lab in zip(chat_ids, chat_labels) if lab != -100])
        untrained = tokenizer.decode([t for t, lab in zip(chat_ids, chat_labels) if lab == -100])
        assert trained in answers  # exactly one answer and its <|im_end|>, nothing else
        assert untrained.startswith("<s><|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>")
        assert untrained.rstrip("\n").endswith("<|im_start|>assistant")
        assert any(p in untrained for p in PROMPTS)


def test_sft_output_loads_and_answers(profile, data, pt_result, tmp_path):
    result = train.instruction_tuning(profile, pt_result.model_dir, tmp_path, max_steps=2,
                                      progress=False, datasets=data)
    assert result.steps == 2 and result.model_dir == tmp_path / "merged"
    assert result.final_val_loss is not None and result.final_val_loss < 20
    model, tokenizer = load_model(result.model_dir)
    answer = train.generate_answer(model, tokenizer, PROMPTS[1], max_new_tokens=8)
    assert isinstance(answer, str)
    assert model.generation_config.eos_token_id in (tokenizer.convert_tokens_to_ids(IM_END),
                                                    [tokenizer.convert_tokens_to_ids(IM_END)])


def test_instruction_tuning_without_stage1_explains(profile, tmp_path):
    with pytest.raises(FileNotFoundError, match="continued pretraining first"):
        train.instruction_tuning(profile, tmp_path / "nothing", tmp_path / "out")


def test_cli_parses_profile_overrides(profile, data, monkeypatch, tmp_path):
    # the CLI is the same function; an unknown profile field is refused before any work starts
    with pytest.raises(TypeError, match="no field"):
        train.main(["--stage", "pt", "--profile", "cpu", "--set", "not_a_field=1",
                    "--output", str(tmp_path)])


def test_fresh_run_into_an_older_runs_folder_refuses_unless_told(profile, data, pt_result, tmp_path):
    """Issue 12: a non-resume run over an older run's checkpoints would let checkpoint rotation
    or a later resume mix the two runs; it refuses, saying how to resume or where to write."""
    old = tmp_path / "old"
    shutil.copytree(pt_result.output_dir, old)
    before = sorted(p.name for p in old.glob("checkpoint-*"))
    assert before == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(FileExistsError, match=r"resume=True \(CLI --resume\).*overwrite=True.*--output"):
        train.continued_pretraining(profile, old, max_steps=2, progress=False, datasets=data,
                                    tiny_sizes=SMALL)
    with pytest.raises(FileExistsError, match="--resume"):
        train.main(["--stage", "sft", "--profile", "cpu", "--base", str(pt_result.model_dir),
                    "--output", str(old), "--no-progress"])
    with pytest.raises(ValueError, match="choose one"):
        train.continued_pretraining(profile, old, resume=True, overwrite=True, datasets=data)
    assert sorted(p.name for p in old.glob("checkpoint-*")) == before  # refused: nothing touched
    result = train.continued_pretraining(profile, old, max_steps=2, progress=False, datasets=data,
                                         tiny_sizes=SMALL, overwrite=True)
    # the old run's checkpoint-4 is gone, not rotated in beside the new run's checkpoint-2
    assert result.steps == 2 and sorted(p.name for p in old.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((old / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (old / "final" / "config.json").is_file()


def test_a_fixed_step_sft_run_reads_only_the_chats_its_steps_reach():
    from imelodist_lib.train import _records_for_steps

    chats = Dataset.from_dict({"messages": [[{"role": "user", "content": str(i)}] for i in range(500)]})
    rows_per_step, seed = 4 * 2, 0  # batch 4, accumulation 2, one process
    picked = _records_for_steps(chats, 15, rows_per_step, seed)
    assert len(picked) == 15 * 4 * 2  # every step's batch, nothing TRL would tokenize in vain
    ids = [m[0]["content"] for m in picked["messages"]]
    assert len(set(ids)) == len(ids) and ids != [str(i) for i in range(len(ids))]  # a random sample
    assert ids == [m[0]["content"] for m in _records_for_steps(chats, 15, rows_per_step, seed)["messages"]]  # seeded
    assert len(_records_for_steps(chats, -1, rows_per_step, seed)) == 500  # full epochs read the whole split
    assert len(_records_for_steps(chats, 100, rows_per_step, seed)) == 500  # more than there is: all of it
