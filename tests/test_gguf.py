"""Tests for GGUF loading (fuselm/loader/gguf.py, gguf_tokenizer.py).

References are independent of the loader: transformers' own GGUF tokenizer for the tokenizer and
chat template, tiny random HF models written to GGUF by tests/gguf_writer.py (llama.cpp's
converter's layout) for the config and every weight, and gguf's own reader for the embedded file.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from gguf_writer import gguf_name, llama_cpp_permute, write_gguf_from_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuselm.loader.defaults import default_model_path
from fuselm.loader.gguf import load_gguf, load_gguf_tokenizer

EMBEDDED = Path(default_model_path())

CORPUS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", "Hello, world!", " Hello world ", "  leading and trailing  ",
    "The quick brown fox jumps over the lazy dog.", "I'm sure they'll've done it; we'd, you're.",
    "12345", "3.14159 and 2,718,281 and 1e-9 and 007", "phone: +1 (555) 123-4567, year 2024",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn -x\n\n\nprint(f(21))\n",
    "for (int i = 0; i < n; ++i) {\n  a[i] = b[i] + c[i];\n}",
    "Café naïve façade — “quotes” … °C", "日本語のテキストです。中文文本。한국어", "emoji 😀🎉👍🏽 👨‍👩‍👧 ✨",
    "Ünïcödé ẞ ΑΒΓ αβγ Привет мир", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>", "<|im_start|><|im_start|>  <|im_end|>", "a <|im_start|> b",
    "<repo_name>x<file_sep>y", "<|im_start", "im_end|>", "   \n  \n", "x" * 300, "!!!???...,,,",
    "mixed CASE WoRdS and ALLCAPS", "tab\tseparated\tvalues\n1\t2\t3", "\u00a0non-breaking\u2009thin space",
    "\r\nwindows\r\nlines\r\n", "https://example.com/path?q=1&r=two#frag", "a\u0301 combining e\u0301",
]


@pytest.fixture(scope="module")
def loaded():
    return load_gguf(EMBEDDED, torch.float32)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(EMBEDDED.parent), gguf_file=EMBEDDED.name)


# --- 1. tokenizer and chat template vs transformers ---------------------------------------------

@pytest.fixture(scope="module")
def reference_smollm(reference):
    """transformers' tokenizer with SmolLM2's own pre-tokenizer (Digits, then ByteLevel): see
    test_smollm_isolates_numerals for why the plain transformers one is not the whole truth."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_str(reference.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


def _has_numeral(text: str) -> bool:
    return any(unicodedata.category(c) in ("Nd", "Nl", "No") for c in text)


def _check_same(ours, ref, ref_smollm, text: str) -> None:
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == ref_smollm.encode(text, add_special_tokens=special).ids, (text, special)
        if not _has_numeral(text):
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", CORPUS)
def test_tokenizer_matches_transformers(loaded, reference, reference_smollm, text):
    _check_same(loaded.tokenizer, reference, reference_smollm, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
       | st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", " ", "\n", "ab", "12", "é", "😀", "  x"]),
                  max_size=12).map("".join))
def test_tokenizer_matches_transformers_fuzz(loaded, reference, reference_smollm, text):
    _check_same(loaded.tokenizer, reference, reference_smollm, text)


def test_smollm_isolates_numerals(loaded, reference):
    """The one place we differ from transformers, on purpose. Pre-tokenizer `smollm` first cuts
    every \\p{N} character out on its own (llama.cpp's smollm regex; SmolLM2's own tokenizer.json:
    Digits, then ByteLevel), then applies GPT-2's regex to the pieces. transformers' GGUF tokenizer
    skips the first step. The vocabulary has no multi-digit tokens, so most text comes out the
    same, but not whitespace runs before a digit (code indentation) or numerals such as "½"."""
    tok = loaded.tokenizer
    assert [tok.token_to_str(i) for i in tok.encode("    1")] == ["ĠĠĠĠ", "1"]
    assert reference.convert_ids_to_tokens(reference.encode("    1")) == ["ĠĠĠ", "Ġ", "1"]
    assert [tok.token_to_str(i) for i in tok.encode(" ½ °C")] == ["Ġ", "Â½", "ĠÂ°", "C"]
    assert reference.convert_ids_to_tokens(reference.encode(" ½ °C"))[:2] == ["ĠÂ", "½"]
    assert tok.encode("a 2024, b 12345!") == reference.encode("a 2024, b 12345!")
    assert tok.decode(tok.encode("x  ½ ² Ⅻ ٣\n    7")) == "x  ½ ² Ⅻ ٣\n    7"


def test_tokenizer_metadata(loaded, reference):
    tok = loaded.tokenizer
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token) == (1, [2], False)
    assert tok.vocab_size == 49152 == len(reference)
    assert tok.token_to_str(1) == "<|im_start|>" and tok.pad_token_id == 2
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi! What's 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, 日本語 😀"}],
])
def test_chat_template_matches_transformers(loaded, reference, messages, gen):
    ours = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt2"])
def test_other_pretokenizers_match_transformers(tmp_path, pre):
    """Other `tokenizer.ggml.pre` names on a small trained byte-level vocabulary: transformers
    applies the same split regex for these, so ids must match it exactly, numerals included."""
    transformers = pytest.importorskip("transformers")
    from tiny_models import save_tokenizer

    (tmp_path / "hf").mkdir()
    save_tokenizer(tmp_path / "hf", 400)
    write_gguf_from_hf(_tiny("llama", 400, True), tmp_path / "hf", tmp_path / "t.gguf", tokenizer_pre=pre)
    ours = load_gguf(tmp_path / "t.gguf", torch.float32).tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    # (not "<|endoftext|>": absent from this vocabulary, transformers appends it as a new id 400)
    texts = [t for t in CORPUS if "<|endoftext|>" not in t]
    for text in texts + ["  0 12345 ½ ² x=[\n    1,\n    22]", "I'M DON'T 1234567 Ⅻ٣ 2024-01-01"]:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (pre, text)
            assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_sentencepiece_tokenizer(tmp_path):
    """`tokenizer.ggml.model == "llama"` (Llama 2 / Mistral / TinyLlama files): byte fallback, merges
    derived from the scores, "▁" for spaces, BOS added by default. Like llama.cpp we put a "▁" before
    the text and after each special token even when a space is already there; transformers' Metaspace
    does not, so it is the reference for the text with that space written out."""
    import gguf

    transformers = pytest.importorskip("transformers")
    pieces = ["▁", "e", "t", "h", "l", "o", "w", "r", "d", "a", "n", "i", "s", "▁t", "he", "▁the", "ll", "llo",
              "▁he", "▁w", "or", "▁wor", "ld", "▁a", "an", "in", "▁in", "er", "on", "▁hello", "▁world", "<|x|>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_block_count(1), w.add_embedding_length(8), w.add_head_count(2), w.add_feed_forward_length(16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 1) + [4])
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    ours = load_gguf_tokenizer(tmp_path / "spm.gguf")  # a tokenizer-only file: no layers to load
    assert ours.add_bos_token and ours.bos_token_id == 1 and ours.eos_token_ids == [2]
    for text in ["hello world", " hello  world ", "the other\nline", "Ünï 😀 ½", "", "a", "x<|x|>y", "hi</s>z"]:
        spelled = (" " + text if text.startswith(" ") else text).replace("<|x|>", "<|x|> ").replace("</s>", "</s> ")
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(spelled, add_special_tokens=special), text
            assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
        if "<" not in text:
            assert ours.decode(ours.encode(text)) == text


# --- 2. tiny HF models written to GGUF ------------------------------------------------------------

def _tiny(kind: str, vocab: int, tie: bool, **extra):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    common.update(extra)
    torch.manual_seed(0)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)  # q/k/v biases are zero at init: make them tell apart
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return model.eval()


VARIANTS = {
    "llama_tied_smollm_vocab": dict(kind="llama", vocab=49152, tie=True, tok=EMBEDDED),
    "llama_untied": dict(kind="llama", vocab=320, tie=False, tok=None),
    "llama_head_dim_32": dict(kind="llama", vocab=300, tie=False, tok=None, head_dim=32),
    "llama_mha_linear_rope": dict(kind="llama", vocab=300, tie=True, tok=None, num_key_value_heads=4,
                                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}),
    "llama3_rope": dict(kind="llama", vocab=300, tie=False, tok=None, head_dim=64, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256, "rope_theta": 500000.0}),
    "llama3_rope_tiny_models": dict(kind="llama", vocab=300, tie=True, tok=None, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}),  # as tests/tiny_models.py makes it
    "qwen2_biases_untied": dict(kind="qwen2", vocab=330, tie=False, tok=None, rope_theta=1e6),
    "qwen2_biases_tied": dict(kind="qwen2", vocab=300, tie=True, tok=None),
}


def _write(tmp_path, name, quant=None):
    spec = dict(VARIANTS[name])
    tok = spec.pop("tok")
    model = _tiny(spec.pop("kind"), spec.pop("vocab"), spec.pop("tie"), **spec)
    path = write_gguf_from_hf(model, tok, tmp_path / f"{name}.gguf", quantize=quant)
    return model, path


def _check_config(config, model):
    hf = model.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(hf, field), field
    assert config.architecture == type(model).__name__
    assert config.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config.rope_theta == pytest.approx((hf.rope_parameters or {}).get("rope_theta", 1e4), rel=1e-6)
    assert config.attention_bias == (hf.model_type == "qwen2")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tiny_model_roundtrip_f32(tmp_path, name):
    model, path = _write(tmp_path, name)
    loaded = load_gguf(path, torch.float32)
    _check_config(loaded.config, model)
    expected = {k: v for k, v in model.state_dict().items()
                if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert set(loaded.weights) == set(expected)
    for key, ref in expected.items():
        got = loaded.weights[key]
        assert got.dtype == torch.float32 and got.shape == ref.shape, key
        assert torch.equal(got, ref), key
    if loaded.config.rope_scaling is not None:  # the model's frequencies are HF's
        from fuselm.layers.rotary import rope_inv_freq

        torch.testing.assert_close(rope_inv_freq(loaded.config), model.model.rotary_emb.inv_freq.float(),
                                   rtol=1e-5, atol=0)


def test_tiny_model_bf16(tmp_path):
    model, path = _write(tmp_path, "qwen2_biases_untied")
    loaded = load_gguf(path, torch.bfloat16)
    for key, ref in model.state_dict().items():
        assert loaded.weights[key].dtype == torch.bfloat16
        assert torch.equal(loaded.weights[key], ref.to(torch.bfloat16)), key


@pytest.mark.parametrize("name", ["llama_untied", "qwen2_biases_untied"])
def test_tiny_model_roundtrip_quantised(tmp_path, name):
    Q = GGMLQuantizationType
    quantized = {"model.embed_tokens.weight": Q.Q8_0, "lm_head.weight": Q.Q8_0,
                 "model.layers.0.self_attn.q_proj.weight": Q.Q8_0, "model.layers.0.self_attn.k_proj.weight": Q.Q8_0,
                 "model.layers.1.self_attn.q_proj.weight": Q.Q4_0, "model.layers.1.self_attn.k_proj.weight": Q.F16,
                 "model.layers.1.mlp.down_proj.weight": Q.Q8_0, "model.layers.1.self_attn.o_proj.weight": Q.BF16,
                 "model.layers.0.mlp.up_proj.weight": Q.Q4_1, "model.layers.0.mlp.gate_proj.weight": Q.Q5_0}
    model, path = _write(tmp_path, name, quantized)
    loaded = load_gguf(path, torch.float32)
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    for key, ref in model.state_dict().items():
        if key not in quantized:
            assert torch.equal(loaded.weights[key], ref), key
            continue
        stored = ref.float()
        proj = key.split(".")[-2]
        if name.startswith("llama") and proj in heads:
            stored = llama_cpp_permute(stored, heads[proj])
        # What the file holds, dequantised by gguf itself, then put back in HF row order.
        qtype = quantized[key]
        expect = torch.from_numpy(dequantize(quantize(stored.numpy(), qtype), qtype))
        if name.startswith("llama") and proj in heads:
            n = heads[proj]
            expect = expect.reshape(n, -1, 2, expect.shape[1]).transpose(1, 2).reshape(expect.shape)
        assert torch.equal(loaded.weights[key], expect), key
        assert not torch.equal(loaded.weights[key], ref)  # really quantised
        torch.testing.assert_close(loaded.weights[key], ref, atol=0.02, rtol=0.02)


def test_tiny_model_tokenizer_from_hf_dir(tmp_path):
    """The writer's HF-directory path: same ids as the directory's own tokenizer.json."""
    from tiny_models import make_tiny_model

    from fuselm.tokenizer import Tokenizer

    model = make_tiny_model(tmp_path / "hf", kind="llama")
    loaded = load_gguf(write_gguf_from_hf(model, tmp_path / "hf", tmp_path / "m.gguf"), torch.float32)
    hf_tok = Tokenizer.from_hf_dir(tmp_path / "hf")
    for text in CORPUS[:24]:
        assert loaded.tokenizer.encode(text) == hf_tok.encode(text), text
    assert loaded.tokenizer.bos_token_id == hf_tok.bos_token_id and loaded.tokenizer.add_bos_token


# --- 3. errors ----------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(missing, torch.float32)


@pytest.mark.parametrize("cut", [3_000_000, 20_000, 30, 4])
def test_truncated_file(tmp_path, cut):
    path = tmp_path / "cut.gguf"
    with open(EMBEDDED, "rb") as f:
        path.write_bytes(f.read(cut))
    with pytest.raises(ValueError, match=r"(?s)cut\.gguf.*(truncated|corrupt|GGUF).*re-download") as info:
        load_gguf(path, torch.float32)
    err = info.value  # no numpy / struct traceback chained under ours
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


@pytest.mark.parametrize("data", [b"", b"not a gguf file at all, just text\n" * 10,
                                  np.random.default_rng(0).bytes(100_000),
                                  b"GGUF\x03\x00\x00\x00" + np.random.default_rng(1).bytes(5000)])
def test_garbage_file(tmp_path, data):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="garbage.gguf"):
        load_gguf(path, torch.float32)


def test_unsupported_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="'phi2' is not supported"):
        load_gguf(tmp_path / "phi.gguf", torch.float32)


def test_missing_tensor(tmp_path):
    model, path = _write(tmp_path, "llama_untied")
    import gguf

    reader = GGUFReader(path)  # rewrite the file without one layer's up_proj
    w = gguf.GGUFWriter(str(tmp_path / "less.gguf"), "llama")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name != gguf_name("model.layers.1.mlp.up_proj.weight"):
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_gguf(tmp_path / "less.gguf", torch.float32)


# --- 4. the embedded SmolLM2-135M-Instruct ------------------------------------------------------

def test_embedded_config(loaded):
    c = loaded.config
    assert c.architecture == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert (c.vocab_size, c.tie_word_embeddings, c.rope_theta) == (49152, True, 100000.0)
    assert c.max_position_embeddings == 8192 and c.rope_scaling is None and not c.attention_bias
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert len(loaded.weights) == 30 * 9 + 2 and "lm_head.weight" not in loaded.weights
    assert loaded.weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert loaded.weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert loaded.weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert loaded.source == str(EMBEDDED)


def test_embedded_weights_match_gguf_reader(loaded):
    tensors = {t.name: t for t in GGUFReader(EMBEDDED).tensors}
    for hf, n_head in [("model.layers.0.self_attn.q_proj.weight", 9), ("model.layers.0.self_attn.k_proj.weight", 3),
                       ("model.layers.7.self_attn.v_proj.weight", None), ("model.embed_tokens.weight", None),
                       ("model.layers.29.mlp.down_proj.weight", None), ("model.norm.weight", None)]:
        t = tensors[gguf_name(hf)]
        stored = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)))
        ours = loaded.weights[hf]
        # Re-applying llama.cpp's permutation to our HF-order weight must give back the file's rows.
        assert torch.equal(llama_cpp_permute(ours, n_head) if n_head else ours, stored), hf
    assert tensors["blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType.Q4_1



def test_auto_dtype_is_float32_where_weights_stay_quantised(tmp_path, monkeypatch):
    """`dtype=auto` on CPU: float32 activations where the projections stay quantised (a GGUF with Q4/Q8 matrices
    kept as they are, or quantization int8/int4): the quantised matmuls and the one-call C layer step take float32.
    Float weights keep the CPU rule (bfloat16 with bf16 matrix units), whatever this machine has."""
    from fuselm import config as config_module
    from fuselm.config import parse_dtype
    from fuselm.loader.gguf import gguf_keeps_quantized_weights
    from fuselm.loader.load import keeps_quantized_weights

    Q = GGMLQuantizationType
    for sub in "fqh":
        (tmp_path / sub).mkdir()
    _, float_path = _write(tmp_path / "f", "llama_untied")
    _, q_path = _write(tmp_path / "q", "llama_untied", {"model.layers.0.mlp.up_proj.weight": Q.Q4_0})
    _, f16_path = _write(tmp_path / "h", "llama_untied", {"model.layers.0.mlp.up_proj.weight": Q.F16})
    assert gguf_keeps_quantized_weights(q_path) and gguf_keeps_quantized_weights(EMBEDDED)
    assert not gguf_keeps_quantized_weights(float_path) and not gguf_keeps_quantized_weights(f16_path)
    assert keeps_quantized_weights(str(q_path), None) and keeps_quantized_weights(None, None)  # the embedded model
    assert not keeps_quantized_weights(str(q_path), "none")  # dequantised at load: float weights
    assert keeps_quantized_weights(str(float_path), "int4") and not keeps_quantized_weights(str(float_path), None)
    for fast in (True, False):
        monkeypatch.setattr(config_module, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert parse_dtype("auto", "cpu", quantized_weights=True) == torch.float32
        assert parse_dtype("auto", "cpu") == (torch.bfloat16 if fast else torch.float32)
        assert parse_dtype("auto", "cuda:0", quantized_weights=True) == torch.bfloat16
        assert parse_dtype("bfloat16", "cpu", quantized_weights=True) == torch.bfloat16  # asked for: kept


def test_engine_on_a_quantised_gguf_defaults_to_float32(tmp_path, monkeypatch):
    """On a CPU whose rule says bfloat16, an engine on a quantised GGUF with dtype auto runs float32 activations;
    its greedy tokens are those of dtype float32 asked for explicitly."""
    from fuselm import LLM, SamplingParams
    from fuselm import config as config_module

    monkeypatch.setattr(config_module, "cpu_has_fast_bf16", lambda: True)
    _, q_path = _write(tmp_path, "llama_untied", {"model.layers.0.mlp.up_proj.weight": GGMLQuantizationType.Q8_0,
                                                  "model.layers.1.self_attn.q_proj.weight": GGMLQuantizationType.Q4_0})
    auto = LLM(str(q_path), device="cpu")
    assert auto.engine.dtype == torch.float32
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    explicit = LLM(str(q_path), device="cpu", dtype="float32")
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8]]
    got = [o.outputs[0].token_ids for o in auto.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in explicit.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                              use_tqdm=False)]
    assert got == want
    assert LLM(str(q_path), device="cpu", quantization="none").engine.dtype == torch.bfloat16


def test_header_is_parsed_once_per_version_of_a_file(tmp_path, monkeypatch):
    """dtype=auto asks whether a GGUF keeps quantised weights, then loads it: one header parse. A file replaced
    or rewritten at the same path is parsed again (inode, size and times key the cache)."""
    import os
    import shutil

    from fuselm.loader import gguf as gguf_module

    Q = GGMLQuantizationType
    for sub in "fq":
        (tmp_path / sub).mkdir()
    _, float_path = _write(tmp_path / "f", "llama_untied")
    _, q_path = _write(tmp_path / "q", "llama_untied", {"model.layers.0.mlp.up_proj.weight": Q.Q4_0})
    parses = []
    real_parse = gguf_module._parse
    monkeypatch.setattr(gguf_module, "_parse", lambda buf: parses.append(1) or real_parse(buf))
    gguf_module._parsed_header.cache_clear()

    path = tmp_path / "model.gguf"
    shutil.copyfile(float_path, path)
    assert not gguf_module.gguf_keeps_quantized_weights(path)
    loaded = load_gguf(path, torch.float32, keep_quantized=True)
    assert len(parses) == 1 and loaded.config.num_hidden_layers > 0

    shutil.copyfile(q_path, tmp_path / "next.gguf")
    os.replace(tmp_path / "next.gguf", path)  # replaced: a new inode
    assert gguf_module.gguf_keeps_quantized_weights(path) and len(parses) == 2

    path.write_bytes(float_path.read_bytes())  # rewritten in place: same inode, another size and time
    assert not gguf_module.gguf_keeps_quantized_weights(path) and len(parses) == 3
