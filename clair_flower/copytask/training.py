"""Local LoRA fine-tuning and evaluation on the copy task.

``train_local`` trains only LoRA factors (both, or just ``A`` / just ``B`` for RoLoRA and
FFA-LoRA); everything else stays frozen. ``evaluate`` scores the y positions only, using the
same causal shift as the Hugging Face loss (logits at ``t - 1`` predict ``labels[t]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .task import IGNORE_INDEX, ClientData, attention_mask

_TRAINABLE = ("both", "A", "B")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Local training: ``local_steps`` AdamW steps on mini-batches drawn with replacement
    from the client's small train set (a fixed step count keeps rounds comparable).

    The defaults are tuned so that a client alone over-fits its 16 samples within a few
    rounds while FedAvg of 10 clients keeps improving (see tests/.../test_collaboration.py).
    """

    local_steps: int = 20
    lr: float = 2e-2
    batch_size: int = 16
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_threads: int | None = 1
    optimizer: str = "adamw"
    """``"adamw"`` or ``"sgd"`` (momentum ``momentum``). Adam rescales every coordinate, so it
    moves the LoRA factors along directions whose gradients are tiny; SGD keeps the update in
    the span the gradients share (docs/identification.md measures what that does to CLAIR)."""
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr <= 0 or self.local_steps < 0 or self.batch_size < 1:
            raise ValueError(f"need lr > 0, local_steps >= 0, batch_size >= 1, got {self.lr}, "
                             f"{self.local_steps}, {self.batch_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


def set_trainable(model: torch.nn.Module, trainable: str = "both") -> list[torch.nn.Parameter]:
    """Freeze everything but the selected LoRA factors; return the trainable parameters."""
    if trainable not in _TRAINABLE:
        raise ValueError(f"trainable must be one of {_TRAINABLE}, got {trainable!r}")
    wanted = ("lora_A", "lora_B") if trainable == "both" else (f"lora_{trainable}",)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(f".{w}." in name for w in wanted))
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError("model has no LoRA parameters to train (wrap it with wrap_lora)")
    return params


class _Threads:
    """Temporarily set torch's intra-op threads (one client per core under Ray)."""

    def __init__(self, n: int | None) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The local optimiser named by ``cfg.optimizer``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(
    model: torch.nn.Module,
    data: ClientData,
    cfg: TrainConfig | None = None,
    seed: int = 0,
    trainable: str = "both",
) -> dict[str, float]:
    """Fine-tune the selected LoRA factors on ``data``'s train split.

    Returns ``{"train-loss": mean loss over the steps, "num-examples": n,
    "train-token-acc": token accuracy on the whole train split at the end,
    "train-token-acc-q3": the same after three quarters of the steps}``. The last two tell
    whether local training has converged (a plateau over the last quarter), which the
    experiments check before they compare methods. Deterministic in ``seed`` (batches drawn
    from a seeded generator; torch RNG forked for dropout).
    """
    cfg = cfg or TrainConfig()
    params = set_trainable(model, trainable)
    opt = make_optimizer(params, cfg)
    n = data.num_train
    rng = np.random.default_rng([seed, 4242])
    losses = []
    q3 = (3 * cfg.local_steps) // 4
    acc_q3 = _train_token_acc(model, data, cfg) if q3 == 0 else float("nan")
    model.train()
    with _Threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(cfg.local_steps):
            if step == q3 and step > 0:
                acc_q3 = _train_token_acc(model, data, cfg)
                model.train()
            idx = torch.from_numpy(rng.integers(0, n, size=min(cfg.batch_size, n)))
            x, y = data.train_inputs[idx], data.train_labels[idx]
            loss = model(input_ids=x, attention_mask=attention_mask(x), labels=y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return {"train-loss": float(np.mean(losses)) if losses else float("nan"), "num-examples": float(n),
            "train-token-acc": _train_token_acc(model, data, cfg), "train-token-acc-q3": acc_q3}


def _train_token_acc(model: torch.nn.Module, data: ClientData, cfg: TrainConfig) -> float:
    """Token accuracy on the client's whole train split (in eval mode: no dropout)."""
    return evaluate(model, data.train_inputs, data.train_labels, num_threads=cfg.num_threads)["token-acc"]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
    num_threads: int | None = None,
) -> dict[str, float]:
    """Loss, token accuracy and exact-sequence accuracy on the labelled (y) positions.

    Token accuracy counts y tokens only; exact accuracy is the fraction of samples whose
    whole target is right (teacher-forced greedy prediction at every y position).
    """
    model.eval()
    total_loss = total_tok = correct_tok = exact = 0.0
    with _Threads(num_threads):
        for start in range(0, inputs.shape[0], batch_size):
            x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
            logits = model(input_ids=x, attention_mask=attention_mask(x)).logits[:, :-1].float()
            target = y[:, 1:]
            mask = target != IGNORE_INDEX
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            hit = (logits.argmax(-1) == target) & mask
            total_loss += float(loss)
            total_tok += float(mask.sum())
            correct_tok += float(hit.sum())
            exact += float(((hit | ~mask).all(dim=1) & mask.any(dim=1)).sum())
    n = max(1, inputs.shape[0])
    tok = max(1.0, total_tok)
    return {"loss": total_loss / tok, "token-acc": correct_tok / tok, "exact-acc": exact / n}
