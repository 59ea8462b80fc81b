"""Speculation counters: drafted and accepted tokens, acceptance per draft position,
mean accepted length (tokens a speculating request gains per verification)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpecStats:
    num_verifications: int = 0        # (request, step) pairs that verified >= 1 draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0       # accepted + correction/bonus tokens of those verifications
    num_verified_tokens: int = 0      # draft tokens the target scored (tree nodes; = drafts for chains)
    drafted_at: list[int] = field(default_factory=list)    # per draft position j
    accepted_at: list[int] = field(default_factory=list)
    num_steps: int = 0                # engine steps
    num_spec_steps: int = 0           # engine steps with at least one draft
    k_histogram: dict[int, int] = field(default_factory=dict)   # chosen k -> steps

    def record(self, num_drafts: int, num_accepted: int, num_emitted: int,
               num_verified: int | None = None) -> None:
        """One request's verification: k drafts (a tree: its depth), how many accepted,
        tokens appended, and draft tokens the target scored (a tree: its nodes)."""
        while len(self.drafted_at) < num_drafts:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        self.num_verifications += 1
        self.num_draft_tokens += num_drafts
        self.num_verified_tokens += num_drafts if num_verified is None else num_verified
        self.num_accepted_tokens += num_accepted
        self.num_emitted_tokens += num_emitted
        for j in range(num_drafts):
            self.drafted_at[j] += 1
            self.accepted_at[j] += j < num_accepted

    def as_dict(self) -> dict[str, Any]:
        n = max(self.num_verifications, 1)
        return {
            "num_drafts": self.num_verifications,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_verified_tokens": self.num_verified_tokens,
            "acceptance_rate": self.num_accepted_tokens / max(self.num_draft_tokens, 1),
            # Tokens per verification: accepted drafts + the correction or bonus token.
            "mean_accepted_length": self.num_emitted_tokens / n,
            "acceptance_rate_per_position": [a / d if d else 0.0
                                             for a, d in zip(self.accepted_at, self.drafted_at)],
            "num_steps": self.num_steps,
            "num_spec_steps": self.num_spec_steps,
            "k_histogram": dict(sorted(self.k_histogram.items())),
        }
