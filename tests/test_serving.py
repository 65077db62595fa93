"""serve_lmdeploy's lifecycle, on CPU: a stand-in `lmdeploy` executable that is a real small HTTP
server (tests/stand_in_lmdeploy.py) binds 127.0.0.1 and checks the API key; serve_lmdeploy itself
runs unchanged. Only 127.0.0.1 is used."""
from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imelodist_lib.inference import Composer, GrammarNotEnforcedError, LMDeployServer, serve_lmdeploy
from imelodist_lib.instructions import ComposeRequest
from imelodist_lib.profiles import get_profile

CPU = get_profile("cpu", max_new_tokens=100)
STAND_IN = Path(__file__).with_name("stand_in_lmdeploy.py")
REQUEST = ComposeRequest("emotion", emotion="欢快", meter="6/8", key="G", bars=4)


@pytest.fixture
def lmdeploy_bin(tmp_path) -> str:
    """An executable named lmdeploy that runs the stand-in with this interpreter."""
    path = tmp_path / "bin" / "lmdeploy"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STAND_IN}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    (tmp_path / "merged").mkdir()
    return tmp_path / "merged"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid: int) -> bool:
    """True when the process is reaped (no zombie left in the process table)."""
    return not Path(f"/proc/{pid}").exists()


def _open_files() -> set[str]:
    fds = Path("/proc/self/fd")
    return {os.path.realpath(fds / fd) for fd in os.listdir(fds) if (fds / fd).exists()}


def test_serves_on_loopback_with_a_key_that_the_composer_sends(lmdeploy_bin, model_dir):
    port = _free_port()
    server = serve_lmdeploy(model_dir, port=port, lmdeploy_bin=lmdeploy_bin, wait_seconds=30)
    try:
        assert isinstance(server, LMDeployServer) and server.url == f"http://127.0.0.1:{port}/v1"
        assert len(server.api_key) == 48 and server.log_path.parent == model_dir.parent
        assert str(server.log_path) not in _open_files()  # our handle on the log is closed
        with pytest.raises(urllib.error.HTTPError, match="401"):  # no key, no answer
            urllib.request.urlopen(f"{server.url}/models", timeout=5)
        with pytest.raises(PermissionError, match="refused the API key"):
            Composer(backend="openai", base_url=server.url, profile=CPU)  # no key: told so
        composer = server.composer(profile=CPU)
        assert composer.engine.server == "lmdeploy" and composer.engine.model == "imelodist"
        [free] = composer.compose(REQUEST, seed=0)  # the key went with it: the stand-in answered
        assert free.text.startswith("Here is a cheerful tune")
        with pytest.raises(NotImplementedError, match="backend='lmdeploy'"):
            composer.compose(REQUEST, constrained=True)
        # forcing a grammar field on it: the stand-in ignores it, and the answer is refused on arrival
        forced = server.composer(profile=CPU, grammar_field="guided_grammar")
        with pytest.raises(GrammarNotEnforcedError, match=r"lmdeploy server at .* decoded unconstrained"):
            forced.compose(REQUEST, constrained=True, seed=0)
    finally:
        code = server.stop(timeout=10)
    argv = json.loads(server.log_path.read_text().splitlines()[0])
    assert argv[argv.index("--server-name") + 1] == "127.0.0.1"
    assert argv[argv.index("--api-keys") + 1] == server.api_key
    assert argv[argv.index("--server-port") + 1] == str(port)
    assert code is not None and _gone(server.process.pid)
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_refuses_a_port_something_answers_on_and_says_what(lmdeploy_bin, model_dir):
    class Models(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"data": [{"id": "other-model", "owned_by": "vllm"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        with pytest.raises(RuntimeError, match=rf"port {port} on 127.0.0.1 is taken: an OpenAI-compatible "
                                               r"server serving other-model \(owned by vllm\)"):
            serve_lmdeploy(model_dir, port=port, lmdeploy_bin=lmdeploy_bin, wait_seconds=10)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not (model_dir.parent / "lmdeploy_server.log").exists()  # nothing was started


def test_stop_kills_a_server_that_ignores_terminate(lmdeploy_bin, model_dir, monkeypatch):
    monkeypatch.setenv("STAND_IN_IGNORE_TERM", "1")
    with serve_lmdeploy(model_dir, port=_free_port(), lmdeploy_bin=lmdeploy_bin, wait_seconds=30,
                        api_key="my-own-key") as server:
        assert server.api_key == "my-own-key"
        assert server.process.poll() is None
        assert server.stop(timeout=1) == -9  # SIGTERM ignored: killed after the timeout
    assert _gone(server.process.pid)


def test_with_block_stops_the_server_when_the_body_fails(lmdeploy_bin, model_dir):
    with pytest.raises(ZeroDivisionError):
        with serve_lmdeploy(model_dir, port=_free_port(), lmdeploy_bin=lmdeploy_bin, wait_seconds=30) as server:
            1 / 0
    assert server.process.returncode is not None and _gone(server.process.pid)


def test_a_server_that_exits_at_start_is_reported_with_its_log(lmdeploy_bin, model_dir, monkeypatch):
    monkeypatch.setenv("STAND_IN_EXIT", "3")
    with pytest.raises(RuntimeError, match=r"exited with code 3: see .*lmdeploy_server.log"):
        serve_lmdeploy(model_dir, port=_free_port(), lmdeploy_bin=lmdeploy_bin, wait_seconds=30)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serve_lmdeploy(model_dir / "missing", lmdeploy_bin=lmdeploy_bin)


def test_make_run_gives_notebook_04_lmdeploys_kernel_on_a_gpu_only_where_it_exists():
    from imelodist_lib.run_notebooks import LMDEPLOY_KERNEL, kernel_for

    nb04, nb03 = Path("04_inference_lmdeploy.ipynb"), Path("03_instruction_tuning.ipynb")
    both = {"python3": "", LMDEPLOY_KERNEL: ""}
    assert kernel_for(nb04, True, both) == LMDEPLOY_KERNEL
    assert kernel_for(nb04, True, {"python3": ""}) == "python3"
    assert kernel_for(nb04, False, both) == "python3" and kernel_for(nb03, True, both) == "python3"


def test_make_run_keeps_what_an_output_widget_shows_as_the_cells_output(tmp_path):
    # nbclient's Output-widget imitation (off in make run's client) would move "inside" into the
    # widget's state and can stall the cell until its timeout (run_notebooks.notebook_client)
    import nbformat

    from imelodist_lib.run_notebooks import run_notebook

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_code_cell(
        "import ipywidgets as W\nfrom IPython.display import display\n"
        "out = W.Output()\ndisplay(out)\nwith out:\n    print('inside')"))
    src = tmp_path / "src" / "99_widget.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, src)
    done = nbformat.read(run_notebook(src, tmp_path / "out"), as_version=4)
    texts = [o.get("text", "") for o in done.cells[0].outputs if o.output_type == "stream"]
    assert texts == ["inside\n"]
    assert (tmp_path / "out" / "99_widget.html").is_file()
