"""The scheduler's output is plain data: a runner in another process can execute it.

One engine runs as usual; a second, identical engine sends every SchedulerOutput, pickled, to a
model runner in a spawned process and takes the ModelOutput back. Both must produce the same
tokens, logprobs and prompt logprobs, for greedy and seeded sampled requests with penalties,
min_tokens and n > 1, with and without speculative tokens (including a sampling draft model's
probabilities). Along the way every row is checked to hold only plain values, never a Request.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import random

import pytest
import torch

from fuselm import LLM, SamplingParams
from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.request import Request
from fuselm.core.scheduler_output import ScheduledRequest, SchedulerOutput
from fuselm.engine.scheduler import Scheduler

ENGINE = dict(dtype="float32", device="cpu", max_model_len=256, kv_cache_memory_bytes=1 << 22,
              max_num_batched_tokens=64)
SPEC_CONFIGS = {
    "plain": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
              "adaptive": False},
    "draft_model": {"method": "draft_model", "num_speculative_tokens": 3, "adaptive": False},  # model: the target
}
PLAIN_TYPES = (int, str, bool, type(None), SamplingParams, torch.Tensor)


def _serve_runner(conn, model: str, options: dict, num_threads: int) -> None:
    """Child process: load the model's runner, then execute pickled SchedulerOutputs until an empty message."""
    try:
        torch.set_num_threads(num_threads)
        from fuselm.config import EngineConfig
        from fuselm.engine.engine import LLMEngine

        runner = LLMEngine(EngineConfig.from_kwargs(model, **options)).runner
        conn.send_bytes(pickle.dumps(("ready", os.getpid(), runner.num_blocks)))
        while message := conn.recv_bytes():
            out = pickle.loads(message)
            result = runner.execute(out)
            conn.send_bytes(pickle.dumps(("ok", result, len(runner.generators))))
    except Exception as exc:
        conn.send_bytes(pickle.dumps(("error", repr(exc), 0)))


class RemoteRunner:
    """The parent's end: a spawned process running a ModelRunner, spoken to with pickled bytes."""

    def __init__(self, model: str, options: dict) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_runner, args=(child, model, options, torch.get_num_threads()),
                                   daemon=True)
        self.process.start()
        status, self.pid, self.num_blocks = pickle.loads(self.conn.recv_bytes())
        assert status == "ready", self.pid
        self.rows_seen = self.spec_rows = self.draft_prob_rows = 0
        self.num_generators = 0

    def execute(self, out: SchedulerOutput):
        assert_plain(out)
        self.rows_seen += len(out.scheduled)
        self.spec_rows += sum(r.num_spec_tokens > 0 for r in out.scheduled)
        self.draft_prob_rows += sum(r.draft_probs is not None for r in out.scheduled)
        self.conn.send_bytes(pickle.dumps(out))
        status, result, self.num_generators = pickle.loads(self.conn.recv_bytes())
        assert status == "ok", result
        return result

    def close(self) -> None:
        self.conn.send_bytes(b"")
        self.process.join(30)


def assert_plain(out: SchedulerOutput) -> None:
    for row in out.scheduled:
        assert type(row) is ScheduledRequest
        for f in dataclasses.fields(row):
            value = getattr(row, f.name)
            items = value if isinstance(value, tuple) else (value,)
            assert all(isinstance(v, PLAIN_TYPES) for v in items), (f.name, type(value))
    assert all(isinstance(x, int) for x in out.finished_seq_ids)
    assert all(isinstance(x, str) for x in out.preempted_ids)


def prompts_and_params() -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(3)
    loop = [rng.randrange(5, 384) for _ in range(7)]
    prompts = [loop * 4, [rng.randrange(5, 384) for _ in range(40)], loop * 2 + [9, 10, 11],
               [rng.randrange(5, 384) for _ in range(90)], loop * 3]
    params = [
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, n=2, max_tokens=12, repetition_penalty=1.3,
                       frequency_penalty=0.4, logprobs=3),
        SamplingParams(temperature=1.0, top_k=40, seed=5, max_tokens=10, min_tokens=6, prompt_logprobs=2),
        SamplingParams(temperature=0, max_tokens=9, presence_penalty=0.8, prompt_logprobs=1),
        SamplingParams(temperature=0.7, seed=23, max_tokens=16, ignore_eos=True),
    ]
    return prompts, params


def summary(outputs) -> list:
    return [(o.prompt_logprobs, [(c.token_ids, c.logprobs, c.finish_reason) for c in o.outputs]) for o in outputs]


@pytest.mark.parametrize("spec", list(SPEC_CONFIGS))
def test_runner_in_another_process_gives_the_same_output(tiny_llama, spec):
    path = tiny_llama[0]
    config = SPEC_CONFIGS[spec]
    if config is not None and config["method"] == "draft_model":
        config = {**config, "model": path}
    prompts, params = prompts_and_params()
    local = LLM(path, speculative_config=config, **ENGINE)
    expected = summary(local.generate(prompts, params, use_tqdm=False))

    split = LLM(path, speculative_config=config, **ENGINE)
    remote = RemoteRunner(path, ENGINE)
    try:
        assert remote.pid != os.getpid() and remote.num_blocks == split.engine.runner.num_blocks
        split.engine.runner.execute = remote.execute
        got = summary(split.generate(prompts, params, use_tqdm=False))
    finally:
        remote.close()
    assert remote.rows_seen > 0
    if config is not None:
        assert remote.spec_rows > 0, "no speculative tokens were verified: the spec path was not tested"
    if spec == "draft_model":
        assert remote.draft_prob_rows > 0, "no draft probabilities crossed: rejection sampling was not tested"
    assert got == expected


def test_pickled_output_executes_like_the_original(tiny_llama):
    """In one process: each step's unpickled copy runs on a second runner with the same result."""
    path = tiny_llama[0]
    prompts, params = prompts_and_params()
    first, second = LLM(path, **ENGINE), LLM(path, **ENGINE)
    copies = second.engine.runner
    real_execute = first.engine.runner.execute
    mismatches = []

    def execute_both(out: SchedulerOutput):
        result = real_execute(out)
        copy = pickle.loads(pickle.dumps(out))
        assert copy == out and copy is not out
        if copies.execute(copy) != result:
            mismatches.append(out)
        return result

    first.engine.runner.execute = execute_both
    first.generate(prompts, params, use_tqdm=False)
    assert not mismatches


def test_seeded_generators_are_dropped_with_their_sequence(tiny_llama):
    llm = LLM(tiny_llama[0], **ENGINE)
    runner = llm.engine.runner
    llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=4), use_tqdm=False)
    assert 1 <= len(runner.generators) <= 4  # those that finished in the last step: no step has run since
    llm.generate([[10, 11]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(runner.generators) == 0  # the next step told the runner; a greedy request needs none


def test_rows_copy_histories_only_where_sampling_reads_them():
    kv = KVCacheManager(64, 16, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_batched_tokens=256, max_num_seqs=8)
    cases = {
        "plain": SamplingParams(temperature=0.8),
        "repetition": SamplingParams(repetition_penalty=1.2),
        "frequency": SamplingParams(frequency_penalty=0.5),
        "min_tokens": SamplingParams(min_tokens=2),
        "prompt_logprobs": SamplingParams(prompt_logprobs=1),
    }
    requests = {}
    for i, (name, p) in enumerate(cases.items()):
        requests[name] = req = Request(name, None, [5 + i] * 20, p, 8, arrival_seq=i)
        sched.add_request(req)
    for step in range(2):
        out = sched.schedule()
        sched.update_from_output(out)
        rows = {r.request_id: r for r in out.scheduled}
        for name, row in rows.items():
            req = requests[name]
            reads_prompt = name == "repetition" or (name == "prompt_logprobs" and step == 0)
            reads_output = name in ("repetition", "frequency", "min_tokens")
            assert (row.prompt_token_ids == tuple(req.prompt_token_ids)) if reads_prompt else \
                row.prompt_token_ids is None, name
            assert (row.output_token_ids == tuple(req.output_token_ids)) if reads_output else \
                row.output_token_ids is None, name
        for req in sched.requests_of(out):
            req.append_token(7)


@torch.no_grad()
def penalized_greedy_reference(model, prompt: list[int], num_tokens: int, repetition: float = 1.0,
                               frequency: float = 0.0, presence: float = 0.0) -> list[int]:
    """HF logits of the whole sequence each step, penalised by hand (HF's repetition rule over prompt +
    output, OpenAI's frequency/presence over the output), then the argmax."""
    ids, out = list(prompt), []
    for _ in range(num_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()  # [V]
        if repetition != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition, logits[seen] * repetition)
        if out:
            counts = torch.bincount(torch.tensor(out), minlength=logits.numel()).float()  # [V]
            logits -= frequency * counts + presence * (counts > 0).float()
        token = int(logits.argmax())
        ids.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("spec", ["plain", "ngram"])
def test_penalties_see_the_whole_history(tiny_llama, spec):
    """Rows carry the prompt and output ids that penalties read, also while speculative tokens are
    verified (each position sees the guesses before it as output)."""
    path, hf = tiny_llama
    prompts, _ = prompts_and_params()
    cases = [dict(repetition_penalty=1.5), dict(frequency_penalty=1.5, presence_penalty=0.5),
             dict(repetition_penalty=1.2, frequency_penalty=0.7)]
    llm = LLM(path, speculative_config=SPEC_CONFIGS[spec], **ENGINE)
    for case in cases:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **case)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts[:3], params, use_tqdm=False)]
        names = {"repetition_penalty": "repetition", "frequency_penalty": "frequency", "presence_penalty": "presence"}
        expected = [penalized_greedy_reference(hf, p, 12, **{names[k]: v for k, v in case.items()}) for p in prompts[:3]]
        assert got == expected, case
