"""POST /generate: continuous batching across clients gives each client exactly llm.generate's text, bad requests
are clear 4xx, a client that hangs up frees its slot, the metrics count it all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import pytest
import torch

from workbench import llm
from workbench.serve.app import ROUTES, ServeSettings, create_app
from workbench.serve.generate import (GENERATE_METRIC_NAMES, GENERATE_ROUTE, GenerateSettings, GenerationEngine,
                                      _served, batched_forward, create_generate_app, generation_load)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"
BLOCK = 24
KEY = "test-key-123"


@pytest.fixture(scope="module")
def gpt():
    """A tiny GPT trained for 60 steps on pangrams: its greedy text varies with the context (a random one repeats
    one character, so a wrong context would go unnoticed)."""
    tok = llm.CharTokenizer(ALPHABET)
    model = llm.GPT(llm.GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16), seed=3)
    ids = tok.encode("the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs, how "
                     "vexingly quick daft zebras jump. sphinx of black quartz, judge my vow. " * 4)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only fight over the cores
    try:
        for _ in range(60):
            starts = torch.randint(0, len(ids) - BLOCK - 1, (16,), generator=gen).tolist()
            x = torch.stack([ids[i:i + BLOCK] for i in starts])
            y = torch.stack([ids[i + 1:i + BLOCK + 1] for i in starts])
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tok


class Gate:
    """Holds the engine before each decoding step until released: what the tests see does not depend on timing."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.permits = threading.Semaphore(0)
        self.is_open = False
        step = engine._step

        def gated(batch):
            if not self.is_open:
                assert self.permits.acquire(timeout=30), "the test never released the engine"
            return step(batch)

        engine._step = gated

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.permits.release()

    def open(self) -> None:
        self.is_open = True
        self.permits.release(1000)


def _wait_for(condition, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


async def _stream(client: httpx.AsyncClient, url: str, body: dict, *, events: int | None = None) -> tuple[str, list]:
    """The text a /generate stream carries and all its events (stop after `events` token events if given)."""
    text, seen = [], []
    async with client.stream("POST", url + GENERATE_ROUTE, json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[6:]
            seen.append(data)
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "token" in event:
                assert event["index"] == len(text)
                text.append(event["token"])
                if events is not None and len(text) == events:
                    break
    return "".join(text), seen


def _metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and (labels is None or all(s.labels.get(k) == v for k, v in labels.items())):
                return s.value
    raise KeyError(name)


# -- the math --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [
    [(0, 5)],                            # one prompt
    [(0, 3), (0, 9), (0, 1)],            # prompts of different lengths (left-padded)
    [(4, 1), (10, 1), (1, 1)],           # decoding after caches of different lengths
    [(4, 3), (0, 7), (12, 1), (20, 4)],  # all mixed, one row filling the context
])
def test_batched_forward_matches_the_model(gpt, rows):
    model, _ = gpt
    gen = torch.Generator().manual_seed(len(rows))
    seqs = [torch.randint(0, model.config.vocab_size, (s + t,), generator=gen) for s, t in rows]
    pasts = [model.step(q[None, :s])[1] if s else None for q, (s, _) in zip(seqs, rows)]
    pasts = [None if p is None else [(k[0], v[0]) for k, v in p.layers] for p in pasts]
    logits, caches = batched_forward(model, pasts, [q[s:].tolist() for q, (s, _) in zip(seqs, rows)])
    with torch.no_grad():
        ref = torch.stack([model(q[None])[0, -1] for q in seqs])
        for q, cache in zip(seqs, caches):  # the returned cache is the one step() builds for the whole sequence
            full = model.step(q[None])[1]
            for (k, v), (rk, rv) in zip(cache, full.layers):
                assert torch.allclose(k, rk[0], atol=1e-5) and torch.allclose(v, rv[0], atol=1e-5)
    assert torch.allclose(logits, ref, atol=1e-5), (logits - ref).abs().max()


# -- batching across clients -----------------------------------------------------------------------------------

CLIENTS = [("abc", 20, 0.0, 0), ("the quick brown fox", 15, 0.0, 0), ("z", 40, 0.0, 0),
           ("hello world, hello", 30, 0.0, 0), ("q", 1, 0.0, 0), ("sampled text", 25, 0.9, 7),
           ("another sample", 12, 1.3, 11)]


def _reference(model, tok, prompt, n, temperature, seed) -> str:
    return llm.generate(model, tok, prompt, max_new_tokens=n, temperature=temperature, seed=seed)


def test_concurrent_clients_each_get_exactly_llm_generate(gpt):
    model, tok = gpt
    app = create_generate_app(model, tok, GenerateSettings(max_batch=8, max_new_tokens=2 * BLOCK))
    engine = app.state.engine
    gate = Gate(engine)
    with _served(app) as url:
        async def run() -> list[str]:
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.create_task(_stream(client, url, {"prompt": p, "max_new_tokens": n,
                                                                    "temperature": t, "seed": s}))
                         for p, n, t, s in CLIENTS]
                # every request is in before the first step: they all decode together from the second step
                await asyncio.to_thread(_wait_for, lambda: engine.active + len(engine._pending) == len(CLIENTS),
                                        "all requests to arrive")
                gate.open()
                return [text for text, _ in await asyncio.gather(*tasks)]

        texts = asyncio.run(run())
        metrics = httpx.get(url + ROUTES["metrics"]).text
    for (prompt, n, t, s), text in zip(CLIENTS, texts):
        assert text == _reference(model, tok, prompt, n, t, s), prompt
    assert len(set(texts[0])) > 3  # the model's text varies: the comparison can catch a wrong context
    # several prompts ran past the context (24): their windows slid as llm.generate's do
    assert any(len(p) + n > BLOCK for p, n, _, _ in CLIENTS)
    # batched across clients: the second step held all 7 sequences
    assert _metric(metrics, "workbench_generate_batch_size_bucket", {"le": "4.0"}) < engine.steps
    assert _metric(metrics, "workbench_generated_tokens_total") == sum(n for _, n, _, _ in CLIENTS)
    assert _metric(metrics, "workbench_time_to_first_token_seconds_count") == len(CLIENTS)
    assert _metric(metrics, "workbench_active_sequences") == 0
    assert _metric(metrics, "workbench_generate_sequences_total", {"outcome": "length"}) == len(CLIENTS)


def test_a_sampled_stream_does_not_depend_on_the_other_clients(gpt):
    model, tok = gpt
    body = {"prompt": "sampled text", "max_new_tokens": 30, "temperature": 0.8, "seed": 5}
    others = [{"prompt": ALPHABET[:k], "max_new_tokens": 10 + k, "temperature": 1.0, "seed": k} for k in range(1, 6)]
    app = create_generate_app(model, tok, GenerateSettings(max_batch=8, max_new_tokens=2 * BLOCK))
    with _served(app) as url:
        async def run(with_others: bool) -> str:
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [_stream(client, url, b) for b in (others if with_others else [])]
                texts = await asyncio.gather(_stream(client, url, body), *tasks)
                return texts[0][0]

        alone, crowded = asyncio.run(run(False)), asyncio.run(run(True))
    assert alone == crowded == _reference(model, tok, body["prompt"], 30, 0.8, 5)


@pytest.mark.parametrize("max_batch", [1, 4])
def test_generation_load_counts_every_client(gpt, max_batch):
    model, tok = gpt
    prompts = ["abc", "hello there", "xyz xyz"]
    app = create_generate_app(model, tok, GenerateSettings(max_batch=max_batch))
    r = generation_load(app, 5, 12, prompts=prompts)
    assert (r.ok, r.errors, r.total_tokens) == (5, 0, 60)
    assert r.texts == [_reference(model, tok, prompts[i % 3], 12, 0.0, 0) for i in range(5)]
    assert r.ttft_p50_s <= r.ttft_p99_s and r.total_tokens_per_s > 0 and r.client_tokens_per_s_min > 0


def test_the_stream_ends_with_a_summary_and_done(gpt):
    model, tok = gpt
    from fastapi.testclient import TestClient

    with TestClient(create_generate_app(model, tok)) as c:
        r = c.post(GENERATE_ROUTE, json={"prompt": "abc", "max_new_tokens": 5})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    summary = json.loads(events[-2])
    assert summary["done"] and summary["finish_reason"] == "length"
    assert (summary["prompt_tokens"], summary["new_tokens"]) == (3, 5) and summary["ttft_s"] >= 0
    tokens = [json.loads(e) for e in events[:-2]]
    assert [e["index"] for e in tokens] == list(range(5))
    assert "".join(e["token"] for e in tokens) == _reference(model, tok, "abc", 5, 0.0, 0)


# -- bad requests and hang-ups ---------------------------------------------------------------------------------

def _b(obj) -> bytes:
    return json.dumps(obj).encode()


BAD = {
    "malformed JSON": (b'{"prompt": "ab', 400, "not valid JSON"),
    "not an object": (_b(["abc"]), 422, 'expected a JSON object {"prompt"'),
    "no prompt": (_b({"max_new_tokens": 3}), 422, 'only "prompt" is required'),
    "unknown field": (_b({"prompt": "abc", "top_p": 0.9}), 422, "unknown field(s) 'top_p'"),
    "empty prompt": (_b({"prompt": ""}), 422, "non-empty string"),
    "prompt not a string": (_b({"prompt": 42}), 422, "non-empty string"),
    "prompt longer than the context": (_b({"prompt": "a" * (BLOCK + 1)}), 422, f"the model's context is {BLOCK}"),
    "characters outside the vocabulary": (_b({"prompt": "ABC!"}), 422, "not in the 29-character vocabulary"),
    "zero new tokens": (_b({"prompt": "abc", "max_new_tokens": 0}), 422, "between 1 and 24"),
    "negative new tokens": (_b({"prompt": "abc", "max_new_tokens": -5}), 422, "between 1 and 24"),
    "too many new tokens": (_b({"prompt": "abc", "max_new_tokens": 25}), 422, "between 1 and 24"),
    "new tokens not a number": (_b({"prompt": "abc", "max_new_tokens": "5"}), 422, "whole number"),
    "new tokens a boolean": (_b({"prompt": "abc", "max_new_tokens": True}), 422, "whole number"),
    "fractional new tokens": (_b({"prompt": "abc", "max_new_tokens": 2.5}), 422, "whole number"),
    "negative temperature": (_b({"prompt": "abc", "temperature": -0.1}), 422, "finite number >= 0"),
    "NaN temperature": (b'{"prompt": "abc", "temperature": NaN}', 422, "contains NaN"),
    "infinite temperature": (b'{"prompt": "abc", "temperature": 1e999}', 422, "finite number >= 0"),
    "temperature a string": (_b({"prompt": "abc", "temperature": "hot"}), 422, "must be a number"),
    "negative seed": (_b({"prompt": "abc", "seed": -1}), 422, "'seed' must be in"),
    "oversized body": (_b({"prompt": "a" * 70_000}), 413, "more than this server's limit"),
    "nested too deeply": (b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400, "nested too deeply"),
}


@pytest.fixture(scope="module")
def client(gpt):
    from fastapi.testclient import TestClient

    with TestClient(create_generate_app(*gpt),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_a_clear_4xx(client, case):
    body, status, message = BAD[case]
    r = client.post(GENERATE_ROUTE, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and message in detail and "\n" not in detail, detail
    assert client.get(ROUTES["ready"]).json() == {"status": "ready", "active": 0}
    ok = client.post(GENERATE_ROUTE, json={"prompt": "abc", "max_new_tokens": 2})  # and the engine still serves
    assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n")


def test_a_body_not_declared_as_json_is_415(client):
    r = client.post(GENERATE_ROUTE, content=_b({"prompt": "abc"}), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]


def test_a_client_that_hangs_up_frees_its_slot(gpt):
    model, tok = gpt
    app = create_generate_app(model, tok, GenerateSettings(max_batch=4))
    engine = app.state.engine
    gate = Gate(engine)
    with _served(app) as url:
        async def run() -> str:
            async with httpx.AsyncClient(timeout=60) as client:
                gate.release(2)  # the prompt's step and one decoding step: two tokens, then the engine waits
                text, _ = await _stream(client, url, {"prompt": "abc", "max_new_tokens": BLOCK}, events=2)
                assert len(text) == 2  # leaving the `stream` block closed the connection mid-stream
                await asyncio.to_thread(_wait_for, lambda: engine._active and engine._active[0].cancelled,
                                        "the server to notice the hang-up")
                gate.open()
                text, _ = await _stream(client, url, {"prompt": "hello", "max_new_tokens": 10})
                return text

        other = asyncio.run(run())
        assert other == _reference(model, tok, "hello", 10, 0.0, 0)
        _wait_for(lambda: _metric(httpx.get(url + ROUTES["metrics"]).text, "workbench_active_sequences") == 0,
                  "the active-sequences gauge to return to 0")
        metrics = httpx.get(url + ROUTES["metrics"]).text
    assert _metric(metrics, "workbench_generate_sequences_total", {"outcome": "cancelled"}) == 1
    assert _metric(metrics, "workbench_generate_sequences_total", {"outcome": "length"}) == 1
    assert _metric(metrics, "workbench_generated_tokens_total") == 2 + 10  # the abandoned one stopped at 2 of 24


def test_stopping_the_server_ends_open_streams_with_an_error_event(gpt):
    model, tok = gpt

    async def run() -> list:
        engine = GenerationEngine(model, tok)
        gate = Gate(engine)
        await engine.start()
        seq = engine.submit(engine.parse(_b({"prompt": "abc", "max_new_tokens": 10})))
        gate.release(1)
        got = []
        with contextlib.suppress(RuntimeError):
            async for tok_id in engine.tokens(seq):
                got.append(tok_id)
                gate.open()
                await engine.stop()
        return [got, seq.finish_reason, engine.active]

    got, reason, active = asyncio.run(run())
    assert reason == "error" and active == 0 and 1 <= len(got) < 10


# -- keys, metrics, mounting beside an ONNX model -------------------------------------------------------------

def _identity_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_mounted_beside_an_onnx_model(gpt, tmp_path):
    from fastapi.testclient import TestClient

    model, tok = gpt
    app = create_app(_identity_onnx(tmp_path / "m.onnx"), ServeSettings(api_key=KEY, poll_seconds=0),
                     generator=GenerationEngine(model, tok))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post(GENERATE_ROUTE, json={"prompt": "abc"}).status_code == 401
        r = c.post(GENERATE_ROUTE, json={"prompt": "abc", "max_new_tokens": 6}, headers={"X-API-Key": KEY})
        assert r.status_code == 200
        text = "".join(json.loads(e[6:])["token"] for e in r.text.split("\n\n") if '"token"' in e)
        assert text == _reference(model, tok, "abc", 6, 0.0, 0)
        bad = c.post(GENERATE_ROUTE, json={"prompt": "abc", "temperature": -1}, headers={"X-API-Key": KEY})
        assert bad.status_code == 422
        p = c.post(ROUTES["predict"], json={"inputs": [[1, 2, 3, 4]]}, headers={"X-API-Key": KEY})
        assert p.status_code == 200 and p.json()["predictions"] == [3]  # /predict is unchanged
        metrics = c.get(ROUTES["metrics"]).text
        assert "/generate" in c.get("/openapi.json").json()["paths"]
    for name in GENERATE_METRIC_NAMES:
        assert name in metrics, name
    assert _metric(metrics, "workbench_generated_tokens_total") == 6
    assert _metric(metrics, "workbench_http_requests_total", {"route": "/generate", "status": "200"}) == 1
    assert _metric(metrics, "workbench_http_requests_total", {"route": "/generate", "status": "401"}) == 1
    assert _metric(metrics, "workbench_http_requests_total", {"route": "/generate", "status": "422"}) == 1


def test_the_standalone_app_checks_its_key(gpt):
    from fastapi.testclient import TestClient

    with TestClient(create_generate_app(*gpt, GenerateSettings(api_key=KEY))) as c:
        assert c.post(GENERATE_ROUTE, json={"prompt": "abc"}).status_code == 401
        r = c.post(GENERATE_ROUTE, json={"prompt": "abc", "max_new_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert c.get(ROUTES["metrics"]).status_code == 200 and c.get(ROUTES["live"]).status_code == 200


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_new_tokens": 0}, {"max_queue": -1},
                                    {"body_timeout_s": 0}, {"api_key": "short"}])
def test_settings_validate_themselves(kwargs):
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match=f"{next(iter(kwargs))}|API key"):
        GenerateSettings(**kwargs)
