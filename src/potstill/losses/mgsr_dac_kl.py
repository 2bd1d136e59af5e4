"""MGSR's token-level objective: the distribution-adaptive clipped KL (DAC-KL), a stateful logit objective.

Paper: Liu et al. 2024, "Multi-Granularity Semantic Revision for Large Language Model Distillation" (MGSR,
arXiv 2407.10068), the token level of its three. No official code; this is our reading of the method.

An LLM's next-token distribution is a few likely tokens and a very long tail. DAC-KL compares teacher and
student only on the teacher's "semantically dense" band: a small network g_φ reads the teacher's sorted
probabilities of a row and predicts two cut points in log-probability, an upper cut `hi` and a lower cut `lo`.
Vocabulary entries whose teacher log-probability lies between them, plus the row's target token, are kept;
both distributions are renormalised over the kept set and compared with KL. Per row, with m = max log p:

    (a, b) = g_φ(top-n sorted log p − m, m)                     (an MLP; detached input)
    hi     = m + 1 − softplus(a),   lo = hi − min_width − softplus(b)
    log w_i = log σ(k·(log p_i − lo)) + log σ(k·(hi − log p_i)),   log w_target = 0
    p̃ ∝ w·p,  q̃ ∝ w·q,   loss = KL(p̃ ‖ q̃) + c·max(0, min_mass − Σ w·p)

The band is soft (a sigmoid of sharpness k per nat on each side) so that φ gets a gradient; with lo = −∞ and
hi = +∞ every weight is exactly 1 and the loss is `forward_kl`. φ is trained with the student by the same loss.
Alone, that would shrink the band to where the student already agrees, so two guards keep it non-degenerate:
the band is never narrower than `min_width` nats (by construction), and a coverage penalty (weight c =
`coverage_weight`) charges any row whose kept teacher mass Σ w·p falls below `min_mass`. The network starts
(zero last layer) at hi ≈ m + 0.95 and lo ≈ m − 9.05: the whole head kept, the tail below p_max·1e-4 cut.

Defaults (ours: the paper gives no numbers we could check): top_n 64, hidden 32, sharpness 4, min_width 2,
min_mass 0.8, coverage_weight 10, temperature 1. The target token comes from the batch's `targets` (the loop
passes them as `target_ids`; -100 rows are not counted); without them no token is forced in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._rows import check_reduction, check_temperature, resolve_mask

_LOG_FLOOR = -30.0  # the network's inputs: sorted log-probs below this count as this


def band_log_weights(teacher_log_probs: Tensor, lower: Tensor, upper: Tensor, sharpness: float,
                     target_ids: Tensor | None = None) -> Tensor:
    """log w per entry of `(n, C)` teacher log-probs for per-row cuts `lower`, `upper` `(n,)` (±inf allowed):
    log σ(k(log p − lower)) + log σ(k(upper − log p)), 0 at each row's `target_ids` entry."""
    lo, hi = lower[:, None], upper[:, None]
    log_w = F.logsigmoid(sharpness * (teacher_log_probs - lo)) + F.logsigmoid(sharpness * (hi - teacher_log_probs))
    if target_ids is not None:
        log_w = log_w.scatter(-1, target_ids[:, None], 0.0)
    return log_w


def clipped_kl_rows(student_logits: Tensor, teacher_logits: Tensor, lower: Tensor, upper: Tensor, *,
                    sharpness: float = 4.0, target_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(KL(p̃ ‖ q̃), kept teacher mass Σ w·p) per row of `(n, C)` logits, float32; p̃, q̃ renormalised over the
    soft band [lower, upper] of log p (plus the target token)."""
    log_p = torch.log_softmax(teacher_logits.float(), -1)
    log_q = torch.log_softmax(student_logits.float(), -1)
    log_w = band_log_weights(log_p, lower, upper, sharpness, target_ids)
    kept_p = log_p + log_w
    lse_p = torch.logsumexp(kept_p, -1)
    lse_q = torch.logsumexp(log_q + log_w, -1)
    p_tilde = torch.exp(kept_p - lse_p[:, None])
    # log p̃ − log q̃ = (log p − log q) − lse_p + lse_q: the weights cancel; 0·(−inf) entries count as 0
    diff = (log_p - log_q).masked_fill(p_tilde == 0, 0.0)
    kl = (p_tilde * diff).sum(-1) - lse_p + lse_q
    return kl, lse_p.exp()


def dac_kl(student_logits: Tensor, teacher_logits: Tensor, *, lower: Tensor, upper: Tensor,
           sharpness: float = 4.0, target_ids: Tensor | None = None, temperature: float = 1.0,
           mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """DAC-KL for given cut points (`lower`, `upper`: log-probabilities, one per row of the leading axes, or
    scalars): the clipped KL without the learned network or the coverage term. `lower=-inf, upper=inf` is
    `forward_kl`. Reduction as the other divergences ("mean" over counted rows, "sum", "none")."""
    check_reduction(reduction)
    temperature = check_temperature(temperature)
    rows = student_logits.shape[:-1]
    s, t = student_logits.reshape(-1, student_logits.shape[-1]), teacher_logits.reshape(-1, teacher_logits.shape[-1])
    lo = torch.as_tensor(lower, dtype=torch.float32).expand(rows).reshape(-1)
    hi = torch.as_tensor(upper, dtype=torch.float32).expand(rows).reshape(-1)
    ids = None if target_ids is None else target_ids.reshape(-1).clamp(min=0)
    values, _ = clipped_kl_rows(s / temperature, t / temperature, lo, hi, sharpness=sharpness, target_ids=ids)
    keep = resolve_mask(rows, mask, None, values.device)
    return _reduce(values.reshape(rows), keep, reduction)


def _reduce(values: Tensor, keep: Tensor | None, reduction: str) -> Tensor:
    if keep is not None:
        values = values.masked_fill(~keep, 0.0)
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    return total / (keep.sum().clamp(min=1) if keep is not None else max(values.numel(), 1))


class DACKL(nn.Module):
    """MGSR's DAC-KL with its learned clipping network (`potstill objectives`: dac_kl); call it like a loss.

    `forward(student_logits, teacher_logits, *, mask=None, labels=None, target_ids=None, reduction="mean")` on
    `[..., V]` logits: the clipped KL plus the coverage penalty per counted row (see the module docstring).
    The clipping network's parameters train with the student (the loop adds objective parameters to the
    optimizer) and are checkpointed with the run. `log_values()`: the last call's mean band width (nats) and
    kept teacher mass. `chunk_size` rows at a time bound the float32 copies of the vocabulary."""

    batch_fields = {"targets": "target_ids"}  # what the training loop passes from the batch

    def __init__(self, *, top_n: int = 64, hidden: int = 32, sharpness: float = 4.0, min_width: float = 2.0,
                 min_mass: float = 0.8, coverage_weight: float = 10.0, temperature: float = 1.0,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        for name, value, low in (("top_n", top_n, 1), ("hidden", hidden, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not sharpness > 0 or not min_width >= 0 or not coverage_weight >= 0:
            raise ValueError(f"sharpness must be > 0 and min_width, coverage_weight >= 0, got {sharpness!r}, "
                             f"{min_width!r}, {coverage_weight!r}")
        if not 0.0 <= min_mass <= 1.0:
            raise ValueError(f"min_mass must be in [0, 1], got {min_mass!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.top_n, self.sharpness, self.min_width = top_n, float(sharpness), float(min_width)
        self.min_mass, self.coverage_weight = float(min_mass), float(coverage_weight)
        self.temperature, self.chunk_size = check_temperature(temperature), chunk_size
        cut_layer = nn.Linear(hidden, 2)
        nn.init.zeros_(cut_layer.weight)
        with torch.no_grad():
            cut_layer.bias.copy_(torch.tensor([-3.0, 7.05]))  # hi ≈ m + 0.95, lo ≈ m − 9.05
        self.clipper = nn.Sequential(nn.Linear(top_n + 1, hidden), nn.GELU(), cut_layer)
        self._last = {"band_width": 0.0, "kept_mass": 0.0}

    def cuts(self, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor]:
        """(lower, upper) cut points in log-probability for `(n, V)` teacher log-probs (detached input)."""
        n = min(self.top_n, teacher_log_probs.shape[-1])
        top = teacher_log_probs.detach().topk(n, -1).values.clamp(min=_LOG_FLOOR)
        peak = top[:, :1]
        rel = torch.cat([top - peak, top.new_full((top.shape[0], self.top_n - n), _LOG_FLOOR)], -1)
        a, b = self.clipper(torch.cat([rel, peak], -1) / 10.0).unbind(-1)
        upper = peak.squeeze(-1) + 1.0 - F.softplus(a)
        return upper - self.min_width - F.softplus(b), upper

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, *, mask: Tensor | None = None,
                labels: Tensor | None = None, target_ids: Tensor | None = None, reduction: str = "mean") -> Tensor:
        check_reduction(reduction)
        rows = student_logits.shape[:-1]
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"student and teacher logits must have the same shape, got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        keep = resolve_mask(rows, mask, labels, student_logits.device)
        vocab = student_logits.shape[-1]
        s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        ids = target_ids if target_ids is not None else labels
        ids = None if ids is None else ids.reshape(-1).to(s.device).clamp(min=0)
        index = keep.reshape(-1).nonzero().squeeze(-1) if keep is not None else None
        if index is not None:
            s, t = s[index], t[index]
            ids = None if ids is None else ids[index]
        values, widths, masses = [], [], []
        step = self.chunk_size or max(s.shape[0], 1)
        for start in range(0, s.shape[0], step):
            sc = s[start:start + step].float() / self.temperature
            tc = t[start:start + step].float() / self.temperature
            lower, upper = self.cuts(torch.log_softmax(tc, -1))
            kl, mass = clipped_kl_rows(sc, tc, lower, upper, sharpness=self.sharpness,
                                       target_ids=None if ids is None else ids[start:start + step])
            values.append(kl + self.coverage_weight * torch.relu(self.min_mass - mass))
            widths.append((upper - lower).detach())
            masses.append(mass.detach())
        flat = torch.cat(values) if values else s.new_zeros(0, dtype=torch.float32)
        if widths:
            self._last = {"band_width": float(torch.cat(widths).mean()), "kept_mass": float(torch.cat(masses).mean())}
        if reduction == "none":
            out = flat.new_zeros(rows.numel())
            out = out.index_copy(0, index, flat) if index is not None else flat
            return out.reshape(rows)
        total = flat.sum()
        return total if reduction == "sum" else total / max(flat.numel(), 1)

    def on_optimizer_step(self, loss: float, step: int, total_steps: int) -> None:
        """Nothing moves on a schedule: the clipping network learns through the optimizer."""

    def log_values(self) -> dict[str, float]:
        """The last call's mean band width (hi − lo, nats) and mean kept teacher mass."""
        return dict(self._last)
