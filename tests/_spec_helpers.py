"""Pieces the speculative-decoding tests share: the mixed-batch sampling parameters, a
recorder of what kinds of requests each engine step ran together, a controller stand-in
that forces k per step, a recorder of the steps a module or method ran on, and random MTP
weights for a tiny target."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ember import LLM, SamplingParams

if TYPE_CHECKING:
    from conftest import TinyCheckpoint


def mixed_batch_params(n: int) -> list[SamplingParams]:
    """Greedy, 24 tokens each; every third request asks for prompt logprobs, which never
    speculates, so speculating and ordinary requests share steps."""
    return [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                           prompt_logprobs=1 if i % 3 == 0 else None) for i in range(n)]


def record_step_kinds(llm: LLM, kind: Callable) -> list[frozenset]:
    """Wrap the runner so each executed step appends the set of kind(s) of its scheduled
    requests; returns the list it fills."""
    seen: list[frozenset] = []
    launch = llm.engine.runner.launch

    def recording(batch, *args, **kwargs):
        seen.append(frozenset(kind(s) for s in batch.scheduled))
        return launch(batch, *args, **kwargs)
    llm.engine.runner.launch = recording
    return seen


class ForcedK:
    """Stands in for the adaptive controller: k per engine step from `pattern` (cycled);
    `ks` holds the k of every step so far (the engine asks once per step)."""

    def __init__(self, pattern: list[int]) -> None:
        self.pattern = pattern
        self.ks: list[int] = []

    def choose(self, batch_size: int) -> int:
        k = self.pattern[len(self.ks) % len(self.pattern)]
        self.ks.append(k)
        return k

    def observe_draft(self, *args, **kw) -> None:
        pass

    observe_acceptance = observe_step = observe_applied = observe_draft


def force_k(llm: LLM, pattern: list[int]) -> ForcedK:
    ctl = ForcedK(pattern)
    llm.engine.speculator.controller = ctl
    return ctl


def steps_of_forwards(module: torch.nn.Module, ctl: ForcedK) -> list[int]:
    """The step index (into ctl.ks) of every forward of `module` from now on."""
    steps: list[int] = []
    module.register_forward_hook(lambda *_: steps.append(len(ctl.ks) - 1))
    return steps


def steps_of_calls(obj: object, method: str, ctl: ForcedK) -> list[int]:
    """The step index (into ctl.ks) of every call of obj.method from now on."""
    steps: list[int] = []
    inner = getattr(obj, method)

    def recording(*args, **kw):
        steps.append(len(ctl.ks) - 1)
        return inner(*args, **kw)
    setattr(obj, method, recording)
    return steps


def random_mtp_tensors(target: TinyCheckpoint, seed: int) -> dict[str, torch.Tensor]:
    """One MTP layer's tensors (names inside the layer): a random decoder layer, norms away
    from 1 so that each one matters, a random eh_proj."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    torch.manual_seed(seed)
    cfg = target.config
    h = cfg.hidden_size
    layer = LlamaDecoderLayer(cfg, layer_idx=0)
    for w in layer.parameters():
        w.data.normal_(0.0, 0.1) if w.dim() == 2 else w.data.uniform_(0.5, 1.5)
    tensors = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{name}.weight"] = torch.empty(h).uniform_(0.5, 1.5)
    tensors["eh_proj.weight"] = torch.randn(h, 2 * h) * 0.1
    return tensors
