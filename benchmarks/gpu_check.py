"""The prepared GPU check (`make gpu-check`) -> benchmarks/results/gpu.json.

One script for the day a GPU is lent: on one H100/H200-class GPU with no hub access it runs the
GPU profile's own code end to end on random weights of InternLM2-chat-7B's shape, built locally:

  ceilings    the card's bf16 matrix rate and copy bandwidth, measured (the datasheet's are leads)
  tokenizer   the InternLM2 fixture's SentencePiece tokenizer, trained on the project's text
  checkpoint  an InternLM2 checkpoint in the hub's layout (fused wqkv, remote-code files that
              raise if imported), InternLM2-chat-7B's shape, random bf16 weights
  convert     models.load_model's conversion to a plain Llama with a fast tokenizer (no remote code)
  pt, sft     QLoRA continued pretraining and SFT steps through train.continued_pretraining /
              instruction_tuning with the gpu profile (NF4 double-quant, LoRA r=64 on all seven
              projections, bf16, gradient checkpointing): tokens/s and MFU against the measured
              and the datasheet bf16 rate; both stages end with the adapter merged
  decode      the merged model through Composer (LMDeploy's pipeline when lmdeploy is importable,
              else transformers): tokens/s single stream and at batch 16, against the HBM bound
              (weight bytes read once per decoding step)
  valid       guaranteed-valid answers through the same Composer: every one must be valid

Each stage writes its figures into the results file as soon as it ends, so a run cut short still
reports what it reached; a stage that cannot run (no lmdeploy in this environment, say) says why.

    python benchmarks/gpu_check.py                 # on the GPU machine (about 6-8 minutes)
    python benchmarks/gpu_check.py --dry-run       # fixture size on the CPU (the test suite runs this)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "gpu.json"

# InternLM2-chat-7B's shape (its config.json); the vocabulary is its own size, the tokenizer the
# fixture's (its ids fill the low end of the table, as a real tokenizer's would).
INTERNLM2_7B = dict(vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                    rope_theta=1000000.0)
FIXTURE = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               rope_theta=1000000.0)
# Datasheet dense bf16 rates and HBM bandwidths (leads; the ceilings stage measures the card).
DATASHEET = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


class Report:
    """The results file, rewritten after every stage so a cut-short run keeps what it reached."""

    def __init__(self, path: Path, command: str):
        self.path = path
        self.data: dict = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           "stages": {}}
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.path)

    @contextmanager
    def stage(self, name: str):
        """Time one stage; record its figures (the yielded dict), or why it was skipped or failed."""
        figures: dict = {}
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            yield figures
            figures.setdefault("status", "ok")
        except Skip as why:
            figures.update(status="skipped", why=str(why))
        except Exception as err:  # noqa: BLE001 - a failed stage is a finding, recorded, not hidden
            figures.update(status="failed", error=f"{type(err).__name__}: {err}",
                           traceback=traceback.format_exc(limit=6))
            raise
        finally:
            figures["seconds"] = round(time.perf_counter() - start, 2)
            self.data["stages"][name] = figures
            self.write()
            print(f"   {json.dumps({k: v for k, v in figures.items() if k != 'traceback'}, default=str)}",
                  flush=True)


class Skip(Exception):
    """A stage that cannot run here, with the reason."""


# ------------------------------------------------------------------------------ the ceilings

def measure_ceilings(device: str) -> dict:
    """bf16 matrix rate (8192^3 products) and copy bandwidth (bytes read + written), measured."""
    import torch

    if device != "cuda":
        raise Skip("no CUDA device: the ceilings are the GPU's")
    name = torch.cuda.get_device_name()
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    flops = 10 * 2 * n ** 3 / (start.elapsed_time(end) / 1e3)
    src = torch.randn(2 ** 30, device="cuda", dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    start.record()
    for _ in range(5):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    bandwidth = 5 * 2 * src.numel() * 4 / (start.elapsed_time(end) / 1e3)
    del a, b, src, dst
    torch.cuda.empty_cache()
    sheet = next((v for k, v in DATASHEET.items() if k in name), (None, None))
    return {"gpu": name, "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1),
            "bf16_flops_measured": flops, "copy_bytes_per_s_measured": bandwidth,
            "bf16_flops_datasheet": sheet[0], "hbm_bytes_per_s_datasheet": sheet[1]}


def model_flops_per_token(cfg: dict, seq: int) -> float:
    """Training FLOPs per token by the usual convention (PaLM's): 6 x parameters in the matrix
    products + 12 x layers x hidden x sequence for attention. QLoRA does less (no weight gradients
    for the frozen base) and more (dequantisation, recomputed activations); MFU by this convention
    is what papers compare."""
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * inter
    matmul_params = layers * per_layer + vocab * h  # the output head; the embedding is a lookup
    return 6 * matmul_params + 12 * layers * h * seq


# ------------------------------------------------------------------------------ the stages

def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "xgrammar",
                 "lmdeploy", "sentencepiece", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def step_clock():
    """A TrainerCallback timing optimizer steps after the first (which warms up kernels and caches)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int, int]] = []  # (time, step, tokens seen)

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.global_step, int(state.num_input_tokens_seen or 0)))

        def tokens_per_second(self) -> float | None:
            if len(self.marks) < 2:
                return None
            (t0, _, n0), (t1, _, n1) = self.marks[0], self.marks[-1]
            return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    return StepClock()


def training_data(workdir: Path | None, tunes: int):
    """Small pt/sft datasets built by notebook 01's code (instructions.load_datasets) for `tunes`
    tunes under workdir, reused when they exist and match, so a prepared folder can travel to a
    GPU machine; workdir None: the cpu profile's own datasets (notebook 01 builds them)."""
    from imelodist_lib.instructions import load_datasets
    from imelodist_lib.profiles import get_profile

    profile = get_profile("cpu") if workdir is None else get_profile("cpu", max_tunes=tunes, workdir=workdir)
    data = load_datasets(profile, progress=False)
    # the check times training, not tokenising or evaluating: 400 training rows (enough for its
    # steps; the trainer goes round again if not) and 16 validation rows of each kind
    for kind in data:
        for split, rows in (("train", 400), ("validation", 16)):
            data[kind][split] = data[kind][split].select(range(min(rows, len(data[kind][split]))))
    return data


def run(args) -> int:
    import torch

    from imelodist_lib import internlm2
    from imelodist_lib.instructions import ComposeRequest
    from imelodist_lib.profiles import KNOWLEDGE_DIR, get_profile

    device = "cpu" if args.dry_run else "cuda"
    shape = FIXTURE if args.dry_run else INTERNLM2_7B
    work = Path(args.workdir or tempfile.mkdtemp(prefix="imelodist-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(Path(args.out), "python benchmarks/gpu_check.py " + " ".join(args.argv))
    report.data.update(versions=versions(), dry_run=args.dry_run, shape=shape, workdir=str(work))
    report.write()

    with report.stage("ceilings") as fig:
        fig.update(measure_ceilings(device))
    ceilings = report.data["stages"]["ceilings"]

    with report.stage("data") as fig:
        data = training_data(Path(args.data) if args.data else None, args.tunes)
        fig.update({f"{kind}_{split}": len(rows) for kind, d in data.items() for split, rows in d.items()})

    with report.stage("tokenizer") as fig:
        # the project's zh/en knowledge text and the training set's tunes, as the test fixture's
        texts = [p.read_text(encoding="utf-8") for p in sorted(KNOWLEDGE_DIR.iterdir())
                 if p.suffix in (".md", ".tsv", ".jsonl")] + list(data["pt"]["train"]["text"][:300])
        tok_model = internlm2.train_sentencepiece_model(texts, work / "tokenizer.model", vocab_size=2000,
                                                        character_coverage=0.98)
        fig.update(texts=len(texts), pieces=2000)

    with report.stage("checkpoint") as fig:
        src = internlm2.write_internlm2_checkpoint(
            work / "internlm2", tok_model, vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
            num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
            num_key_value_heads=shape["num_key_value_heads"], intermediate_size=shape["intermediate_size"],
            max_position_embeddings=shape["max_position_embeddings"], rope_theta=shape["rope_theta"],
            dtype=torch.bfloat16, shards=1 if args.dry_run else 8, device=device,
            init_std=0.1 if args.dry_run else 0.02)
        fig.update(bytes=sum(p.stat().st_size for p in src.iterdir()))

    with report.stage("convert") as fig:
        converted = internlm2.ensure_llama_checkpoint(src, cache_dir=work / "converted")
        fig.update(path=str(converted), tokenizer_json=(converted / "tokenizer.json").is_file())
        if not args.dry_run:
            shutil.rmtree(src)  # disk: three 15 GB copies do not fit beside each other

    from imelodist_lib.train import continued_pretraining, instruction_tuning

    profile = get_profile("gpu", device=device, base_model=str(converted), max_seq_len=args.seq,
                          batch_size=args.batch, grad_accum=1, pt_max_steps=args.steps,
                          sft_max_steps=args.steps, eval_steps=10 ** 6, save_steps=10 ** 6,
                          workdir=work / "runs")
    peak = ceilings.get("bf16_flops_measured")
    stage_dirs = {}
    for stage, train in (("pt", continued_pretraining), ("sft", instruction_tuning)):
        with report.stage(stage) as fig:
            clock = step_clock()
            kwargs = dict(output_dir=work / stage, progress=False, datasets=data, callbacks=[clock])
            if stage == "sft":
                kwargs["base_dir"] = stage_dirs["pt"]
            result = train(profile, **kwargs)
            stage_dirs[stage] = result.model_dir
            rate = clock.tokens_per_second()
            losses = [round(loss, 4) for _, loss in result.train_losses]
            fig.update(steps=result.steps, tokens=result.tokens_seen, losses=losses,
                       tokens_per_second=rate, model_dir=str(result.model_dir),
                       adapter=(result.model_dir.parent / "adapter" / "adapter_config.json").is_file())
            if rate and peak:
                flops = rate * model_flops_per_token(shape, args.seq)
                fig.update(mfu_measured_peak=flops / peak)
                if ceilings.get("bf16_flops_datasheet"):
                    fig.update(mfu_datasheet_peak=flops / ceilings["bf16_flops_datasheet"])

    from imelodist_lib.inference import Composer

    with report.stage("decode") as fig:
        composer = Composer(str(stage_dirs["sft"]), profile=profile)
        request = ComposeRequest("emotion", emotion="joyful", key="G", meter="6/8", bars=8, lang="en")
        composer.compose(request, n=1, max_new_tokens=8, seed=0)  # warm-up
        single = composer.compose(request, n=1, max_new_tokens=args.new_tokens, temperature=1.0, seed=1)[0]
        batch = composer.compose(request, n=16, max_new_tokens=args.new_tokens, temperature=1.0, seed=2)
        weight_bytes = sum(p.numel() * p.element_size() for p in composer.engine.model.parameters()) \
            if hasattr(composer.engine, "model") else None
        fig.update(backend=composer.backend, single_tokens=single.completion_tokens,
                   single_tokens_per_second=single.completion_tokens / single.seconds,
                   batch16_tokens=sum(c.completion_tokens for c in batch),
                   batch16_tokens_per_second=sum(c.completion_tokens for c in batch) / batch[0].seconds,
                   weight_bytes=weight_bytes)
        bandwidth = ceilings.get("copy_bytes_per_s_measured")
        if weight_bytes and bandwidth:
            bound = bandwidth / weight_bytes  # each decoding step reads every weight once
            fig.update(hbm_bound_tokens_per_second=bound,
                       single_share_of_bound=fig["single_tokens_per_second"] / bound,
                       batch16_share_of_bound=fig["batch16_tokens_per_second"] / (16 * bound))

    with report.stage("valid") as fig:
        requests = [ComposeRequest("emotion", emotion="tender", key="D", meter="3/4", bars=4, lang="en"),
                    ComposeRequest("emotion", style="reel", key="Am", meter="4/4", bars=4, lang="zh"),
                    ComposeRequest("chords", chords=["G", "C", "D", "G"], key="G", meter="6/8", bars=4, lang="en")]
        answers = [c for r in requests for c in composer.compose(r, n=2, constrained=True, seed=3)]
        fig.update(answers=len(answers), valid=sum(c.ok for c in answers), backend=composer.backend)
        if fig["valid"] != fig["answers"]:
            raise AssertionError(f"guaranteed-valid mode gave {fig['valid']}/{fig['answers']} valid answers")

    report.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report.write()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="fixture size on the CPU")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--workdir", default=None, help="where checkpoints go (default: a temp folder)")
    parser.add_argument("--data", default=None,
                        help="workdir of the small training set (built there when missing; "
                             "default: the cpu profile's datasets, which notebook 01 builds)")
    parser.add_argument("--tunes", type=int, default=120, help="tunes in the small training set")
    parser.add_argument("--prepare-data", metavar="DIR", default=None,
                        help="only build the small training set into DIR (to carry to the GPU machine)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.prepare_data:
        data = training_data(Path(args.prepare_data), args.tunes)
        print({kind: {split: len(rows) for split, rows in d.items()} for kind, d in data.items()})
        return 0
    small = args.dry_run
    args.steps = args.steps or (3 if small else 12)
    args.seq = args.seq or (128 if small else 2048)
    args.batch = args.batch or (2 if small else 4)
    args.new_tokens = args.new_tokens or (16 if small else 256)
    if small:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
