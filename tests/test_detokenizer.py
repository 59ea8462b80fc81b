"""Streaming detokenization: whole characters only, and the same text as one decode."""
from __future__ import annotations

from collections.abc import Sequence

import pytest

from _gguf_helpers import SPECIAL_TOKENS, requires_smollm2, smollm2_checkpoint, tiny_bpe
from ember.detokenizer import IncrementalDetokenizer
from ember.tokenizer import Tokenizer

TEXTS = [
    "Hello 😀 world 🎉🎉 thumbs 👍🏽 family 👨‍👩‍👧 flag 🇫🇷!",
    "日本語のテキストと中文 mixed with English 😀",
    "Ünïcödé çàfé — “quotes” … naïve",
    "code:\n    for x in range(3):\n        print(x)  # 🐍\n",
    "🙂" * 20,
]


def _tiny_tokenizer() -> Tokenizer:
    return Tokenizer(tiny_bpe(), {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=requires_smollm2)])
def tokenizer(request) -> Tokenizer:
    return _tiny_tokenizer() if request.param == "tiny" else smollm2_checkpoint().tokenizer


def _stream(tok: Tokenizer, prompt: Sequence[int], output: Sequence[int], chunk: int = 1,
            skip_special_tokens: bool = True) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detok.append(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    deltas.append(detok.flush())
    return deltas, detok


def _has_split_character(tok: Tokenizer, ids: Sequence[int]) -> bool:
    """Whether decoding some prefix of `ids` cuts a character (what the test must survive)."""
    return any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_are_whole_characters_and_add_up(tokenizer: Tokenizer, text: str, chunk: int) -> None:
    prompt = tokenizer.encode("Prompt: say something nice ✨", add_special_tokens=False)
    output = tokenizer.encode(text, add_special_tokens=False)
    if any(ord(c) > 0x2000 for c in text):
        assert _has_split_character(tokenizer, output), "the text should split a character across tokens"
    deltas, detok = _stream(tokenizer, prompt, output, chunk)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tokenizer.decode(output) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_follow_skip_flag(tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    output = [
        *tokenizer.encode("Sure 👍", add_special_tokens=False),
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        *tokenizer.encode("\nmore 🎉", add_special_tokens=False),
    ]
    deltas, detok = _stream(tokenizer, [], output, skip_special_tokens=skip_special_tokens)
    expected = tokenizer.decode(output, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == detok.text == expected
    assert ("<|im_end|>" in expected) is not skip_special_tokens
    assert all("\ufffd" not in d for d in deltas)


def test_incomplete_character_is_held_until_flush(tokenizer: Tokenizer) -> None:
    emoji = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(emoji) > 1
    output = tokenizer.encode("ok ", add_special_tokens=False) + emoji[:-1]  # generation stopped mid-emoji
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.append([i]) for i in output]
    assert "".join(deltas) == "ok " and all("\ufffd" not in d for d in deltas)
    assert detok.flush() == tokenizer.decode(output)[len("ok "):]  # the broken bytes, as decode shows them
    assert detok.text == tokenizer.decode(output)


def test_prompt_context_does_not_leak_into_output(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    output = tokenizer.encode(" Hello there", add_special_tokens=False)
    deltas, _ = _stream(tokenizer, prompt, output)
    assert "".join(deltas) == " Hello there"


class _CountingTokenizer:
    """Records how many ids each decode call gets, to check the window stays small."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.longest = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_cost_per_step_does_not_grow() -> None:
    inner = _tiny_tokenizer()
    counting = _CountingTokenizer(inner)
    end = inner.convert_tokens_to_ids(SPECIAL_TOKENS[2])
    output = inner.encode("The quick brown fox 🦊 jumps. " * 200, add_special_tokens=False)
    output += [end] * 100  # a long run of tokens that decode to nothing
    output += inner.encode(" done", add_special_tokens=False)
    prompt = inner.encode("a long prompt " * 100, add_special_tokens=False)
    deltas, _ = _stream(counting, prompt, output)
    assert "".join(deltas) == inner.decode(output)
    assert counting.longest <= 40  # a few tokens of context, not the whole sequence
