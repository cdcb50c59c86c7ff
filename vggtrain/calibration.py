"""How far a model's confidence can be trusted: expected calibration error (ECE), negative
log-likelihood and Brier score, summed on the device during an evaluation pass, and temperature
scaling (one scalar T fitted on the validation split's log-probabilities).

ECE is written here as a few tensor ops rather than taken from torchmetrics because it is in
every report and torchmetrics is not a core dependency; it follows torchmetrics'
`multiclass_calibration_error(n_bins=15, norm="l1")` exactly (tests/test_calibration.py checks
that): 15 equal-width bins [k/15, (k+1)/15) of the top-1 confidence, and a confidence of exactly
1.0 (where float32's softmax saturates on confident images) counted in a slot of its own.
ECE = sum over bins of |correct - sum of confidences| / images.

"Logits" here are the evaluation's log-probabilities: with test-time augmentation, the log of the
probabilities averaged over the views (evaluate.log_probs). Without it, log_softmax(z) / T gives
the same softmax as z / T, so T means what it means for logits; with it, the calibrated
probabilities are those averaged probabilities raised to 1/T and renormalised. A temperature is
therefore fitted per TTA mode and applied only to the kind of log-probabilities it was fitted on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vggtrain.numfmt import finite

N_BINS = 15
SLOTS = N_BINS + 1  # the 15 bins, then confidences of exactly 1.0 (torchmetrics' binning)
FLOATS = SLOTS + 2  # per slot: the sum of confidences; then the NLL sum, the Brier sum
INTS = 2 * SLOTS  # per slot: images wrong, images right


def new_sums(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 counts, float32 sums) to accumulate a pass's calibration into, on the device."""
    return (torch.zeros(INTS, device=device, dtype=torch.int64),
            torch.zeros(FLOATS, device=device))


def top1_confidence(logp: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(B,) the probability of each image's predicted class, from log-probabilities (B, C)."""
    return logp.gather(1, pred[:, None]).squeeze(1).exp()


def add_batch(sums: tuple[torch.Tensor, torch.Tensor], logp: torch.Tensor, y: torch.Tensor,
              pred: torch.Tensor, conf: torch.Tensor | None = None) -> None:
    """Add a batch's log-probabilities (B, C), labels and predicted classes to sums, in place,
    without a host sync. conf: top1_confidence(logp, pred), where the caller has it already
    (evaluate_split keeps it per image); computed here otherwise."""
    ints, floats = sums
    probs = logp.exp()
    if conf is None:
        conf = top1_confidence(logp, pred)
    conf = conf.clamp(max=1.0)  # exp can round above 1
    edges = torch.linspace(0, 1, N_BINS + 1, device=logp.device)
    # as torchmetrics: [k/15, (k+1)/15), then 1.0; clamped for a diverged model's NaN
    slot = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, N_BINS)
    ints += torch.bincount(slot * 2 + (pred == y), minlength=INTS)
    in_slot = slot[:, None] == torch.arange(SLOTS, device=logp.device)
    floats[:SLOTS] += (in_slot * conf[:, None]).sum(0)  # not scatter/index_add: deterministic on CUDA
    p_true = probs.gather(1, y[:, None]).squeeze(1)
    floats[SLOTS] += nn.functional.nll_loss(logp, y, reduction="sum")
    # Brier: sum over classes of (p - onehot)^2 = sum p^2 - 2 p_true + 1
    floats[SLOTS + 1] += (probs.square().sum(1) - 2 * p_true + 1).sum()


@dataclass(frozen=True)
class Calibration:
    """A pass's calibration; bins: per slot (15 bins, then confidence 1.0) images, right, and the
    sum of confidences."""

    ece: float
    nll: float
    brier: float
    images: list[int]
    correct: list[int]
    confidence_sum: list[float]

    def as_dict(self) -> dict[str, Any]:
        """ece, nll, brier, and the bins as report.json holds them."""
        bins = []
        for k, (n, c, s) in enumerate(zip(self.images, self.correct, self.confidence_sum, strict=True)):
            lower, upper = (k / N_BINS, (k + 1) / N_BINS) if k < N_BINS else (1.0, 1.0)
            bins.append({"lower": lower, "upper": upper, "images": n, "correct": c,
                         "mean_confidence": finite(s / n) if n else None})
        return {"ece": finite(self.ece), "nll": finite(self.nll), "brier": finite(self.brier),
                "bins": bins}


def summarize(ints: torch.Tensor, floats: torch.Tensor) -> Calibration:
    """The Calibration of sums read back to the host (the packed reads of evaluate_split)."""
    wrong_right = ints.view(SLOTS, 2)
    images, correct = wrong_right.sum(1), wrong_right[:, 1]
    conf = floats[:SLOTS].double()
    total = max(int(images.sum()), 1)
    ece = float((correct.double() - conf).abs().sum()) / total
    return Calibration(ece=ece, nll=float(floats[SLOTS]) / total, brier=float(floats[SLOTS + 1]) / total,
                       images=images.tolist(), correct=correct.tolist(), confidence_sum=conf.tolist())


def rescaled(logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """The log-probabilities of softmax(logp / T)."""
    return torch.log_softmax(logp / temperature, dim=1)


T_MIN, T_MAX = 0.05, 20.0  # the temperatures a fit may return


def fit_temperature(logp: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T minimising the mean NLL of softmax(logp / T) on these images (Guo et
    al. 2017): LBFGS with a strong-Wolfe line search over log T, so T stays positive. logp:
    (N, C) log-probabilities (or logits) on any device; a model already calibrated gets T = 1."""
    logp = logp.detach().float()
    log_t = torch.zeros(1, device=logp.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logp * torch.exp(-log_t), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # A split the model gets all right keeps lowering the NLL as T -> 0: bounded, so such a fit
    # stores a sharp but finite temperature rather than an arbitrary underflow.
    t = float(log_t.detach().clamp(math.log(T_MIN), math.log(T_MAX)).exp())
    return t if math.isfinite(t) else 1.0
