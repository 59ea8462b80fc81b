"""ember.tokenizer against transformers: same ids, same text, same chat prompts."""
from __future__ import annotations

import json
import os
import random
import shutil
from functools import lru_cache

import jinja2
import pytest

from _gguf_helpers import (
    CHATML_TEMPLATE,
    USER_TOKEN,
    requires_smollm2,
    smollm2_checkpoint,
    smollm2_hf_tokenizer,
    tiny_bpe,
    write_tokenizer_only_gguf,
)
from ember.tokenizer import Tokenizer

STRINGS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "   three leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "     ",
    "\n",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "日本語のテキストと中文",
    "Ünïcödé çàfé naïve résumé Ωμέγα Привет",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))",
    "for (int i = 0; i < n; ++i) { x[i] <<= 2; }",
    "numbers 1234567890 3.14159 1e-10 0x1F",
    "don't won't it's we've they'll I'm you'd DON'T",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|im_end|><|im_end|>",
    "special-looking <|not_a_token|> and <im_start>",
    f"user-defined {USER_TOKEN} token",
    "zero\u200bwidth and \u00a0nbsp and \ufeffBOM",
    "a" * 300,
    "https://example.com/path?q=1&r=2#frag",
]


def _fuzz_strings(count: int, seed: int = 0) -> list[str]:
    """Deterministic random strings mixing scripts, whitespace, digits and punctuation."""
    pieces = ["a", "Z", "é", "ß", "中", "語", "😀", "👍🏽", "\u0301", " ", "  ", "\t", "\n", "\r\n", "7", "42",
              "'s", ".", ",", "!", "<|im_start|>", "<|im_end|>", "def", " the", "Ġ", "\u00a0", "ÿ", "\x00"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(count)]


def _assert_same_tokenization(ours: Tokenizer, hf, strings: list[str]) -> None:
    for text in strings:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == hf(text, add_special_tokens=add_special)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


# ---------------------------------------------------------------------- tiny GGUF tokenizers


@lru_cache(maxsize=8)
def _tiny_gguf_pair(directory: str, pre: str, add_bos: bool | None):
    path = os.path.join(directory, f"tok-{pre}-{add_bos}.gguf")
    write_tokenizer_only_gguf(path, pre=pre, add_bos=add_bos)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(directory, gguf_file=os.path.basename(path))
    return Tokenizer.from_gguf(path), hf


@pytest.mark.parametrize(
    ("pre", "add_bos"),
    [("smollm", None), ("llama-bpe", True), ("qwen2", False)],  # GPT-2 split, Llama 3 split, Qwen2 split
)
def test_tiny_gguf_matches_transformers(tmp_path_factory, pre: str, add_bos: bool | None) -> None:
    ours, hf = _tiny_gguf_pair(str(tmp_path_factory.mktemp("tok")), pre, add_bos)
    _assert_same_tokenization(ours, hf, STRINGS + _fuzz_strings(150))
    assert ours.add_bos_token is bool(add_bos)
    assert ours.encode("hi")[:1] == ([ours.bos_token_id] if add_bos else ours.encode("hi", add_special_tokens=False)[:1])
    assert ours.vocab_size == len(hf)
    assert ours.special_tokens == hf.special_tokens_map
    # The user-defined token is matched whole but, not being special, survives skip_special_tokens.
    user_id = ours.convert_tokens_to_ids(USER_TOKEN)
    assert ours.encode(f"a{USER_TOKEN}b", add_special_tokens=False)[1] == user_id
    assert ours.decode([user_id], skip_special_tokens=True) == USER_TOKEN


def test_tiny_gguf_special_ids(tmp_path) -> None:
    path = str(tmp_path / "tok.gguf")
    write_tokenizer_only_gguf(path)
    tok = Tokenizer.from_gguf(path)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("<|im_end|>")}
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [tok.eos_token_id]
    assert tok.decode([tok.bos_token_id, *tok.encode("hey", add_special_tokens=False)]) == "hey"
    assert tok.chat_template == CHATML_TEMPLATE


def test_missing_chat_template_is_a_clear_error(tmp_path) -> None:
    path = str(tmp_path / "tok.gguf")
    write_tokenizer_only_gguf(path, chat_template=None)
    tok = Tokenizer.from_gguf(path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    # An explicit template still works.
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ messages[0].content }}") == "hi"


# ---------------------------------------------------------------------- the real SmolLM2 GGUF


@requires_smollm2
def test_smollm2_matches_transformers() -> None:
    ours, hf = smollm2_checkpoint().tokenizer, smollm2_hf_tokenizer()
    _assert_same_tokenization(ours, hf, STRINGS + _fuzz_strings(300, seed=1))
    assert ours.vocab_size == len(hf) == 49152
    assert ours.bos_token_id == hf.bos_token_id == 1 and ours.eos_token_id == hf.eos_token_id == 2
    assert ours.add_bos_token is False  # the GGUF says so; chat templates write <|im_start|> themselves
    assert ours.encode("<|im_start|>user\n") == [1, 4093, 198]


@requires_smollm2
def test_smollm2_round_trips() -> None:
    tok = smollm2_checkpoint().tokenizer
    for text in STRINGS + _fuzz_strings(100, seed=2):
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke about 🐍."},
        {"role": "assistant", "content": "Why did the python cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
    [
        {"role": "system", "content": "Système: réponds en français.\n\nMerci."},
        {"role": "user", "content": "  spaces around  "},
        {"role": "assistant", "content": "Bien sûr."},
    ],
]


@requires_smollm2
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(conversation, add_generation_prompt: bool) -> None:
    ours, hf = smollm2_checkpoint().tokenizer, smollm2_hf_tokenizer()
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
    hf_ids = hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True,
                                    return_dict=False)
    assert ids == hf_ids
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


# ---------------------------------------------------------------------- a Hugging Face folder

# Exercises what real templates use: namespace, slicing, tojson on tools, loop controls,
# raise_exception, strftime_now, a {% generation %} block, reasoning_content, kwargs.
RICH_TEMPLATE = """{%- set ns = namespace(system=none) -%}
{%- if messages[0].role == 'system' -%}
  {%- set ns.system = messages[0].content -%}
  {%- set messages = messages[1:] -%}
{%- endif -%}
{{- bos_token -}}
{%- if tools %}<tools>
{% for tool in tools %}{{ tool | tojson }}{% if not loop.last %},
{% endif %}{% endfor %}
</tools>
{% endif -%}
{%- if ns.system is not none %}<|im_start|>system
{{ ns.system }}<|im_end|>
{% endif -%}
{%- for message in messages -%}
  {%- if message.role not in ['user', 'assistant'] -%}
    {{- raise_exception('unsupported role: ' + message.role) -}}
  {%- endif -%}
  {%- if loop.index > 20 %}{% break %}{% endif -%}
  {%- if message.role == 'assistant' %}<|im_start|>assistant
{% if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>
{% endif %}{% generation %}{{ message.content | trim }}{% endgeneration %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>
{% endif %}{% endif -%}
{%- if strftime_now('%Y') | length != 4 %}broken strftime_now{% endif -%}
"""

TOOLS = [{
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in <city> & \"quotes\" — é",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    """A tokenizer folder saved by transformers, with generation_config listing two EOS ids."""
    from transformers import PreTrainedTokenizerFast

    folder = str(tmp_path_factory.mktemp("hf-tokenizer"))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tiny_bpe(), bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=RICH_TEMPLATE,
    )
    hf.save_pretrained(folder)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 0], "bos_token_id": 1}, f)
    return folder


def _hf_from_folder(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


FOLDER_CALLS = [
    dict(messages=[{"role": "user", "content": "hi"}]),
    dict(messages=[{"role": "system", "content": "sys <b>"}, {"role": "user", "content": "q"}], tools=TOOLS),
    dict(messages=CONVERSATIONS[2], add_generation_prompt=False),
    dict(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": " a ", "reasoning": "hmm"},
                   {"role": "user", "content": "more", "name": None}], enable_thinking=False),
]


@pytest.mark.parametrize("call", FOLDER_CALLS)
def test_folder_chat_template_matches_transformers(hf_folder: str, call: dict) -> None:
    ours, hf = Tokenizer.from_folder(hf_folder), _hf_from_folder(hf_folder)
    kwargs = {k: v for k, v in call.items() if k != "messages"}
    kwargs.setdefault("add_generation_prompt", True)
    text = ours.apply_chat_template(call["messages"], **kwargs)
    assert text == hf.apply_chat_template(call["messages"], tokenize=False, **kwargs)
    assert ours.apply_chat_template(call["messages"], tokenize=True, **kwargs) == hf.apply_chat_template(
        call["messages"], tokenize=True, return_dict=False, **kwargs)
    assert text.startswith("<|im_start|>")  # bos_token is a template variable


def test_folder_tokenizer_matches_transformers(hf_folder: str) -> None:
    ours, hf = Tokenizer.from_folder(hf_folder), _hf_from_folder(hf_folder)
    _assert_same_tokenization(ours, hf, STRINGS + _fuzz_strings(100, seed=3))
    assert ours.eos_token_ids == {2, 0}  # tokenizer eos + generation_config's list
    assert ours.bos_token_id == hf.bos_token_id
    with pytest.raises(jinja2.TemplateError, match="unsupported role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_folder_with_template_in_tokenizer_config(hf_folder: str, tmp_path) -> None:
    """Older folders keep the template inside tokenizer_config.json (and no .jinja file)."""
    folder = tmp_path / "old-style"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_folder, name), folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML_TEMPLATE
    # transformers 5 ignores this when a tokenizer.json exists (its post-processor decides).
    config["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = Tokenizer.from_folder(folder), _hf_from_folder(str(folder))
    assert ours.encode("hello") == hf("hello")["input_ids"] and ours.add_bos_token is False
    assert ours.chat_template == CHATML_TEMPLATE
    for conversation in CONVERSATIONS:
        assert ours.apply_chat_template(conversation) == hf.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False)
    assert ours.eos_token_ids == {2}  # no generation_config.json here


def test_from_folder_needs_tokenizer_json(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
