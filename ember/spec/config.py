"""`--speculative-config`: which proposer, how many draft tokens, and adaptive speculation."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from typing import Any

from ember.spec.tree import TreeShape

logger = logging.getLogger("ember")

METHODS = ("none", "ngram", "draft", "mtp", "eagle", "peagle")
TREE_METHODS = ("eagle", "peagle")


@dataclass
class SpeculativeConfig:
    """Names follow vLLM's --speculative-config keys where they exist.

    method: none | ngram (prompt lookup) | draft (a smaller model sharing the tokenizer) |
        mtp (a multi-token-prediction module on the target's hidden states) | eagle (an
        EAGLE-3 drafter on the target's hidden states) | peagle (P-EAGLE: all draft
        positions from one drafter forward).
    num_speculative_tokens: the most draft tokens per request per step (k); with a tree,
        its greatest depth.
    model: the draft model (HF folder) for method "draft"; for "mtp", an `ember train-mtp`
        folder, or omitted when the target checkpoint carries its own MTP layer; the
        drafter folder (published EAGLE-3 layout, or `ember train-eagle` output) for eagle
        / peagle.
    tree: eagle / peagle only: None drafts chains; {"top_k": children per expanded node,
        "budget": most nodes, "depth": defaults to num_speculative_tokens} drafts EAGLE-2
        dynamic trees, verified in one target forward with a tree attention mask;
        "device_greedy" (peagle, default true): greedy requests' trees are chosen, verified
        and kept on the device with one read-back a step (ember.spec.device_tree).
    adaptive: choose k each step from the measured acceptance and batch size (0 = off
        at large batches); False always drafts num_speculative_tokens.
    prompt_lookup_min / prompt_lookup_max: n-gram sizes the ngram proposer matches.
    """

    method: str = "none"
    num_speculative_tokens: int = 3
    model: str | None = None
    adaptive: bool = True
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    tree: Any = None   # dict from the user -> TreeShape

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method != "none" and self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        if self.method in ("draft",) + TREE_METHODS and not self.model:
            raise ValueError(f'speculative method "{self.method}" needs "model": a draft model folder')
        if self.tree is not None and not isinstance(self.tree, TreeShape):
            if self.method not in TREE_METHODS:
                raise ValueError(f'"tree" needs method eagle or peagle, not {self.method!r}')
            if not isinstance(self.tree, dict) or set(self.tree) - {"depth", "top_k", "budget", "device_greedy"}:
                raise ValueError('"tree" takes {"depth", "top_k", "budget", "device_greedy"}')
            shape = dict(self.tree)
            shape.setdefault("depth", self.num_speculative_tokens)
            self.num_speculative_tokens = shape["depth"]
            shape.setdefault("budget", max(shape["depth"], 4 * shape["depth"]))
            self.tree = TreeShape(**shape, level_slots=self.method == "eagle")
            most = self.tree.max_nodes(self.tree.depth)
            if self.tree.budget > most:   # budget_for caps it: say so rather than silently
                logger.warning("tree budget %d is more than a depth-%d, top-%d expansion makes; trees "
                               "hold at most %d nodes", self.tree.budget, self.tree.depth, self.tree.top_k, most)
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig:
        """From a dict, a JSON string (the CLI flag), an instance, or None (off)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("the speculative config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative config keys {unknown}; known: {sorted(known)}")
        return cls(**value)
