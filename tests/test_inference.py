"""The composer: ABC extraction, the transformers backend on a tiny real Llama, the OpenAI backend
against a real local HTTP server (serving that model's generations), and the errors people hit."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from imelodist_lib import abc
from imelodist_lib.grammar import grammar_for_request, grammar_logits_processor
from imelodist_lib.inference import (Composer, Composition, GrammarNotEnforcedError, extract_abc,
                                     first_bar_seconds, resolve_backend)
from imelodist_lib.instructions import ComposeRequest
from imelodist_lib.profiles import SHIPPED_MODEL_DIR, get_profile

CPU = get_profile("cpu", max_new_tokens=300)
SEED_TUNE = "X:1\nT:Seed\nM:4/4\nL:1/8\nK:D\nDEFG ABcd | e2d2 c2B2 |"
REQUESTS = {
    "emotion": ComposeRequest("emotion", emotion="欢快", style="jig", meter="6/8", key="G", bars=6),
    "chords": ComposeRequest("chords", lang="en", chords=["G", "C", "D7", "G"], meter="3/4", key="G"),
    "theme_chords": ComposeRequest("theme_chords", chords=["Am", "Dm", "E7", "Am"], theme="秋夜",
                                   meter="4/4", key="Am", tempo=96),
    "continue": ComposeRequest("continue", seed_abc=SEED_TUNE, bars=5),
}


@pytest.fixture(scope="module")
def composer(tiny):
    model, tokenizer = tiny
    return Composer(model=model, tokenizer=tokenizer, backend="transformers", profile=CPU)


# ------------------------------------------------------------------------------ extract_abc
REEL = "X:1\nT:Reel\nM:4/4\nL:1/8\nK:D\nDEFG ABcd | e2d2 c2B2 | A8 |]"


def test_extract_from_code_fence_with_prose_around():
    text = f"Here is your tune:\n```abc\n{REEL}\n```\nEnjoy playing it!"
    [tune] = extract_abc(text)
    assert tune == abc.normalize(REEL)


def test_extract_several_tunes_and_stops_at_prose():
    second = REEL.replace("T:Reel", "T:Second").replace("K:D", "K:G")
    text = f"两首曲子：\n{REEL}\n这是第二首，更安静一些。\n{second}\nThat is all."
    tunes = extract_abc(text)
    assert [abc.parse_tune(t).title for t in tunes] == ["Reel", "Second"]
    assert all("That is all" not in t and "第二首" not in t for t in tunes)


def test_extract_one_line_header_form():
    [tune] = extract_abc("X:1 L:1/8 M:4/4 K:Emin |: E2 EF GABc | d8 :|")
    parsed = abc.parse_tune(tune)
    assert parsed.meter == "4/4"
    assert "E2 EF GABc" in parsed.body
    assert abc.validate(tune).ok


def test_a_field_name_inside_a_title_is_part_of_the_title():
    # a grammar-valid answer the shipped model's successor wrote: the title holds " M: "
    text = 'X:1\nT:The M: linepet\nM:4/4\nL:1/8\nK:Dm\n"Dm"A2 GF EDEF | D8 |]\n'
    [tune] = extract_abc(text)
    assert abc.parse_tune(tune).meter == "4/4" and "T:The M: linepet" in tune
    assert abc.validate(tune).ok
    [tune] = extract_abc(text.replace("T:The M: linepet", "T:Gr. K: Lee."))  # another one
    assert "T:Gr. K: Lee." in tune and abc.validate(tune).ok


def test_extract_tune_without_x_and_unfenced_code_block():
    [tune] = extract_abc("```\nM:3/4\nL:1/8\nK:G\nG2 A2 B2 | d6 |]\n```")
    assert tune.startswith("X:1\n") and abc.validate(tune).ok


def test_extract_nothing_from_prose():
    assert extract_abc("I am sorry, I cannot write music today.") == []
    assert extract_abc("") == []


# ------------------------------------------------------------------------------ transformers
def test_compose_returns_compositions_with_facts(composer):
    comps = composer.compose(REQUESTS["emotion"], n=2, seed=7, max_new_tokens=40)
    assert len(comps) == 2 and all(isinstance(c, Composition) for c in comps)
    for c in comps:
        assert c.backend == "transformers" and c.seed == 7 and not c.constrained
        assert c.prompt_tokens > 10 and 0 < c.completion_tokens <= 40
        assert c.seconds > 0 and c.first_token_seconds is not None and c.first_token_seconds <= c.seconds
        assert c.messages[-1] == {"role": "assistant", "content": c.text}
        assert c.messages[0]["content"] == "你是专业的音乐作曲家 IMelodist"


def test_same_seed_same_answer(composer):
    a = composer.compose(REQUESTS["emotion"], seed=3, max_new_tokens=30)[0].text
    b = composer.compose(REQUESTS["emotion"], seed=3, max_new_tokens=30)[0].text
    c = composer.compose(REQUESTS["emotion"], seed=4, max_new_tokens=30)[0].text
    assert a == b and a != c


def test_temperature_defaults_to_the_profile(tiny):
    """No temperature given: the profile's. At 0 decoding is greedy, so seeds stop mattering;
    an explicit temperature still wins over the profile."""
    model, tokenizer = tiny
    greedy = Composer(model=model, tokenizer=tokenizer, backend="transformers",
                      profile=get_profile("cpu", max_new_tokens=30, temperature=0.0))
    a, b = (greedy.compose(REQUESTS["emotion"], seed=s)[0].text for s in (3, 4))
    assert a == b
    hot = greedy.compose(REQUESTS["emotion"], seed=4, temperature=1.0)[0].text
    assert hot != a
    assert get_profile("cpu").temperature == 0.6 and get_profile("gpu").temperature == 1.0


@pytest.mark.parametrize("task", list(REQUESTS))
def test_constrained_mode_gives_valid_tunes_for_every_task(composer, task):
    request = REQUESTS[task]
    for c in composer.compose(request, n=2, seed=11, constrained=True, max_new_tokens=1500):
        assert c.constrained and c.finish_reason == "stop", c.text
        assert c.abc is not None, c.text
        assert c.report.ok and c.bar_errors == 0 and c.ok, (c.report.error, c.text)
        tune = abc.parse_tune(c.abc)
        if request.meter:
            assert tune.meter == request.meter
        if task in ("chords", "theme_chords"):
            from imelodist_lib.instructions import chords_per_bar

            assert chords_per_bar(c.abc) == request.chords
        if task == "theme_chords":
            assert tune.title == "秋夜" and "Q:1/4=96" in c.abc
        if task == "continue":
            assert c.text.startswith(SEED_TUNE)


def test_unconstrained_random_model_writes_no_valid_tune(composer):
    # the control for the test above: the same model without the grammar writes noise
    comps = composer.compose(REQUESTS["emotion"], n=2, seed=11, max_new_tokens=120)
    assert not any(c.ok for c in comps)


def test_default_budget_gives_long_requests_room_in_both_modes(composer):
    long = ComposeRequest("emotion", lang="en", emotion="calm", meter="12/8", key="Bb", bars=32)
    short = ComposeRequest("emotion", lang="en", emotion="calm", meter="2/4", key="G", bars=4)
    free_long, free_short = composer.default_budget(long, False), composer.default_budget(short, False)
    assert free_long > CPU.max_new_tokens == free_short  # 4 bars of 2/4 fit in the profile's limit
    assert composer.default_budget(long, True) == max(1024, free_long)
    assert composer.default_budget(short, True) == 1024
    assert composer.default_budget(long, False, max_new_tokens=77) == 77  # a given limit wins
    assert composer.default_budget("write a tune", False) is None  # plain text: the profile's limit
    unstated = ComposeRequest("emotion", lang="en", emotion="calm", meter="12/8", key="Bb")
    assert composer.default_budget(unstated, False) is None  # no length asked: the profile's limit
    # compose uses it: the random model never stops, so it writes exactly the budget
    [c] = composer.compose(long, seed=1)
    assert (c.finish_reason, c.completion_tokens) == ("length", free_long)


def test_stream_pieces_join_to_the_composed_text(composer):
    pieces = list(composer.stream(REQUESTS["chords"], seed=5, constrained=True, max_new_tokens=600))
    [whole] = composer.compose(REQUESTS["chords"], seed=5, constrained=True, max_new_tokens=600)
    assert len(pieces) > 3 and "".join(pieces) == whole.text
    seconds, text = first_bar_seconds(iter(pieces))
    assert seconds is not None and text == whole.text


def test_chat_keeps_history(composer):
    first = composer.chat("写一首曲子", seed=1, max_new_tokens=20)
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    second = composer.chat(first.messages + [{"role": "user", "content": "再写一首"}], seed=2,
                           max_new_tokens=20)
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert second.messages[:3] == first.messages


def test_bad_calls_say_what_to_do(composer):
    with pytest.raises(ValueError, match="prose"):
        composer.compose(ComposeRequest("describe", seed_abc=SEED_TUNE), constrained=True)
    with pytest.raises(ValueError, match="ComposeRequest"):
        composer.compose("写一首曲子", constrained=True)
    with pytest.raises(ValueError, match="top_p"):
        composer.compose(REQUESTS["emotion"], top_p=0)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("tensorrt")


def test_missing_weights_and_missing_lmdeploy(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Composer(model=tmp_path / "no-model", backend="transformers", profile=CPU)
    assert resolve_backend("auto") == ("lmdeploy" if torch.cuda.is_available() and
                                       __import__("importlib").util.find_spec("lmdeploy") else "transformers")
    if __import__("importlib").util.find_spec("lmdeploy") is None:
        with pytest.raises(ImportError, match="make lmdeploy-env"):
            Composer(model=tmp_path, backend="lmdeploy", profile=CPU)


@pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").is_file(), reason="IMelodist-tiny not trained yet")
def test_shipped_model_constrained_is_always_valid():
    composer = Composer(model=SHIPPED_MODEL_DIR, backend="transformers", profile=CPU)
    comps = composer.compose(REQUESTS["emotion"], n=2, seed=0, constrained=True, max_new_tokens=600)
    assert all(c.ok for c in comps), [c.text for c in comps]


# ------------------------------------------------------------------------------ openai backend
class _ChatServer(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible server (GET /v1/models, streaming POST /v1/chat/completions)
    answering with a real transformers model; honours `guided_grammar` and vLLM's
    `structured_outputs.grammar` through xgrammar, unless `drop_grammar` (an engine that ignores it)."""

    model = tokenizer = None
    delay = 0.0
    drop_grammar = False
    owned_by = "test"
    requests: list = []  # the bodies received, for the payload checks

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _json(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": "imelodist", "object": "model", "created": 0, "owned_by": self.owned_by}]})
        self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(request)
        time.sleep(self.delay)
        if request["model"] != "imelodist":
            return self._json(404, {"error": {"message": f"model {request['model']} not found"}})
        tok, model = self.tokenizer, self.model
        inputs = tok.apply_chat_template(request["messages"], add_generation_prompt=True,
                                         return_dict=True, return_tensors="pt")
        processors = []
        grammar = request.get("guided_grammar") or request.get("structured_outputs", {}).get("grammar")
        if grammar and not self.drop_grammar:
            processors.append(grammar_logits_processor(tok, grammar, vocab_size=model.config.vocab_size))
        torch.manual_seed(request.get("seed") or 0)
        out = model.generate(**inputs, do_sample=True, temperature=request.get("temperature", 1.0),
                             top_p=request.get("top_p", 1.0), top_k=request.get("top_k", 50),
                             max_new_tokens=request.get("max_tokens", 100), logits_processor=processors,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        finish = "stop" if im_end in new else "length"
        new = new[: new.index(im_end)] if im_end in new else new
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "imelodist"}
        chunks = []
        for i in range(len(new)):
            piece = tok.decode(new[: i + 1], skip_special_tokens=True)[len(tok.decode(new[:i], skip_special_tokens=True)):]
            chunks.append({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        chunks.append({**base, "choices": [], "usage": {"prompt_tokens": inputs["input_ids"].shape[1],
                                                        "completion_tokens": len(new) + (finish == "stop"),
                                                        "total_tokens": 0}})
        try:
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
        except BrokenPipeError:  # the client gave up (the timeout test)
            pass


@pytest.fixture(scope="module")
def server(tiny):
    handler = type("Handler", (_ChatServer,), {"model": tiny[0], "tokenizer": tiny[1]})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # Request threads must finish before the process exits: a daemon thread still inside torch's
    # generate at exit aborts the interpreter (the timeout test leaves one running).
    httpd.daemon_threads = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_openai_backend_composes_with_grammar(server):
    _, url = server
    composer = Composer(backend="openai", base_url=url, profile=CPU)
    assert composer.engine.model == "imelodist"  # found through GET /v1/models
    [c] = composer.compose(REQUESTS["chords"], seed=2, constrained=True, max_new_tokens=600)
    assert c.backend == "openai" and c.ok, c.text
    assert c.completion_tokens > 10 and c.prompt_tokens > 10 and c.first_token_seconds is not None
    pieces = list(composer.stream(REQUESTS["chords"], seed=2, constrained=True, max_new_tokens=600))
    assert "".join(pieces) == c.text


def test_openai_server_kinds_send_their_grammar_fields(server):
    """vLLM gets `structured_outputs.grammar`, a generic server `guided_grammar` (or the field named),
    LMDeploy's api_server none: constrained=True refuses before sending, naming the routes that work."""
    handler, url = server
    request = REQUESTS["chords"]
    grammar = grammar_for_request(request)
    for kind, field, expected in [("vllm", None, {"structured_outputs": {"grammar": grammar}}),
                                  ("generic", None, {"guided_grammar": grammar}),
                                  ("vllm", "guided_grammar", {"guided_grammar": grammar})]:
        handler.requests.clear()
        composer = Composer(backend="openai", base_url=url, profile=CPU, server=kind, grammar_field=field)
        [c] = composer.compose(request, seed=2, constrained=True, max_new_tokens=600)
        assert c.ok, c.text
        [body] = handler.requests
        assert {k: body[k] for k in expected} == expected and "response_format" not in body
    handler.owned_by = "vllm"  # a server that names itself in GET /v1/models is recognised
    try:
        assert Composer(backend="openai", base_url=url, profile=CPU).engine.server == "vllm"
        handler.owned_by = "lmdeploy"
        composer = Composer(backend="openai", base_url=url, profile=CPU)
    finally:
        handler.owned_by = "test"
    assert composer.engine.server == "lmdeploy"
    assert not composer.compose(request, seed=2, max_new_tokens=20)[0].constrained  # free sampling works
    handler.requests.clear()
    with pytest.raises(NotImplementedError, match="api_server.*backend='lmdeploy'.*server='vllm'"):
        composer.compose(request, constrained=True)
    assert handler.requests == []
    with pytest.raises(ValueError, match="server kind"):
        Composer(backend="openai", base_url=url, profile=CPU, server="tgi")


def test_engine_that_drops_the_grammar_is_caught_on_arrival(server):
    """A server that ignores the grammar and answers free text (this random model's noise): the
    answer is checked against the request and refused with the engine named, never returned."""
    handler, url = server
    composer = Composer(backend="openai", base_url=url, profile=CPU, server="vllm")
    handler.drop_grammar = True
    try:
        with pytest.raises(GrammarNotEnforcedError, match=r"vllm server at http://127\.0\.0\.1:\d+/v1 "
                                                         r"decoded unconstrained: it leaves"):
            composer.compose(REQUESTS["emotion"], seed=2, constrained=True, max_new_tokens=200)
        pieces = []
        with pytest.raises(GrammarNotEnforcedError, match="decoded unconstrained"):
            for piece in composer.stream(REQUESTS["emotion"], seed=2, constrained=True, max_new_tokens=200):
                pieces.append(piece)
        assert pieces  # the text was shown as it came; the refusal comes at its end
        free = composer.compose(REQUESTS["emotion"], seed=2, max_new_tokens=50)  # unconstrained: no check
        assert len(free) == 1 and not free[0].constrained
    finally:
        handler.drop_grammar = False


def test_openai_unknown_model_and_timeout(server):
    handler, url = server
    with pytest.raises(LookupError, match="served_model"):
        Composer(backend="openai", base_url=url, served_model="nope", profile=CPU).compose("hi")
    handler.delay = 1.5
    try:
        with pytest.raises(TimeoutError, match="did not answer in time"):
            Composer(backend="openai", base_url=url, timeout=0.3, profile=CPU).compose("hi", max_new_tokens=5)
    finally:
        handler.delay = 0.0


def test_unreachable_server_names_url_and_how_to_start_it():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ConnectionError, match="lmdeploy serve api_server") as info:
        Composer(backend="openai", base_url=url, profile=CPU)
    assert url in str(info.value)


def _real_tunes(count: int = 12) -> list[str]:
    """Normalised single-voice tunes from music21's bundled corpus."""
    from music21 import corpus

    tunes = []
    for path in sorted(corpus.getPaths(fileExtensions=("abc",)), key=str)[::9]:
        for text in abc.split_tunes(path.read_text(encoding="latin-1"))[:2]:
            try:
                tune = abc.normalize(text)
            except abc.ABCError:
                continue
            if "V:" not in tune and abc.validate(tune).ok:
                tunes.append(tune)
        if len(tunes) >= count:
            break
    return tunes[:count]


@pytest.mark.parametrize("wrap", [
    lambda t: t,
    lambda t: f"好的，这是我为你写的曲子：\n\n```abc\n{t}```\n\n希望你喜欢！",
    lambda t: f"Sure! Here it is:\n\n{t}\nThis tune uses a simple AABB form.",
])
def test_extract_recovers_real_tunes_from_any_wrapping(wrap):
    tunes = _real_tunes()
    assert len(tunes) >= 8
    for tune in tunes:
        assert extract_abc(wrap(tune)) == [tune], tune
