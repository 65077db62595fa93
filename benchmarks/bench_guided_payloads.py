"""How big the per-request grammar is in each engine's payload, how long each engine's xgrammar
entry point takes to compile it with IMelodist-tiny's tokenizer, and whether a regular
expression (LMDeploy api_server's only grammar-like `response_format`, `regex_schema`) is a
workable form of it.

Our grammars have no recursion (bars are counted out), so each one *is* a regular language: the
regex is the grammar with every rule written out in place. This script counts that regex's
length without building it (memoised per rule), and for the smallest cases builds it and times
`xgrammar.Grammar.from_regex` + `GrammarCompiler.compile_grammar` in a child process with a
time limit.

    python benchmarks/bench_guided_payloads.py      # ~1-2 min on one core
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imelodist_lib.grammar import (abc_grammar, grammar_for_request, lmdeploy_response_format,  # noqa: E402
                                   stop_token_ids, vllm_structured_outputs)
from imelodist_lib.inference import benchmark_requests  # noqa: E402
from imelodist_lib.profiles import SHIPPED_MODEL_DIR  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "guided_payloads.json"
REGEX_TIME_LIMIT_S = 120
_TOKEN = re.compile(r'\s+|"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z_][A-Za-z0-9_]*|\{\d+,\d+\}|[|()?*+]')


def _rules(grammar: str) -> dict[str, list[str]]:
    return {name: [t for t in _TOKEN.findall(body) if not t.isspace()]
            for name, body in (line.split(" ::= ", 1) for line in grammar.strip().splitlines())}


def _literal_regex(token: str) -> str:
    """An EBNF string literal as a regex: the characters, regex specials escaped."""
    text = json.loads(token)  # our literals escape only \\ \" and \n, as JSON does
    return "".join("\\n" if c == "\n" else ("\\" + c if c in "\\^$.|?*+()[]{}/" else c) for c in text)


def regex_of(grammar: str, build: bool = True) -> str | int:
    """The grammar as one regex (every rule written out in place), or only its length."""
    rules, memo = _rules(grammar), {}

    def expand(name):
        if name not in memo:
            parts = []
            for t in rules[name]:
                if t[0] == '"':
                    piece = _literal_regex(t)
                elif t[0] == "[" or t[0] in "|()?*+{":
                    piece = t
                else:
                    inner = expand(t)
                    piece = "(" + inner + ")" if build else inner + 2
                parts.append(piece if build else (piece if isinstance(piece, int) else len(piece)))
            memo[name] = "".join(parts) if build else sum(parts)
        return memo[name]

    return expand("root")


def _compiler():
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=stop_token_ids(tokenizer))
    return xgr, xgr.GrammarCompiler(info, max_threads=1)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 4)


def payload_figures() -> list[dict]:
    """Per benchmark request: grammar and payload sizes, compile seconds per entry point."""
    xgr, compiler = _compiler()
    rows = []
    for request in benchmark_requests(continuations=3):
        grammar = grammar_for_request(request)
        tag = json.dumps(lmdeploy_response_format(grammar), ensure_ascii=False)
        ebnf = vllm_structured_outputs(grammar)["structured_outputs"]["grammar"]
        compiler.clear_cache()
        rows.append({
            "request": f"{request.task} {request.meter or '(seed)'} bars={request.bars}",
            "ebnf_bytes": len(grammar.encode()),
            "lmdeploy_payload_bytes": len(tag.encode()),
            "from_structural_tag_s": _timed(lambda: xgr.Grammar.from_structural_tag(tag)),
            "compile_structural_tag_s": _timed(lambda: compiler.compile_structural_tag(tag)),
            "compile_grammar_ebnf_s": _timed(lambda: compiler.compile_grammar(ebnf)),
            "regex_chars": regex_of(grammar, build=False),
        })
    return rows


def _regex_compile_child(meter: str, bars: int) -> None:
    """In a child process: build the regex for an n-bar tune and compile it; print the figures."""
    import resource

    grammar = abc_grammar(meter, "1/8", "G", title="T", min_bars=bars, max_bars=bars)
    regex = regex_of(grammar)
    xgr, compiler = _compiler()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    parse = _timed(lambda: xgr.Grammar.from_regex(regex))
    compile_s = _timed(lambda: compiler.compile_grammar(xgr.Grammar.from_regex(regex)))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"regex_chars": len(regex), "from_regex_s": parse, "compile_s": compile_s,
                      "extra_memory_mb": round((after - before) / 1024)}))


def regex_compile_figures() -> list[dict]:
    """Compile the regex of the smallest tunes (one and two bars of 2/4), each within a time limit."""
    rows = []
    for meter, bars in (("2/4", 1), ("2/4", 2)):
        row = {"tune": f"{bars} bar(s) of {meter}, L:1/8, fixed title",
               "ebnf_bytes": len(abc_grammar(meter, "1/8", "G", title="T", min_bars=bars, max_bars=bars))}
        try:
            out = subprocess.run([sys.executable, __file__, "--regex-child", meter, str(bars)],
                                 capture_output=True, text=True, timeout=REGEX_TIME_LIMIT_S, cwd=ROOT)
            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            row.update(regex_chars=regex_of(abc_grammar(meter, "1/8", "G", title="T", min_bars=bars,
                                                        max_bars=bars), build=False),
                       compile_s=f"> {REGEX_TIME_LIMIT_S} (stopped)")
        rows.append(row)
    return rows


def main() -> None:
    import torch

    torch.set_num_threads(1)
    payloads = payload_figures()
    one_bar = {m: regex_of(abc_grammar(m, "1/8", "G", title="T", min_bars=1, max_bars=1), build=False)
               for m in ("2/4", "3/4", "6/8", "4/4")}
    result = {
        "command": "python benchmarks/bench_guided_payloads.py",
        "tokenizer": "IMelodist-tiny (data/models/imelodist-tiny)",
        "payloads": payloads,
        "lmdeploy_payload_bytes_max": max(p["lmdeploy_payload_bytes"] for p in payloads),
        "compile_structural_tag_s_max": max(p["compile_structural_tag_s"] for p in payloads),
        "regex_chars_min_over_requests": min(p["regex_chars"] for p in payloads),
        "regex_chars_one_bar": one_bar,
        "regex_compiles": regex_compile_figures(),
    }
    RESULTS.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "payloads"}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--regex-child"]:
        _regex_compile_child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
