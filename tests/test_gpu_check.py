"""The prepared GPU check runs at fixture size on the CPU, so it cannot rot before a GPU is lent."""
import importlib.util
import json
import math

from imelodist_lib.profiles import REPO_ROOT


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "gpu.json"
    assert _gpu_check().main(["--dry-run", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert report["command"].startswith("python benchmarks/gpu_check.py --dry-run")
    assert stages["ceilings"]["status"] == "skipped" and "CUDA" in stages["ceilings"]["why"]
    expected = ["data", "tokenizer", "checkpoint", "convert", "pt", "sft", "decode", "valid"]
    assert [name for name in stages if name != "ceilings"] == expected
    assert all(stages[name]["status"] == "ok" for name in expected), {n: stages[n].get("error") for n in expected}
    assert stages["convert"]["tokenizer_json"]
    for stage in ("pt", "sft"):
        assert stages[stage]["adapter"] and stages[stage]["steps"] == 3
        assert all(math.isfinite(loss) for loss in stages[stage]["losses"])
    assert stages["decode"]["single_tokens"] > 0 and stages["decode"]["batch16_tokens"] > 0
    assert stages["valid"]["answers"] == stages["valid"]["valid"] == 6
