"""Test-wide settings for tests/ and the notebooks nbval runs: CPU size, no progress bars, no hub.

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadscope`) with the
scheduler below: each test file and each notebook is one unit, so a worker runs a module's tests
(sharing its fixtures) or a notebook's cells in order, and notebooks 01 -> 02 -> 03 are one unit,
since each reads what the one before wrote (the datasets, then the stage-1 model). Under xdist
every process, and every kernel nbval starts, uses one torch/BLAS thread: the two workers share
the two cores."""
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


def work_unit(nodeid: str) -> str:
    """What one worker runs whole: the notebook chain, else the test file or notebook."""
    path = nodeid.split("::", 1)[0]
    name = os.path.basename(path)
    if name.endswith(".ipynb") and name.startswith(NOTEBOOK_CHAIN):
        return "notebooks 01-03"
    return path


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` with `work_unit` as the scope. (xdist's `loadgroup` marks do not reach
    the node ids under pytest 9, whose items no longer keep the `_nodeid` xdist rewrites.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ChainScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ChainScheduling(config, log)
