"""Streaming token ids -> text, one step at a time, without broken characters.

Decoding each new token alone goes wrong twice over: a byte-level token may hold only part
of a UTF-8 character (an emoji is often split over 2-4 tokens), and some decoders need the
preceding token to know about spaces. So each step decodes a short window of recent ids
twice -- with and without the new ones -- and emits the difference, holding it back while
it ends in an incomplete character (U+FFFD). This is the prefix_offset / read_offset scheme
of Hugging Face text-generation-inference and vLLM; cost per step is O(window), not
O(sequence).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens kept as left context for the first decode: enough for any decoder that
# looks back (sentencepiece spaces), few enough to be cheap.
_PROMPT_CONTEXT = 5
# After this many ids in the window without any new text (e.g. a run of skipped special
# tokens) the window is moved on anyway, so a step never costs more than this.
_MAX_STALLED_IDS = 32

_REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a request's output ids into text deltas as they are generated.

    Concatenating every `append` result and the final `flush()` gives exactly
    `tokenizer.decode(output_ids)` for byte-level BPE tokenizers; no delta ever ends in a
    partial character.
    """

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only the window is kept: ids[prefix_offset:read_offset] is already emitted text
        # used as context, ids[read_offset:] is not emitted yet.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []  # deltas emitted so far; joined lazily by `text`

    def append(self, token_ids: Sequence[int]) -> str:
        """Add newly generated ids; return the text they complete (possibly "")."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        complete = not full_text.endswith(_REPLACEMENT_CHAR)
        delta = ""
        if complete and len(full_text) > len(prefix_text):
            delta = full_text[len(prefix_text) :]
            self._advance()
        elif complete and len(self._ids) - self._prefix_offset > _MAX_STALLED_IDS:
            self._advance()
        self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """Emit whatever is still held back (call once, when the request finishes). Text
        that never became a whole character is emitted as U+FFFD, as `decode` would."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        delta = full_text[len(prefix_text) :]
        self._advance()
        self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _advance(self) -> None:
        """Everything decoded so far is emitted: the unread ids become the new context."""
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
