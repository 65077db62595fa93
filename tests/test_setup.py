"""make setup hands pip's configured package sources to uv (.ci/uv_flags.py)."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("uv_flags", Path(__file__).parents[1] / ".ci" / "uv_flags.py")
uv_flags = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uv_flags)


def test_pip_config_lines_become_uv_flags_once_each_in_pips_order():
    lines = [":env:.find-links='/opt/wheels'",
             "global.cert='/etc/ssl/certs/ca-certificates.crt'",
             "global.constraint='/etc/xdg/pip/constraints.txt'",
             "global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'",
             "global.find-links='/opt/wheels'",
             "download.index-url='https://not-read.example/simple'",  # pip install reads global, install
             "install.index-url='https://mirror.example/simple'"]
    assert uv_flags.uv_flags(lines) == [
        "--find-links", "/opt/wheels", "--constraint", "/etc/xdg/pip/constraints.txt",
        "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
        "--index-url", "https://mirror.example/simple"]
    assert uv_flags.uv_flags([]) == []
