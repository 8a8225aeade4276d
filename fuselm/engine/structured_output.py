"""Structured output: grammars compiled off the step path, one matcher per sequence, token bitmasks.

A request with `structured_outputs` (fuselm.structured_outputs) is decoded under a grammar:
every sampled token must keep the output a prefix of a sentence of the grammar, and once the
grammar is complete only a stop token (EOS) is allowed. The pieces:

- `add_request` parses the spec synchronously (`parse_spec`: well under a millisecond), so a bad
  schema, regex or grammar is an InvalidRequestError naming `structured_outputs.<key>` before
  anything is queued;
- the expensive part, compiling the grammar against the vocabulary (the token-mask cache), runs
  in a one-thread pool. Compiled grammars are cached by spec (a bounded LRU of futures), so a
  request with a schema seen before is ready at once. A request waits, unscheduled, until its
  grammar is compiled (`SequenceGrammar.ready`, read by the scheduler); others keep running;
- each sequence (each of n samples) holds its own `GrammarMatcher`, advanced with every token
  the engine appends. Preemption leaves it alone: it follows generated tokens, which a recompute
  does not change;
- each step the scheduler asks a sampling row's grammar for its token bitmask: [1 + s, ceil(V/32)]
  int32 for a row with s speculative tokens, the mask of each position got by advancing the
  matcher over the guesses and rolling it back afterwards. The runner's sampler applies all rows'
  masks in one masked op over the batch (runner/logits_processors.py). Guesses the grammar
  rejects are cut from a request's speculation before scheduling (`trim_speculation`).

Library choice, measured on SmolLM2's 49,152-token vocabulary (AMD EPYC, 1 thread, loaded
machine), for a typical schema (5 properties, a nested object, an enum array, patterns, integer
bounds): xgrammar 0.2.9 compiles it in 22-28 ms and fills a mask in ~5 us per token;
llguidance 1.9.1 builds its matcher lazily (~1 ms) but fills a mask in ~24 us per token and
needs ~0.65 s to load the vocabulary against xgrammar's ~0.2-0.35 s. Per-token cost is what
batch 32 pays every step, so fuselm uses xgrammar (its EBNF is GBNF-like, as vLLM's `grammar`).
With the bounded-string fix below, a cold compile of that schema is ~37 ms (benchmarks/structured_output.py).
The library is imported on the first structured request (~1 s), not at engine start.
"""

from __future__ import annotations

import collections
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fuselm.errors import InvalidRequestError
from fuselm.structured_outputs import StructuredOutputsParams

# Whitespace characters allowed between two JSON tokens: room for pretty-printing five levels deep
# with 4-space indents, but a model sampling at temperature 1 cannot loop on newlines forever.
MAX_JSON_WHITESPACE = 21
_CACHE_SIZE = 256  # compiled grammars kept (futures; a compiled JSON schema is typically < 1 MB)
_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:123: " before a message


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:
        raise InvalidRequestError("structured output needs the xgrammar package: `pip install --no-deps "
                                  "xgrammar==0.2.9` plus fuselm's `structured` extra (scripts/setup.sh does both)",
                                  param="structured_outputs") from exc
    return xgrammar


def _clean_error(exc: BaseException) -> str:
    return _ERROR_PREFIX.sub("", str(exc).strip()).strip()


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose sentences are exactly the choices (JSON string escapes are EBNF's too)."""
    import json
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# xgrammar 0.2.9 writes a string with minLength/maxLength as `"\"" X_characters{min, max} "\""` with
# X_characters ::= [^\"\\\r\n], which lets raw control characters (U+0000-U+001F but CR and LF) into
# the string: not JSON. Its unbounded strings exclude them; the bounded ones are given the same class.
_BOUNDED_STRING_CLASS = r'[^\"\\\r\n]'
_JSON_STRING_CLASS = r'[^\0-\x1f\"\\\r\n]'


def _json_safe(grammar):
    """The JSON-schema grammar with its bounded strings' character class fixed (see above)."""
    text = str(grammar)
    if _BOUNDED_STRING_CLASS not in text:
        return grammar
    return _xgrammar().Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CLASS, _JSON_STRING_CLASS))


def parse_spec(spec: StructuredOutputsParams):
    """The spec as an xgrammar Grammar; raises InvalidRequestError naming the key when it is invalid."""
    xgr = _xgrammar()
    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            import json
            schema = json.dumps(spec.json) if kind == "json" else '{"type": "object"}'
            return _json_safe(xgr.Grammar.from_json_schema(schema, any_whitespace=not spec.disable_any_whitespace,
                                                           max_whitespace_cnt=MAX_JSON_WHITESPACE))
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_grammar(spec.choice))
        return xgr.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError) as exc:
        what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
        raise InvalidRequestError(f"{spec.param} is not a valid {what} that fuselm can enforce: {_clean_error(exc)}",
                                  param=spec.param) from None


def tokenizer_vocabulary(tokenizer) -> tuple[list[str], str]:
    """Each token id's vocabulary string (special tokens blanked, so no grammar ever allows them
    inside text: detokenising skips them) and the tokenizer's serialized JSON."""
    hf = tokenizer.hf
    size = hf.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    vocab = ["" if i in special else (hf.id_to_token(i) or "") for i in range(size)]
    return vocab, hf.to_str()


class SequenceGrammar:
    """One sequence's matcher over a compiled grammar (compiled in the background: see `ready`)."""

    __slots__ = ("_compiled", "_matcher", "_vocab_size", "_spec", "_never")

    def __init__(self, compiled: Future, vocab_size: int, spec: StructuredOutputsParams, never: frozenset[int]) -> None:
        self._compiled = compiled
        self._matcher = None
        self._vocab_size = vocab_size
        self._spec = spec
        self._never = never  # special tokens: no grammar takes them (xgrammar warns on stderr when offered one)

    @property
    def ready(self) -> bool:
        """The grammar is compiled: the scheduler may admit the request (never when it failed: see `error`)."""
        return self._compiled.done() and self._compiled.exception() is None

    @property
    def error(self) -> str | None:
        if not self._compiled.done() or self._compiled.exception() is None:
            return None
        return f"{self._spec.param} could not be compiled: {_clean_error(self._compiled.exception())}"

    def _get_matcher(self):
        if self._matcher is None:
            self._matcher = _xgrammar().GrammarMatcher(self._compiled.result())
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance over an appended token; False when the grammar does not allow it (then nothing changes)."""
        matcher = self._get_matcher()
        if matcher.is_terminated():
            return False
        return matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """A stop token has been accepted after a complete sentence."""
        return self._matcher is not None and self._matcher.is_terminated()

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` (speculative guesses) the grammar accepts in a row; the state is unchanged."""
        matcher = self._get_matcher()
        count = 0
        for token in tokens:
            if token in self._never or matcher.is_terminated() or not matcher.accept_token(token):
                break
            count += 1
        if count:
            matcher.rollback(count)
        return count

    def token_bitmask(self, spec_tokens: tuple[int, ...] | list[int] = ()) -> torch.Tensor:
        """[1 + s, ceil(V/32)] int32: bit t of row j set when token t may follow the output plus the
        first j guesses (which must all be accepted: see valid_prefix)."""
        matcher = self._get_matcher()
        words = (self._vocab_size + 31) // 32
        # Positions after a guess the matcher cannot take (or after a stop token) are never sampled:
        # the guess before them is rejected, or the sequence ends. They stay all-allowed.
        mask = torch.full((1 + len(spec_tokens), words), -1, dtype=torch.int32)
        advanced = 0
        for j in range(len(spec_tokens) + 1):
            if matcher.is_terminated():
                break
            matcher.fill_next_token_bitmask(mask, j)
            if j == len(spec_tokens) or not matcher.accept_token(spec_tokens[j]):
                break
            advanced += 1
        if advanced:
            matcher.rollback(advanced)
        return mask


class StructuredOutputManager:
    """The engine's grammar side: tokenizer info, the compile pool and cache, per-sequence matchers."""

    def __init__(self, tokenizer, model_vocab_size: int, eos_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._eos_token_ids = list(eos_token_ids)
        self.vocab_size = max(model_vocab_size, tokenizer.vocab_size)  # the bitmask covers every logit
        self._compiler = None
        self._lock = threading.Lock()  # guards the compiler's creation (first compile) and the cache
        self._cache: collections.OrderedDict[tuple, Future] = collections.OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: set[Future] = set()
        self._failed = False  # some compile raised since the engine last looked (failed_requests)
        self._special_ids: frozenset[int] | None = None
        self.num_compiles = 0

    def _get_compiler(self):
        """Built on first use, in the pool's thread: tokenizer info over the vocabulary (~0.2-0.4 s)."""
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                vocab, backend = tokenizer_vocabulary(self._tokenizer)
                meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend)
                info = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=self.vocab_size,
                                         stop_token_ids=self._eos_token_ids, add_prefix_space=meta["add_prefix_space"])
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def _compile(self, grammar):
        compiled = self._get_compiler().compile_grammar(grammar)
        self.num_compiles += 1
        return compiled

    def grammar_for(self, spec: StructuredOutputsParams) -> Future:
        """The compiled grammar of `spec` (a Future): from the cache, or parsed now (raising
        InvalidRequestError for a bad spec) and compiled in the background."""
        key = spec.cache_key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(key)
                return future
        grammar = parse_spec(spec)  # raises for a bad spec, on the caller's thread
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuselm-grammar")
        future = self._pool.submit(self._compile, grammar)
        with self._lock:
            self._cache[key] = future
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            self._pending.add(future)
        future.add_done_callback(self._compiled)
        return future

    def _compiled(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)
            if future.exception() is not None:
                self._failed = True

    def failed_requests(self, waiting) -> list:
        """The waiting requests whose grammar failed to compile (they are never scheduled)."""
        if not self._failed:
            return []
        self._failed = False
        return [req for req in waiting if req.grammar is not None and req.grammar.error is not None]

    def new_sequences(self, spec: StructuredOutputsParams, count: int) -> list[SequenceGrammar]:
        """One matcher holder per sample of a request, sharing the compiled grammar."""
        compiled = self.grammar_for(spec)
        if self._special_ids is None:
            decoder = self._tokenizer.hf.get_added_tokens_decoder()
            self._special_ids = frozenset(i for i, t in decoder.items() if t.special) - set(self._eos_token_ids)
        return [SequenceGrammar(compiled, self.vocab_size, spec, self._special_ids) for _ in range(count)]

    @property
    def compiling(self) -> bool:
        return bool(self._pending)

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` s for some compile to finish (the engine has nothing else to run)."""
        with self._lock:
            pending = list(self._pending)
        if pending:
            from concurrent.futures import FIRST_COMPLETED, wait
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def trim_speculation(requests) -> None:
    """Cut each constrained request's guesses at the first one its grammar rejects."""
    for req in requests:
        grammar = req.grammar
        if grammar is None or not req.spec_token_ids or not grammar.ready:
            continue
        keep = grammar.valid_prefix(req.spec_token_ids)
        if keep < len(req.spec_token_ids):
            req.spec_token_ids = req.spec_token_ids[:keep]
            if req.spec_draft_probs is not None:
                req.spec_draft_probs = req.spec_draft_probs[:keep] if keep else None


def bad_words_token_ids(tokenizer, words: list[str]) -> list[tuple[int, ...]]:
    """Each bad word's tokenisations as vLLM makes them: the word alone, and with a leading space
    when that tokenises to as many tokens and a different first one (the word inside a text)."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if bare:
            sequences.append(bare)
        if spaced and len(spaced) == len(bare) and spaced[0] != bare[0]:
            sequences.append(spaced)
    return sequences


def prepare_token_constraints(params, tokenizer, vocab_size: int) -> None:
    """Check logit_bias and allowed_token_ids against the model's vocabulary and tokenise bad_words
    (once per SamplingParams). Raises InvalidRequestError naming the field."""
    for name, ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids)):
        if ids:
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidRequestError(f"{name} names token ids outside the vocabulary [0, {vocab_size}): "
                                          f"{bad[:5]}", param=name)
    if params.bad_words and params.bad_words_token_ids is None:
        params._bad_words_token_ids = bad_words_token_ids(tokenizer, params.bad_words)
