"""Run every numbered notebook in order, headless, as `make run` does.

    python -m imelodist_lib.run_notebooks [--out runs/notebooks] [--only 01 02] [--jobs 2]

Executed copies (with their plots and players) and HTML exports go to `--out`; the size comes
from the one switch (`IMELODIST_PROFILE`, default cpu when there is no CUDA).
With `--jobs 2` (the default at CPU size with two or more cores; `--jobs 1` runs them in turn)
the notebooks run in two lanes at once: 01 -> 02 -> 03 in order (each needs the one before: the
datasets, then the stage-1 model), the others in the second lane, each kernel with one torch
thread so the lanes don't fight over the cores. A CPU-size kernel decodes and trains on one
core, so one lane leaves the other idle: measured after `make test` in one clone on this 2-core
machine (datasets then built from every train tune), 9 min 1 s in one lane, 5 min 54 s in two;
with the CPU size's sampled datasets a fresh clone's whole `make run` took 2 min 13 s (README).
(04-07 read the shipped model; 06 and 07 read notebook 01's tunes.jsonl, or assemble it under
the data folder's lock, so a lane never reads a half-written file.)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from imelodist_lib.parallel import default_workers
from imelodist_lib.profiles import REPO_ROOT, get_profile

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
LMDEPLOY_KERNEL = "imelodist-lmdeploy"  # LMDeploy's own environment as a kernel (make lmdeploy-env)


def numbered_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in pipeline order, optionally only those whose number is listed."""
    books = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        books = [b for b in books if b.name[:2] in only]
    return books


CHAIN = ("01", "02", "03")  # notebooks that read what the one before wrote: one lane, in order


def lanes(books: list[Path], jobs: int) -> list[list[Path]]:
    """The notebooks split into at most `jobs` lanes run side by side: the CHAIN in one, in
    order, the rest in the others (one lane when jobs is 1)."""
    if jobs <= 1:
        return [books]
    chain = [b for b in books if b.name[:2] in CHAIN]
    rest = [b for b in books if b.name[:2] not in CHAIN]
    groups = [chain] + [rest[i::jobs - 1] for i in range(jobs - 1)]
    return [g for g in groups if g]


def run_lanes(groups: list[list[Path]], out_dir: Path) -> int:
    """Each lane in its own process (`--jobs 1 --only ...`), one torch thread per kernel; returns
    the first non-zero exit code (0: every notebook ran)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "imelodist_lib.run_notebooks", "--out", str(out_dir),
                               "--jobs", "1", "--only", *[b.name[:2] for b in group]], env=env)
             for group in groups]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def kernel_for(notebook: Path, is_gpu: bool, kernels: dict | None = None) -> str:
    """python3, except notebook 04 on a GPU when LMDeploy's kernel exists: there it composes
    with LMDeploy's in-process pipeline, where guaranteed-valid mode works (its api_server,
    reached from python3, takes no grammar)."""
    if is_gpu and notebook.name.startswith("04_"):
        if kernels is None:
            from jupyter_client.kernelspec import find_kernel_specs

            kernels = find_kernel_specs()
        if LMDEPLOY_KERNEL in kernels:
            return LMDEPLOY_KERNEL
    return "python3"


def notebook_client(nb: Any, cwd: Path, kernel: str = "python3", timeout: int | None = None) -> Any:
    """An nbclient `NotebookClient` for `nb` run in `cwd`, without nbclient's imitation of a
    browser's Output widget. That imitation sends the captured outputs back to the kernel on the
    shell socket while the client waits on that socket for the cell's reply, and with
    jupyter_client 8 the send can swallow the reply's wake-up: a cell that shows something inside
    an Output widget (the playground's buttons) then waits until its timeout, or forever without
    one (measured: notebook 05's Regenerate cells took the full 60 s timeout each, 1-2 s without
    the imitation). Without it, what such a cell shows is kept as the cell's own output."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, kernel_name=kernel, timeout=timeout, resources={"metadata": {"path": str(cwd)}})
    client.comm_open_handlers["jupyter.widget"] = lambda _msg: None  # no Output-widget imitation
    return client


def run_notebook(src: Path, out_dir: Path, kernel: str = "python3") -> Path:
    """Execute one notebook (cwd = notebooks/) and export it to HTML; the executed copy is
    written even when a cell fails (nbclient's CellExecutionError names the cell)."""
    import nbformat
    from nbconvert import HTMLExporter

    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    nb = nbformat.read(src, as_version=4)
    try:
        notebook_client(nb, src.parent, kernel).execute()
    finally:
        nbformat.write(nb, dst)
    html, _ = HTMLExporter().from_notebook_node(nb)
    dst.with_suffix(".html").write_text(html, encoding="utf-8")
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "notebooks"))
    parser.add_argument("--only", nargs="*", help="notebook numbers, e.g. 01 04")
    parser.add_argument("--jobs", type=int, default=None,
                        help="notebooks run at once in lanes (default: 2 at CPU size on two or more cores, else 1)")
    args = parser.parse_args(argv)
    profile = get_profile()
    out_dir = Path(args.out)
    books = numbered_notebooks(args.only)
    if not books:
        print(f"no numbered notebooks in {NOTEBOOK_DIR}", file=sys.stderr)
        return 1
    # two lanes at CPU size; at GPU size one (training and serving a 7B model share one GPU badly)
    jobs = args.jobs if args.jobs is not None else 1 if profile.is_gpu else min(2, default_workers())
    groups = lanes(books, jobs)
    if len(groups) > 1:
        start = time.perf_counter()
        print(f"profile {profile.name}: running {len(books)} notebooks in {len(groups)} lanes "
              f"({' | '.join(' '.join(b.name[:2] for b in g) for g in groups)}) -> {out_dir}", flush=True)
        code = run_lanes(groups, out_dir)
        print(f"all lanes: {time.perf_counter() - start:.1f} s" + ("" if code == 0 else " (a notebook failed)"))
        return code
    print(f"profile {profile.name}: running {len(books)} notebooks -> {out_dir}", flush=True)
    for book in books:
        start = time.perf_counter()
        try:
            dst = run_notebook(book, out_dir, kernel_for(book, profile.is_gpu))
        except Exception as err:  # nbclient names the failing cell; keep its message short
            print(f"FAILED {book.name}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}",
                  file=sys.stderr)
            print(f"  the partly executed notebook is in {out_dir / book.name}", file=sys.stderr)
            return 1
        print(f"  {book.name}: {time.perf_counter() - start:6.1f} s -> {dst}", flush=True)
    print(f"\nDone. Open the executed notebooks (or their .html exports) in {out_dir};")
    print(f"datasets, checkpoints and results are under {profile.run_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "0")
    raise SystemExit(main())
