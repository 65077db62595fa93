"""Test-wide settings for tests/ and the notebooks nbval runs: CPU size, no progress bars, no hub.

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`). Each test file
and each notebook is one group, so a worker runs a module's tests (and shares its fixtures) or a
notebook's cells in order; notebooks 01 -> 02 -> 03 are one group, since each reads what the one
before wrote (the datasets, then the stage-1 model). Under xdist every process, and every kernel
nbval starts, uses one torch/BLAS thread: two workers share the two cores."""
import os

os.environ.setdefault("IMELODIST_PROFILE", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")

NOTEBOOK_CHAIN = ("01_", "02_", "03_")


def xdist_group(path) -> str:
    """The worker group of a collected file: the notebook chain, else the file itself."""
    name = os.path.basename(str(path))
    if name.endswith(".ipynb") and name.startswith(NOTEBOOK_CHAIN):
        return "notebooks-01-03"
    return os.path.relpath(str(path), os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item.path)))
