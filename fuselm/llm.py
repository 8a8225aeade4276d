"""LLM: the offline batch API (vLLM's names): generate() and chat() over many prompts at once.

Arguments are checked before any work: a wrong type gets a TypeError that says what to pass, a bad
value an InvalidRequestError / InvalidConfigError (ValueErrors) naming the field.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from fuselm.config import EngineConfig
from fuselm.engine.engine import LLMEngine
from fuselm.errors import InvalidConfigError
from fuselm.outputs import RequestOutput
from fuselm.sampling_params import SamplingParams

PromptType = str | list[int] | dict  # text, token ids, or {"prompt": text} / {"prompt_token_ids": ids} as in vLLM


class LLM:
    """Load a model once, then run batches through the continuous-batching engine.

    `LLM()` loads the embedded SmolLM2-135M-Instruct; `LLM("path/to/hf_dir_or.gguf", dtype="float32", ...)`
    takes any EngineConfig option by name.
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        if model is not None and (not isinstance(model, (str, os.PathLike)) or not os.fspath(model).strip()):
            raise InvalidConfigError(f"model must be the path of an HF model directory or a .gguf file, got {model!r}; "
                                     "leave it out (or pass None) to load the embedded SmolLM2-135M-Instruct",
                                     option="model")
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_options))
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def dump_expert_stats(self, path: str | os.PathLike) -> dict:
        """Write the routing statistics of an MoE model (tokens per expert per layer, and between
        consecutive MoE layers; fuselm/runner/expert_stats.py) as JSON to `path`, the file
        `fuselm placement --stats` reads; returns what was written."""
        stats = getattr(self.engine.runner, "expert_stats", None)  # the runner's, or rank 0's under parallelism
        if stats is None:
            raise InvalidConfigError(f"{self.engine.model_name} has no experts: there are no routing statistics",
                                     option="model")
        return stats.dump(path, self.engine.model_name)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() overlaid with the model's generation_config.json defaults."""
        return SamplingParams(**self.engine.generation_defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a text, token ids, a prompt dict or a list of them, "
                            f"got {type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (list, tuple)) and all(isinstance(p, SamplingParams) for p in sampling_params):
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; "
                                 "give one, or one per prompt")
        else:
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them (one per prompt), got "
                            f"{type(sampling_params).__name__}; e.g. SamplingParams(temperature=0) for greedy")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError("priority needs one value per prompt")
        return self._run(prompts, params_list, use_tqdm, priority)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        if not isinstance(messages, (list, tuple)):
            raise TypeError('chat() takes a conversation, a list of {"role": ..., "content": ...} dicts, or a list '
                            f"of conversations; got {type(messages).__name__}. For plain text use generate()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [
            tok.encode(tok.apply_chat_template(conv, add_generation_prompt, chat_template), add_special_tokens=False)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, prompts: list[PromptType], params_list: list[SamplingParams], use_tqdm: bool,
             priority: Sequence[int] | None) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            rid = str(self._next_id)
            self._next_id += 1
            ids.append(rid)
            try:
                engine.add_request(rid, prompt, params, priority=priority[i] if priority else 0)
            except ValueError:
                for done in ids[:-1]:  # leave the engine clean: drop what this call queued
                    engine.abort_request(done)
                raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        start = time.perf_counter()
        prompt_tokens = gen_tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
                    prompt_tokens += len(out.prompt_token_ids)
                    gen_tokens += sum(len(c.token_ids) for c in out.outputs)
                    bar.update(1)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"in: {prompt_tokens / elapsed:.0f} tok/s, out: {gen_tokens / elapsed:.0f} tok/s")
        bar.close()
        return [results[rid] for rid in ids]
