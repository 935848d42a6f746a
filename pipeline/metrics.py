"""Pure metric functions for `kdpipe eval`: no I/O, no models, no state.

Masked-LM metrics come in two layers. The per-batch functions take logits at the masked positions
only, (N, V), and return *sums* (counts of correct positions, summed cross-entropy, summed KL), so
a held-out set of any size is scored in batches and the sums are added up; the final numbers are
ratios of those sums (`MlmSums.result`). Classification metrics take label sequences.

    teacher masked-token accuracy: topk_correct(z_t, y, 1) / N
    perplexity:                    exp(sum CE / N), CE over masked positions only
    agreement with the teacher:    mean [argmax z_s == argmax z_t]
    KL(teacher || student) at T:   mean_n sum_v p_t(v) (log p_t(v) - log p_s(v)), p = softmax(z / T)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------ masked-LM, per batch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows of (N, V) `logits` rank their label (N,) among the top k."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices  # (N, k)
    return int((top == labels[:, None]).any(dim=-1).sum())


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over rows of -log softmax(logits)[label], in float64 for a stable running sum."""
    return float(F.cross_entropy(logits.double(), labels, reduction="sum"))


def agreement_count(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> int:
    """Rows (N, V) where the student's top-1 token is the teacher's top-1 token."""
    return int((teacher_logits.argmax(-1) == student_logits.argmax(-1)).sum())


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Sum over rows (N, V) of KL(p_teacher || p_student) at `temperature`, in nats."""
    log_p = F.log_softmax(teacher_logits.double() / temperature, dim=-1)  # (N, V)
    log_q = F.log_softmax(student_logits.double() / temperature, dim=-1)  # (N, V)
    return float((log_p.exp() * (log_p - log_q)).sum())


def perplexity(ce_sum: float, count: int) -> float:
    """exp of the mean cross-entropy; inf when the mean overflows."""
    if count <= 0:
        raise ValueError("perplexity of zero positions")
    mean = ce_sum / count
    return math.exp(mean) if mean < 700 else math.inf


ROW_CHUNK = 512


@dataclass
class MlmSums:
    """Running sums over masked positions; `add` one batch at a time, `result` at the end."""

    count: int = 0
    top1: int = 0
    top5: int = 0
    ce: float = 0.0
    agree: int = 0
    kl: float = 0.0
    compared: bool = False  # whether teacher logits were given (a student)

    def add(self, logits: torch.Tensor, labels: torch.Tensor,
            teacher_logits: torch.Tensor | None = None) -> None:
        """logits (N, V) and labels (N,) at masked positions; teacher_logits (N, V) for a student.

        Rows are taken `ROW_CHUNK` at a time, so the float64 temporaries stay small with a
        30k-token vocabulary."""
        self.count += int(labels.numel())
        for i in range(0, labels.numel(), ROW_CHUNK):
            z, y = logits[i:i + ROW_CHUNK], labels[i:i + ROW_CHUNK]
            self.top1 += topk_correct(z, y, 1)
            self.top5 += topk_correct(z, y, 5)
            self.ce += cross_entropy_sum(z, y)
            if teacher_logits is not None:
                zt = teacher_logits[i:i + ROW_CHUNK]
                self.agree += agreement_count(zt, z)
                self.kl += kl_sum(zt, z)
        self.compared = self.compared or teacher_logits is not None

    def result(self) -> dict[str, float | int | None]:
        n = self.count
        return {
            "masked_tokens": n,
            "top1_accuracy": self.top1 / n,
            "top5_accuracy": self.top5 / n,
            "mean_cross_entropy": self.ce / n,
            "perplexity": perplexity(self.ce, n),
            "teacher_agreement": self.agree / n if self.compared else None,
            "kl_teacher_student": self.kl / n if self.compared else None,
        }


# ---------------------------------------------------------------------------- classification


def accuracy(predictions: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    """Share of positions where prediction equals gold."""
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} labels")
    if not gold:
        raise ValueError("accuracy of an empty set")
    return sum(p == g for p, g in zip(predictions, gold)) / len(gold)


def macro_f1(predictions: Sequence[Hashable], gold: Sequence[Hashable],
             labels: Sequence[Hashable] | None = None) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN).

    Classes are `labels` if given, else those that occur in gold or predictions (scikit-learn's
    default); a class with no gold and no predicted example has F1 0 (scikit-learn's
    zero_division=0), which is why the default leaves such classes out.
    """
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} labels")
    classes = list(labels) if labels is not None else sorted(set(gold) | set(predictions), key=str)
    if not classes:
        raise ValueError("macro-F1 of an empty set")
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(predictions, gold))
        fp = sum(p == c and g != c for p, g in zip(predictions, gold))
        fn = sum(p != c and g == c for p, g in zip(predictions, gold))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores)


def paired_delta_se(model: Sequence[Sequence[Hashable]], baseline: Sequence[Sequence[Hashable]],
                    gold: Sequence[Hashable]) -> float:
    """Standard error of accuracy(model) - accuracy(baseline) scored on the same examples.

    `model` and `baseline` hold one prediction list per fine-tuning seed. Each example's
    correctness is averaged over a model's seeds, d_i is the model's minus the baseline's, and the
    s.e. is sd(d) / sqrt(n). Pairing cancels what the two share (which examples are hard), which
    the unpaired sqrt(2 p (1 - p) / n) counts twice: for two similar students it is several times
    smaller, and it is what can tell a 0.3-point gap from noise.
    """
    n = len(gold)
    if n < 2:
        raise ValueError("a paired standard error needs at least 2 examples")

    def correct(runs: Sequence[Sequence[Hashable]]) -> list[float]:
        if not runs or any(len(r) != n for r in runs):
            raise ValueError(f"every seed's predictions must cover the {n} examples")
        return [sum(r[i] == gold[i] for r in runs) / len(runs) for i in range(n)]

    d = [a - b for a, b in zip(correct(model), correct(baseline))]
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


# ------------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float
    values: list[float] = field(default_factory=list)


def median_spread(values: Sequence[float]) -> Spread:
    """Median (mean of the middle two for an even count) with min and max."""
    if not values:
        raise ValueError("median of no values")
    s = sorted(float(v) for v in values)
    n = len(s)
    mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return Spread(mid, s[0], s[-1], [float(v) for v in values])


def retention(student: float, teacher: float) -> float | None:
    """The student's score as % of the teacher's (the paper's '97% of BERT'); None if teacher is 0."""
    if teacher == 0:
        return None
    return 100.0 * student / teacher


def speedup(student_seconds: float, teacher_seconds: float) -> float | None:
    """How many times faster the student is (teacher time / student time)."""
    if student_seconds <= 0:
        return None
    return teacher_seconds / student_seconds
