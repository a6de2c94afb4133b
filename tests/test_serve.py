"""griffin-export serve: the OpenAI API over class experts, on a tiny model with planted classes (the
discovery of tests/test_discover.py), through the official `openai` client and raw HTTP, on a server
each test module starts on a free loopback port and stops.

Answers equal `generate` on the same router (greedy), batched or alone; every bad request is a 4xx
OpenAI error and the server keeps serving; a client that leaves mid-stream frees its row; a drain lets
the answers in flight finish and refuses new ones. The engine's scheduling (rows joining a running
batch, classes taking turns, limits) is tested on a fake backend. Slow: SIGTERM on the command, Ray
Serve with two replicas, llama.cpp on the default model, and the soak."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from griffin_export.classes.discover import discover, write_discovery
from griffin_export.model.load import ModelSource
from griffin_export.runtime.base import Runtime
from griffin_export.runtime.routed import FULL, load_routed
from griffin_export.settings import ClassSettings, DecodeOptions, DiscoverSettings, ServeSettings, defaults
from tests.helpers import ROOT, one_line, refused, tiny_model, tiny_tokenizer
from tests.test_discover import planted_log

if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("openai") is None:
    if os.environ.get("CI"):
        pytest.fail("fastapi or openai is not installed; CI installs the [test] extra")
    pytest.skip('the [serve] extra and openai are not installed: pip install -e ".[test]"', allow_module_level=True)

import httpx  # noqa: E402
import openai  # noqa: E402

from griffin_export.serve.assemble import build  # noqa: E402
from griffin_export.serve.backends import Backend  # noqa: E402
from griffin_export.serve.engine import STEP_DELAY_ENV, Engine, Overloaded, Request  # noqa: E402
from griffin_export.serve.server import start  # noqa: E402

KEY = "test-key"
LIMIT = 8192  # the test servers' body limit
# a chat template in the tiny vocabulary: w3 before each message, w4 to answer
CHAT = "{% for m in messages %}w3 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w4{% endif %}"
STRANGER = " ".join(f"w{40 + i % 7}" for i in range(24))  # tokens of neither planted kind: the guard fires


def planted_classes(root: Path, *, lean: bool = False) -> SimpleNamespace:
    """The tiny Llama (head_dim 16 where `lean`, as the lean ONNX graph wants) with a chat template, and the
    classes discovered in a planted log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    lm = tiny_model("llama", lean=lean)
    lm.model.config.eos_token_id = 2
    lm.model.save_pretrained(root / "model")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    tok.save_pretrained(root / "model")
    kinds = planted_log(root / "log.jsonl")
    result = discover([root / "log.jsonl"], ClassSettings("c"), DiscoverSettings(k=2), ModelSource(str(root / "model")))
    out = write_discovery(result, root / "classes")
    prompts = [json.loads(line)["prompt"] for line in (root / "log.jsonl").read_text().splitlines()]
    return SimpleNamespace(root=root, model=str(root / "model"), router=str(out / "router.safetensors"),
                           bundles=sorted(str(p) for p in out.glob("c-*.safetensors")), prompts=prompts, kinds=kinds)


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    return planted_classes(tmp_path_factory.mktemp("serve"))


def settings(classes, **kw) -> ServeSettings:
    return ServeSettings(**{"router": classes.router, "model": classes.model, "port": 0, "api_key": KEY,
                            "max_body_bytes": LIMIT, **kw})


@pytest.fixture(scope="module")
def server(classes):
    with start(settings(classes)) as running:
        yield running


@pytest.fixture(scope="module")
def reference(classes):
    """The same router in a RoutedRuntime of its own: what `generate --router` computes."""
    return load_routed(classes.router, classes.model)


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60, **kw)


def expected(rt, opts: DecodeOptions, model: str, ids: torch.Tensor):
    """What generate gives: routed for "auto", else that class's experts (or the full model's) throughout."""
    if model == "auto":
        return rt.generate(opts, ids=ids)
    rt.experts.activate(FULL if model == "full" else model)
    return Runtime.generate(rt, opts, ids=ids)


# -- answers ------------------------------------------------------------------------------------------


def test_models_lists_every_class_the_full_model_and_auto(server):
    assert [m.id for m in client(server).models.list()] == ["c-1", "c-2", "full", "auto"]
    health = httpx.get(server.url + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["backend"] == "torch" and health["alive"]


def test_completions_are_generate_greedy_for_every_model(server, reference, classes):
    cli = client(server)
    prompts = [classes.prompts[i] for i in (0, 1, 2, 3)] + [STRANGER]
    seen = set()
    for model in ("auto", "c-1", "c-2", "full"):
        for p in prompts:
            r = cli.completions.create(model=model, prompt=p, max_tokens=7)
            want = expected(reference, DecodeOptions(max_new_tokens=7), model, reference.tokenize(p))
            assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
            assert r.usage.prompt_tokens == reference.tokenize(p).shape[1]
            assert r.choices[0].finish_reason == ("length" if want.stop_reason == "length" else "stop")
            assert r.model == model and r.griffin["class"] == (want.extra["class"] if model == "auto" else model)
            if model == "auto":
                assert r.griffin == {k: want.extra[k] for k in r.griffin}
                seen.add(r.griffin["class"])
    assert {"c-1", "c-2", "full"} <= seen  # both classes, and the guard fired for the stranger


def test_streamed_completion_is_the_whole_answer_in_pieces(server, reference, classes):
    p = classes.prompts[5]
    whole = client(server).completions.create(model="auto", prompt=p, max_tokens=9, extra_body={"ignore_eos": True})
    chunks = list(client(server).completions.create(model="auto", prompt=p, max_tokens=9, stream=True,
                                                    stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and whole.usage.completion_tokens == 9
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert next(c for c in chunks if c.choices and c.choices[0].finish_reason).griffin["class"] == \
        whole.griffin["class"]


def test_chat_uses_the_template_streamed_or_not(server, reference, classes):
    messages = [{"role": "system", "content": "w9 w9"}, {"role": "user", "content": classes.prompts[6]}]
    ids = torch.tensor([reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                return_dict=True)["input_ids"]])
    cli = client(server)
    for model in ("auto", "full"):
        want = expected(reference, DecodeOptions(max_new_tokens=6), model, ids)
        r = cli.chat.completions.create(model=model, messages=messages, max_tokens=6)
        assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == ids.shape[1] and r.object == "chat.completion"
        chunks = list(cli.chat.completions.create(model=model, messages=messages, max_tokens=6, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    parts = [{"role": "user", "content": [{"type": "text", "text": "w5 w6"}, {"type": "text", "text": " w7"}]}]
    assert cli.chat.completions.create(model="full", messages=parts, max_tokens=2).usage.prompt_tokens == 5


def test_requests_sent_together_answer_as_each_alone(server, classes):
    cli = client(server)
    asks = [dict(model=m, prompt=classes.prompts[i], max_tokens=4 + i % 5, extra_body={"ignore_eos": bool(i % 2)})
            for i, m in enumerate(["auto", "c-1", "full", "auto", "c-2", "auto", "c-1", "full", "auto", "auto"])]
    alone = [cli.completions.create(**a).choices[0].text for a in asks]
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda a: cli.completions.create(**a).choices[0].text, asks))
    assert together == alone


def test_the_engine_batches_requests_and_admits_them_mid_batch_as_each_alone(classes, monkeypatch):
    """On the real (tiny) backend: requests queued before the engine starts prefill as one batch; more join
    it while it decodes; sampled ones too. Every answer is the one it gets alone."""
    monkeypatch.setenv(STEP_DELAY_ENV, "0.01")  # the batches still run when the second wave comes
    served = build(settings(classes))
    try:
        engine, rng = served.engine, random.Random(0)
        engine.stop()  # a fresh engine, not started yet: what is submitted now waits for one batch
        engine = Engine(served.backend, max_batch=8, max_waiting=64, prefill_tokens=4096)
        asks = [(served.backend.encode(prompt=classes.prompts[i]), DecodeOptions(
            max_new_tokens=3 + rng.randint(0, 12), temperature=0.0 if i % 3 else 0.8, seed=i, stop_at_eos=i % 2 == 0),
            rng.choice(["c-1", "c-2", "full"])) for i in range(12)]
        first = [_submit(engine, *a) for a in asks[:6]]
        engine.start()
        time.sleep(0.05)
        rest = [_submit(engine, *a) for a in asks[6:]]
        together = [_wait(r) for r in first + rest]
        assert engine.stats.prefills < len(asks) and engine.stats.joins >= 1, engine.stats
        engine.stop()
        alone = Engine(served.backend, max_batch=1, max_waiting=64, prefill_tokens=4096).start()
        assert [_wait(_submit(alone, *a)).token_ids for a in asks] == [g.token_ids for g in together]
        alone.stop()
    finally:
        served.close()


def test_rows_of_different_classes_decode_in_one_batch_as_each_alone(classes):
    """The lean step's mixed batch: each class's prompts prefilled through its experts, then joined into one
    running batch (the full model's rows too), every row decoding with its own FF weights."""
    from griffin_export.model.load import load_model
    from griffin_export.serve.backends import ClassRuntime, class_bundles
    from tests.test_batch import decode_with_arrivals

    rt = ClassRuntime(load_model(classes.model, quiet=True), class_bundles(classes.bundles))
    prompts = classes.prompts[:6] + [STRANGER]
    which = ["c-1", "c-2", FULL, "c-2", "c-1", "c-1", FULL]
    arrivals = {0: [0], 1: [1], 2: [2], 3: [3], 5: [4, 5], 6: [6]}  # a prefill is one class's
    opts = DecodeOptions(max_new_tokens=10, stop_at_eos=False)
    alone = []
    for p, c in zip(prompts, which):
        rt.experts.activate(c)
        alone.append(Runtime.generate(rt, opts, prompt=p).token_ids)
    mixed = decode_with_arrivals(rt, prompts, opts, arrivals, before=lambda i: rt.experts.activate(which[i]))
    assert mixed == alone and len({tuple(t) for t in alone}) > 3


def _submit(engine: Engine, ids, opts, model: str, wait: float = 0):
    events: list = []
    done = threading.Event()

    def emit(event):
        events.append(event)
        if event[0] != "text":
            done.set()

    r = Request(ids, opts, model, emit)
    r.events, r.done = events, done
    engine.submit(r)
    return r


def _wait(r: Request, timeout: float = 60):
    assert r.done.wait(timeout), "no answer"
    kind, value = r.events[-1]
    assert kind == "done", value
    return value


# -- bad requests -------------------------------------------------------------------------------------

LONG = " ".join(["w5"] * 300)  # past the tiny model's 256 positions
OK = {"model": "full", "prompt": "w5 w6 w7", "max_tokens": 2}
BAD = [  # (path, body, status, words the message holds, param)
    ("/v1/completions", b"{bad", 400, "not valid JSON", None),
    ("/v1/completions", b"\xff\xfe", 400, "not valid JSON", None),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object", None),
    ("/v1/completions", {"prompt": "w5"}, 400, "`model` is required", "model"),
    ("/v1/completions", {**OK, "model": 3}, 400, "`model` must be a string", "model"),
    ("/v1/completions", {**OK, "model": "nope"}, 404, "does not exist", "model"),
    ("/v1/completions", {"model": "full"}, 400, "`prompt` is required", "prompt"),
    ("/v1/completions", {**OK, "prompt": 5}, 400, "`prompt` must be a string", "prompt"),
    ("/v1/completions", {**OK, "prompt": LONG}, 400, "context", "prompt"),
    ("/v1/completions", {**OK, "prompt": ""}, 400, "0 tokens", "prompt"),
    ("/v1/completions", {**OK, "max_tokens": 0}, 400, "`max_tokens` must be >= 1", "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": -3}, 400, "`max_tokens` must be >= 1", "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": 254}, 400, "past the model's context", "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": "5"}, 400, "`max_tokens` must be an integer", "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": True}, 400, "`max_tokens` must be an integer", "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": 2.5}, 400, "`max_tokens` must be an integer", "max_tokens"),
    ("/v1/completions", b'{"model": "full", "prompt": "w5", "temperature": NaN}', 400, "finite", "temperature"),
    ("/v1/completions", b'{"model": "full", "prompt": "w5", "temperature": Infinity}', 400, "finite", "temperature"),
    ("/v1/completions", b'{"model": "full", "prompt": "w5", "top_p": 1e999}', 400, "finite", "top_p"),
    ("/v1/completions", {**OK, "temperature": -1}, 400, "`temperature`", "temperature"),
    ("/v1/completions", {**OK, "temperature": "hot"}, 400, "`temperature` must be a number", "temperature"),
    ("/v1/completions", {**OK, "top_p": 0}, 400, "`top_p` must be in (0, 1]", "top_p"),
    ("/v1/completions", {**OK, "top_p": 1.5}, 400, "`top_p` must be in (0, 1]", "top_p"),
    ("/v1/completions", {**OK, "stop": ""}, 400, "empty stop string", "stop"),
    ("/v1/completions", {**OK, "stop": ["w5", ""]}, 400, "empty stop string", "stop"),
    ("/v1/completions", {**OK, "stop": 5}, 400, "`stop` must be a string or an array", "stop"),
    ("/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
    ("/v1/completions", {**OK, "seed": -1}, 400, "`seed` must be in", "seed"),
    ("/v1/completions", {**OK, "seed": 1.5}, 400, "`seed` must be an integer", "seed"),
    ("/v1/completions", {**OK, "n": 2}, 400, "`n` is not supported", "n"),
    ("/v1/completions", {**OK, "stream": "yes"}, 400, "`stream` must be a boolean", "stream"),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": True}}, 400, "goes with stream=true",
     "stream_options"),
    ("/v1/chat/completions", {"model": "full"}, 400, "`messages` is required", "messages"),
    ("/v1/chat/completions", {"model": "full", "messages": []}, 400, "at least one message", "messages"),
    ("/v1/chat/completions", {"model": "full", "messages": "w5"}, 400, "`messages` must be an array", "messages"),
    ("/v1/chat/completions", {"model": "full", "messages": ["w5"]}, 400, "must be an object", "messages[0]"),
    ("/v1/chat/completions", {"model": "full", "messages": [{"role": "robot", "content": "w5"}]}, 400,
     "`messages[0].role` must be one of", "messages[0].role"),
    ("/v1/chat/completions", {"model": "full", "messages": [{"role": "user", "content": 5}]}, 400,
     "`messages[0].content` must be a string", "messages[0].content"),
    ("/v1/chat/completions", {"model": "full", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "text parts", "messages[0].content"),
    ("/v1/chat/completions", {"model": "full", "messages": [{"role": "user", "content": LONG}]}, 400, "context",
     "messages"),
]


@pytest.mark.parametrize("path, body, status, words, param", BAD, ids=[f"{i}-{b[3][:24]}" for i, b in enumerate(BAD)])
def test_a_bad_request_is_a_4xx_openai_error_and_the_server_keeps_serving(server, path, body, status, words, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"], error
    if status == 404:
        assert error["code"] == "model_not_found"
    if words in ("context", "past the model's context"):
        assert error["code"] == "context_length_exceeded"
    assert post(server, "/v1/completions", OK).status_code == 200


def test_keys_sizes_routes_and_methods_are_refused_as_openai_errors(server):
    assert post(server, "/v1/completions", OK, key="wrong").status_code == 401
    r = post(server, "/v1/completions", OK, key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model="full", prompt="w5", max_tokens=1)
    big = {**OK, "prompt": "w5 " * LIMIT}
    r = post(server, "/v1/completions", big)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(LIMIT // 1000 + 2):
            yield b" " * 1000

    r = httpx.post(server.url + "/v1/completions", content=chunked(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413
    with pytest.raises(openai.APIStatusError) as e:
        client(server).completions.create(model="full", prompt="w5 " * LIMIT, max_tokens=1)
    assert e.value.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="c-9", prompt="w5", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model="full", prompt="w5", max_tokens=0)
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/nothing"
    r = httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()
    assert client(server).completions.create(**OK).usage.completion_tokens >= 1


def test_a_client_that_leaves_mid_stream_frees_its_row(classes, monkeypatch):
    monkeypatch.setenv(STEP_DELAY_ENV, "0.02")  # 200 tokens would take 4 s
    with start(settings(classes)) as running:
        body = {"model": "c-1", "prompt": classes.prompts[0], "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            t0 = time.perf_counter()
        deadline = time.perf_counter() + 10
        while (h := httpx.get(running.url + "/health").json())["running"] and time.perf_counter() < deadline:
            time.sleep(0.02)
        assert h["running"] == 0 and h["cancelled"] == 1 and h["served"] == 0, h
        assert time.perf_counter() - t0 < 2.0  # freed at the next step boundaries, not after 200 tokens
        assert post(running, "/v1/completions", OK).status_code == 200  # still serving


class LongStream(threading.Thread):
    """A streamed answer of `tokens` tokens read in a thread: its non-empty lines, and `started` at the first."""

    def __init__(self, url: str, prompt: str, tokens: int):
        super().__init__()
        self.url, self.tokens, self.prompt = url, tokens, prompt
        self.lines: list[str] = []
        self.started = threading.Event()
        self.start()
        assert self.started.wait(30)

    def run(self) -> None:
        body = {"model": "auto", "prompt": self.prompt, "max_tokens": self.tokens, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if line:
                    self.lines.append(line)
                    self.started.set()

    def finished_whole(self) -> bool:
        self.join(30)
        last = json.loads([line for line in self.lines if line.startswith("data: {")][-1][6:])
        return self.lines[-1] == "data: [DONE]" and last["choices"][0]["finish_reason"] == "length"


def refused_while_draining(server) -> bool:
    r = post(server, "/v1/completions", OK)
    return r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"


def test_drain_refuses_new_requests_and_lets_streams_finish(classes, monkeypatch):
    monkeypatch.setenv(STEP_DELAY_ENV, "0.01")
    running = start(settings(classes, drain_s=30))
    stream = LongStream(running.url, classes.prompts[1], 60)
    running.drain()
    assert refused_while_draining(running)
    assert stream.finished_whole()
    running.thread.join(10)
    assert not running.thread.is_alive()  # the server stopped once nothing was in flight
    running.served.close()


# -- the engine, on a fake backend ----------------------------------------------------------------------


class Words:
    """decode() for the fake backend's tokens: one word each."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


class Fake(Backend):
    """Each row's next token is its last one + 1 (mod 50); a step takes `delay` seconds; records the batch
    sizes it steps, per group, in order."""

    name = "fake"

    def __init__(self, *, joins: bool = True, mixes: bool = False, max_batch: int = 16, delay: float = 0.002):
        super().__init__(None, set(), 10_000, ["a", "b"], routes=False, identity="fake")
        self.tokenizer = Words()
        self.joins, self.mixes, self.max_batch, self.delay = joins, mixes, max_batch, delay
        self.log: list[tuple[str, int]] = []

    @staticmethod
    def logits(last: list[int]) -> torch.Tensor:
        out = torch.zeros(len(last), 50)
        out[torch.arange(len(last)), [(t + 1) % 50 for t in last]] = 1
        return out

    def start(self, group, batch, room):
        self.log.append((group, -len(batch)))  # a prefill: negative
        return [int(x[0, -1]) for x in batch], self.logits([int(x[0, -1]) for x in batch])

    def join(self, group, state, new, room):
        return state + new

    def step(self, group, state, tokens, keep):
        time.sleep(self.delay)
        state[:] = tokens
        self.log.append((group, len(tokens)))
        return self.logits(tokens)


def ask(engine, model="a", n=5, first=0, **kw):
    return _submit(engine, torch.tensor([[first]]), DecodeOptions(max_new_tokens=n, **kw), model)


def test_a_short_request_is_not_held_back_by_a_long_one_of_its_class():
    engine = Engine(Fake(), max_batch=4, max_waiting=10, prefill_tokens=100).start()
    long = ask(engine, n=300)
    while not long.events:
        time.sleep(0.001)
    short = ask(engine, n=3, first=7)
    assert _wait(short).text == "t8 t9 t10" and not long.done.is_set()  # joined the running batch
    other = ask(engine, "b", n=3)
    assert _wait(other).text == "t1 t2 t3" and not long.done.is_set()  # another class takes turns
    assert _wait(long).token_ids == [(1 + i) % 50 for i in range(300)]
    engine.stop()
    assert engine.stats.joins >= 1 and engine.stats.served == 3


def test_a_backend_that_mixes_decodes_every_class_in_one_batch():
    fake = Fake(mixes=True)
    engine = Engine(fake, max_batch=4, max_waiting=10, prefill_tokens=100)
    rs = [ask(engine, "a", n=30), ask(engine, "b", n=30, first=20)]
    engine.start()
    while not rs[0].events:
        time.sleep(0.001)
    rs.append(ask(engine, "b", n=3, first=40))
    assert [_wait(r).token_ids[:3] for r in rs] == [[1, 2, 3], [21, 22, 23], [41, 42, 43]]
    engine.stop()
    assert ("a", -1) in fake.log and ("b", -1) in fake.log  # each class prefilled through its own experts
    assert max(n for g, n in fake.log) == 3 and {g for g, n in fake.log if n > 0} == {None}  # stepped together
    assert engine.stats.joins == 2


def test_a_backend_that_cannot_join_starts_a_new_batch_when_none_runs():
    fake = Fake(joins=False)
    engine = Engine(fake, max_batch=4, max_waiting=10, prefill_tokens=100)
    first = [ask(engine, n=20) for _ in range(2)]
    engine.start()
    while not first[0].events:
        time.sleep(0.001)
    late = ask(engine, n=3)
    assert all(_wait(r).token_ids for r in first + [late])
    engine.stop()
    sizes = [n for g, n in fake.log if g == "a"]
    assert sizes[0] == -2 and -1 in sizes and sizes.index(-1) > sizes.index(2)  # after the first batch ended
    assert engine.stats.joins == 0


def test_limits_batch_size_queue_and_prefill_tokens():
    fake = Fake()
    engine = Engine(fake, max_batch=3, max_waiting=8, prefill_tokens=2)
    rs = [_submit(engine, torch.tensor([[1, 2]]), DecodeOptions(max_new_tokens=4), "a") for _ in range(8)]
    with pytest.raises(Overloaded, match="8 requests are waiting"):
        ask(engine)
    engine.start()
    assert all(_wait(r).token_ids == [3, 4, 5, 6] for r in rs)
    engine.stop()
    assert max(n for _, n in fake.log) <= 3  # max_batch
    assert min(n for _, n in fake.log) == -1  # 2 prompt tokens a turn: one prompt per prefill
    with pytest.raises(Overloaded, match="shutting down"):
        ask(engine)


def test_a_cancelled_request_leaves_its_batch_or_the_queue():
    fake = Fake(delay=0.005)
    engine = Engine(fake, max_batch=2, max_waiting=10, prefill_tokens=100).start()
    a, b = ask(engine, n=400), ask(engine, n=400)
    queued = ask(engine, n=400)
    while not a.events:
        time.sleep(0.001)
    queued.cancel()
    a.cancel()
    assert _wait(ask(engine, n=2)).token_ids == [1, 2]  # took the freed row
    b.cancel()
    time.sleep(0.1)
    engine.stop()
    assert engine.stats.cancelled == 3 and engine.stats.served == 1 and not a.done.is_set()


def test_a_backend_failure_fails_its_requests_and_the_engine_keeps_serving():
    class Broken(Fake):
        def step(self, group, state, tokens, keep):
            if group == "b":
                raise RuntimeError("boom")
            return super().step(group, state, tokens, keep)

    engine = Engine(Broken(), max_batch=4, max_waiting=10, prefill_tokens=100).start()
    bad = ask(engine, "b")
    assert bad.done.wait(10) and bad.events[-1] == ("error", "RuntimeError: boom")
    assert _wait(ask(engine, "a", n=2)).token_ids == [1, 2]
    engine.stop()


# -- the command and its settings -----------------------------------------------------------------------


def test_serve_cli_defaults_are_the_settings_defaults():
    from cli import serve as serve_cli

    cli = {p.name: p.default for p in serve_cli.command.params}
    lib = defaults(ServeSettings)
    for name in ("backend", "host", "port", "max_body_bytes", "max_batch", "max_waiting", "prefill_tokens",
                 "max_tokens", "drain_s", "gguf_quant", "engine", "replicas"):
        assert cli[name] == lib[name], name
    assert lib["host"] == "127.0.0.1" and lib["max_tokens"] == DecodeOptions().max_new_tokens


def test_serve_refuses_bad_settings_in_one_line(classes, tmp_path, capsys, monkeypatch):
    one_line(["serve"], capsys, "--router", "BUNDLE")
    one_line(["serve", "--router", classes.router, *classes.bundles[:1]], capsys, "one of the two")
    one_line(["serve", "--router", classes.router, "--replicas", "3"], capsys, "--replicas", "--engine ray")
    one_line(["serve", "--router", classes.router, "--gguf-dir", tmp_path], capsys, "--gguf-dir", "--backend llama.cpp")
    one_line(["serve", "--router", classes.router, "--api-key", " "], capsys, "empty --api-key")
    one_line(["serve", tmp_path / "missing.safetensors"], capsys, "missing.safetensors")
    refused(lambda: ServeSettings(router="r", port=70000), "`port` must be in 0..65535")
    with start(settings(classes)) as running:  # the port is taken: refused before the model loads
        port = running.url.rsplit(":", 1)[1]
        one_line(["serve", "--router", classes.router, "--model", classes.model, "--port", port], capsys,
                 f"cannot listen on 127.0.0.1:{port}")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    one_line(["serve", "--router", classes.router], capsys, "uvicorn not installed", "[serve] extra")


def test_serving_class_bundles_without_a_router_names_the_class_per_request(classes, reference):
    with start(settings(classes, router=None, bundles=tuple(classes.bundles))) as running:
        cli = client(running)
        assert [m.id for m in cli.models.list()] == ["c-1", "c-2", "full"]
        p = classes.prompts[2]
        r = cli.completions.create(model="c-2", prompt=p, max_tokens=5)
        assert r.choices[0].text == expected(reference, DecodeOptions(max_new_tokens=5), "c-2",
                                             reference.tokenize(p)).text
        with pytest.raises(openai.NotFoundError):
            cli.completions.create(model="auto", prompt=p, max_tokens=5)


def test_the_load_generator_compares_auto_with_full(server, classes, tmp_path, monkeypatch, capsys):
    from bench import serve_load

    monkeypatch.setattr(sys, "argv", ["serve_load", "--url", server.url, "--api-key", KEY, "--data",
                                      str(classes.root / "log.jsonl"), "--clients", "1,2", "--repeats", "2",
                                      "--requests", "3", "--max-tokens", "4", "-o", str(tmp_path)])
    serve_load.main()
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 2 * 2 * 2 and all(r["errors"] == 0 and r["requests"] == 3 and r["tokens"] == 12 for r in runs)
    table = (tmp_path / "results.md").read_text()
    assert "| 2 | auto |" in table and "auto / full tokens/s" in table and "2 clients / 1 client" in table


@pytest.mark.slow
def test_the_memory_script_measures_one_process_against_one_per_class(classes, tmp_path, monkeypatch):
    from bench import serve_memory

    monkeypatch.setattr(sys, "argv", ["serve_memory", "--router", classes.router, "--model", classes.model,
                                      "--counts", "2", "-o", str(tmp_path)])
    serve_memory.main()
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["shared"][0]["classes"] == 2 and result["full"]["rss_mb"] > result["full"]["anon_mb"] > 0


# -- slow: the command under SIGTERM, Ray Serve, llama.cpp, the soak --------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_process(classes, port: int, *extra: str, delay: str = "0") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), STEP_DELAY_ENV: delay, "GRIFFIN_EXPORT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "griffin_export_cli.main", "serve", "--router", classes.router,
                             "--model", classes.model, "--port", str(port), "--max-body-bytes", str(LIMIT), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


@pytest.mark.slow
def test_sigterm_drains_the_command(classes):
    port = _free_port()
    proc = _serve_process(classes, port, delay="0.02")
    url = SimpleNamespace(url=f"http://127.0.0.1:{port}")
    stream = LongStream(url.url, classes.prompts[3], 80)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert refused_while_draining(url)
    assert stream.finished_whole()
    assert proc.wait(30) == 0, proc.stderr.read()


@pytest.fixture(scope="module")
def ray_serve(classes):
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        if os.environ.get("CI"):
            pytest.fail("ray[serve] is not installed; CI installs the [test] extra")
        pytest.skip('Ray Serve is not installed: pip install -e ".[ray]"')
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file written into the home directory
    import ray
    from ray import serve

    from griffin_export.serve.ray_app import deployment

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    s = settings(classes, engine="ray", replicas=2, threads=1, port=port)
    serve.run(deployment(s, num_cpus=0.5), name="griffin-export", route_prefix="/", blocking=False)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}")
    serve.shutdown()
    ray.shutdown()


@pytest.mark.slow
def test_ray_serve_two_replicas_answer_as_the_server_does(ray_serve, server, classes):
    replicas = {httpx.get(ray_serve.url + "/health").json()["replica"] for _ in range(30)}
    assert len(replicas) == 2
    here, there = client(server), client(ray_serve)
    for model in ("auto", "c-1", "full"):
        a = here.completions.create(model=model, prompt=classes.prompts[4], max_tokens=6)
        b = there.completions.create(model=model, prompt=classes.prompts[4], max_tokens=6)
        assert (a.choices[0].text, a.griffin) == (b.choices[0].text, b.griffin)
    chunks = list(there.chat.completions.create(model="auto", messages=[{"role": "user", "content": "w5 w6"}],
                                                max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        client(ray_serve, key="wrong").models.list()


@pytest.mark.slow
@pytest.mark.real_model
def test_llama_cpp_backend_serves_each_class_gguf(real_model_available, tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed; CI installs it")
        pytest.skip("llama-cpp-python is not installed")
    rows = [json.loads(line) for line in (ROOT / "bench/data/mixed_dev.jsonl").read_text().splitlines()]
    picked = [r for r in rows if r["kind"] == "code"][:4] + [r for r in rows if r["kind"] == "man"][:4]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"][:600]}) + "\n" for r in picked))
    result = discover([tmp_path / "log.jsonl"], ClassSettings("k"), DiscoverSettings(k=2), ModelSource())
    out = write_discovery(result, tmp_path / "classes")
    s = ServeSettings(router=str(out / "router.safetensors"), backend="llama.cpp", gguf_dir=str(tmp_path / "gguf"),
                      port=0, threads=2)
    with start(s) as running:
        cli = client(running, key="-")
        assert [m.id for m in cli.models.list()] == ["k-1", "k-2", "full", "auto"]
        for model in ("auto", "k-1", "k-2", "full"):
            r = cli.completions.create(model=model, prompt=picked[0]["prompt"][:600], max_tokens=8)
            assert r.usage.completion_tokens >= 1 and r.griffin["class"] in ("k-1", "k-2", "full")
        chunks = list(cli.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Say hi."}],
                                                  max_tokens=6, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    assert len(list((tmp_path / "gguf").glob("k-*.Q4_1.gguf"))) == 2


@pytest.mark.slow
def test_onnx_backend_answers_as_the_torch_backend(tmp_path):
    """Each class's lean graph and the full model's, exported at start; greedy answers equal the PyTorch
    backend's, alone or sent together (rows joining a running batch)."""
    lean = planted_classes(tmp_path, lean=True)
    asks = [dict(model=m, prompt=lean.prompts[i], max_tokens=5 + i % 4, extra_body={"ignore_eos": True})
            for i, m in enumerate(["auto", "c-1", "c-2", "full", "auto", "auto"])]
    with start(settings(lean)) as torch_server:
        want = [client(torch_server).completions.create(**a) for a in asks]
    with start(settings(lean, backend="onnx", onnx_dir=str(tmp_path / "graphs"))) as running:
        assert running.served.backend.joins  # lean graphs: continuous batching
        cli = client(running)
        alone = [cli.completions.create(**a) for a in asks]
        with ThreadPoolExecutor(len(asks)) as pool:
            together = list(pool.map(lambda a: cli.completions.create(**a), asks))
    assert [(r.choices[0].text, r.griffin) for r in alone] == [(r.choices[0].text, r.griffin) for r in want]
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in want]
    assert len(list((tmp_path / "graphs").iterdir())) == 3  # c-1, c-2, full: found again at the next start


SOAK_SECONDS = float(os.environ.get("GRIFFIN_EXPORT_SOAK_SECONDS", "120"))
SOAK_CLIENTS = 32
RSS_BOUND_MB = 64  # growth allowed between the first sample after the warm-up and every later one


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_mixed_traffic_with_disconnects(classes):
    """32 clients for two minutes: valid requests (streamed or not, chat or not, every model), invalid
    ones and clients that leave mid-stream. No 5xx, every valid request answered whole, the server's
    memory flat within RSS_BOUND_MB after a warm-up of a fifth of the run."""
    port = _free_port()
    proc = _serve_process(classes, port)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    stop_at = time.time() + SOAK_SECONDS
    counts = {"valid": 0, "answered": 0, "invalid": 0, "left": 0}
    problems: list[str] = []
    lock = threading.Lock()

    def one(rng: random.Random, http: httpx.Client) -> None:
        kind = rng.random()
        prompt = rng.choice(classes.prompts)
        model = rng.choice(["auto", "auto", "c-1", "c-2", "full"])
        if kind < 0.2:  # invalid
            body = rng.choice([b"{bad", json.dumps({"model": "nope", "prompt": "w5"}).encode(),
                               json.dumps({**OK, "max_tokens": 0}).encode(),
                               json.dumps({**OK, "prompt": LONG}).encode(), b"x" * (LIMIT + 1)])
            r = http.post(url + "/v1/completions", content=body, headers=headers)
            ok = 400 <= r.status_code < 500 and "error" in r.json()
            with lock:
                counts["invalid"] += 1
                if not ok:
                    problems.append(f"invalid request answered {r.status_code}: {r.text[:200]}")
            return
        body = {"model": model, "max_tokens": rng.randint(1, 40), "stream": kind >= 0.5}
        chat = rng.random() < 0.3
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
        if 0.2 <= kind < 0.3:  # leaves mid-stream
            body["stream"] = True
            with http.stream("POST", url + path, json=body, headers=headers) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        break
            with lock:
                counts["left"] += 1
            return
        with lock:
            counts["valid"] += 1
        if body["stream"]:
            with http.stream("POST", url + path, json=body, headers=headers) as r:
                lines = list(r.iter_lines()) if r.status_code == 200 else [r.read().decode()]
            data = [line for line in lines if line.startswith("data: ")]
            good = r.status_code == 200 and data[-1:] == ["data: [DONE]"] and '"finish_reason": "' in data[-2]
        else:
            r = http.post(url + path, json=body, headers=headers)
            good = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        with lock:
            counts["answered"] += good
            if not good:
                problems.append(f"valid {path} {body.get('stream')}: {r.status_code}")

    def client_loop(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(timeout=120) as http:
            while time.time() < stop_at:
                try:
                    one(rng, http)
                except Exception as e:  # noqa: BLE001 - a transport failure is a finding too
                    with lock:
                        problems.append(f"{type(e).__name__}: {e}")

    rss: list[tuple[float, float]] = []

    def sample() -> None:
        t0 = time.time()
        while time.time() < stop_at:
            rss.append((time.time() - t0, _rss_mb(proc.pid)))
            time.sleep(2)

    try:
        sampler = threading.Thread(target=sample)
        sampler.start()
        with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
            list(pool.map(client_loop, range(SOAK_CLIENTS)))
        sampler.join()
        health = httpx.get(url + "/health").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not problems, problems[:10]
    assert counts["answered"] == counts["valid"] > 100 and counts["invalid"] and counts["left"], counts
    assert health["running"] == 0 and health["waiting"] == 0 and health["failed"] == 0, health
    warm = [mb for t, mb in rss if t >= SOAK_SECONDS / 5]
    print(f"soak: {counts}, served {health['served']}, cancelled {health['cancelled']}; resident memory "
          f"{rss[0][1]:.0f} MB at the start, {min(warm):.0f}-{max(warm):.0f} MB after the warm-up")  # pytest -rP
    assert warm and max(warm) - warm[0] <= RSS_BOUND_MB, rss
