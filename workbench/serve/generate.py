"""Text generation over HTTP: ``POST /generate`` streams a GPT's tokens as server-sent events, with the
sequences of all clients decoded together ("continuous batching").

A background engine keeps the set of active sequences. At each step it runs the model once on all of them
(at most ``max_batch``) and hands one new token to each; a request that arrives joins at the next step,
and a finished or abandoned one leaves. Each sequence keeps its own KV cache; a step runs at most two
forwards: one over the new sequences' prompts (and any whose context is full, re-read from their last
``block_size`` tokens, as :func:`workbench.llm.generate` crops), one over a single new token for all the
others, their caches left-padded to the longest with an attention mask and per-row positions
(:func:`batched_forward`). Sampling draws from each request's own ``torch.Generator``, so a sequence is the
one :func:`workbench.llm.generate` gives for its prompt and seed, whatever the other clients do (up to
float32 rounding, which the batch composition may change: only a near-tie between two logits could flip).

The stream::

    data: {"token": "d", "index": 0}
    data: {"token": "e", "index": 1}
    ...
    data: {"done": true, "finish_reason": "length", "prompt_tokens": 4, "new_tokens": 64, "ttft_s": ..., ...}
    data: [DONE]

Every bad request is a 4xx JSON ``{"detail": "..."}`` before the stream starts. Serve a checkpoint with::

    app = create_generate_app(*checkpoint.load(path)[:2]); run_server(app)

or beside an ONNX model: ``create_app(source, settings, generator=GenerationEngine(model, tokenizer))``.
``generation_load`` and ``generation_bench`` measure time to first token and tokens per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Sequence

import torch
from fastapi import Request  # at module level: FastAPI resolves the handler's annotation here
from starlette.responses import Response
from torch.nn import functional as F

from ..errors import WorkbenchError
from .validate import BadInput, check_content_type

__all__ = ["GenerateSettings", "GenerationEngine", "batched_forward", "parse_generate", "GenerateRequest",
           "add_generate_routes", "create_generate_app", "generation_load", "GenerationLoad", "generation_bench",
           "GENERATE_ROUTE", "GENERATE_METRIC_NAMES"]

GENERATE_ROUTE = "/generate"
GENERATE_METRIC_NAMES = ("workbench_generated_tokens_total", "workbench_time_to_first_token_seconds",
                         "workbench_active_sequences", "workbench_generate_batch_size",
                         "workbench_generate_sequences_total", "workbench_generate_queue_depth")
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_FIELDS = ("prompt", "max_new_tokens", "temperature", "seed")

Cache = list[tuple[torch.Tensor, torch.Tensor]]  # one sequence's keys and values per layer, each (heads, T, hd)


@dataclass(frozen=True)
class GenerateSettings:
    """How the engine batches and what /generate accepts.

    Args:
        max_batch: most sequences decoded together (1: one sequence at a time, the others wait).
        max_new_tokens: most tokens one request may ask for (None: the model's context length).
        default_new_tokens: tokens generated when a request does not say (capped by max_new_tokens).
        max_queue: most requests waiting for a slot (more is a 503).
        max_body_bytes: largest request body (more is a 413).
        api_key: if set, /generate needs it (standalone app only; mounted, the app's key applies).
        body_timeout_s: longest wait for a request's headers, then its body (as :class:`ServeSettings`).
    """

    max_batch: int = 16
    max_new_tokens: int | None = None
    default_new_tokens: int = 64
    max_queue: int = 256
    max_body_bytes: int = 64 << 10
    api_key: str | None = None
    body_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "default_new_tokens", "max_queue", "max_body_bytes", "max_new_tokens"):
            value = getattr(self, name)
            if name == "max_new_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkbenchError(f"GenerateSettings.{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.body_timeout_s, bool) or not isinstance(self.body_timeout_s, (int, float)) \
                or not 0 < self.body_timeout_s <= 3600:
            raise WorkbenchError(f"GenerateSettings.body_timeout_s must be seconds in (0, 3600], got "
                                 f"{self.body_timeout_s!r}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise WorkbenchError("an API key must be at least 8 characters long")


@dataclass(frozen=True)
class GenerateRequest:
    """A validated /generate body."""

    prompt: str
    ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    seed: int


# ---------------------------------------------------------------------------------------------------------------
# The math: one forward over sequences of different lengths


@torch.no_grad()
def batched_forward(model: Any, pasts: Sequence[Cache | None], news: Sequence[Sequence[int]]
                    ) -> tuple[torch.Tensor, list[Cache]]:
    """Next-token logits of several sequences at once, each with its own cache and its own new tokens.

    Row i holds ``s_i`` cached positions (``pasts[i]``, None for none) and ``t_i`` new tokens ``news[i]``,
    placed at positions ``s_i .. s_i + t_i - 1``. Cached keys are left-padded to the longest, new tokens too;
    a mask lets each real token see its row's real keys up to itself (a padding query sees only itself, so
    that no row of the softmax is empty). Computes what ``model.step(news[i], pasts[i])`` does for each row.

    Args:
        model: a :class:`~workbench.llm.GPT` (its modules are called one by one; quantized wrappers work).
        pasts: per row, the cache a previous call returned, or None.
        news: per row, at least one token id; ``s_i + t_i <= block_size``.

    Returns:
        (logits (B, vocab) at each row's last new token, each row's cache with the new tokens appended).

    Example:
        >>> logits, caches = batched_forward(model, [None, None], [[1, 2, 3], [4]])
        >>> logits, caches = batched_forward(model, caches, [[logits[0].argmax()], [logits[1].argmax()]])
    """
    b = len(news)
    s = [0 if p is None else p[0][0].shape[1] for p in pasts]
    t = [len(n) for n in news]
    if b == 0 or len(pasts) != b or min(t) < 1:
        raise WorkbenchError("batched_forward needs as many caches as rows and at least one new token per row")
    block = model.config.block_size
    if max(si + ti for si, ti in zip(s, t)) > block:
        raise WorkbenchError(f"a row's cached + new positions exceed the context length {block}")
    S, T = max(s), max(t)
    idx = torch.zeros(b, T, dtype=torch.long)
    pos = torch.zeros(b, T, dtype=torch.long)
    key_ok = torch.zeros(b, S + T, dtype=torch.bool)
    for i in range(b):
        idx[i, T - t[i]:] = torch.as_tensor(news[i], dtype=torch.long)
        pos[i, T - t[i]:] = torch.arange(s[i], s[i] + t[i])
        key_ok[i, S - s[i]:S] = True
        key_ok[i, S + T - t[i]:] = True
    # query q (a column of the new part) sees every real cached key and the real new keys up to itself
    causal = torch.ones(T, S + T, dtype=torch.bool).tril(diagonal=S)
    if all(si == S for si in s) and all(ti == T for ti in t):  # no padding: no mask, or the causal one
        attn_mask, is_causal = (None, S == 0 and T > 1) if T == 1 or S == 0 else (causal, False)
    else:
        mask = key_ok[:, None, :] & causal[None]
        mask[:, torch.arange(T), S + torch.arange(T)] = True  # a padding query sees itself: no empty softmax row
        attn_mask, is_causal = mask[:, None], False
    x = model.wte(idx) + model.wpe(pos)
    new_caches: list[Cache] = [[] for _ in range(b)]
    for layer, block_ in enumerate(model.blocks):
        attn = block_.attn
        h = block_.ln_1(x)
        d = h.shape[-1]
        nh = attn.n_head
        q, k, v = attn.qkv(h).split(d, dim=2)
        q, k, v = (z.view(b, T, nh, d // nh).transpose(1, 2) for z in (q, k, v))
        if S:
            pk = k.new_zeros(b, nh, S, d // nh)
            pv = v.new_zeros(b, nh, S, d // nh)
            for i, p in enumerate(pasts):
                if p is not None and s[i]:
                    pk[i, :, S - s[i]:] = p[layer][0]
                    pv[i, :, S - s[i]:] = p[layer][1]
            kk, vv = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        else:
            kk, vv = k, v
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=attn_mask, is_causal=is_causal)
        x = x + attn.proj(y.transpose(1, 2).reshape(b, T, d))
        x = x + block_.mlp(block_.ln_2(x))
        for i in range(b):
            nk, nv = k[i, :, T - t[i]:], v[i, :, T - t[i]:]
            if pasts[i] is not None and s[i]:
                nk, nv = torch.cat([pasts[i][layer][0], nk], dim=1), torch.cat([pasts[i][layer][1], nv], dim=1)
            new_caches[i].append((nk, nv))
    logits = model.lm_head(model.ln_f(x[:, -1]))  # the last column is real in every row (left padding)
    return logits, new_caches


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _reject_constant(name: str) -> float:
    raise BadInput(422, f"numbers must be finite; the body contains {name}")


def _whole(payload: dict, name: str, default: int) -> int:
    value = payload.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(422, f"'{name}' must be a whole number, got {json.dumps(value)[:40]}")
    return value


def parse_generate(body: bytes, tokenizer: Any, *, block_size: int, max_new_tokens: int,
                   default_new_tokens: int = 64) -> GenerateRequest:
    """Validate a /generate body; raise :class:`BadInput` (a status and one line) for every way it can be wrong.

    Example:
        >>> parse_generate(b'{"prompt": "def "}', tok, block_size=128, max_new_tokens=128).max_new_tokens
        64
    """
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except BadInput:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(400, f"the body is not valid JSON ({str(exc).splitlines()[0][:120]}); "
                            f'send {{"prompt": "...", "max_new_tokens": 64}}') from None
    except RecursionError:
        raise BadInput(400, "the body's JSON is nested too deeply; send a flat object "
                            '{"prompt": "...", "max_new_tokens": 64}') from None
    if not isinstance(payload, dict) or "prompt" not in payload:
        raise BadInput(422, 'expected a JSON object {"prompt": "...", "max_new_tokens": n, "temperature": t, '
                            '"seed": s} (only "prompt" is required)')
    unknown = sorted(set(payload) - set(_FIELDS))
    if unknown:
        raise BadInput(422, f"unknown field(s) {', '.join(map(repr, unknown))}; the body takes "
                            f"{', '.join(map(repr, _FIELDS))}")
    prompt = payload["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise BadInput(422, "'prompt' must be a non-empty string (the text to continue)")
    if len(prompt) > block_size:
        raise BadInput(422, f"the prompt has {len(prompt)} characters but the model's context is {block_size}; "
                            f"send its last {block_size} characters or fewer")
    try:
        ids = tuple(int(i) for i in tokenizer.encode(prompt))
    except WorkbenchError as exc:
        raise BadInput(422, f"the prompt has {str(exc).splitlines()[0][:300]}") from None
    cap = min(default_new_tokens, max_new_tokens)
    n = _whole(payload, "max_new_tokens", cap)
    if not 1 <= n <= max_new_tokens:
        raise BadInput(422, f"'max_new_tokens' must be between 1 and {max_new_tokens} (this server's limit), "
                            f"got {n}")
    temperature = payload.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise BadInput(422, f"'temperature' must be a number (0 = greedy), got {json.dumps(temperature)[:40]}")
    temperature = float(temperature) if abs(temperature) < 1e308 else math.inf  # huge JSON integers
    if not math.isfinite(temperature) or temperature < 0:
        raise BadInput(422, f"'temperature' must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    seed = _whole(payload, "seed", 0)
    if not 0 <= seed < 2**63:
        raise BadInput(422, f"'seed' must be in [0, 2**63), got {seed}")
    return GenerateRequest(prompt=prompt, ids=ids, max_new_tokens=n, temperature=temperature, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# The engine


class _Metrics:
    def __init__(self, registry: Any, engine: "GenerationEngine") -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = r = registry
        self.tokens = Counter("workbench_generated_tokens", "Tokens generated by /generate", registry=r)
        self.ttft = Histogram("workbench_time_to_first_token_seconds",
                              "From a /generate request's arrival to its first token", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.batch = Histogram("workbench_generate_batch_size", "Sequences per decoding step",
                               buckets=_BATCH_BUCKETS, registry=r)
        self.sequences = Counter("workbench_generate_sequences", "Finished /generate sequences by outcome",
                                 ["outcome"], registry=r)
        for outcome in ("length", "cancelled", "error"):
            self.sequences.labels(outcome)
        Gauge("workbench_active_sequences", "Sequences being decoded", registry=r).set_function(
            lambda: len(engine._active))
        Gauge("workbench_generate_queue_depth", "Requests waiting for a decoding slot", registry=r).set_function(
            lambda: len(engine._pending))


class _Sequence:
    """One request's state: its tokens, cache, generator, and the queue its stream reads."""

    def __init__(self, req: GenerateRequest) -> None:
        self.req = req
        self.ids = list(req.ids)
        self.cache: Cache | None = None
        self.generator = torch.Generator().manual_seed(req.seed)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.emitted = 0
        self.cancelled = False
        self.finish_reason: str | None = None
        self.arrived = time.perf_counter()
        self.first_at: float | None = None
        self.done_at: float | None = None

    def summary(self) -> dict[str, Any]:
        end = self.done_at or time.perf_counter()
        ttft = (self.first_at - self.arrived) if self.first_at is not None else None
        decode = end - self.first_at if self.first_at is not None else 0.0
        return {"done": True, "finish_reason": self.finish_reason, "prompt_tokens": len(self.req.ids),
                "new_tokens": self.emitted, "ttft_s": ttft, "total_s": end - self.arrived,
                "tokens_per_s": (self.emitted - 1) / decode if self.emitted > 1 and decode > 0 else None}


class GenerationEngine:
    """Continuous batching over a GPT: at each step one batched forward for all active sequences.

    Args:
        model: the :class:`~workbench.llm.GPT` (put in eval mode).
        tokenizer: its :class:`~workbench.llm.CharTokenizer`.
        settings: batching and limits.
        registry: the Prometheus ``CollectorRegistry`` to put the metrics in (default: a new one).

    Example:
        >>> engine = GenerationEngine(model, tok, GenerateSettings(max_batch=16)); await engine.start()
        >>> seq = engine.submit(parse_generate(body, tok, block_size=128, max_new_tokens=128))
        >>> async for token_id in engine.tokens(seq): ...
    """

    def __init__(self, model: Any, tokenizer: Any, settings: GenerateSettings | None = None, *,
                 registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry

        self.model, self.tokenizer = model.eval(), tokenizer
        self.settings = settings or GenerateSettings()
        self.block_size = model.config.block_size
        if tokenizer.vocab_size != model.config.vocab_size:
            raise WorkbenchError(f"the tokenizer has {tokenizer.vocab_size} characters but the model's vocabulary "
                                 f"{model.config.vocab_size}: they do not belong together")
        self.max_new_tokens = self.settings.max_new_tokens or self.block_size
        self._pending: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None
        self.steps = 0
        self.use_registry(registry if registry is not None else CollectorRegistry())

    def use_registry(self, registry: Any) -> None:
        """Put the metrics in `registry` (the app's, when mounted beside a model); before :meth:`start`."""
        if self._task is not None:
            raise WorkbenchError("the metrics registry can only change before the engine starts")
        self.metrics = _Metrics(registry, self)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def active(self) -> int:
        return len(self._active)

    def mount(self, app: Any, *, dependencies: Sequence[Any] = (), auth: bool = False) -> str:
        """Add ``POST /generate`` served by this engine to a FastAPI `app`; returns the route's path."""
        add_generate_routes(app, self, dependencies=dependencies, auth=auth)
        return GENERATE_ROUTE

    def parse(self, body: bytes) -> GenerateRequest:
        return parse_generate(body, self.tokenizer, block_size=self.block_size, max_new_tokens=self.max_new_tokens,
                              default_new_tokens=self.settings.default_new_tokens)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt-decode")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="generation-engine")

    async def stop(self) -> None:
        """Stop decoding; every waiting and active stream ends with an error event."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for seq in [*self._active, *self._pending]:
            self._finish(seq, "error", RuntimeError("the server is shutting down"))
        self._active.clear()
        self._pending.clear()
        self._executor.shutdown(wait=True)
        self._task = self._executor = None

    def submit(self, req: GenerateRequest) -> _Sequence:
        """Queue a request; it joins the batch at the next step. A full queue is a 503 :class:`BadInput`."""
        if not self.running:
            raise BadInput(503, "the generation engine is not running (starting or stopping); retry shortly")
        if len(self._pending) >= self.settings.max_queue:
            raise BadInput(503, f"{len(self._pending)} requests are already waiting for a decoding slot (this "
                                f"server's limit); retry shortly")
        seq = _Sequence(req)
        self._pending.append(seq)
        self._wake.set()
        return seq

    def cancel(self, seq: _Sequence) -> None:
        """The client went away: the engine drops the sequence before its next step."""
        if seq.finish_reason is None:
            seq.cancelled = True
            if seq in self._pending:
                self._pending.remove(seq)
                self._finish(seq, "cancelled")
            self._wake.set()

    async def tokens(self, seq: _Sequence) -> AsyncIterator[int]:
        """The sequence's new token ids as they come; raises the engine's error if it failed."""
        while True:
            item = await seq.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _finish(self, seq: _Sequence, reason: str, error: BaseException | None = None) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        seq.done_at = time.perf_counter()
        seq.cache = None
        self.metrics.sequences.labels(reason).inc()
        if error is not None:
            seq.queue.put_nowait(error)
        seq.queue.put_nowait(None)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for seq in [s for s in self._active if s.cancelled]:
                self._active.remove(seq)
                self._finish(seq, "cancelled")
            while self._pending and len(self._active) < self.settings.max_batch:
                self._active.append(self._pending.popleft())
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self._active)
            try:
                new = await loop.run_in_executor(self._executor, self._step, batch)
            except Exception as exc:  # a failed step ends its sequences with an error, never the engine
                for seq in batch:
                    self._active.remove(seq)
                    self._finish(seq, "error", RuntimeError(f"generation failed: {str(exc).splitlines()[0][:200]}"
                                                            if str(exc) else type(exc).__name__))
                continue
            self.steps += 1
            self.metrics.batch.observe(len(batch))
            now = time.perf_counter()
            for seq, tok in zip(batch, new):
                if seq.cancelled:
                    continue  # dropped at the top of the next step
                seq.queue.put_nowait(tok)
                seq.emitted += 1
                self.metrics.tokens.inc()
                if seq.first_at is None:
                    seq.first_at = now
                    self.metrics.ttft.observe(now - seq.arrived)
                if seq.emitted >= seq.req.max_new_tokens:
                    self._active.remove(seq)
                    self._finish(seq, "length")

    def _step(self, batch: list[_Sequence]) -> list[int]:
        """On the worker thread: one new token for each sequence of `batch` (at most two forwards)."""
        block = self.block_size
        # A sequence with no cache (new) or a full one is (re-)read from its last block_size tokens, as
        # llm.generate crops; the others feed their last token after their cache.
        fresh = [i for i, q in enumerate(batch) if q.cache is None or q.cache[0][0].shape[1] >= block]
        decode = sorted(set(range(len(batch))) - set(fresh))
        logits: list[torch.Tensor | None] = [None] * len(batch)
        with torch.inference_mode():
            for group, pasts, news in (
                    (fresh, [None] * len(fresh), [batch[i].ids[-block:] for i in fresh]),
                    (decode, [batch[i].cache for i in decode], [batch[i].ids[-1:] for i in decode])):
                if not group:
                    continue
                out, caches = batched_forward(self.model, pasts, news)
                for j, i in enumerate(group):
                    logits[i] = out[j]
                    batch[i].cache = caches[j]
            new = []
            for seq, row in zip(batch, logits):
                if seq.req.temperature == 0:
                    tok = int(row.argmax())
                else:  # as workbench.llm.generate draws, from the sequence's own generator
                    tok = int(torch.multinomial((row / seq.req.temperature).softmax(-1), 1,
                                                generator=seq.generator))
                seq.ids.append(tok)
                new.append(tok)
        return new


# ---------------------------------------------------------------------------------------------------------------
# HTTP


class _EventStream(Response):
    """A text/event-stream response that stops (and calls `on_close`) as soon as the client disconnects.

    Watching ``receive`` for the disconnect, rather than waiting for a write to fail, frees the sequence's
    slot at once, under any ASGI spec version.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Any) -> None:
        self.chunks, self.on_close = chunks, on_close
        self.status_code, self.background = 200, None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(watch())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError, Exception):
                    await task
            self.on_close()
        if tasks[0] in done and tasks[0].exception() is not None:
            raise tasks[0].exception()


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _events(engine: GenerationEngine, seq: _Sequence) -> AsyncIterator[bytes]:
    chars = engine.tokenizer.chars
    i = 0
    try:
        async for tok in engine.tokens(seq):
            yield _event({"token": chars[tok], "index": i})
            i += 1
        yield _event(seq.summary())
    except RuntimeError as exc:  # the engine stopped or a step failed
        yield _event({"error": str(exc), **seq.summary()})
    yield b"data: [DONE]\n\n"


async def _read_body(request: Any, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"the body has {int(declared):,} bytes, more than this server's limit of {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(413, f"the body is more than this server's limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def add_generate_routes(app: Any, engine: GenerationEngine, *, dependencies: Sequence[Any] = (),
                        auth: bool = False) -> None:
    """Add ``POST /generate`` to a FastAPI `app`, served by `engine` (start and stop it in the app's lifespan).

    Args:
        dependencies: FastAPI dependencies of the route (the API key check).
        auth: whether `dependencies` check a key (declares the 401 in the schema).
    """
    from fastapi.responses import JSONResponse

    from .app import ErrorBody

    codes = {400: "malformed JSON", 401: "missing or wrong API key", 408: "the body did not arrive in time",
             413: "the body is over this server's limit", 415: "the body is not declared as application/json",
             422: "valid JSON, wrong content: an empty or too long prompt, characters outside the vocabulary, "
                  "max_new_tokens out of range, a negative or non-finite temperature, an unknown field",
             503: "the engine is not running or its queue is full"}
    if not auth:
        codes.pop(401)
    responses = {c: {"model": ErrorBody, "description": d} for c, d in codes.items()}
    responses[200] = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                      "description": 'server-sent events: data: {"token", "index"} per character, a summary, '
                                     "data: [DONE]"}
    limit = engine.settings.max_body_bytes

    async def generate(request: Request) -> Any:
        try:
            check_content_type(request.headers.get("content-type"))
            req = engine.parse(await _read_body(request, limit))
            seq = engine.submit(req)
        except BadInput as bad:
            return JSONResponse({"detail": bad.detail}, status_code=bad.status)
        return _EventStream(_events(engine, seq), lambda: engine.cancel(seq))

    app.add_api_route(GENERATE_ROUTE, generate, methods=["POST"], dependencies=list(dependencies),
                      responses=responses, summary="Continue a prompt, streaming tokens as server-sent events",
                      openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                          "type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
                              "prompt": {"type": "string", "minLength": 1, "maxLength": engine.block_size},
                              "max_new_tokens": {"type": "integer", "minimum": 1,
                                                 "maximum": engine.max_new_tokens},
                              "temperature": {"type": "number", "minimum": 0, "description": "0 = greedy"},
                              "seed": {"type": "integer", "minimum": 0}}}}}}})


def create_generate_app(model: Any, tokenizer: Any, settings: GenerateSettings | None = None) -> Any:
    """A server for a GPT alone: ``POST /generate``, ``GET /health``, ``/health/live`` and ``/metrics``.

    Run it with :func:`workbench.serve.app.run_server` (it takes the same header and body deadlines).

    Example:
        >>> model, tok, _ = checkpoint.load("gpt.pt")
        >>> run_server(create_generate_app(model, tok, GenerateSettings(max_batch=16)), port=8000)
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

    from .app import ROUTES, _LATENCY_BUCKETS, _BodyTimeoutMiddleware, _MetricsMiddleware, key_guard

    settings = settings or GenerateSettings()
    engine = GenerationEngine(model, tokenizer, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="workbench text generation server", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.server = app.state.engine = engine  # uvicorn_config reads server.settings.body_timeout_s

    add_generate_routes(app, engine, dependencies=key_guard(settings.api_key), auth=bool(settings.api_key))

    @app.get(ROUTES["ready"], summary="Readiness probe")
    async def ready() -> Any:
        ok = engine.running
        return JSONResponse({"status": "ready" if ok else "starting", "active": engine.active},
                            status_code=200 if ok else 503)

    @app.get(ROUTES["live"], summary="Liveness probe")
    async def live() -> Any:
        return JSONResponse({"status": "alive"})

    @app.get(ROUTES["metrics"], response_class=Response, summary="Prometheus metrics")
    async def metrics() -> Any:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    r = engine.metrics.registry
    http = _HttpMetrics(Counter("workbench_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r),
                        Histogram("workbench_http_request_duration_seconds", "Time to answer a request", ["route"],
                                  buckets=_LATENCY_BUCKETS, registry=r))
    app.add_middleware(_BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(_MetricsMiddleware, metrics=http, extra_routes=(GENERATE_ROUTE,))
    return app


@dataclass
class _HttpMetrics:
    """The two HTTP metrics the app's middleware records (the standalone app has no model metrics)."""

    requests: Any
    latency: Any


# ---------------------------------------------------------------------------------------------------------------
# Measuring: time to first token and tokens per second


@dataclass
class GenerationLoad:
    """What :func:`generation_load` measured (seconds and tokens per second)."""

    clients: int
    new_tokens: int
    ok: int
    errors: int
    wall_s: float
    total_tokens: int
    total_tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    client_tokens_per_s_p50: float
    client_tokens_per_s_min: float
    texts: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("texts")
        return d


@contextlib.contextmanager
def _served(app: Any) -> Any:
    """`app` on a free loopback port, uvicorn in a thread (configured as ``workbench serve`` does)."""
    import uvicorn

    from .app import uvicorn_config
    from .process import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True, name="generate-server")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise WorkbenchError("the generation server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def _load(url: str, clients: int, new_tokens: int, prompts: Sequence[str], temperature: float, seed: int,
                api_key: str | None, timeout_s: float) -> GenerationLoad:
    import httpx

    from .loadtest import _target

    _target(url)  # loopback only
    headers = {"X-API-Key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: list[tuple[bool, float, float, int, str]] = [(False, math.nan, math.nan, 0, "")] * clients

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as client:
        async def one(i: int, start: asyncio.Event) -> None:
            await start.wait()
            body = {"prompt": prompts[i % len(prompts)], "max_new_tokens": new_tokens, "temperature": temperature,
                    "seed": seed + i}
            sent = time.perf_counter()
            first, text, ok = math.nan, [], False
            try:
                async with client.stream("POST", url + GENERATE_ROUTE, json=body) as r:
                    if r.status_code == 200:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            data = line[6:]
                            if data == "[DONE]":
                                break
                            event = json.loads(data)
                            if "token" in event:
                                if not text:
                                    first = time.perf_counter() - sent
                                text.append(event["token"])
                            elif "error" in event:
                                break
                            elif event.get("done"):
                                ok = len(text) == new_tokens
            except (httpx.HTTPError, OSError, ValueError):
                ok = False
            results[i] = (ok, first, time.perf_counter() - sent, len(text), "".join(text))

        start = asyncio.Event()
        tasks = [asyncio.create_task(one(i, start)) for i in range(clients)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    good = [r for r in results if r[0]]
    ttft = [r[1] for r in good]
    rate = [r[3] / r[2] for r in good if r[2] > 0]
    total = sum(r[3] for r in results)
    return GenerationLoad(clients=clients, new_tokens=new_tokens, ok=len(good), errors=clients - len(good),
                          wall_s=wall, total_tokens=total, total_tokens_per_s=total / wall if wall > 0 else 0.0,
                          ttft_p50_s=_pct(ttft, 50), ttft_p99_s=_pct(ttft, 99),
                          client_tokens_per_s_p50=_pct(rate, 50),
                          client_tokens_per_s_min=min(rate) if rate else float("nan"),
                          texts=[r[4] for r in results])


def generation_load(url_or_app: Any, clients: int, new_tokens: int, *, prompts: Sequence[str],
                    temperature: float = 0.0, seed: int = 0, api_key: str | None = None,
                    timeout_s: float = 300.0) -> GenerationLoad:
    """`clients` concurrent streaming /generate requests, sent together; time to first token and tokens/s.

    Args:
        url_or_app: the server's base URL (``http://127.0.0.1:PORT``, loopback only), or an app that has
            /generate (served here by uvicorn on a free 127.0.0.1 port for the run).
        clients: concurrent requests, one each.
        new_tokens: max_new_tokens of every request.
        prompts: the prompts, cycled over the clients (their characters must be in the model's vocabulary).
        temperature, seed: of every request (client i uses ``seed + i``).

    Returns:
        A :class:`GenerationLoad`: p50/p99 time to first token, each client's tokens/s (its tokens over its
        whole request), all clients' tokens over the wall time, and errors (a non-200, a broken stream, or
        fewer tokens than asked).

    Example:
        >>> r = generation_load(create_generate_app(model, tok), 16, 64, prompts=["def "]); r.total_tokens_per_s
    """
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise WorkbenchError(f"clients must be a whole number >= 1, got {clients!r}")
    if not prompts:
        raise WorkbenchError("generation_load needs at least one prompt")
    from .loadtest import _run_now  # asyncio.run, on a thread of its own inside a running loop (a notebook)

    if isinstance(url_or_app, str):
        return _run_now(_load(url_or_app.rstrip("/"), clients, new_tokens, prompts, temperature, seed,
                              api_key, timeout_s))
    with _served(url_or_app) as url:
        return _run_now(_load(url, clients, new_tokens, prompts, temperature, seed, api_key, timeout_s))


def generation_bench(model: Any, tokenizer: Any, *, prompts: Sequence[str], clients: Sequence[int] = (1, 4, 16),
                     new_tokens: int = 64, max_batch: int | None = None) -> dict[str, Any]:
    """Batched (``max_batch`` = the most clients) vs one sequence at a time (``max_batch=1``) at each number
    of concurrent clients: time to first token, tokens per second, errors.

    Returns:
        ``{"rows": [one GenerationLoad dict per mode and client count], "figures": {...}}`` with
        ``batched_over_sequential_tokens_per_s`` at the largest client count and ``errors`` over all runs.

    Example:
        >>> t = llm.pretrained(); generation_bench(t.model, t.tokenizer, prompts=["def f(x):"])["figures"]
    """
    max_batch = max_batch or max(clients)
    rows: list[dict[str, Any]] = []
    rate: dict[tuple[str, int], float] = {}
    for mode, mb in (("batched", max_batch), ("sequential", 1)):
        app = create_generate_app(model, tokenizer, GenerateSettings(max_batch=mb, max_new_tokens=max(new_tokens, 1)))
        with _served(app) as url:
            generation_load(url, 1, min(8, new_tokens), prompts=prompts)  # warm-up: first-call costs
            for n in clients:
                r = generation_load(url, n, new_tokens, prompts=prompts)
                rows.append({"mode": mode, "max_batch": mb, **r.to_dict()})
                rate[mode, n] = r.total_tokens_per_s
    top = max(clients)
    figures = {f"{mode}_tokens_per_s_c{n}": v for (mode, n), v in rate.items()}
    figures.update({f"{row['mode']}_ttft_p50_s_c{row['clients']}": row["ttft_p50_s"] for row in rows})
    figures["batched_over_sequential_tokens_per_s"] = rate["batched", top] / rate["sequential", top]
    figures["errors"] = float(sum(row["errors"] for row in rows))
    return {"rows": rows, "figures": figures}
