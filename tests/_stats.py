"""Statistics shared by the distribution tests (sampler, rejection sampler)."""
from __future__ import annotations

import torch


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of `observed` counts against `expected_probs`.

    Categories with zero expected probability must have zero counts (else p = 0).
    """
    expected_probs = expected_probs.double().cpu()
    observed = observed.cpu()
    support = expected_probs > 0
    if observed[~support].sum() > 0:
        return 0.0
    n = observed.sum()
    exp = expected_probs[support] * n
    stat = ((observed[support] - exp) ** 2 / exp).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))
