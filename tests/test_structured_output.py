"""Structured output on the embedded model (SmolLM2-135M-Instruct): every output follows its spec.

References are independent of fuselm: `jsonschema` validates JSON outputs against random schemas,
Python's `re.fullmatch` checks regex outputs, a recursive-descent parser written here (and
Python's own evaluator) checks an arithmetic EBNF grammar's outputs. Sampling is at temperature 1
with several seeds, so the grammar, not the model's habits, is what keeps outputs valid.
Speculation, chunked prefill and preemption must not change greedy constrained output.
"""

from __future__ import annotations

import json
import random
import re
import threading

import jsonschema
import pytest

from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidRequestError

# adaptive off: its rule weighs measured step times, so on a busy machine it may make no guesses at all, and the
# tests below assert that guesses were verified
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "adaptive": False}
PROMPT = [{"role": "user", "content": "Reply with a JSON object describing a fictional person and their pets."}]


@pytest.fixture(scope="module")
def llm():
    return LLM()


def chat_prompt(llm: LLM, messages=PROMPT) -> str:
    return llm.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# ---------------------------------------------------------------- random JSON schemas

def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema mixing the features structured output must honour."""
    props = {}
    for i in range(rng.randint(1, 4)):
        props[f"{rng.choice(['name', 'kind', 'size', 'tags', 'meta', 'code', 'ok', 'pet'])}_{i}"] = \
            random_value_schema(rng, depth)
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def random_value_schema(rng: random.Random, depth: int) -> dict:
    kinds = ["string", "enum", "pattern", "integer", "boolean", "array", "null"]
    if depth < 2:
        kinds.append("object")
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 12)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "a b", "x\"y", 7, None, True], rng.randint(1, 4))}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{2,6}$", "^[A-Z][0-9]{3}$", "^(cat|dog)-[0-9]{1,2}$"])}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "array":
        low = rng.randint(0, 2)
        items = rng.choice([{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 6},
                            {"enum": ["s", "m", "l"]}])
        return {"type": "array", "items": items, "minItems": low, "maxItems": low + rng.randint(0, 3)}
    return random_schema(rng, depth + 1)


@pytest.mark.parametrize("schema_seed", range(4))
def test_random_schemas_validate(llm, schema_seed):
    rng = random.Random(schema_seed)
    schemas = [random_schema(rng) for _ in range(3)]
    prompt = chat_prompt(llm)
    params = [SamplingParams(temperature=1.0, seed=schema_seed * 10 + i, n=2, max_tokens=400,
                             structured_outputs={"json": schema, "disable_any_whitespace": i == 2})
              for i, schema in enumerate(schemas)]
    outs = llm.generate([prompt] * len(schemas), params, use_tqdm=False)
    for schema, out in zip(schemas, outs):
        for completion in out.outputs:
            assert completion.finish_reason == "stop", (schema, completion.text)
            jsonschema.validate(json.loads(completion.text), schema)


def test_json_schema_as_text_and_json_object(llm):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    prompt = chat_prompt(llm)
    as_text = SamplingParams(temperature=0, max_tokens=100, structured_outputs={"json": json.dumps(schema)})
    as_dict = SamplingParams(temperature=0, max_tokens=100, structured_outputs={"json": schema})
    anything = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=200, structured_outputs={"json_object": True})
    text_out, dict_out, object_out = llm.generate([prompt] * 3, [as_text, as_dict, anything], use_tqdm=False)
    assert text_out.outputs[0].token_ids == dict_out.outputs[0].token_ids
    jsonschema.validate(json.loads(dict_out.outputs[0].text), schema)
    for completion in object_out.outputs:
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
        else:  # free-form JSON may run out of tokens; what was written is still an object's start
            assert completion.text.lstrip().startswith("{")


# ---------------------------------------------------------------- regex, choice, grammar

@pytest.mark.parametrize("pattern", [r"[a-z]{3,8}@(gmail|example)\.com", r"\d{3}-\d{4}", r"(yes|no), because [a-z ]{5,20}\.",
                                     r"[A-Z][a-z]{1,12} [A-Z][a-z]{1,12}"])
def test_regex_outputs_fullmatch(llm, pattern):
    params = SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=60, structured_outputs={"regex": pattern})
    out = llm.generate([chat_prompt(llm, [{"role": "user", "content": "Answer briefly."}])], params, use_tqdm=False)[0]
    for completion in out.outputs:
        assert completion.finish_reason == "stop", completion.text
        assert re.fullmatch(pattern, completion.text), completion.text


def test_choice_outputs_are_choices(llm):
    choices = ["positive", "negative", "neutral \"mixed\"", "ünïcode ✓", "two\nlines"]
    params = [SamplingParams(temperature=1.0, seed=s, n=3, max_tokens=20, structured_outputs={"choice": choices})
              for s in range(4)]
    prompt = chat_prompt(llm, [{"role": "user", "content": "Is 'I loved it' positive or negative?"}])
    for out in llm.generate([prompt] * 4, params, use_tqdm=False):
        for completion in out.outputs:
            assert completion.text in choices
            assert completion.finish_reason == "stop"


ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]? [0-9]?
"""


def parse_arithmetic(text: str) -> bool:
    """Recursive descent over the grammar above; True when the whole text is one `expr`."""
    pos = 0

    def number() -> bool:
        nonlocal pos
        m = re.match(r"[1-9][0-9]{0,2}", text[pos:])
        if not m:
            return False
        pos += m.end()
        return True

    def factor() -> bool:
        nonlocal pos
        if text.startswith("(", pos):
            pos += 1
            if not expr() or not text.startswith(")", pos):
                return False
            pos += 1
            return True
        return number()

    def chain(inner, ops: str) -> bool:
        nonlocal pos
        if not inner():
            return False
        while pos < len(text) and text[pos] in ops:
            pos += 1
            if not inner():
                return False
        return True

    def term() -> bool:
        return chain(factor, "*/")

    def expr() -> bool:
        return chain(term, "+-")

    return expr() and pos == len(text)


def test_parse_arithmetic_reference():
    assert parse_arithmetic("1+2*(30-4)/5")
    assert not parse_arithmetic("1+") and not parse_arithmetic("(1") and not parse_arithmetic("01")


def test_ebnf_grammar_outputs_parse(llm):
    prompt = chat_prompt(llm, [{"role": "user", "content": "Write an arithmetic expression."}])
    params = [SamplingParams(temperature=1.0, seed=s, n=4, max_tokens=48, structured_outputs={"grammar": ARITHMETIC})
              for s in range(3)]
    finished = 0
    for out in llm.generate([prompt] * 3, params, use_tqdm=False):
        for completion in out.outputs:
            if completion.finish_reason == "length":  # the grammar is unbounded; a cut output is a prefix
                continue
            finished += 1
            assert parse_arithmetic(completion.text), completion.text
            eval(compile(completion.text.replace("/", "*"), "<expr>", "eval"), {})  # Python agrees it is one
    assert finished >= 6


# ---------------------------------------------------------------- engine paths

SPEC_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog", "fish"]}, "name": {"type": "string", "maxLength": 16}},
        "required": ["kind", "name"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}


def constrained_batch(llm: LLM):
    prompts = [chat_prompt(llm, [{"role": "user", "content": c}]) for c in (
        "Describe Alice, 31, who has two cats named Tom and Tim, as JSON.",
        "Describe Bob as JSON. Bob has a dog.", "Give a JSON person.",
        "Pick a colour.", "Email address for Alice?")]
    specs = [{"json": SPEC_SCHEMA}, {"json": SPEC_SCHEMA}, {"json_object": True},
             {"choice": ["red", "green", "blue"]}, {"regex": r"[a-z]{2,10}@example\.(com|org)"}]
    params = [SamplingParams(temperature=0, max_tokens=120, structured_outputs=s) for s in specs]
    return prompts, params


# The batched equivalence checks run on the tiny float32 model, whose kernels compute every row the
# same whatever the batch (the embedded model's quantised matmul switches method at 48 rows).

@pytest.fixture(scope="module")
def tiny_reference(tiny_llama):
    tiny = LLM(tiny_llama[0], dtype="float32", device="cpu")
    prompts, params = constrained_batch(tiny)
    outs = tiny.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outs, params):  # the random model's output still follows every spec
        text = out.outputs[0].text
        spec = p.structured_outputs
        if out.outputs[0].finish_reason == "stop":
            if spec.json is not None:
                jsonschema.validate(json.loads(text), spec.json)
            elif spec.choice is not None:
                assert text in spec.choice
            elif spec.regex is not None:
                assert re.fullmatch(spec.regex, text)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_gives_the_same_greedy_output(tiny_llama, tiny_reference, method):
    config = NGRAM if method == "ngram" else \
        {"method": "draft_model", "model": tiny_llama[0], "num_speculative_tokens": 3, "adaptive": False}
    spec = LLM(tiny_llama[0], dtype="float32", device="cpu", speculative_config=config)
    prompts, params = constrained_batch(spec)
    outs = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == tiny_reference
    assert sum(o.metrics.spec_num_accepted_tokens for o in outs) > 0  # guesses were verified under the grammar


@pytest.mark.parametrize("speculate", [False, True])
def test_random_model_sampling_stays_valid(tiny_llama, speculate):
    """A random model at temperature 1 writes control characters, odd bytes and long strings
    whenever the grammar lets it: bounded strings must still be JSON and within their bounds."""
    config = {"method": "draft_model", "model": tiny_llama[0], "num_speculative_tokens": 3, "adaptive": False}
    spec = LLM(tiny_llama[0], dtype="float32", device="cpu", speculative_config=config if speculate else None)
    prompts, _ = constrained_batch(spec)
    params = [SamplingParams(temperature=1.0, seed=10 * s, n=2, max_tokens=400,
                             structured_outputs={"json": SPEC_SCHEMA, "disable_any_whitespace": True})
              for s in range(3)]
    outs = spec.generate(prompts[:3], params, use_tqdm=False)
    for completion in (c for o in outs for c in o.outputs):
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SPEC_SCHEMA)
    assert sum(o.metrics.spec_num_accepted_tokens for o in outs) > 0 or not speculate


def test_chunked_prefill_and_preemption_keep_greedy_output(tiny_llama, tiny_reference):
    per_block = LLM(tiny_llama[0], dtype="float32", device="cpu").engine.runner.bytes_per_block
    small = LLM(tiny_llama[0], dtype="float32", device="cpu", max_num_batched_tokens=16,
                kv_cache_memory_bytes=16 * per_block)
    prompts, params = constrained_batch(small)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == tiny_reference
    assert small.engine.scheduler.num_preemptions > 0


def test_embedded_model_speculation_same_json(llm):
    prompt = chat_prompt(llm, [{"role": "user", "content": "Describe Alice, 31, who has two cats named Tom and Tim, "
                                                           "as JSON with name, age and pets."}])
    params = SamplingParams(temperature=0, max_tokens=120, structured_outputs={"json": SPEC_SCHEMA})
    want = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    spec = LLM(speculative_config=NGRAM)
    got = spec.generate([prompt], params, use_tqdm=False)[0]
    assert got.outputs[0].token_ids == want.token_ids
    assert got.metrics.spec_num_accepted_tokens > 0
    jsonschema.validate(json.loads(want.text), SPEC_SCHEMA)


def test_stop_string_cuts_constrained_output(llm):
    prompt = chat_prompt(llm, [{"role": "user", "content": "Describe Bob as JSON. Bob has a dog."}])
    params = SamplingParams(temperature=0, max_tokens=120, structured_outputs={"json": SPEC_SCHEMA})
    full = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    stop = full[full.index('"age"'):][:6]
    out = llm.generate([prompt], params.clone(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == full[:full.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_cached_grammar_is_not_compiled_again(llm):
    schema = {"type": "object", "properties": {"q": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["q"]}
    before = llm.engine.structured.num_compiles
    for _ in range(2):
        out = llm.generate([chat_prompt(llm)], SamplingParams(temperature=0, max_tokens=30,
                                                              structured_outputs={"json": schema}), use_tqdm=False)
        assert json.loads(out[0].outputs[0].text)["q"] in range(10)
    assert llm.engine.structured.num_compiles == before + 1


# ---------------------------------------------------------------- errors name the field

@pytest.mark.parametrize("spec, param", [
    ({"json": {"type": "objec"}}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": {"type": "string", "pattern": "(unclosed"}}, "structured_outputs.json"),
    ({"regex": "(a|b"}, "structured_outputs.regex"),
    ({"grammar": 'root ::= "a'}, "structured_outputs.grammar"),
    ({"grammar": 'start ::= "a"'}, "structured_outputs.grammar"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": ["a", 3]}, "structured_outputs.choice"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
    ({}, "structured_outputs"),
    ({"json_schema": {}}, "structured_outputs"),
    ({"json_object": "yes"}, "structured_outputs.json_object"),
    ("a regex", "structured_outputs"),
])
def test_invalid_spec_names_the_field(llm, spec, param):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(["hi"], SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert info.value.param == param
    assert not llm.engine.has_unfinished_requests()


def test_compiling_request_waits_while_others_run_and_a_failed_compile_fails_only_it(tiny_llama):
    tiny = LLM(tiny_llama[0], dtype="float32", device="cpu")
    engine = tiny.engine
    release = threading.Event()
    compile_grammar = engine.structured._compile

    def slow_then_fail(grammar):
        release.wait(timeout=30)
        if slow_then_fail.fail:
            raise RuntimeError("compiler broke")
        return compile_grammar(grammar)

    slow_then_fail.fail = False
    engine.structured._compile = slow_then_fail
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    schema = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": SPEC_SCHEMA})
    engine.add_request("constrained", "hello", schema)
    engine.add_request("plain", "hello", plain)
    finished = {}
    while "plain" not in finished:  # the plain request runs to the end while the grammar compiles
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.groups["constrained"][0].num_computed_tokens == 0
    release.set()
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["constrained"].outputs[0].finish_reason in ("stop", "length")

    release.clear()
    slow_then_fail.fail = True
    other = {"json": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}}
    engine.add_request("broken", "hello", SamplingParams(temperature=0, max_tokens=8, structured_outputs=other))
    engine.add_request("fine", "hello", plain)
    release.set()
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["broken"].outputs[0].finish_reason == "error" and "compiler broke" in outs["broken"].error
    assert outs["fine"].outputs[0].finish_reason == "length"
