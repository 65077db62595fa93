"""The player in a real browser: execute a notebook, export it to HTML, open it in headless Chromium.

Checks what a student sees in the saved notebook's HTML export: the engraved score is drawn
(verovio's bars counted in the live DOM vs our own bar count), player.js ran (cursor lights
notes), a hostile title stays text, and malformed ABC shows the error panel. The screenshot is
kept under runs/player/ for a person to look at.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import nbformat
import pytest

from imelodist_lib import abc
from imelodist_lib.profiles import REPO_ROOT

MUSIC21_CORPUS = Path(__import__("music21").__file__).parent / "corpus"
REEL = (MUSIC21_CORPUS / "ryansMammoth" / "7thRegimentReel.abc").read_text()
JIG = "X:1\nT:Little Jig\nM:6/8\nL:1/8\nQ:3/8=60\nK:G\n|:GAB c2d|e2f g3:|\"C\"cde \"D\"d2c|B3 G3|]\n"
CANARY = "document.body.setAttribute('data-pwned','1')"
HOSTILE = JIG.replace("T:Little Jig", f'T:</script><img src=x onerror="{CANARY}"> 小曲')
BROKEN = "X:1\nT:broken\nM:4/4\nL:1/8\nK:G\nGABc dedB|\nGA[Bc d2|]\n"
TUNES = [("reel", REEL), ("hostile", HOSTILE), ("broken", BROKEN)]

# After load, record what the browser drew into attributes that --dump-dom serialises.
PROBE = """<script>
window.addEventListener("load", function () {
  document.querySelectorAll(".imelodist-player").forEach(function (root) {
    var svg = root.querySelector(".imp-score svg");
    root.setAttribute("data-measures", root.querySelectorAll(".imp-score g.measure").length);
    root.setAttribute("data-svg-height", svg ? Math.round(svg.getBoundingClientRect().height) : 0);
    root.setAttribute("data-lit", root.impSeek ? root.impSeek(10) : -1);
  });
  document.body.setAttribute("data-probed", "1");
});
</script>"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    path = chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI must run the browser test: "
                        "apt-get install -y chromium (see the Makefile set-up)")
        pytest.skip("chromium not installed (apt-get install -y chromium); runs in CI")
    return path


def export_notebook(workdir: Path) -> Path:
    """Execute a tiny notebook that shows three players, export it to HTML, add the probe."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_code_cell("from imelodist_lib.player import show"))
    for name, text in TUNES:
        nb.cells.append(nbformat.v4.new_code_cell(f"p_{name} = show({text!r}, title={name!r})"))
    html_path = execute_to_html(nb, workdir / "players.html", timeout=120)
    page = html_path.read_text(encoding="utf-8")
    html_path.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    return html_path


def execute_to_html(nb, html_path: Path, timeout: int) -> Path:
    """Run `nb` in a fresh kernel in `html_path`'s folder as `make run` does
    (`run_notebooks.notebook_client`, with this checkout on the kernel's path) and export it."""
    from nbconvert import HTMLExporter

    from imelodist_lib.run_notebooks import notebook_client

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    notebook_client(nb, html_path.parent, timeout=timeout).execute(env=env)
    html_path.write_text(HTMLExporter().from_notebook_node(nb)[0], encoding="utf-8")
    return html_path


def run_chromium(browser: str, page: Path, screenshot: Path | None = None) -> str:
    profile = tempfile.mkdtemp(prefix="imelodist-chromium-")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1100,1800", "--virtual-time-budget=5000"]
    try:
        if screenshot is not None:
            subprocess.run(flags + [f"--screenshot={screenshot}", page.as_uri()], check=True,
                           capture_output=True, timeout=120)
        done = subprocess.run(flags + ["--dump-dom", page.as_uri()], check=True, capture_output=True,
                              timeout=120)
        return done.stdout.decode("utf-8")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def player_roots(dom: str) -> list[str]:
    """The opening tag of each player's root element (it carries the probe's attributes)."""
    return re.findall(r'<div class="imelodist-player"[^>]*>', dom)


def attr(tag: str, name: str) -> str:
    m = re.search(rf'{name}="([^"]*)"', tag)
    assert m, f"{name} missing in {tag}"
    return m.group(1)


@pytest.fixture(scope="module")
def dom(browser, tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("browser")
    page = export_notebook(workdir)
    shots = REPO_ROOT / "runs" / "player"
    shots.mkdir(parents=True, exist_ok=True)
    return run_chromium(browser, page, screenshot=shots / "browser_test.png")


def test_scores_are_drawn_with_every_bar(dom):
    assert 'data-probed="1"' in dom, "the page never finished loading"
    roots = player_roots(dom)
    assert len(roots) == 3
    for (name, text), root in zip(TUNES[:2], roots[:2]):
        ours = len(abc.validate(text).bars.bars)
        assert int(attr(root, "data-measures")) == ours, name
        assert int(attr(root, "data-svg-height")) > 60, f"{name}: score not laid out"
        assert attr(root, "data-ready") == "1", f"{name}: player.js did not run"
        assert int(attr(root, "data-lit")) == 1, f"{name}: cursor found no note at 10 ms"


def test_hostile_title_stays_text(dom):
    body_tag = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-probed="1"' in body_tag and "data-pwned" not in body_tag  # the onerror never ran
    body = dom[dom.index("<body"):]
    # the export's players hold no <img>: the title's tag is text in the SVG and the caption
    players = "".join(re.findall(r'<div class="imelodist-player".*?</audio>', body, re.S))
    assert "<img" not in players
    assert "&lt;img src=x onerror=" in players
    assert "小曲" in players


def test_broken_tune_shows_the_error_panel(dom):
    root = player_roots(dom)[2]
    assert attr(root, "data-measures") == "0"
    assert "Cannot show this tune (line 7)" in dom


# ------------------------------------------------------------------ your own tune, bars regenerated
# Per drawn bar, what a reader sees of its notes: each note's and rest's glyphs (notehead,
# accidentals, flags: durations and spelling) and the notehead's height above the staff's top
# line (the pitch), read from the live DOM after load.
BAR_PROBE = """<script>
window.addEventListener("load", function () {
  function glyphs(el) {
    return Array.prototype.map.call(el.querySelectorAll("use"), function (u) {
      return (u.getAttribute("xlink:href") || u.getAttribute("href") || "").split("-")[0];
    }).join("+");
  }
  document.querySelectorAll(".imelodist-player").forEach(function (root) {
    var bars = Array.prototype.map.call(root.querySelectorAll(".imp-score g.measure"), function (m) {
      var line = m.querySelector("g.staff > path");
      var top = line ? parseFloat(line.getAttribute("d").split(" ")[1]) : 0;
      return Array.prototype.map.call(m.querySelectorAll("g.note, g.rest"), function (n) {
        var head = n.querySelector("g.notehead use") || n.querySelector("use");
        var y = head ? parseFloat(/translate\\([^,]+,\\s*([-0-9.]+)/.exec(head.getAttribute("transform"))[1]) : 0;
        return n.getAttribute("class") + ":" + glyphs(n) + "@" + Math.round(y - top);
      }).join(" ");
    });
    root.setAttribute("data-bars", JSON.stringify(bars));
  });
  document.body.setAttribute("data-probed", "1");
});
</script>"""


@pytest.fixture(scope="module")
def edited(browser, tmp_path_factory) -> tuple[list[str], list[list[str]]]:
    """The playground in an executed, exported notebook: Halewyn written to MIDI by music21,
    imported, bars 5-6 regenerated by the shipped model; the page read by Chromium. Returns the
    two tunes (imported, regenerated) and each player's drawn bars."""
    import html
    import json

    workdir = tmp_path_factory.mktemp("edited")
    essen = (MUSIC21_CORPUS / "essenFolksong" / "altdeu10.abc").read_text(encoding="latin-1")
    [halewyn] = [t for t in abc.split_tunes(essen) if abc.parse_tune(t).field("X") == "9"]
    abc.to_music21(abc.normalize(halewyn)).write("midi", fp=str(workdir / "Halewyn.mid"))
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells += [nbformat.v4.new_code_cell(source) for source in (
        "import json, torch\n"
        "from imelodist_lib.inference import Composer\n"
        "from imelodist_lib.playground import Playground\n"
        "from imelodist_lib.profiles import SHIPPED_MODEL_DIR, get_profile\n"
        "torch.set_num_threads(1)\n"
        "composer = Composer(str(SHIPPED_MODEL_DIR), backend='transformers', cpu_threads=1)\n"
        "pg = Playground(composer, get_profile('cpu'), out_dir='.')\n"
        "pg.form.seed.value = 3\n"
        "pg.use_tune('Halewyn.mid')\n"
        "pg.own.bars.value = (5, 6)\n"
        "pg.regenerate_button.click()\n"
        "assert pg.history[-1].ok, pg.edit_status.value\n"
        "open('tunes.json', 'w').write(json.dumps([pg.tune, pg.history[-1].abc]))",
        "pg.tune_player",
        "pg.shown[-1]")]
    page = execute_to_html(nb, workdir / "edited.html", timeout=300)
    page.write_text(page.read_text(encoding="utf-8").replace("</body>", BAR_PROBE + "</body>"), encoding="utf-8")
    dom = run_chromium(browser, page)
    assert 'data-probed="1"' in dom, "the page never finished loading"
    drawn = [json.loads(html.unescape(attr(root, "data-bars"))) for root in player_roots(dom)]
    return json.loads((workdir / "tunes.json").read_text(encoding="utf-8")), drawn


def test_regenerated_tune_is_drawn_with_every_bar_and_the_kept_bars_unchanged(edited):
    (tune, regenerated), drawn = edited
    # the playground's own two players (shown inside its Output widgets in cell 1; a headless
    # run keeps them as that cell's output), then the same two shown by cells 2 and 3
    assert len(drawn) == 4 and drawn[:2] == drawn[2:]
    before, after = drawn[2:]  # the imported tune's player, the regenerated tune's
    bars = len(abc.validate(tune).bars.bars)
    assert bars == 12 and len(before) == bars and len(after) == len(abc.validate(regenerated).bars.bars) == bars
    assert all(before) and all(after)  # every bar has notes drawn
    for k in range(bars):
        if k not in (4, 5):  # bars 5-6 (0-based 4, 5) were written anew
            assert after[k] == before[k], f"kept bar {k + 1} is drawn differently"
    new_text = [regenerated[s.start:s.end] for s in _bar_spans(regenerated)]
    old_text = [tune[s.start:s.end] for s in _bar_spans(tune)]
    changed = [k for k in (4, 5) if new_text[k] != old_text[k]]
    assert all(after[k] != before[k] for k in changed)  # a rewritten bar is drawn as rewritten


def _bar_spans(text: str):
    from imelodist_lib.editing import bar_spans

    return bar_spans(text)
