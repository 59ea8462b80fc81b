"""Text <-> token ids, and chat prompts, for the models ember serves.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust BPE engine) built either from a
Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`) or from the metadata of
a GGUF file. Both paths are meant to encode, decode and render chat templates exactly as
transformers 5 does for the same files, so ember's outputs can be compared with HF's
token for token.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

if TYPE_CHECKING:
    from gguf import GGUFReader

Message = Mapping[str, Any]

# Named special tokens a chat template may refer to, as transformers exposes them.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# How byte-level vocabularies named by `tokenizer.ggml.pre` split text before BPE. Those not
# listed here use GPT-2's own split (ByteLevel's built-in regex), as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class Tokenizer:
    """A model's tokenizer: encode/decode, special token ids and its chat template.

    Build one with `Tokenizer.from_folder` or `Tokenizer.from_gguf`; the constructor takes
    an already configured backend (its post-processor decides whether BOS is added).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        """`special_tokens` maps names like "bos_token" to token strings; `chat_templates`
        maps template names to Jinja sources ("default" is used unless asked otherwise);
        `extra_eos_token_ids` adds stop tokens beyond `eos_token` (e.g. generation_config's)."""
        self.backend = backend
        self.special_tokens: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.bos_token_id: int | None = self._id_of(self.special_tokens.get("bos_token"))
        self.eos_token_id: int | None = self._id_of(self.special_tokens.get("eos_token"))
        self.pad_token_id: int | None = self._id_of(self.special_tokens.get("pad_token"))
        eos = {self.eos_token_id} if self.eos_token_id is not None else set()
        self.eos_token_ids: set[int] = eos | {int(i) for i in extra_eos_token_ids}

    # ------------------------------------------------------------------ building

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json, plus tokenizer_config.json,
        chat_template.jinja, generation_config.json and config.json when present."""
        folder = os.fspath(path)
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{folder} has no tokenizer.json (ember needs the fast-tokenizer file)")
        backend = BackendTokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))

        special = {name: _token_content(config.get(name)) for name in _SPECIAL_TOKEN_NAMES}
        special = {name: token for name, token in special.items() if token is not None}
        # Like transformers: tokens listed in the config but missing from tokenizer.json get
        # added, and named special tokens are made special so they are matched whole.
        declared = sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))
        for _, entry in declared:
            content = _token_content(entry)
            if content is not None and backend.token_to_id(content) is None:
                special_flag, normalized = bool(entry.get("special")), bool(entry.get("normalized"))
                backend.add_tokens([AddedToken(content, special=special_flag, normalized=normalized)])
        _make_special(backend, special.values())
        # transformers 5 ignores tokenizer_config's add_bos_token/add_eos_token whenever a
        # tokenizer.json exists: its post-processor alone decides, so we leave it as it is.

        extra_eos: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(os.path.join(folder, name)).get("eos_token_id")
            extra_eos.update([eos] if isinstance(eos, int) else (eos or []))
        return cls(backend, special, _folder_chat_templates(folder, config), extra_eos)

    @classmethod
    def from_gguf(cls, source: Mapping[str, Any] | GGUFReader | str | os.PathLike[str]) -> Tokenizer:
        """Rebuild a byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`) from GGUF
        metadata, the way transformers' GGUF loading does. `source` is a GGUF path, a
        `gguf.GGUFReader`, or the file's metadata as a dict."""
        metadata = _gguf_metadata(source)
        field = metadata.get

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise NotImplementedError(
                f"GGUF tokenizer type {kind!r} is not supported; ember rebuilds only byte-level BPE ('gpt2') "
                "vocabularies. Pass a Hugging Face tokenizer folder instead."
            )
        tokens: list[str] = field("tokenizer.ggml.tokens")
        token_types: list[int] = field("tokenizer.ggml.token_type") or []
        backend = _byte_level_backend(tokens, field("tokenizer.ggml.merges") or [], field("tokenizer.ggml.pre"))

        special: dict[str, str] = {}
        named_ids = (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))
        for name, key in named_ids:
            token_id = field(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None:
                special[name] = tokens[token_id]

        # Control tokens become special (matched whole, dropped by skip_special_tokens) and
        # user-defined ones plain added tokens (matched whole, kept). A "control" token
        # spelled outside the byte alphabet is a llama.cpp mislabel and is left alone, as in
        # transformers.
        alphabet = set(_bytes_to_unicode().values())
        control = [
            AddedToken(t, special=True, normalized=False)
            for t, token_type in zip(tokens, token_types)
            if token_type == _TOKEN_TYPE_CONTROL and set(t) <= alphabet
        ]
        backend.add_special_tokens(control)
        vocab = backend.get_vocab(with_added_tokens=True)
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, token_type in zip(tokens, token_types)
            if token_type == _TOKEN_TYPE_USER_DEFINED and t in vocab
        ]
        backend.add_tokens(user)
        _make_special(backend, special.values())

        backend.post_processor = _bos_eos_processor(
            backend,
            special.get("bos_token") if field("tokenizer.ggml.add_bos_token", False) else None,
            special.get("eos_token") if field("tokenizer.ggml.add_eos_token", False) else None,
        )
        # llama.cpp's end-of-turn / end-of-message ids (e.g. Llama 3's <|eot_id|>) also stop generation.
        extra_eos = [field(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")]
        template = field("tokenizer.chat_template")
        templates = {"default": template} if template else {}
        return cls(backend, special, templates, [i for i in extra_eos if i is not None])

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS where this tokenizer does."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form a whole UTF-8 character come out as U+FFFD."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        """Vocabulary strings (byte-level spelling, e.g. "Ġhello") of one id or a list of ids."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Ids of vocabulary strings (None for unknown ones)."""
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` puts BOS first."""
        return self.bos_token_id is not None and self.encode("")[:1] == [self.bos_token_id]

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    # ------------------------------------------------------------------ chat

    @property
    def chat_template(self) -> str | None:
        """The default chat template's Jinja source, or None."""
        return self.chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the model's chat template, as transformers does.

        `messages` are dicts like {"role": "user", "content": "hi"}; `tools` are JSON
        schemas; extra keyword arguments (e.g. `enable_thinking=False`) become template
        variables and override the special-token variables (`bos_token`, ...). Returns the
        prompt text, or its ids when `tokenize` (no BOS is added: the template writes it).
        """
        template = chat_template or self._select_template(tools)
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        conversation = [_alias_reasoning(_plain({k: v for k, v in dict(m).items() if v is not None})) for m in messages]
        for tool in tools or ():
            if not isinstance(tool, Mapping):
                raise TypeError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
        variables = {**self.special_tokens, **_plain(kwargs)}
        text = _compile_chat_template(template).render(
            messages=conversation,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _select_template(self, tools: Sequence[Mapping[str, Any]] | None) -> str:
        if not self.chat_templates:
            raise ValueError(
                "this tokenizer has no chat template, so chat messages cannot be turned into a prompt; "
                "send a plain prompt instead, or pass chat_template=<jinja source>"
            )
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        raise ValueError(f"no default chat template among {sorted(self.chat_templates)}; pass chat_template=")

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


# ---------------------------------------------------------------------- GGUF building blocks


def _gguf_metadata(source: Mapping[str, Any] | GGUFReader | str | os.PathLike[str]) -> Mapping[str, Any]:
    """A GGUF file's metadata as plain values, from whichever form the caller has."""
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        from ember.models.gguf_loader import read_gguf

        return read_gguf(os.fspath(source))[0]
    return {key: f.contents() for key, f in source.fields.items()}  # a gguf.GGUFReader


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character; byte-level BPE vocabularies are
    spelled in these characters (a space is "Ġ", a newline "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str | None) -> BackendTokenizer:
    """A BPE tokenizer over a byte-level vocabulary, with ByteLevel pre-tokenizer and decoder."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token with characters outside the byte alphabet (llama.cpp writes some added tokens
    # as plain text) is respelled byte by byte, so BPE can reach it.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    pairs = [tuple(merge.split(" ")) for merge in merges]
    bpe = models.BPE(
        vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
    )
    backend = BackendTokenizer(bpe)
    split = _GGUF_PRE_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        # The model's own split first; ByteLevel then only maps bytes to its alphabet.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _make_special(backend: BackendTokenizer, tokens: Iterable[str]) -> None:
    """Register named special tokens (bos, eos, ...) that are not added tokens yet as special,
    so they are matched whole and skipped on decode, as transformers does."""
    already_added = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = [AddedToken(t, special=True, normalized=False) for t in tokens if t not in already_added]
    if missing:
        backend.add_special_tokens(missing)


def _bos_eos_processor(backend: BackendTokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """Post-processor that wraps each sequence in BOS/EOS (either may be None)."""
    head = f"{bos}:0 " if bos else ""
    tail = f" {eos}:0" if eos else ""
    single = f"{head}$A:0{tail}"
    pair = f"{single}{f' {bos}:1' if bos else ''} $B:1{f' {eos}:1' if eos else ''}"
    used = [t for t in (bos, eos) if t]
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(used)]
    )


# ---------------------------------------------------------------------- HF folder helpers


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config: a plain string or a serialized AddedToken."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _folder_chat_templates(folder: str, config: Mapping[str, Any]) -> dict[str, str]:
    """Chat templates by name. Template files, when any exist, replace the config's entries."""
    templates: dict[str, str] = {}
    default_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(default_file):
        with open(default_file, encoding="utf-8") as f:
            templates["default"] = f.read()
    extra_dir = os.path.join(folder, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                    templates[name.removesuffix(".jinja")] = f.read()
    if templates:
        return templates
    configured = config.get("chat_template")
    if isinstance(configured, str):
        return {"default": configured}
    if isinstance(configured, list):  # [{"name": ..., "template": ...}, ...]
        return {entry["name"]: entry["template"] for entry in configured}
    return {}


# ---------------------------------------------------------------------- chat template rendering


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types, so the sandboxed template never
    sees an object with methods of its own (as transformers does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. OpenAI SDK messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """Templates read a message's reasoning as `reasoning_content` (gpt-oss: `thinking`);
    accept it under any of the names clients use, as transformers does."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks.
    Rendering just outputs the body (in its own scope, like transformers' tracker)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox with transformers' settings and helpers.
    Templates come from model files, i.e. untrusted code, hence the immutable sandbox."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
