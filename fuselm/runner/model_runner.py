"""ModelRunner: owns the weights and the KV tensors; turns a SchedulerOutput into one packed forward.

Per step it builds the 1-D batch (input_ids, positions, slot_mapping), the attention layout
(decode rows batched, prompt chunks per row), runs the model once, pushes only the hidden states
that need logits through the LM head, and samples.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass

import torch

from fuselm.config import EngineConfig, ModelConfig, parse_dtype
from fuselm.core.kv_groups import blocks_for_tokens, describe_groups, kv_cache_groups
from fuselm.core.scheduler_output import ScheduledRequest, SchedulerOutput
from fuselm.models.registry import build_model
from fuselm.layers.cascade import chunk_as_query_rows, plan_shared_prefix, prefix_key
from fuselm.layers.paged_attention import (AttentionMetadata, PrefillRow, additive_mask, chunk_causal_allowed,
                                           forward_context)
from fuselm.runner.expert_stats import ExpertStats
from fuselm.runner.group_layout import group_metadata
from fuselm.runner.cache_positions import CachePositions
from fuselm.runner.h2o_compaction import H2OScores
from fuselm.runner.kv_compaction import compact, snapkv_captures, streaming_visible
from fuselm.runner.execution_plan import plan_execution, weight_bytes
from fuselm.runner.kernel_choice import Override, choose_chunk_attention, choose_layer_step
from fuselm.runner.kv_prefault import KVPrefault
from fuselm.layers.kv_quant import SCALE_DTYPE
from fuselm.runner.sampler import SampledToken, Sampler, SamplingBatch, compute_logprobs
from fuselm.runner.seeded import SeededGenerators
from fuselm.runner.verify import verify_speculative
from fuselm.runner.host_heap import keep_freed_memory

logger = logging.getLogger("fuselm")

# Multi-token rows up to this long (speculative tokens being verified, tiny prompt chunks) attend
# as one query row per token, batched with the decodes, instead of one SDPA call per row.
QUERY_ROW_MAX_TOKENS = 16


@dataclass(slots=True)
class PromptLogprobsChunk:
    start: int  # index in the prompt of the first token these entries score
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]]


@dataclass(slots=True)
class ModelOutput:
    # aligned with SchedulerOutput.scheduled: the tokens each row emits (one, or with speculation
    # the accepted speculative tokens plus one), None where the row did not sample
    sampled: list[list[SampledToken] | None]
    prompt_logprobs: list[PromptLogprobsChunk | None]


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: dict[str, torch.Tensor],
                 device: str, dtype: torch.dtype, max_model_len: int, eos_token_ids: list[int],
                 parallel=None, group_kv_by_window: bool = True) -> None:
        """`parallel`: a fuselm.parallel.group.TensorParallelGroup when this runner is one rank of a
        tensor-parallel engine (`model_config` and `weights` are then that rank's shard).
        `group_kv_by_window=False` keeps every layer in one KV cache group (no block is released
        behind a sliding window), for a caller whose KV manager rolls sequences back."""
        self.config = config
        self.parallel = parallel
        self.model_config = model_config
        self.device = torch.device(device)
        self.dtype = dtype
        if config.kv_cache_dtype == "int8":
            self.kv_dtype = torch.int8  # with per-token, per-head scales (layers/kv_quant.py)
        else:
            self.kv_dtype = dtype if config.kv_cache_dtype == "auto" else parse_dtype(config.kv_cache_dtype, device)
        self.block_size = config.block_size
        self.eos_token_ids = list(eos_token_ids)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        if self.device.type == "cpu":
            keep_freed_memory()  # per-step tensors reuse the heap instead of faulting fresh pages in (host_heap.py)
        with torch.device("meta"):
            model = build_model(model_config, max_model_len)
        self._install_quantized(model, weights)
        model = model.to_empty(device=self.device).to(dtype)
        model.rope = type(model.rope)(model_config, max_model_len, dtype).to(self.device)  # real buffers
        model.load_hf_weights(weights)
        if config.quantization in ("int8", "int4"):
            from fuselm.quant.apply import quantize_model

            quantize_model(model, config.quantization, config.quantization_group_size, config.quantize_lm_head)
        self.model = model.eval()
        self.sampler = Sampler()
        self.generators = SeededGenerators()  # seeded sequences' generators, by seq_id
        self.h2o_scores = H2OScores()  # accumulated attention of running H2O sequences, by seq_id
        self.cache_positions = CachePositions()  # StreamingLLM rotary positions in the cache: offsets applied
        # KV cache groups (core/kv_groups.py): one unless sliding-window layers can drop old blocks
        # each layer's attention module, once: the step hands them to the KV rewriters (24 us a step to rebuild)
        self.attention_layers = [layer.self_attn for layer in self.model.layers]
        windows = [attn.sliding_window for attn in self.attention_layers]
        self.kv_groups = kv_cache_groups(windows if group_kv_by_window else [None] * len(windows))
        self.max_chunk_tokens = config.max_num_batched_tokens
        self.num_blocks = self._kv_cache_blocks(max_model_len)
        if parallel is not None:  # every rank's cache holds the same blocks: as many as the smallest
            self.num_blocks = parallel.min_over_ranks(self.num_blocks)
        # One extra block at the end stays all zeros: padded context positions point at it, so
        # masked-out positions never read uninitialised memory (0 * NaN would poison the output).
        # Layer j of every group reads cache tensor j: a block id belongs to one group at a time.
        shape = (self.num_blocks + 1, self.block_size, model_config.num_key_value_heads, model_config.head_dim)
        self.null_slot = self.num_blocks * self.block_size
        tensors = []
        for _ in self.kv_groups[0].layers:
            caches = {}
            for name in ("k_cache", "v_cache"):
                caches[name] = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
                caches[name][-1].zero_()
            if self.kv_dtype == torch.int8:
                for name in ("k_scale", "v_scale"):
                    caches[name] = torch.zeros(shape[:-1], dtype=SCALE_DTYPE, device=self.device)
            tensors.append(caches)
        # the pool's pages are mapped a chunk of blocks ahead of the steps that first write them
        self.kv_prefault = KVPrefault([c for caches in tensors for name, c in caches.items()
                                       if name in ("k_cache", "v_cache")], self.num_blocks)
        for g, group in enumerate(self.kv_groups):
            for j, index in enumerate(group.layers):
                attn = self.model.layers[index].self_attn
                attn.kv_group = g
                for name, cache in tensors[j].items():
                    setattr(attn, name, cache)
        self.plan = plan_execution(self.model, self.device, config.cpu_kernels, self.kv_dtype, parallel,
                                   config.max_num_seqs, config.max_num_batched_tokens)
        self.cpu_kernels = self.plan.attention_kernels  # the attention layers' C kernels, or None
        # an MoE model's routing counts, kept by the driver (every rank routes every token)
        self.expert_stats = ExpertStats.attach(self.model) if parallel is None or parallel.is_driver else None
        # shared-prefix attention (layers/cascade.py), where the attention path takes these shapes
        self.cascade = config.enable_cascade_attention and self.kv_groups[0].window is None and (
            self.cpu_kernels is None or self.cpu_kernels.cascade_supports(model_config.head_dim, self.block_size))
        self.cascade_kv_tokens_saved = 0  # per layer: KV token reads not repeated thanks to it, since start
        override = Override.from_env() if parallel is None else Override()
        chunks = choose_chunk_attention(self, override)  # first: the layer step's prompt chunk attends as chosen
        if chunks is not None:  # prompt chunks' attention: the C chunk kernel against torch's SDPA
            self.plan.measured["chunks"] = chunks
        layer_step = choose_layer_step(self, override)
        if layer_step is not None:  # the C layer step against the torch layers, timed on synthetic steps
            self.plan.measured["layers"] = layer_step
        logger.info("%s", self.plan.summary())
        self.weight_bytes = weight_bytes(self.model)
        self.kv_bytes = self.num_blocks * self.page_bytes

    def _install_quantized(self, model, weights: dict) -> None:
        """GGUF tensors that arrived quantised become quantised modules before any parameter is allocated."""
        from fuselm.quant.apply import install_quantized
        from fuselm.quant.formats import QuantWeight

        if any(isinstance(v, QuantWeight) for v in weights.values()):
            install_quantized(model, weights, self.dtype, self.device)

    @property
    def bytes_per_block(self) -> int:
        """K/V bytes of one block of tokens in every layer."""
        return self.model_config.num_hidden_layers * self._layer_block_bytes()

    @property
    def page_bytes(self) -> int:
        """Bytes of one block id: one block in the layers of one KV cache group."""
        return len(self.kv_groups[0].layers) * self._layer_block_bytes()

    def _layer_block_bytes(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        row = mc.head_dim * elem  # one head's key (or value) for one token
        if self.kv_dtype == torch.int8:
            row += SCALE_DTYPE.itemsize  # its scale
        return 2 * self.block_size * mc.num_key_value_heads * row

    def sequence_blocks(self, num_tokens: int) -> int:
        """Block ids one sequence of `num_tokens` tokens holds at most, over all KV cache groups."""
        return sum(blocks_for_tokens(g, num_tokens, self.max_chunk_tokens, self.block_size) for g in self.kv_groups)

    def _kv_cache_blocks(self, max_model_len: int) -> int:
        cfg = self.config
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            activation_reserve = 1 << 30
            budget = int(total * cfg.gpu_memory_utilization) - (total - free) - activation_reserve
        else:
            budget = int(available_memory_bytes() * cfg.kv_cache_memory_fraction)
            # No point reserving more than every sequence slot at full length could use.
            if len(self.kv_groups) == 1:
                enough = cfg.max_num_seqs * (max_model_len + self.block_size) * self.page_bytes // self.block_size
            else:
                enough = cfg.max_num_seqs * (self.sequence_blocks(max_model_len) + len(self.kv_groups)) * self.page_bytes
            budget = min(budget, enough)
        num_blocks = budget // self.page_bytes
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of {self.page_bytes} bytes; "
                             "raise kv_cache_memory_bytes / gpu_memory_utilization")
        return int(num_blocks)

    # ---- one step -------------------------------------------------------------------------

    def _slots(self, block_ids: tuple[int, ...], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_ids, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size  # [end - start]

    def _chunk_as_query_rows(self, r: ScheduledRequest, prefixes: collections.Counter) -> bool:
        """Whether prompt chunk `r` attends as query rows through the shared-prefix kernel (layers/cascade.py);
        `prefixes` counts the step's rows by prefix_key."""
        return (self.cascade and self.cpu_kernels is not None and r.snapkv is None and r.h2o is None
                and not r.cache_positions
                and chunk_as_query_rows(r.num_new_tokens, r.num_computed_tokens - r.kv_offset, self.block_size,
                                        prefixes[prefix_key(r.block_ids)] - 1))

    def _build_batch(self, out: SchedulerOutput):
        """Pack the step: query rows first (single-token rows, then each token of short rows), then long rows.

        Returns (input_ids [T], positions [T], attention metadata, row_start): row_start[i] is where
        out.scheduled[i]'s tokens begin in the packed batch.
        """
        bs = self.block_size
        rows = out.scheduled
        single = [i for i, r in enumerate(rows) if r.num_new_tokens == 1]
        # (a StreamingLLM row of several tokens is a long row: its queries are masked to their own windows)
        # rows by leading blocks, for chunks that may attend as query rows: only steps with such a chunk pay for it
        prefixes = collections.Counter(prefix_key(r.block_ids) for r in rows) if self.cascade and any(
            r.num_new_tokens > QUERY_ROW_MAX_TOKENS for r in rows) else None
        short = [i for i, r in enumerate(rows) if 1 < r.num_new_tokens and r.kv_window is None and (
            r.num_new_tokens <= QUERY_ROW_MAX_TOKENS or self._chunk_as_query_rows(r, prefixes))]
        as_query_rows = set(short)
        long_rows = [i for i, r in enumerate(rows) if r.num_new_tokens > 1 and i not in as_query_rows]
        row_start = [0] * len(rows)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        ctx_lens: list[int] = []
        tables: list[tuple[int, ...]] = []
        for i in single + short:
            r = rows[i]
            row_start[i] = len(input_ids)
            table = r.block_ids
            for j, token in enumerate(r.token_ids):
                p = r.num_computed_tokens + j
                e = p - r.kv_offset  # its cache index (KV compression evicted kv_offset positions before it)
                input_ids.append(token)
                positions.append(e if r.cache_positions else p)
                slot_mapping.append(table[e // bs] * bs + e % bs)
                ctx_lens.append(e + 1)
                tables.append(table)
        nd = len(input_ids)
        pos_parts = [torch.tensor(positions, dtype=torch.long)]
        slot_parts = [torch.tensor(slot_mapping, dtype=torch.long)]
        prefill_rows = []
        cursor = nd
        for i in long_rows:
            r = rows[i]
            row_start[i] = cursor
            n, c = r.num_new_tokens, r.num_computed_tokens - r.kv_offset  # c: cache entries before the row
            input_ids.extend(r.token_ids)
            first_position = c if r.cache_positions else r.num_computed_tokens
            pos_parts.append(torch.arange(first_position, first_position + n))
            slot_parts.append(self._slots(r.block_ids, c, c + n))
            if c == 0 and r.kv_window is None:
                prefill_rows.append(PrefillRow(cursor, cursor + n, 0, None, None))
            else:
                ctx_slots = self._slots(r.block_ids, 0, c + n).to(self.device)
                mask = None  # plain causal: the C chunk kernel needs none, the torch path builds it once a step
                if r.kv_window is not None:
                    allowed = chunk_causal_allowed(c, n) & streaming_visible(r, c, n, bs)  # [n, c + n]
                    mask = additive_mask(allowed, self.dtype).to(self.device)
                prefill_rows.append(PrefillRow(cursor, cursor + n, c, ctx_slots, mask))
            cursor += n
        meta = AttentionMetadata(slot_mapping=torch.cat(slot_parts).to(self.device), num_query_rows=nd,
                                 prefill_rows=prefill_rows, num_single_rows=len(single),
                                 cpu_kernels=self.cpu_kernels,  # query rows' kernels, and prompt chunks'
                                 chunk_kernel=self.plan.chunks == "c",
                                 chunk_query_rows=sum(rows[i].num_new_tokens for i in short
                                                      if rows[i].num_new_tokens > QUERY_ROW_MAX_TOKENS),
                                 snapkv=snapkv_captures(rows, row_start, self._slots, self.device),
                                 h2o=self.h2o_scores.captures(rows, row_start, self._slots, self.device))
        if nd:
            lens = torch.tensor(ctx_lens)  # [nd]
            max_blocks = max(len(t) for t in tables)
            table = torch.tensor([t + (self.num_blocks,) * (max_blocks - len(t)) for t in tables],
                                 dtype=torch.long)  # [nd, max_blocks], padded with the null block
            torch_path = self.cpu_kernels is None
            if self.cascade and nd > 1:
                meta.cascade = plan_shared_prefix(tables, ctx_lens, bs, *((table, lens, self.null_slot, self.device)
                                                                          if torch_path else ()))
                if meta.cascade is not None:
                    self.cascade_kv_tokens_saved += meta.cascade.kv_tokens_saved
            if not torch_path:
                meta.decode_block_table, meta.decode_ctx_lens = table, lens
            else:
                max_len = int(lens.max())
                slots = (table.unsqueeze(-1) * bs + torch.arange(bs)).view(nd, -1)[:, :max_len]  # [nd, L]
                valid = torch.arange(max_len).unsqueeze(0) < lens.unsqueeze(1)  # [nd, L]
                meta.decode_context_slots = torch.where(valid, slots, self.null_slot).to(self.device)
                meta.decode_mask = valid.view(nd, 1, 1, max_len).to(self.device)
        if len(self.kv_groups) > 1:  # the other KV cache groups' slots, through their own block tables
            meta.groups = [meta] + [group_metadata(meta, rows, single + short, long_rows, g, bs, self.num_blocks,
                                                   pos_parts[0], self.device) for g in range(1, len(self.kv_groups))]
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        return ids, torch.cat(pos_parts).to(self.device), meta, row_start

    def _forward(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        input_ids, positions, meta, row_start = self._build_batch(out)
        self.kv_prefault.cover_step(out.scheduled)
        self.cache_positions.rerotate(out.scheduled, self.attention_layers,
                                      getattr(self.model, "rope", None), self.block_size, self._slots)
        with forward_context(meta):
            hidden = self.model(input_ids, positions)  # [T, hidden]
        if meta.snapkv:
            compact(meta.snapkv, self.attention_layers)
        if meta.h2o:
            self.h2o_scores.update(meta.h2o, self.attention_layers)
        return hidden, row_start

    @torch.inference_mode()
    def last_token_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Run the step and return the logits of each scheduled row's last token: [rows, vocab]."""
        assert all(r.num_new_tokens for r in out.scheduled), "every row needs at least one token"
        hidden, row_start = self._forward(out)
        index = [row_start[i] + r.num_new_tokens - 1 for i, r in enumerate(out.scheduled)]
        return self.model.compute_logits(hidden[torch.tensor(index, device=self.device)])

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        self.generators.release(out.finished_seq_ids)
        self.h2o_scores.release(out.finished_seq_ids)
        self.cache_positions.release(out.finished_seq_ids)
        hidden, row_start = self._forward(out)

        # Which hidden states need logits: the last token of rows that sample (and, with
        # speculative tokens, the position before each of them), and every position of rows that
        # asked for prompt logprobs.
        sample_rows: list[int] = []
        sample_tokens: list[int] = []  # packed index of each sampled position
        logit_index: list[int] = []
        prompt_lp_spans: list[tuple[int, int, int, int]] = []  # (row, first logits index, count, prompt start)
        for i, r in enumerate(out.scheduled):
            n = r.num_new_tokens
            start = row_start[i]
            if r.params.prompt_logprobs is not None and r.num_computed_tokens < r.num_prompt_tokens - 1:
                # logits at position p score prompt token p + 1
                count = min(n, r.num_prompt_tokens - 1 - r.num_computed_tokens)
                prompt_lp_spans.append((i, len(logit_index), count, r.num_computed_tokens + 1))
                logit_index.extend(range(start, start + count))
            if r.needs_sample:
                sample_rows.append(i)
                sample_tokens.extend(range(start + n - 1 - r.num_spec_tokens, start + n))
        sample_logit_pos = list(range(len(logit_index), len(logit_index) + len(sample_tokens)))
        logit_index.extend(sample_tokens)
        sampled: list[list[SampledToken] | None] = [None] * len(out.scheduled)
        prompt_lps: list[PromptLogprobsChunk | None] = [None] * len(out.scheduled)
        if not logit_index:
            return ModelOutput(sampled, prompt_lps)
        logits = self.model.compute_logits(hidden[torch.tensor(logit_index, device=self.device)])  # [S, V]
        if self.parallel is not None and not self.parallel.is_driver:
            return ModelOutput(sampled, prompt_lps)  # only rank 0 has the gathered logits and samples

        for row, first, count, start in prompt_lp_spans:
            r = out.scheduled[row]
            targets = list(r.prompt_token_ids[start:start + count])
            num_top = r.params.prompt_logprobs
            lp, rank, top_ids, top_lp = compute_logprobs(
                logits[first:first + count], torch.tensor(targets, device=self.device), num_top)
            prompt_lps[row] = PromptLogprobsChunk(
                start=start, token_ids=targets, logprobs=lp.tolist(), ranks=rank.tolist(),
                top=[list(zip(a, b)) for a, b in zip(top_ids.tolist(), top_lp.tolist())],
            )

        if sample_rows:
            sample_logits = logits  # every row samples, in order (no prompt logprobs): no [S, vocab] copy
            if len(sample_logit_pos) != logits.shape[0]:
                sample_logits = logits[torch.tensor(sample_logit_pos, device=self.device)]
            rows = [out.scheduled[i] for i in sample_rows]
            generators = [self.generators.for_row(r) for r in rows]
            if any(r.num_spec_tokens for r in rows):
                tokens = verify_speculative(self.sampler, sample_logits, rows, generators, self.eos_token_ids)
            else:
                tokens = self._sample_one(sample_logits, rows, generators)
            for i, toks in zip(sample_rows, tokens):
                sampled[i] = toks
        return ModelOutput(sampled, prompt_lps)

    def _sample_one(self, logits: torch.Tensor, rows: list[ScheduledRequest],
                    generators: list[torch.Generator | None]) -> list[list[SampledToken]]:
        """One token per row (no speculation): the sampler's batched path."""
        batch = SamplingBatch(
            params=[r.params for r in rows], generators=generators,
            prompt_token_ids=[r.prompt_token_ids or () for r in rows],
            output_token_ids=[r.output_token_ids or () for r in rows], eos_token_ids=self.eos_token_ids,
            token_bitmasks=[None if r.grammar_bitmask is None else r.grammar_bitmask[0] for r in rows],
        )
        result = self.sampler(logits, batch)
        token_ids = result.token_ids.tolist()
        if result.logprobs is not None:
            lps, ranks = result.logprobs.tolist(), result.ranks.tolist()
            tops = result.top_ids.tolist(), result.top_logprobs.tolist()
        tokens = []
        for j, r in enumerate(rows):
            tok = SampledToken(token_ids[j])
            n_top = r.params.logprobs
            if n_top is not None:
                tok.logprob, tok.rank = lps[j], ranks[j]
                tok.top = list(zip(tops[0][j][:n_top], tops[1][j][:n_top]))
            tokens.append([tok])
        return tokens


def summarize_memory(runner: ModelRunner, max_model_len: int) -> str:
    from fuselm.quant.apply import describe

    tokens = runner.num_blocks * runner.block_size
    quant = describe(runner.model)
    quant = "" if quant == "none" else f" (quantised: {quant})"
    line = (f"weights {runner.weight_bytes / 2**20:.1f} MiB{quant}, KV cache {runner.kv_bytes / 2**20:.1f} MiB "
            f"({runner.num_blocks} blocks x {runner.block_size} = {tokens} tokens), max_model_len {max_model_len}")
    groups = runner.kv_groups
    if len(groups) > 1 or groups[0].window is not None:
        line += "; " + describe_groups(groups, max_model_len, runner.max_chunk_tokens, runner.block_size)
    return line


__all__ = ["ModelRunner", "ModelOutput", "SampledToken", "PromptLogprobsChunk", "summarize_memory"]
