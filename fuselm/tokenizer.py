"""Tokenizer: a thin, fast wrapper over `tokenizers.Tokenizer` plus the chat template.

We use the `tokenizers` library directly (not transformers) because importing transformers costs
~2 s and the embedded model must load in under 5 s. The chat template is rendered with jinja2 the
same way transformers does (sandboxed, trim_blocks/lstrip_blocks, raise_exception, tojson).
Messages are checked before rendering (check_messages), so a missing 'content', a bad role or a
lone surrogate is an InvalidRequestError naming the message, not jinja2's UndefinedError or the
tokenizer's TypeError.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from fuselm.errors import InvalidRequestError, check_text


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def check_messages(messages: object) -> None:
    """A conversation the chat template can render: a list of dicts, each with a non-empty string
    'role' and a 'content' that is a string, a list of content parts ({"type": "text", "text": ...}
    and the like; templates that take lists read them) or None beside 'tool_calls'; no lone
    surrogate in any string. Raises InvalidRequestError (a ValueError) naming the message."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidRequestError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                                  f"{type(messages).__name__}", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{where} must be a dict with 'role' and 'content', got {message!r:.80}",
                                      param="messages")
        role = message.get("role")
        if not isinstance(role, str) or not role.strip():
            raise InvalidRequestError(f"{where} needs a 'role' that is a non-empty string such as 'user', 'assistant' "
                                      f"or 'system', got {role!r:.80}", param="messages")
        if "content" not in message:
            raise InvalidRequestError(f"{where} has no 'content'; give the message text as 'content'",
                                      param="messages")
        content = message["content"]
        if content is None and "tool_calls" not in message:
            raise InvalidRequestError(f"{where}['content'] is None; give the message text (None only goes with "
                                      "'tool_calls')", param="messages")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(f"{where}['content'] must be a string or a list of content parts, got "
                                      f"{type(content).__name__}", param="messages")
        _check_strings(message, where)


def _check_strings(value: object, where: str) -> None:
    """Every string inside a message (keys included) must be valid Unicode text."""
    if isinstance(value, str):
        check_text(value, "messages", where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, where)
            _check_strings(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            _check_strings(item, f"{where}[{j}]")


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos_token: bool = False,
        chat_template: str | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self.hf = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        # add_bos_token: prepend BOS ourselves (GGUF files say so in metadata); HF tokenizer.json
        # files usually do it in their post-processor instead, and then this is False.
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.pad_token_id = pad_token_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token_to_str(self, token_id: int) -> str:
        return self.hf.id_to_token(token_id) or ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        """The text of one token alone (for logprobs), special tokens included."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None,
        **extra: object,
    ) -> str:
        template = chat_template or self.chat_template
        if not template:
            raise ValueError(
                "this model has no chat template; pass chat_template=... or use generate() with a plain prompt"
            )
        check_messages(messages)
        special = {
            "bos_token": self.token_to_str(self.bos_token_id) if self.bos_token_id is not None else "",
            "eos_token": self.token_to_str(self.eos_token_id) if self.eos_token_id is not None else "",
        }
        try:
            return _compile_template(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **special, **extra
            )
        except jinja2.TemplateError as exc:  # e.g. the template reads a message key that is not there
            raise InvalidRequestError(f"the chat template could not render these messages: {exc}",
                                      param="messages") from exc

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) of an HF model directory."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(
                f"{tok_file} not found: fuselm needs the fast tokenizer file tokenizer.json in the model directory"
            )
        hf = HFTokenizer.from_file(str(tok_file))
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())

        def token_id(entry: object) -> int | None:
            if isinstance(entry, dict):
                entry = entry.get("content")
            return hf.token_to_id(entry) if isinstance(entry, str) else None

        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        eos = token_id(cfg.get("eos_token"))
        model_cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        gen_cfg = (
            json.loads((path / "generation_config.json").read_text())
            if (path / "generation_config.json").exists() else {}
        )
        eos_ids: list[int] = []
        for src in (gen_cfg.get("eos_token_id"), model_cfg.get("eos_token_id"), eos):
            for e in [src] if isinstance(src, int) else (src or []):
                if e not in eos_ids:
                    eos_ids.append(e)
        bos = token_id(cfg.get("bos_token"))
        if bos is None:
            bos = model_cfg.get("bos_token_id")
        # add_bos_token only matters when the tokenizer.json post-processor does not already add it.
        probe = hf.encode("a", add_special_tokens=True).ids
        add_bos = bool(cfg.get("add_bos_token", False)) and (not probe or probe[0] != bos)
        return cls(
            hf, bos_token_id=bos, eos_token_ids=eos_ids, add_bos_token=add_bos,
            chat_template=template, pad_token_id=token_id(cfg.get("pad_token")),
        )
