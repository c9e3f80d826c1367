"""Tokenizer and chat template of a Hugging Face checkpoint, without transformers.

Reads tokenizer.json with the `tokenizers` library and renders the chat template (tokenizer_config.json
"chat_template" or chat_template.jinja) with a sandboxed jinja2 environment set up as transformers does.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as plain strings or as serialized AddedToken dicts.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _select_template(value: Any) -> str | None:
    # Older configs hold a list of named templates; the unnamed use is the "default" one.
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


# tokenizer_config.json and chat_template.jinja are a few KB to a few MB; tokenizer.json tens of MB.
_MAX_TEXT_FILE_BYTES = 64 << 20
_MAX_TOKENIZER_BYTES = 512 << 20


def _checkpoint_error(message: str) -> Exception:
    from dgemma_rt._core import CheckpointError

    return CheckpointError(message)


def _regular_file(path: pathlib.Path, max_bytes: int) -> bool:
    """False when nothing is at `path`; True for a regular file of at most max_bytes; else CheckpointError.

    A FIFO, device, directory or symlink loop where a tokenizer file should be is refused instead of
    being read (which could block) or silently ignored.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise _checkpoint_error(f"{path} is a dangling symlink") from None
        return False
    except OSError as e:
        raise _checkpoint_error(f"cannot open {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _checkpoint_error(f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise _checkpoint_error(f"{path} is {st.st_size} bytes, more than the {max_bytes} this file may have")
    return True


def _read_text(path: pathlib.Path, max_bytes: int = _MAX_TEXT_FILE_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise _checkpoint_error(f"{path} is more than {max_bytes} bytes")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _checkpoint_error(f"cannot read {path}: {e}") from e


def check_text(text: str, what: str = "text") -> None:
    """ValueError unless `text` can be encoded as UTF-8 (a lone surrogate such as "\\ud800" cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid Unicode: {e.reason} {text[e.start:e.end]!r} at position {e.start}"
        ) from None


def lacks_tokenizer(checkpoint: str | os.PathLike[str]) -> bool:
    """True for a checkpoint directory (it has a config.json) without tokenizer.json: what a command that reads
    text can refuse before the weights load (minutes for a large checkpoint). Anything that is no checkpoint at
    all is left to the Engine, whose error says so."""
    root = pathlib.Path(checkpoint)
    return (root / "config.json").is_file() and not os.path.lexists(root / "tokenizer.json")


def is_chat(value: Any) -> bool:
    """Whether `value` is a chat: a non-empty list (or tuple) of message mappings."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, Mapping) for m in value)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


class Tokenizer:
    """A checkpoint's tokenizer: `tokenizers.Tokenizer` plus the settings of tokenizer_config.json."""

    def __init__(self, tokenizer: Any, config: Mapping[str, Any] | None = None, chat_template: str | None = None):
        self._tok = tokenizer
        self.config: dict[str, Any] = dict(config or {})
        self.chat_template = (
            chat_template if chat_template is not None else _select_template(self.config.get("chat_template"))
        )
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self._compiled: tuple[str, Any] | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer | None:
        """The tokenizer of checkpoint dir `path`, or None when it has no tokenizer.json."""
        from tokenizers import Tokenizer as _HFTokenizer

        root = pathlib.Path(path)
        tok_file = root / "tokenizer.json"
        if not _regular_file(tok_file, _MAX_TOKENIZER_BYTES):
            return None
        # Read here and parsed from the string: tokenizers takes a path only as valid UTF-8, and a
        # checkpoint directory's name need not be (Python spells such bytes as surrogate escapes).
        text = _read_text(tok_file, _MAX_TOKENIZER_BYTES)
        try:
            tok = _HFTokenizer.from_str(text)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as e:  # a bare Exception on malformed files, or a Rust panic (a BaseException)
            raise _checkpoint_error(f"cannot read {tok_file}: {str(e)[:300]}") from e
        config: dict[str, Any] = {}
        cfg_file = root / "tokenizer_config.json"
        if _regular_file(cfg_file, _MAX_TEXT_FILE_BYTES):
            try:
                loaded = json.loads(_read_text(cfg_file))
            except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
                raise _checkpoint_error(f"cannot read {cfg_file}: {str(e)[:300]}") from None
            if not isinstance(loaded, dict):
                raise _checkpoint_error(f"{cfg_file} does not hold a JSON object")
            config = loaded
        # transformers 5 saves the template as its own file, which wins over the config's copy.
        template_file = root / "chat_template.jinja"
        template = _read_text(template_file) if _regular_file(template_file, _MAX_TEXT_FILE_BYTES) else None
        return cls(tok, config, template)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens the tokenizer's post-processor adds BOS."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        check_text(text)
        try:
            return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as e:  # a tokenizer.json that loads but cannot encode (a Rust panic): not the text's fault
            raise RuntimeError(f"the checkpoint's tokenizer failed to encode: {str(e)[:300]}") from e

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        seq = [int(i) for i in np.asarray(ids).reshape(-1)] if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        return str(self._tok.decode(seq, skip_special_tokens=skip_special_tokens))

    def render_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template's text for `messages` (a list of {"role", "content"} dicts)."""
        source = self.chat_template
        if source is None:
            raise ValueError(
                "this checkpoint has no chat template (no 'chat_template' in tokenizer_config.json and no "
                "chat_template.jinja); pass a plain string prompt instead"
            )
        if isinstance(messages, (list, tuple)) and not messages:
            raise ValueError("messages is empty: a chat needs at least one message")
        if not is_chat(messages):
            raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts')
        try:
            template = self._template(source)
            return str(
                template.render(
                    messages=[dict(m) for m in messages],
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                    pad_token=self.pad_token or "",
                    add_generation_prompt=add_generation_prompt,
                )
            )
        except MemoryError:
            raise
        except Exception as e:  # the checkpoint's template: a syntax error, raise_exception, or any runtime error
            raise ValueError(f"chat template failed: {type(e).__name__}: {str(e)[:300]}") from e

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat; the template writes BOS itself, so none is added."""
        return self.encode(self.render_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def _template(self, source: str) -> Any:
        if self._compiled is None or self._compiled[0] != source:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            # The settings transformers renders chat templates with, so whitespace comes out the same.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals["raise_exception"] = _raise_exception
            env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
                x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
            )
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._compiled = (source, env.from_string(source))
        return self._compiled[1]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, chat_template={self.chat_template is not None})"
