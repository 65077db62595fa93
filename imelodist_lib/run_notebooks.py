"""Run every numbered notebook in order, headless, as `make run` does.

    python -m imelodist_lib.run_notebooks [--out runs/notebooks] [--only 01 02]

Executed copies (with their plots and players) and HTML exports go to `--out`; the size comes
from the one switch (`IMELODIST_PROFILE`, default cpu when there is no CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from imelodist_lib.profiles import REPO_ROOT, get_profile

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
LMDEPLOY_KERNEL = "imelodist-lmdeploy"  # LMDeploy's own environment as a kernel (make lmdeploy-env)


def numbered_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in pipeline order, optionally only those whose number is listed."""
    books = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        books = [b for b in books if b.name[:2] in only]
    return books


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


def run_notebook(src: Path, out_dir: Path, kernel: str = "python3") -> Path:
    """Execute one notebook with papermill (cwd = notebooks/) and export it to HTML."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    papermill.execute_notebook(str(src), str(dst), cwd=str(src.parent), kernel_name=kernel,
                               progress_bar=False)
    html, _ = HTMLExporter().from_notebook_node(nbformat.read(dst, as_version=4))
    dst.with_suffix(".html").write_text(html, encoding="utf-8")
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "notebooks"))
    parser.add_argument("--only", nargs="*", help="notebook numbers, e.g. 01 04")
    args = parser.parse_args(argv)
    profile = get_profile()
    out_dir = Path(args.out)
    books = numbered_notebooks(args.only)
    if not books:
        print(f"no numbered notebooks in {NOTEBOOK_DIR}", file=sys.stderr)
        return 1
    print(f"profile {profile.name}: running {len(books)} notebooks -> {out_dir}")
    for book in books:
        start = time.perf_counter()
        try:
            dst = run_notebook(book, out_dir, kernel_for(book, profile.is_gpu))
        except Exception as err:  # papermill names the failing cell; keep its message short
            print(f"FAILED {book.name}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}",
                  file=sys.stderr)
            print(f"  the partly executed notebook is in {out_dir / book.name}", file=sys.stderr)
            return 1
        print(f"  {book.name}: {time.perf_counter() - start:6.1f} s -> {dst}")
    print(f"\nDone. Open the executed notebooks (or their .html exports) in {out_dir};")
    print(f"datasets, checkpoints and results are under {profile.run_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "0")
    raise SystemExit(main())
