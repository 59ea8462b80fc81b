"""The one verifier every proposer shares: speculative rejection sampling, batched.

For a request with draft tokens d_0..d_{k-1} drawn from draft distributions q_0..q_{k-1},
the target scores the k+1 positions in one forward and yields its sampling
distributions p_0..p_k (after penalties, temperature, top-k/top-p/min-p: see
`ember.layers.sampler.sampling_probs`). Walking the chain:

- accept d_j with probability min(1, p_j(d_j) / q_j(d_j));
- at the first rejected position j emit a token drawn from norm(max(p_j - q_j, 0)) and stop;
- when all k are accepted emit a bonus token drawn from p_k.

Every emitted token is then distributed exactly as the target would have sampled it
(Leviathan et al. 2023; Chen et al. 2023). Greedy rows need no special case: their p is
one-hot at the argmax, so acceptance is an exact match and the correction / bonus token
is the argmax. A deterministic proposer (n-gram) passes `draft_probs=None`: q is one-hot
at the draft token, so acceptance is "u < p(d)" and the residual is p with d removed.

The draft is a flat chain now. A tree (EAGLE) is the same walk over a node's children:
a `parents` index per draft node would replace "position j follows j-1", and the
residual at a node subtracts the q mass of the children already rejected there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VerifyOutput:
    """Per request: the tokens to append (1..k+1 of them) and how many drafts were accepted."""

    token_ids: list[list[int]]
    num_accepted: list[int]


def _noise(shape: tuple[int, ...], generators: list[torch.Generator | None],
           device: torch.device, kind: str) -> torch.Tensor:
    """Uniform [0, 1) or Exp(1) noise, one row per request; a seeded row draws its row from
    its own generator only, so its tokens don't depend on the rest of the batch."""
    out = torch.empty(shape, device=device)
    draw = (lambda t, g=None: t.uniform_(generator=g)) if kind == "uniform" else \
        (lambda t, g=None: t.exponential_(generator=g))
    draw(out)
    for i, g in enumerate(generators):
        if g is not None:
            draw(out[i], g)
    return out


def sample_from(probs: torch.Tensor,  # [B, vocab], rows sum to 1 (or any positive scale)
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row by the exponential race argmax(p / E), E ~ Exp(1). Returns [B] long."""
    e = _noise(tuple(probs.shape), generators, probs.device, "exp")
    e.clamp_(min=torch.finfo(e.dtype).tiny)
    return (probs / e).argmax(dim=-1)


def rejection_sample(
    target_probs: torch.Tensor,        # [B, K+1, vocab] fp32 target sampling distributions
    draft_token_ids: torch.Tensor,     # [B, K] long, padded past num_drafts
    num_drafts: list[int],             # [B] drafts per request, 0..K
    draft_probs: torch.Tensor | None,  # [B, K, vocab] q, or None: q one-hot at the draft
    generators: list[torch.Generator | None],  # [B] per-request generator (seeded) or None
) -> VerifyOutput:
    """Verify a batch of draft chains; see the module docstring for the rule.

    A seeded request draws K uniforms then one vocabulary row of exponentials from its
    generator per call, so its output is reproducible given the same drafts.
    """
    b, k1, _ = target_probs.shape
    k = k1 - 1
    dev = target_probs.device
    if b == 0:
        return VerifyOutput([], [])
    rows = torch.arange(b, device=dev)
    n_drafts = torch.tensor(num_drafts, device=dev)  # [B]
    if k > 0:
        d = draft_token_ids[:, :k].to(dev)  # [B, K]
        p_d = target_probs[:, :k].gather(2, d[..., None]).squeeze(-1)  # [B, K]
        if draft_probs is None:
            q_d = torch.ones_like(p_d)
        else:
            q_d = draft_probs.gather(2, d[..., None]).squeeze(-1)  # [B, K]
        u = _noise((b, k), generators, dev, "uniform")  # [B, K]
        # u < p/q  <=>  u * q < p; with u in [0, 1) this accepts surely when p >= q and
        # never when p == 0 (q(d) > 0 because d was drawn from q).
        accept = u * q_d < p_d
        accept &= torch.arange(k, device=dev)[None, :] < n_drafts[:, None]
        n_acc = accept.long().cumprod(dim=1).sum(dim=1)  # [B] leading accepts
    else:
        d = torch.zeros((b, 0), dtype=torch.long, device=dev)
        n_acc = torch.zeros(b, dtype=torch.long, device=dev)

    p_n = target_probs[rows, n_acc]  # [B, vocab] target at the first unaccepted position
    rejected = n_acc < n_drafts  # [B]; False: all accepted, the bonus comes from p_k
    if k > 0:
        j = n_acc.clamp(max=k - 1)
        if draft_probs is None:
            q_n = torch.zeros_like(p_n).scatter_(1, d[rows, j][:, None], 1.0)
        else:
            q_n = draft_probs[rows, j]  # [B, vocab]
        resid = (p_n - q_n).clamp_(min=0.0)
        # Rounding can leave no mass where p and q (almost) coincide; p itself is then the
        # residual's limit.
        empty = resid.sum(dim=-1, keepdim=True) <= 0
        resid = torch.where(empty, p_n, resid)
        dist = torch.where(rejected[:, None], resid, p_n)
    else:
        dist = p_n
    last = sample_from(dist, generators)  # [B]

    n_acc_l = n_acc.tolist()
    d_l = d.tolist()
    last_l = last.tolist()
    tokens = [d_l[i][:n_acc_l[i]] + [last_l[i]] for i in range(b)]
    return VerifyOutput(tokens, n_acc_l)


def greedy_verify(best: list[list[int]],   # [B][K + 1] the target's argmax at each position
                  drafts: list[list[int]]) -> VerifyOutput:
    """rejection_sample's one-hot case, on the host: a greedy target accepts the drafts
    that equal its argmax, up to the first that does not, then emits its argmax there
    (or the bonus argmax after k accepted drafts). One read-back, no noise drawn."""
    tokens, accepted = [], []
    for row, d in zip(best, drafts):
        n = 0
        while n < len(d) and d[n] == row[n]:
            n += 1
        tokens.append(list(d[:n]) + [row[n]])
        accepted.append(n)
    return VerifyOutput(tokens, accepted)
