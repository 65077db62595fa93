"""Training presets (configs/presets/*.toml) and type-checked profile overrides.

The shipped model's card says `python -m imelodist_lib.train --preset tiny-sft-2d`; these tests
pin that each checked-in preset reads, names the folders and step counts its stage's recorded
training log shows (data/models/imelodist-tiny/train_result_*.json), and that a wrong type in a
preset, in `--set` or in `get_profile` fails at once with the field's name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from imelodist_lib import train
from imelodist_lib.profiles import SHIPPED_MODEL_DIR, get_profile, parse_override

# preset -> the training log its stage wrote when the shipped model was trained
RECORDED = {
    "tiny-pt": "train_result_pt.json",
    "tiny-sft-2a": "train_result_sft.json",
    "tiny-sft-2b": "train_result_sft_phrases.json",
    "tiny-sft-2c": "train_result_sft_phrases4.json",
    "tiny-sft-2d": "train_result_sft_transposed.json",
}


def plan(*argv: str) -> train.RunPlan:
    return train.plan_run(train.build_parser().parse_args(list(argv)))


def test_the_shipped_models_stages_are_checked_in_as_presets():
    assert train.preset_names() == sorted(RECORDED)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_each_preset_matches_its_stages_recorded_run(name):
    log = json.loads((SHIPPED_MODEL_DIR / RECORDED[name]).read_text())
    preset = train.load_preset(name)
    assert preset.stage == log["stage"]
    assert preset.output == log["output_dir"]
    if preset.max_steps and preset.max_steps > 0:
        assert preset.max_steps == log["steps"]


def test_each_sft_preset_starts_from_the_model_the_stage_before_wrote():
    logs = {name: json.loads((SHIPPED_MODEL_DIR / f).read_text()) for name, f in RECORDED.items()}
    order = sorted(RECORDED)  # tiny-pt, tiny-sft-2a .. 2d: the order the stages ran
    for before, after in zip(order, order[1:]):
        assert train.load_preset(after).base == logs[before]["model_dir"]


def test_a_preset_becomes_the_profile_and_flags_override_it():
    p = plan("--preset", "tiny-sft-2d")
    assert (p.stage, p.max_steps, p.output) == ("sft", 2400, "runs/tiny5/sft")
    assert p.profile.transposed_chat_share == 1.0 and p.profile.instructions_per_tune == 2
    assert p.profile.workdir == Path("runs/tiny5") and p.profile.learning_rate == 0.0005
    p = plan("--preset", "tiny-sft-2d", "--max-steps", "10", "--set", "batch_size=2",
             "--output", "elsewhere")
    assert (p.max_steps, p.output, p.profile.batch_size) == (10, "elsewhere", 2)
    assert p.profile.learning_rate == 0.0005  # the preset's other fields stay


def test_a_preset_from_a_path_is_checked(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('stage = "pt"\nprofile = "cpu"\n[set]\nmax_tunes = 40\n')
    assert plan("--preset", str(good)).profile.max_tunes == 40
    bad = tmp_path / "bad.toml"
    bad.write_text('stage = "pt"\n[set]\nbatch_size = "8"\n')
    with pytest.raises(TypeError, match="'batch_size' takes int"):
        train.load_preset(bad)
    bad.write_text('stage = "pt"\nsteps = 3\n')
    with pytest.raises(ValueError, match="unknown key"):
        train.load_preset(bad)
    with pytest.raises(FileNotFoundError, match="tiny-sft-2d"):
        train.load_preset("no-such-preset")


def test_the_command_line_refuses_a_wrong_type_before_any_work():
    with pytest.raises(TypeError, match="'batch_size' takes int, got 'eight'"):
        train.main(["--preset", "tiny-pt", "--set", "batch_size=eight"])
    with pytest.raises(ValueError, match="--stage pt|sft or --preset"):
        train.main(["--set", "eval_steps=5"])


def test_overrides_are_read_as_the_fields_type():
    assert parse_override("learning_rate=1") == ("learning_rate", 1.0)
    assert parse_override("max_tunes=null") == ("max_tunes", None)
    assert parse_override("transpositions=[-2, 2]") == ("transpositions", (-2, 2))
    assert parse_override("base_model=123") == ("base_model", "123")
    assert parse_override("workdir=runs/x") == ("workdir", Path("runs/x"))
    with pytest.raises(TypeError, match="no field 'batchsize'"):
        parse_override("batchsize=8")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_override("batch_size")


@pytest.mark.parametrize("field, value", [("batch_size", "8"), ("packing", 1), ("transpositions", 2),
                                          ("max_tunes", 1.5), ("eval_steps", True)])
def test_get_profile_refuses_a_value_of_the_wrong_type(field, value):
    with pytest.raises(TypeError, match=f"'{field}' takes"):
        get_profile("cpu", **{field: value})


def test_a_given_workdir_wins_over_imelodist_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("IMELODIST_RUNS", str(tmp_path / "env"))
    assert get_profile("cpu").run_dir == tmp_path / "env" / "cpu"
    assert get_profile("cpu", workdir=tmp_path / "mine").run_dir == tmp_path / "mine" / "cpu"
    monkeypatch.delenv("IMELODIST_RUNS")
    assert get_profile("cpu").run_dir.parent.name == "runs"
