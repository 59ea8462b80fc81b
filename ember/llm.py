"""The offline API, shaped like vLLM's `LLM` so code can switch without rewriting."""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from ember.config import EngineConfig
from ember.engine.engine import Engine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

Prompt = str | dict[str, Any]
Message = dict[str, str]


class LLM:
    """Load a model once, then `generate` / `chat` over batches of prompts.

    Keyword arguments are EngineConfig fields (dtype, max_model_len, max_num_seqs,
    max_num_batched_tokens, kv_cache_memory, gpu_memory_utilization, load_format, ...).
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. A prompt is a string or
        {"prompt_token_ids": [...]}; sampling_params is one for all or one per prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = self._per_prompt(sampling_params, len(prompts))
        ids = [self._add(p, sp) for p, sp in zip(prompts, params)]
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the model's own chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt, **(chat_template_kwargs or {}))
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[Message], add_generation_prompt: bool = True,
                            **kwargs: Any) -> dict[str, Any]:
        tok = self._tokenizer()
        text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                       tokenize=False, **kwargs)
        # The template already holds the special tokens it wants (e.g. a BOS).
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt, yielding text as it is decoded (used by the CLI)."""
        rid = self._add(prompt, sampling_params or SamplingParams())
        shown = 0
        while True:
            for out in self.engine.step():
                if out.request_id != rid:
                    continue
                text = out.outputs[0].text
                if len(text) > shown:
                    yield text[shown:]
                    shown = len(text)
                if out.finished:
                    return
            if not self.engine.has_unfinished_requests():
                return

    # ---- helpers --------------------------------------------------------------------------
    def _tokenizer(self):
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]} prompts")
        return self.engine.tokenizer

    @staticmethod
    def _per_prompt(sp, n: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        if len(sp) != n:
            raise ValueError(f"{len(sp)} sampling params for {n} prompts")
        return list(sp)

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        if isinstance(prompt, str):
            text, ids = prompt, self._tokenizer().encode(prompt)
        elif "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
        elif "prompt" in prompt:
            text, ids = prompt["prompt"], self._tokenizer().encode(prompt["prompt"])
        else:
            raise ValueError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [...]}")
        rid = str(next(self._ids))
        self.engine.add_request(rid, ids, params, prompt=text)
        return rid

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        while pending:
            outputs = self.engine.step()
            if not outputs and not self.engine.has_unfinished_requests():
                raise RuntimeError(f"engine went idle with {len(pending)} requests unfinished")
            for out in outputs:
                if out.finished and out.request_id in pending:
                    pending.discard(out.request_id)
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]
