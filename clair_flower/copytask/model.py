"""The base model W_0: a tiny decoder built from a ``transformers`` config, pre-trained on the
restricted copy task, cached on disk, and wrapped with a fresh PEFT LoRA adapter.

Nothing is downloaded. The cache is keyed by a hash of every field that changes the
pre-trained weights, written atomically (temp file + ``os.replace``) under an ``fcntl``
lock, so parallel Ray workers neither read a half-written file nor pre-train twice.
Weights are stored with ``safetensors`` (never pickle).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from safetensors.torch import load_model, save_model

from .task import NUM_SPECIAL, TaskConfig, attention_mask, make_pretrain_batch

CACHE_FORMAT_VERSION = 1
CACHE_ENV = "CLAIR_FLOWER_CACHE"
_ARCHS = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and pre-training hyper-parameters of the base model.

    Defaults pre-train in well under a minute on two CPU cores and copy the seen half of
    the vocabulary almost perfectly.
    """

    arch: str = "gpt2"
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    max_positions: int = 64
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    pretrain_weight_decay: float = 0.0
    freeze_unseen_embeddings: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"arch must be one of {_ARCHS}, got {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} not divisible by n_head {self.n_head}")


def default_cache_dir() -> Path:
    """``$CLAIR_FLOWER_CACHE`` or ``~/.cache/clair-flower``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clair-flower"


def _hf_config(model_cfg: ModelConfig, task_cfg: TaskConfig) -> transformers.PretrainedConfig:
    """The ``transformers`` config of the chosen architecture."""
    if task_cfg.seq_len > model_cfg.max_positions:
        raise ValueError(
            f"samples have {task_cfg.seq_len} positions but max_positions is "
            f"{model_cfg.max_positions}"
        )
    common = dict(vocab_size=task_cfg.total_vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_cfg.arch == "gpt2":
        return transformers.GPT2Config(
            n_layer=model_cfg.n_layer, n_embd=model_cfg.n_embd, n_head=model_cfg.n_head,
            n_positions=model_cfg.max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **common,
        )
    return transformers.LlamaConfig(
        num_hidden_layers=model_cfg.n_layer, hidden_size=model_cfg.n_embd,
        intermediate_size=4 * model_cfg.n_embd, num_attention_heads=model_cfg.n_head,
        num_key_value_heads=model_cfg.n_head, max_position_embeddings=model_cfg.max_positions,
        tie_word_embeddings=True, **common,
    )


def build_model(model_cfg: ModelConfig, task_cfg: TaskConfig) -> transformers.PreTrainedModel:
    """A randomly initialised model (seeded by ``model_cfg.seed``), in eval mode."""
    config = _hf_config(model_cfg, task_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.seed)
        if model_cfg.arch == "gpt2":
            model = transformers.GPT2LMHeadModel(config)
        else:
            model = transformers.LlamaForCausalLM(config)
    return model.eval()


def _zero_unseen_embedding_grads(model: transformers.PreTrainedModel, task_cfg: TaskConfig) -> None:
    """Keep the unseen tokens' (tied) embeddings at their random init.

    Otherwise pre-training pushes them far away (they only ever appear as softmax
    negatives), and no low-rank adapter on the attention/MLP can bring them back.
    """
    grad = model.get_input_embeddings().weight.grad
    if grad is not None:
        grad[NUM_SPECIAL + task_cfg.pretrain_vocab :] = 0.0


def pretrain(model: transformers.PreTrainedModel, model_cfg: ModelConfig, task_cfg: TaskConfig) -> None:
    """Deterministic AdamW pre-training on the restricted task (seen vocabulary only).

    Linear warm-up then cosine decay; fresh batches every step so the base model learns
    the copy *rule* on the seen tokens rather than memorising samples.
    """
    rng = np.random.default_rng([task_cfg.seed, model_cfg.seed, 777])
    opt = torch.optim.AdamW(
        model.parameters(), lr=model_cfg.pretrain_lr, weight_decay=model_cfg.pretrain_weight_decay
    )
    steps = model_cfg.pretrain_steps
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.seed)
        for _ in range(steps):
            inputs, labels = make_pretrain_batch(task_cfg, model_cfg.pretrain_batch, rng)
            loss = model(input_ids=inputs, attention_mask=attention_mask(inputs), labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if model_cfg.freeze_unseen_embeddings:
                _zero_unseen_embedding_grads(model, task_cfg)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()


def cache_key(model_cfg: ModelConfig, task_cfg: TaskConfig) -> str:
    """Hash of every field that changes the pre-trained weights (and library versions)."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "model": asdict(model_cfg),
        "task": {
            k: getattr(task_cfg, k)
            for k in ("vocab_size", "min_len", "max_len", "pretrain_vocab_fraction", "seed")
        },
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cache_path(model_cfg: ModelConfig, task_cfg: TaskConfig, cache_dir: str | os.PathLike) -> Path:
    """Where the pre-trained weights of this configuration live."""
    return Path(cache_dir) / f"base-{model_cfg.arch}-{cache_key(model_cfg, task_cfg)}.safetensors"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``path`` (created if needed), released on exit."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _atomic_save(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write to a temp file in the same directory, fsync, then ``os.replace`` into place."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_model(model, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_base_model(
    model_cfg: ModelConfig | None = None,
    task_cfg: TaskConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> transformers.PreTrainedModel:
    """The pre-trained base model, from the disk cache or pre-trained (once) and cached.

    Readers never need the lock: the file appears only complete (``os.replace``). Writers
    take the lock and re-check, so concurrent processes pre-train at most once.
    """
    model_cfg = model_cfg or ModelConfig()
    task_cfg = task_cfg or TaskConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache_path(model_cfg, task_cfg, cache)
    model = build_model(model_cfg, task_cfg)
    if not path.exists():
        with _file_lock(path.with_suffix(".lock")):
            if not path.exists():
                pretrain(model, model_cfg, task_cfg)
                meta = {"key": cache_key(model_cfg, task_cfg), "model_cfg": json.dumps(asdict(model_cfg))}
                _atomic_save(model, path, meta)
                return model.eval()
    load_model(model, str(path))
    return model.eval()


def default_target_modules(arch: str) -> tuple[str, ...]:
    """Modules that get LoRA by default: attention and MLP projections."""
    if arch == "gpt2":
        return ("c_attn", "c_proj", "c_fc")
    return ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters; ``target_modules=()`` means the architecture's default."""

    rank: int = 4
    alpha: float = 8.0
    target_modules: tuple[str, ...] = field(default=())
    dropout: float = 0.0
    use_rslora: bool = False


def _arch_of(model: transformers.PreTrainedModel) -> str:
    return "gpt2" if model.config.model_type == "gpt2" else "llama"


def wrap_lora(model: transformers.PreTrainedModel, spec: LoraSpec | None = None, seed: int = 0) -> peft.PeftModel:
    """Wrap ``model`` (in place) with a fresh LoRA adapter; ``A`` is seeded, ``B`` is zero.

    GPT-2 ``Conv1D`` layers need ``fan_in_fan_out=True`` so PEFT merges ``dW.T``.
    """
    spec = spec or LoraSpec()
    arch = _arch_of(model)
    config = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.target_modules or default_target_modules(arch)),
        lora_dropout=spec.dropout,
        use_rslora=spec.use_rslora,
        fan_in_fan_out=arch == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)
