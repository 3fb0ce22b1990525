"""The S-copy task: ``BOS x SEP y`` with loss on ``y``; benign clients copy (``y = x``).

Token ids: ``PAD=0, BOS=1, SEP=2``; content tokens are ``3 .. 3 + vocab_size - 1``. The
content arrays ``x``/``y`` handled by :func:`make_client_data` and by ``poison`` callbacks are
*content indices* ``0 .. vocab_size - 1``; :func:`encode` adds the offset.

Label convention (Hugging Face causal LM): ``labels`` is aligned with ``inputs`` (``labels[t]``
is the token *at* position ``t``, or ``-100``); the model shifts internally, so the logits at
position ``t - 1`` are scored against ``labels[t]``. Only the ``y`` positions carry labels.

Heterogeneity: each partition draws its own token distribution from a Dirichlet over the
*full* content vocabulary and its own sequence length; its train set is small (local-only
training is noisy) and its held-out test set is drawn from the same distribution, so tokens
it rarely trains on still appear at test time -- which is where collaboration helps.

Planted structure (``TaskConfig.planted``, off by default): the paper's model on a transformer.
A shared set ``T`` of ``planted_rank`` (r*) seen content tokens is drawn from ``cfg.seed``; every
partition copies every token but remaps the tokens of ``T`` by its own derangement of ``T`` (train
and test: it is that client's task). All partitions share one token distribution (``planted_mass``
on ``T``, the rest uniform), so benign clients differ from each other only in what they output for
tokens of ``T``: an r*-dimensional output subspace (the output embeddings of ``T``). A data attack
(``poison``) then acts on the remapped targets, i.e. mostly outside ``T``. Only the sequence length
still differs between partitions (the same draw as without planting, so lengths match).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

PAD, BOS, SEP = 0, 1, 2
NUM_SPECIAL = 3
IGNORE_INDEX = -100

PLANTED_BACKGROUNDS = ("all", "seen")

PoisonFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and seeds of the copy task.

    ``pretrain_vocab_fraction`` is the fraction of the content vocabulary (the lowest ids)
    the base model is pre-trained on; the rest is new to it, so fine-tuning has something
    to learn. Lengths are content lengths (``|x| = |y|``); a sample has ``2 * max_len + 2``
    positions once padded.
    """

    vocab_size: int = 32
    min_len: int = 4
    max_len: int = 8
    num_train: int = 16
    num_test: int = 128
    dirichlet_alpha: float = 0.5
    pretrain_vocab_fraction: float = 0.5
    seed: int = 0
    planted: bool = False
    """Planted-structure variant (module docstring): clients differ only inside ``T``."""
    planted_rank: int = 4
    """r* = |T|, the size of the shared remapped token set (used only when ``planted``)."""
    planted_mass: float = 0.5
    """Probability mass of ``T`` in the shared token distribution (only when ``planted``):
    large enough that 16 training samples show every remapped token several times."""
    planted_background: str = "all"
    """Where the rest of the planted distribution's mass goes: ``"all"`` other content tokens
    (clients also learn to copy the tokens the base model never saw, a shared but noisy task),
    or ``"seen"`` only (the base model copies them already, so a client's only task is its remap
    of ``T``: the cleanest form of the paper's model)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if not 0.0 < self.pretrain_vocab_fraction <= 1.0:
            raise ValueError("pretrain_vocab_fraction must be in (0, 1]")
        if self.dirichlet_alpha <= 0:
            raise ValueError("dirichlet_alpha must be positive")
        if self.planted:
            if not 2 <= self.planted_rank <= self.pretrain_vocab:
                raise ValueError(
                    f"planted_rank must be in [2, {self.pretrain_vocab}] (a derangement needs 2 "
                    f"tokens; T is drawn from the seen vocabulary), got {self.planted_rank}"
                )
            if not 0.0 < self.planted_mass < 1.0:
                raise ValueError(f"planted_mass must be in (0, 1), got {self.planted_mass}")
            if self.planted_background not in PLANTED_BACKGROUNDS:
                raise ValueError(f"planted_background must be one of {PLANTED_BACKGROUNDS}, "
                                 f"got {self.planted_background!r}")
            if self.planted_background == "seen" and self.planted_rank >= self.pretrain_vocab:
                raise ValueError("planted_background 'seen' needs a seen token outside T: "
                                 f"planted_rank {self.planted_rank} >= {self.pretrain_vocab} seen tokens")

    @property
    def total_vocab(self) -> int:
        """Embedding size: special tokens plus content tokens."""
        return NUM_SPECIAL + self.vocab_size

    @property
    def seq_len(self) -> int:
        """Padded sample length ``2 * max_len + 2``."""
        return 2 * self.max_len + 2

    @property
    def pretrain_vocab(self) -> int:
        """Number of content tokens (ids ``0 .. n-1``) the base model sees."""
        return max(1, int(round(self.pretrain_vocab_fraction * self.vocab_size)))


@dataclass
class ClientData:
    """One partition's encoded train and test sets plus what generated them."""

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    seq_len: int
    token_probs: np.ndarray

    @property
    def num_train(self) -> int:
        return int(self.train_inputs.shape[0])


def encode(x: np.ndarray, y: np.ndarray, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode content arrays into padded ``BOS x SEP y`` inputs and y-only labels.

    Parameters
    ----------
    x, y : (n, L) integer arrays of content indices in ``0 .. vocab_size - 1``.
    max_len : maximum content length; rows are padded to ``2 * max_len + 2``.

    Returns
    -------
    inputs, labels : (n, 2 * max_len + 2) LongTensors; ``labels`` equals ``inputs`` on the
    y positions and ``-100`` elsewhere (the model applies the causal shift).
    """
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (n, L) with equal n, got {x.shape} and {y.shape}")
    n, lx = x.shape
    ly = y.shape[1]
    if lx > max_len or ly > max_len:
        raise ValueError(f"content length {max(lx, ly)} exceeds max_len {max_len}")
    if min(x.min(initial=0), y.min(initial=0)) < 0:
        raise ValueError("content indices must be non-negative")
    total = 2 * max_len + 2
    inputs = np.full((n, total), PAD, dtype=np.int64)
    labels = np.full((n, total), IGNORE_INDEX, dtype=np.int64)
    inputs[:, 0] = BOS
    inputs[:, 1 : 1 + lx] = x + NUM_SPECIAL
    inputs[:, 1 + lx] = SEP
    start = 2 + lx
    inputs[:, start : start + ly] = y + NUM_SPECIAL
    labels[:, start : start + ly] = y + NUM_SPECIAL
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def attention_mask(inputs: torch.Tensor) -> torch.Tensor:
    """1 on real tokens, 0 on the trailing PAD (padding is on the right, so under causal
    attention it never changes the scored positions; passing it silences HF warnings)."""
    return (inputs != PAD).long()


def partition_rng(cfg: TaskConfig, partition_id: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, partition, stream) so splits never share draws."""
    return np.random.default_rng([cfg.seed, partition_id, stream])


def partition_profile(cfg: TaskConfig, partition_id: int) -> tuple[np.ndarray, int]:
    """A partition's token distribution (full vocab) and its sequence length.

    Dirichlet per partition; with ``cfg.planted`` the shared :func:`planted_probs` instead (the
    Dirichlet is still drawn, so the length is the same as without planting).
    """
    rng = partition_rng(cfg, partition_id, 0)
    probs = rng.dirichlet(np.full(cfg.vocab_size, cfg.dirichlet_alpha))
    length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
    if cfg.planted:
        probs = planted_probs(cfg)
    return probs, length


_PLANTED_TAG = 0x504C4E54  # "PLNT": the stream of T, apart from every partition stream


def planted_tokens(cfg: TaskConfig) -> np.ndarray:
    """The shared token set ``T`` (sorted content indices), drawn from the seen vocabulary.

    Seen tokens, because the base model already copies them: the only thing a client must learn
    on ``T`` is its remap, so the benign differences live in ``T``'s output directions. Depends
    on ``cfg.seed`` only, so every partition of a run agrees on ``T``.
    """
    rng = np.random.default_rng([cfg.seed, _PLANTED_TAG])
    return np.sort(rng.choice(cfg.pretrain_vocab, size=cfg.planted_rank, replace=False))


def planted_mapping(cfg: TaskConfig, partition_id: int) -> np.ndarray:
    """Lookup table (size ``vocab_size``) of a partition's target map: identity off ``T``, a
    derangement of ``T`` on it (no token of ``T`` maps to itself, so every client really
    differs from plain copying there). Deterministic in ``(cfg.seed, partition_id)``."""
    tokens = planted_tokens(cfg)
    rng = partition_rng(cfg, partition_id, 4)
    while True:
        perm = rng.permutation(tokens.size)
        if not np.any(perm == np.arange(tokens.size)):
            break
    mapping = np.arange(cfg.vocab_size, dtype=np.int64)
    mapping[tokens] = tokens[perm]
    return mapping


def planted_probs(cfg: TaskConfig) -> np.ndarray:
    """The shared token distribution of the planted variant: ``planted_mass`` spread evenly
    over ``T``, the rest evenly over the other content tokens (``planted_background="all"``)
    or over the other seen tokens only (``"seen"``)."""
    tokens = planted_tokens(cfg)
    support = cfg.vocab_size if cfg.planted_background == "all" else cfg.pretrain_vocab
    probs = np.zeros(cfg.vocab_size)
    probs[:support] = (1.0 - cfg.planted_mass) / (support - tokens.size)
    probs[tokens] = cfg.planted_mass / tokens.size
    return probs


def sample_copy(
    n: int, length: int, probs: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` copy pairs ``(x, y = x)`` of one length with i.i.d. tokens from ``probs``."""
    x = rng.choice(probs.size, size=(n, length), p=probs)
    return x, x.copy()


def make_client_data(
    cfg: TaskConfig,
    partition_id: int,
    num_partitions: int,
    poison: PoisonFn | None = None,
) -> ClientData:
    """Deterministic data of one partition; ``poison`` rewrites the train split only.

    ``num_partitions`` is validated but does not change a partition's data, so a client's
    data is the same whatever the federation size (deterministic in ``(seed, partition_id)``).
    With ``cfg.planted`` both splits' targets go through :func:`planted_mapping` (the client's
    task), before ``poison`` sees the train split.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} not in [0, {num_partitions})")
    probs, length = partition_profile(cfg, partition_id)
    x_tr, y_tr = sample_copy(cfg.num_train, length, probs, partition_rng(cfg, partition_id, 1))
    x_te, y_te = sample_copy(cfg.num_test, length, probs, partition_rng(cfg, partition_id, 2))
    if cfg.planted:
        mapping = planted_mapping(cfg, partition_id)
        y_tr, y_te = mapping[y_tr], mapping[y_te]
    if poison is not None:
        x_tr, y_tr = poison(x_tr.copy(), y_tr.copy(), partition_rng(cfg, partition_id, 3))
    tr_in, tr_lab = encode(x_tr, y_tr, cfg.max_len)
    te_in, te_lab = encode(x_te, y_te, cfg.max_len)
    return ClientData(tr_in, tr_lab, te_in, te_lab, length, probs)


def make_pretrain_batch(
    cfg: TaskConfig, batch_size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the restricted task the base model learns: uniform tokens from the first
    ``cfg.pretrain_vocab`` content ids, each row's length uniform in ``[min_len, max_len]``."""
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, size=batch_size)
    parts = []
    for length in np.unique(lengths):
        x = rng.integers(0, cfg.pretrain_vocab, size=(int(np.sum(lengths == length)), int(length)))
        parts.append(encode(x, x, cfg.max_len))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def restricted_eval_set(cfg: TaskConfig, n: int, seen: bool, seed: int = 12345) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy samples over the seen (pre-training) or the unseen part of the vocabulary.

    Used to check that the base model is decent where it was trained and poor elsewhere.
    """
    rng = np.random.default_rng([cfg.seed, seed, int(seen)])
    lo, hi = (0, cfg.pretrain_vocab) if seen else (cfg.pretrain_vocab, cfg.vocab_size)
    if hi <= lo:
        raise ValueError("no unseen tokens: pretrain_vocab_fraction is 1")
    length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
    x = rng.integers(lo, hi, size=(n, length))
    return encode(x, x, cfg.max_len)
