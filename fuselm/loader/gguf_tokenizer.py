"""Build a `tokenizers.Tokenizer` straight from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json: only the token list, the BPE merges (or SentencePiece scores),
the token types and the name of llama.cpp's pre-tokenizer. transformers can rebuild a tokenizer
from those, but importing it costs ~2 s, so we assemble the same pieces with the `tokenizers`
library ourselves: a BPE model, the pre-tokenizer named by `tokenizer.ggml.pre`, a decoder, and
the control / user-defined tokens registered as added tokens so they always encode as one id.
"""

from __future__ import annotations

import re
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from fuselm.tokenizer import Tokenizer

# llama.cpp's token types (llama_token_type / gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of the byte-level vocabularies we know, keyed by `tokenizer.ggml.pre`.
# Llama 3: contractions, letters with one leading non-letter, numbers in runs of <= 3, punctuation, spaces.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2: the Llama 3 pattern but every digit on its own.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# Individual digits first, then the GPT-2 byte-level regex (SmolLM/SmolLM2, StarCoder).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder")


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes keep their character,
    the other 68 bytes (controls, space, ...) are moved to U+0100 onwards, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + shifted))
            shifted += 1
    return table


_BYTE_CHARS = _byte_alphabet()
_NOT_BYTE_LEVEL = re.compile("[^" + re.escape("".join(_BYTE_CHARS)) + "]")


def _byte_level_spelling(text: str) -> str:
    return "".join(_BYTE_CHARS[b] for b in text.encode("utf-8"))


def _unique_vocab(tokens: list[str]) -> dict[str, int]:
    """token -> id; a spelling that occurs twice keeps its first id (later copies stay unreachable)."""
    return dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))  # later (= lower) ids win


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], pre: str) -> HFTokenizer:
    tokens = list(tokens)
    for i, tok in enumerate(tokens):
        # Normal tokens must be in the byte alphabet; a few converters store some as raw text.
        # Control and user-defined tokens keep their raw text: they are matched as added tokens.
        if types[i] not in (_CONTROL, _USER_DEFINED) and _NOT_BYTE_LEVEL.search(tok):
            tokens[i] = _byte_level_spelling(tok)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=_unique_vocab(tokens), merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # "gpt2", "default", or a name we do not know: GPT-2's own regex (as transformers does)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE files list no merges: every way to cut a token into two vocabulary tokens
    is a merge, ranked by the token's score (best first), then longer left / right pieces first."""
    ids = _unique_vocab(tokens)
    ranked = []
    for tid, tok in enumerate(tokens):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            lid, rid = ids.get(left), ids.get(right)
            if lid is not None and rid is not None:
                ranked.append((-scores[tid], -len(left), -len(right), tid, lid, rid, left, right))
    ranked.sort(key=lambda r: r[:6])
    return [(r[6], r[7]) for r in ranked]


def _sentencepiece_bpe(tokens: list[str], scores: list[float], unk: str | None, add_space_prefix: bool) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(
        vocab=_unique_vocab(tokens), merges=_spm_merges(tokens, scores), unk_token=unk,
        fuse_unk=True, byte_fallback=True,
    ))
    # llama.cpp (like sentencepiece) puts one space before the text and after every special token,
    # even where a space already is; a normalizer runs exactly on those pieces. (Metaspace's
    # prepend_scheme="first", which transformers uses, skips it when the text starts with a space.)
    space = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), space]) if add_space_prefix else space
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _as_int(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(key)
    return int(value) if value is not None else None


def build_gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """fuselm Tokenizer from GGUF metadata (key -> value, string arrays as lists of str)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(
            "the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing); "
            "re-convert it with llama.cpp's convert_hf_to_gguf.py, which embeds the tokenizer"
        )
    n = len(tokens)
    raw_types = meta.get("tokenizer.ggml.token_type")
    if raw_types is not None and len(raw_types) == n:
        types = raw_types.tolist() if hasattr(raw_types, "tolist") else [int(t) for t in raw_types]
    else:
        types = [_NORMAL] * n
    kind = meta.get("tokenizer.ggml.model", "gpt2")
    if kind == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise ValueError("the GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges; re-convert the model")
        hf = _byte_level_bpe(tokens, types, merges, str(meta.get("tokenizer.ggml.pre", "default")))
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        scores = [float(s) for s in scores] if scores is not None and len(scores) == n else [0.0] * n
        unk_id = _as_int(meta, "tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < n else None
        hf = _sentencepiece_bpe(tokens, scores, unk, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    else:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (fuselm reads 'gpt2' byte-level BPE and "
            "'llama' SentencePiece BPE); use the model's HF directory instead"
        )
    # Control tokens (<|im_start|>, <s>, ...) are special: matched whole, skipped by decode(skip_special_tokens).
    # User-defined ones (<think>, ...) are matched whole too but are ordinary text when decoding.
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)

    bos = _as_int(meta, "tokenizer.ggml.bos_token_id")
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        tid = _as_int(meta, f"tokenizer.ggml.{key}")
        if tid is not None and 0 <= tid < n and tid not in eos_ids:
            eos_ids.append(tid)
    # llama.cpp adds BOS by default to SentencePiece vocabularies, not to byte-level ones.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(
        hf,
        bos_token_id=bos if bos is not None and 0 <= bos < n else None,
        eos_token_ids=eos_ids,
        add_bos_token=add_bos and bos is not None,
        chat_template=template if isinstance(template, str) else None,
        pad_token_id=_as_int(meta, "tokenizer.ggml.padding_token_id"),
    )
