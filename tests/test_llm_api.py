"""The offline LLM API end to end on a tiny model: sampling options, stops, logprobs, outputs, chat."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidConfigError, InvalidRequestError


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama[0], dtype="float32", device="cpu")


def test_same_seed_same_text_whatever_the_batch(llm):
    prompts = random_prompts([10, 30, 50], seed=20)
    seeded = SamplingParams(temperature=1.0, seed=123, max_tokens=16, ignore_eos=True)
    alone = llm.generate(prompts[:1], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm.generate(prompts, [others, seeded, others], use_tqdm=False)
    mixed_again = llm.generate([prompts[2], prompts[0]], [others, seeded], use_tqdm=False)
    # the seeded request was at different positions with different neighbours
    assert llm.generate([prompts[1]], seeded, use_tqdm=False)[0].outputs[0].token_ids == mixed[1].outputs[0].token_ids
    assert mixed_again[1].outputs[0].token_ids == alone


def test_top_k_1_equals_greedy(llm):
    prompts = random_prompts([4, 40], seed=21)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    topk1 = llm.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in topk1]


def test_stop_string_is_cut_from_text(llm):
    prompt = random_prompts([12], seed=22)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    assert len(text) > 12
    stop = text[8:11]
    first = text.find(stop)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first]
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop,
                                                 include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:first + len(stop)]


def test_stop_token_ids_min_tokens_and_length(llm):
    prompt = random_prompts([12], seed=23)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    target = full.token_ids[5]
    first = full.token_ids.index(target)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                stop_token_ids=[target]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[:first + 1] and out.stop_reason == target
    # min_tokens bans the stop token until enough tokens exist, so generation goes on past it.
    late = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, min_tokens=first + 2, ignore_eos=True,
                                                 stop_token_ids=[target]), use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= first + 2


def test_eos_stops_unless_ignored(llm):
    eos = llm.engine.eos_token_ids[0]
    prompt = random_prompts([8], seed=24)[0]
    # Force EOS: a huge logit bias isn't an option here, so look for a prompt's greedy token and
    # declare the model's own EOS through stop_token_ids equivalence: EOS from the tokenizer config.
    assert eos == llm.get_tokenizer().eos_token_id
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
    if eos in out.token_ids:
        assert out.token_ids[-1] == eos and out.finish_reason == "stop"
    else:
        assert out.finish_reason == "length"


def test_logprobs_match_hf(tiny_llama, llm):
    _, hf = tiny_llama
    prompt = random_prompts([25], seed=25)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3,
                                                prompt_logprobs=2), use_tqdm=False)[0]
    gen = out.outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + gen.token_ids])).logits[0].float(), -1)
    for i, (tok, entry) in enumerate(zip(gen.token_ids, gen.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert math.isclose(entry[tok].logprob, row[tok].item(), abs_tol=1e-4)
        assert entry[tok].rank == 1  # greedy picks the top token
        top3 = row.topk(3).indices.tolist()
        assert set(top3) <= set(entry)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        assert math.isclose(out.prompt_logprobs[pos][prompt[pos]].logprob, ref[pos - 1, prompt[pos]].item(),
                            abs_tol=1e-4)


def test_outputs_in_input_order_with_metrics(llm):
    prompts = random_prompts([50, 3, 20], seed=26)
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (2, 9, 5)],
                        use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 9, 5]
    for o in outs:
        m = o.metrics
        assert o.finished and m.arrival_time <= m.first_token_time <= m.finished_time


def test_text_prompts_and_chat(llm):
    tok = llm.get_tokenizer()
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert out.prompt == "The quick brown fox" and out.prompt_token_ids == tok.encode("The quick brown fox")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)
    msgs = [{"role": "user", "content": "Hello there"}]
    chat = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    expected = tok.encode("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert chat.prompt_token_ids == expected
    two = llm.chat([msgs, msgs + [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]],
                   SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == chat.outputs[0].token_ids[:3]


def test_vllm_prompt_dicts(llm):
    """{"prompt": text} and {"prompt_token_ids": ids} (vLLM's TextPrompt / TokensPrompt) mean what plain ones do."""
    greedy = SamplingParams(temperature=0, max_tokens=4)
    ids = random_prompts([12], seed=31)[0]
    plain = llm.generate([ids, "The quick brown fox"], greedy, use_tqdm=False)
    dicts = llm.generate([{"prompt_token_ids": ids}, {"prompt": "The quick brown fox"}], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    assert dicts[1].prompt == "The quick brown fox" and dicts[0].prompt_token_ids == ids
    single = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    for bad in ({"prompt": "a", "prompt_token_ids": [1]}, {"text": "a"}, {"prompt_token_ids": 5}):
        with pytest.raises(ValueError, match="prompt"):
            llm.generate(bad, greedy, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt", ["\ud800", "ok \udfff then", {"prompt": "a\udc00"}])
def test_prompts_with_lone_surrogates_are_refused_by_name(llm, prompt):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)
    assert info.value.param == "prompt" and "surrogate" in str(info.value)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user"}], "no 'content'"),
    ([{"content": "hi"}], "'role'"),
    ([{"role": None, "content": "hi"}], "'role'"),
    ([{"role": "", "content": "hi"}], "'role'"),
    ([{"role": 3, "content": "hi"}], "'role'"),
    ([{"role": "user", "content": None}], "None"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user", "content": "fine"}, "not a dict"], r"messages\[1\]"),
    ([{"role": "user", "content": "a\ud800"}], "surrogate"),
    ([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}], "surrogate"),
    ([{"role": "user\ud800", "content": "hi"}], "surrogate"),
])
def test_chat_refuses_malformed_messages_by_name(llm, messages, words):
    """A clear ValueError naming the message instead of jinja2's UndefinedError or a TypeError."""
    with pytest.raises(InvalidRequestError, match=words) as info:
        llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    assert info.value.param == "messages"
    assert not llm.engine.has_unfinished_requests()


def test_chat_template_errors_become_request_errors(llm):
    template = "{{ messages[0]['name'] + '!' }}"  # reads a key these messages lack
    with pytest.raises(InvalidRequestError, match="chat template") as info:
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2), use_tqdm=False,
                 chat_template=template)
    assert info.value.param == "messages"


def test_wrong_argument_types_say_what_to_pass(llm):
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams or a list of them"):
        llm.generate("a", "greedy", use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams(), "greedy"], use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(TypeError, match="prompts must be"):
        llm.generate(5, use_tqdm=False)
    with pytest.raises(TypeError, match="conversation"):
        llm.chat("hello", use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="integers in the vocabulary"):
        llm.generate([[1, True]], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("model", ["", "   ", 5])
def test_an_empty_model_path_is_refused_not_replaced_by_the_embedded_model(model):
    with pytest.raises(InvalidConfigError) as info:
        LLM(model)
    assert info.value.option == "model" and "leave it out" in str(info.value)


def test_no_model_loads_the_embedded_one():
    from fuselm.loader.defaults import default_model_path

    for llm in (LLM(max_model_len=64), LLM(None, max_model_len=64)):
        assert llm.engine.model_name == default_model_path()


def test_forward_context_is_per_thread():
    """A thread leaving its step's context does not clear another thread's (two engines in one process)."""
    from fuselm.layers.paged_attention import AttentionMetadata, forward_context, get_attention_metadata

    ours, theirs = object.__new__(AttentionMetadata), object.__new__(AttentionMetadata)
    entered, left = threading.Event(), threading.Event()

    def other_engine():
        with forward_context(theirs):
            entered.set()
            left.wait(10)

    thread = threading.Thread(target=other_engine)
    with forward_context(ours):
        thread.start()
        assert entered.wait(10)
        assert get_attention_metadata() is ours
    left.set()
    thread.join(10)
    with pytest.raises(AssertionError, match="outside forward_context"):
        get_attention_metadata()


def test_two_engines_stepping_on_two_threads_give_their_own_outputs(tiny_llama, llm):
    """Two engines in one process, stepping at the same time, each give what it gives alone."""
    other = LLM(tiny_llama[0], dtype="float32", device="cpu")
    prompts = random_prompts([30, 70, 5, 120], seed=24)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    results, errors = {}, []

    def run(name, engine, order):
        try:
            for _ in range(3):
                outs = engine.generate([prompts[i] for i in order], params, use_tqdm=False)
                results.setdefault(name, []).append({i: o.outputs[0].token_ids for i, o in zip(order, outs)})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=("a", llm, [0, 1, 2, 3])),
               threading.Thread(target=run, args=("b", other, [3, 2, 1, 0]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for name in "ab":
        for run_outputs in results[name]:
            assert [run_outputs[i] for i in range(4)] == alone
