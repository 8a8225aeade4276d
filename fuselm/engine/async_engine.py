"""AsyncLLMEngine: one LLMEngine shared by many asyncio callers, stepping in a background thread.

LLMEngine is not thread-safe, so exactly one thread (the engine thread) ever touches it. Callers
on the event loop hand it commands (add, abort) through a thread-safe queue; the engine thread
applies them between steps, so a request that arrives while others run joins the running batch at
the next step. Every request gets a RequestStream: the engine thread pushes each cumulative
RequestOutput into the stream's asyncio.Queue with loop.call_soon_threadsafe. Model compute
releases the GIL, so the event loop keeps serving HTTP while the engine thread steps.

Text is tokenised (and chat templates rendered) in small worker pools, never on the event loop or
the engine thread, so one long prompt delays only its own request: `tokenizers` releases the GIL
while it encodes. Short texts and long ones have separate pools, so a queue of long prompts
never holds up a short one.

from_options loads the model on the engine thread too, so only that thread ever runs OpenMP
parallel regions. libgomp keeps a team of worker threads for every thread that has started a
region; once those outnumber the CPUs it stops spinning between regions and parks its workers after
each one (its "throttled" spin), and every region then pays a wake-up. Loaded on the main thread
and stepped on another, a 512-token prefill of SmolLM2 in float32 took ~2.0 s instead of ~1.1 s on
a 2-vCPU machine; loaded and stepped on one thread, it is as fast as the offline LLM.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol, TypeVar

from fuselm.config import EngineConfig
from fuselm.spec.speculator import SpecStats
from fuselm.engine.engine import LLMEngine
from fuselm.outputs import RequestOutput
from fuselm.parallel.group import WorkerFailedError
from fuselm.sampling_params import SamplingParams

logger = logging.getLogger("fuselm")

T = TypeVar("T")
SHORT_TEXT_CHARS = 16384  # texts up to this long go to the short-text tokenizer pool


class RequestFailed(RuntimeError):
    """The engine failed this request after accepting it (e.g. an exception in a model step)."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running, so no request can be served."""


class OutputObserver(Protocol):
    """Sees every RequestOutput, in the engine thread (must be quick and thread-safe)."""

    def on_output(self, output: RequestOutput, now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """Engine counters, copied by the engine thread after each iteration (safe to read anywhere)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    spec: SpecStats | None = None  # speculative decoding totals since start (a copy); None when it is off
    cascade_kv_tokens_saved: int = 0  # KV token reads per layer that shared-prefix attention did not repeat


class RequestStream:
    """The async iterator of one request's cumulative RequestOutputs; its last item is finished."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, owner: "AsyncLLMEngine",
                 final_only: bool = False) -> None:
        self.request_id = request_id
        self.loop = loop
        self.final_only = final_only  # hand over only the finished output (a caller that does not stream)
        self.accepted: asyncio.Future = loop.create_future()
        self.finished = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._owner = owner

    # ---- engine thread side ---------------------------------------------------------------

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass

    def push(self, item: RequestOutput | BaseException) -> None:
        self._call(self._queue.put_nowait, item)

    def resolve(self, error: BaseException | None) -> None:
        def settle() -> None:
            if not self.accepted.done():
                if error is None:
                    self.accepted.set_result(None)
                else:
                    self.accepted.set_exception(error)
        self._call(settle)

    # ---- event loop side ------------------------------------------------------------------

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not self._queue.empty():  # outputs are cumulative: a slow reader only needs the newest
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stop generating for this request (no-op once it has finished). Safe to call repeatedly."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, log_stats_interval: float = 10.0, log_requests: bool = True,
                 observers: list[OutputObserver] | None = None) -> None:
        self.engine = engine
        self.log_stats_interval = log_stats_interval
        self.log_requests = log_requests
        self.observers: list[OutputObserver] = list(observers or [])
        self.snapshot = EngineSnapshot()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # touched by the engine thread only
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self._last_log = (time.monotonic(), 0, 0)  # (time, prompt tokens, generation tokens)
        self._active_since_log = False
        self._short_text_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="fuselm-tokenize")
        self._long_text_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fuselm-tokenize-long")

    @classmethod
    def from_options(cls, model: str | None = None, log_stats_interval: float = 10.0, log_requests: bool = True,
                     **engine_options: Any) -> "AsyncLLMEngine":
        """Build the LLMEngine from EngineConfig options (the same names as LLM(...) takes).

        The engine thread starts now and loads the model itself (see the module docstring); this
        returns once it is loaded and re-raises whatever the load raised.
        """
        config = EngineConfig.from_kwargs(model, **engine_options)
        front = cls(None, log_stats_interval=log_stats_interval, log_requests=log_requests)  # type: ignore[arg-type]
        loaded: concurrent.futures.Future = concurrent.futures.Future()

        def load() -> bool:
            try:
                front.engine = LLMEngine(config)
            except BaseException as exc:
                loaded.set_exception(exc)
                return False
            loaded.set_result(None)
            return True

        front.start(load)
        loaded.result()  # raises the load's exception; the engine thread has ended then
        return front

    # ---- passthroughs (immutable after load, safe from any thread) --------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def generation_defaults(self) -> dict:
        """The model's generation_config.json sampling defaults (a copy)."""
        return dict(self.engine.generation_defaults or {})

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self, load: Callable[[], bool] | None = None) -> None:
        """Start the engine thread; `load`, when given, runs on it first and returns whether to go on."""
        with self._start_lock:
            if self.is_running:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, args=(load,), name="fuselm-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)
        self._short_text_pool.shutdown(wait=False, cancel_futures=True)
        self._long_text_pool.shutdown(wait=False, cancel_futures=True)

    # ---- tokenizer work (worker pools, never the event loop or the engine thread) -----------

    async def in_tokenizer_pool(self, size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on a tokenizer worker; `size` (characters or tokens) picks the pool."""
        pool = self._short_text_pool if size <= SHORT_TEXT_CHARS else self._long_text_pool
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.in_tokenizer_pool(len(text), self.tokenizer.encode, text,
                                            add_special_tokens=add_special_tokens)

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return await self.in_tokenizer_pool(len(ids), self.tokenizer.decode, ids,
                                            skip_special_tokens=skip_special_tokens)

    async def render_chat(self, conversation: list[dict], add_generation_prompt: bool, size: int) -> str:
        """The chat template applied to `conversation` (`size`: its characters, to pick the pool)."""
        return await self.in_tokenizer_pool(size, self.tokenizer.apply_chat_template, conversation,
                                            add_generation_prompt)

    # ---- requests (event loop side) ---------------------------------------------------------

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          priority: int = 0, arrival_time: float | None = None,
                          final_only: bool = False, client_id: str = "") -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it (with `final_only`, a stream
        that yields only the finished output: no event-loop work per generated token).

        A text prompt is tokenised here, in a tokenizer pool, and reaches the engine thread as token
        ids with its text. Raises the engine's InvalidRequestError (a ValueError) when the request is
        invalid (bad prompt, too long, ...).
        """
        if not self.is_running:
            if self._stop.is_set():
                raise EngineDeadError("the engine is shut down")
            self.start()
        arrival_time = arrival_time or time.time()
        text = None
        if isinstance(prompt, dict) and set(prompt) == {"prompt"} and isinstance(prompt["prompt"], str):
            prompt = prompt["prompt"]
        if isinstance(prompt, str) and prompt:
            try:
                text, prompt = prompt, await self.encode(prompt)
            except (TypeError, ValueError):  # text the tokenizer refuses: the engine's check says why
                text = None
        stream = RequestStream(request_id, asyncio.get_running_loop(), self, final_only)
        self._commands.put(("add", stream, prompt, params, priority, arrival_time, text, client_id))
        try:
            await stream.accepted
        except asyncio.CancelledError:
            stream.abort()
            raise
        except BaseException:
            stream.finished = True
            raise
        return stream

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Convenience: iterate a request's outputs; leaving the loop early aborts it."""
        stream = await self.add_request(request_id, prompt, params, priority)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its blocks return to the pool before the next step."""
        self._commands.put(("abort", request_id))

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run fn() on the engine thread between steps (from any thread; its result and errors are dropped)."""
        self._commands.put(("call", fn, None))

    async def call(self, fn: Callable[[], T]) -> T:
        """fn() on the engine thread between steps, where the LLMEngine may be touched; returns its result."""
        if not self.is_running:
            raise EngineDeadError("the engine thread is not running")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, done))
        return await asyncio.wrap_future(done)

    # ---- the engine thread --------------------------------------------------------------------

    def _next_commands(self, block: bool | float) -> list[tuple]:
        """Everything queued; block=True waits up to the stats interval for a first command, a float that long."""
        commands = []
        try:
            if block:
                commands.append(self._commands.get(timeout=self.log_stats_interval if block is True else block))
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return commands

    def _run(self, load: Callable[[], bool] | None = None) -> None:
        if load is not None and not load():
            return
        logger.info("engine thread started")
        idle_wait: bool | float = False
        while not self._stop.is_set():
            try:
                idle_wait = self._iteration(idle_wait)
            except Exception:  # a bug outside the model step: fail what is in flight, keep serving
                logger.exception("engine loop failed; failing %d in-flight requests", len(self._streams))
                self._fail_all("internal engine error")
                idle_wait = 0.01
        self._fail_all("the engine is shutting down")
        self.engine.shutdown()  # tensor-parallel workers, from the thread that started them
        for command in self._next_commands(False):  # requests that arrived during shutdown
            if command[0] == "add":
                command[1].resolve(EngineDeadError("the engine is shut down"))
            elif command[0] == "call" and command[2] is not None:
                command[2].set_exception(EngineDeadError("the engine is shut down"))
        logger.info("engine thread stopped")

    def _iteration(self, idle_wait: bool | float) -> bool | float:
        """Apply queued commands, run one step, hand out its outputs; returns how long to wait next time."""
        engine = self.engine
        block = True if not engine.has_unfinished_requests() else idle_wait
        for command in self._next_commands(block):
            self._apply(command)
        idle_wait = False
        if engine.has_unfinished_requests():
            steps_before = engine.stats.num_steps
            try:
                outputs = engine.step()
            except Exception as exc:  # the engine's state is suspect: fail what is in flight
                logger.exception("engine step raised; failing %d in-flight requests", len(self._streams))
                self._fail_all(f"internal engine error: {exc}")
                outputs = []
                if isinstance(exc, WorkerFailedError):  # no later step can run: stop (503 from now on)
                    self._stop.set()
            now = time.time()
            for output in outputs:
                self._dispatch(output, now)
            if not outputs and engine.stats.num_steps == steps_before and engine.has_unfinished_requests():
                idle_wait = 0.005  # nothing could be scheduled: wait briefly for a command instead of spinning
        self._take_snapshot()
        self._maybe_log_stats()
        return idle_wait

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, stream, prompt, params, priority, arrival, text, client_id = command
            try:
                self.engine.add_request(stream.request_id, prompt, params, priority=priority, arrival_time=arrival,
                                        client_id=client_id)
            except Exception as exc:  # ValueError: bad request; anything else: our bug, still this request's
                if not isinstance(exc, ValueError):
                    logger.exception("add_request(%s) raised", stream.request_id)
                stream.resolve(exc)
                return
            if text is not None:  # tokenised in the pool: the outputs still carry the prompt's text
                for request in self.engine.groups[stream.request_id]:
                    request.prompt = text
            self._streams[stream.request_id] = stream
            self._active_since_log = True
            stream.resolve(None)
        elif kind == "abort":
            output = self.engine.abort_request(command[1])
            if output is not None:
                self._dispatch(output, time.time())
        elif kind == "call":
            _, fn, done = command
            try:
                result = fn()
            except Exception as exc:
                if done is None:
                    logger.exception("engine-thread call %r failed", fn)
                else:
                    done.set_exception(exc)
                return
            if done is not None:
                done.set_result(result)

    def _dispatch(self, output: RequestOutput, now: float) -> None:
        stream = self._streams.get(output.request_id)
        for observer in self.observers:
            try:
                observer.on_output(output, now)
            except Exception:
                logger.exception("output observer %r failed", observer)
        if output.finished:
            self._streams.pop(output.request_id, None)
            if self.log_requests:
                self._log_request(output)
        if stream is not None and (output.finished or output.error or not stream.final_only):
            stream.push(RequestFailed(output.error) if output.error else output)

    def _fail_all(self, message: str) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)
            stream.push(RequestFailed(message))
        self._streams.clear()

    def _take_snapshot(self) -> None:
        e = self.engine
        self.snapshot = EngineSnapshot(
            num_running=e.num_running, num_waiting=e.num_waiting, kv_usage=e.kv.usage, prefix_hit_rate=e.kv.hit_rate,
            num_prompt_tokens=e.stats.num_prompt_tokens, num_generation_tokens=e.stats.num_generation_tokens,
            num_preemptions=e.scheduler.num_preemptions,
            spec=dataclasses.replace(e.speculator.stats) if e.speculator is not None else None,
            cascade_kv_tokens_saved=getattr(e.runner, "cascade_kv_tokens_saved", 0),
        )

    # ---- logging ----------------------------------------------------------------------------

    def _log_request(self, output: RequestOutput) -> None:
        m = output.metrics
        gen = sum(len(c.token_ids) for c in output.outputs)
        reason = "error" if output.error else ",".join(sorted({str(c.finish_reason) for c in output.outputs}))
        ttft = f"{m.first_token_time - m.arrival_time:.3f}s" if m and m.first_token_time else "-"
        total = f"{(m.finished_time or time.time()) - m.arrival_time:.3f}s" if m else "-"
        logger.info("request %s finished (%s): prompt %d tokens (%d cached), generated %d tokens, TTFT %s, total %s",
                    output.request_id, reason, len(output.prompt_token_ids), output.num_cached_tokens, gen,
                    ttft, total)

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        last_time, last_prompt, last_gen = self._last_log
        if now - last_time < self.log_stats_interval:
            return
        s = self.snapshot
        # requests that came and went between two ticks count too
        worked = s.num_prompt_tokens != last_prompt or s.num_generation_tokens != last_gen
        if self._active_since_log or worked or s.num_running or s.num_waiting:
            elapsed = now - last_time
            logger.info("engine: %d running, %d waiting, KV cache %.1f%% used, prefix cache hit rate %.1f%%, "
                        "prompt %.1f tok/s, generation %.1f tok/s", s.num_running, s.num_waiting, 100 * s.kv_usage,
                        100 * s.prefix_hit_rate, (s.num_prompt_tokens - last_prompt) / elapsed,
                        (s.num_generation_tokens - last_gen) / elapsed)
            if s.spec is not None:
                sp = s.spec
                logger.info("speculative decoding: %d drafts, %d tokens proposed, %d accepted (acceptance rate "
                            "%.1f%%, mean acceptance length %.2f)", sp.num_drafts, sp.num_draft_tokens,
                            sp.num_accepted_tokens, 100 * sp.acceptance_rate, sp.mean_acceptance_length)
        self._active_since_log = bool(s.num_running or s.num_waiting)
        self._last_log = (now, s.num_prompt_tokens, s.num_generation_tokens)
