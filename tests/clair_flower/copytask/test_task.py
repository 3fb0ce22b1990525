"""The copy task: determinism, heterogeneity, the y-only loss mask, train-only poisoning."""

import numpy as np
import pytest
import torch

from clair_flower.copytask.task import (
    BOS, IGNORE_INDEX, NUM_SPECIAL, PAD, SEP, TaskConfig, encode, make_client_data,
    make_pretrain_batch, restricted_eval_set,
)

CFG = TaskConfig()


def test_same_seed_same_data():
    a, b = make_client_data(CFG, 3, 10), make_client_data(CFG, 3, 10)
    for name in ("train_inputs", "train_labels", "test_inputs", "test_labels"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert np.array_equal(a.token_probs, b.token_probs)


def test_other_seed_other_data():
    a = make_client_data(CFG, 3, 10)
    b = make_client_data(TaskConfig(seed=1), 3, 10)
    assert not np.array_equal(a.token_probs, b.token_probs)


def test_partitions_differ_in_distribution_and_length():
    parts = [make_client_data(CFG, k, 10) for k in range(10)]
    probs = np.stack([p.token_probs for p in parts])
    assert probs.shape == (10, CFG.vocab_size)
    assert np.allclose(probs.sum(1), 1.0)
    assert len({tuple(np.round(p, 6)) for p in probs}) == 10
    assert len({p.seq_len for p in parts}) >= 3
    assert all(CFG.min_len <= p.seq_len <= CFG.max_len for p in parts)
    # Dirichlet over the full vocabulary: every partition puts mass on the unseen half.
    assert np.all(probs[:, CFG.pretrain_vocab:].sum(1) > 0)


def test_data_independent_of_federation_size():
    a, b = make_client_data(CFG, 2, 5), make_client_data(CFG, 2, 50)
    assert torch.equal(a.train_inputs, b.train_inputs)
    with pytest.raises(ValueError):
        make_client_data(CFG, 5, 5)


def test_encode_layout_and_loss_mask():
    x = np.array([[0, 1, 2], [3, 3, 0]])
    inputs, labels = encode(x, x, max_len=4)
    assert inputs.shape == labels.shape == (2, 10)
    assert inputs.dtype == labels.dtype == torch.long
    row = inputs[0].tolist()
    assert row[0] == BOS and row[4] == SEP
    assert row[1:4] == [t + NUM_SPECIAL for t in x[0]] == row[5:8]
    assert row[8:] == [PAD, PAD]
    # Labels are -100 everywhere except on y (aligned, HF shifts inside the model).
    assert (labels[:, :5] == IGNORE_INDEX).all() and (labels[:, 8:] == IGNORE_INDEX).all()
    assert torch.equal(labels[:, 5:8], inputs[:, 5:8])


def test_client_labels_only_on_y():
    d = make_client_data(CFG, 0, 10)
    L = d.seq_len
    mask = d.train_labels != IGNORE_INDEX
    assert mask.sum(1).eq(L).all()
    assert mask[:, L + 2 : 2 * L + 2].all()
    assert torch.equal(d.train_labels[mask], d.train_inputs[mask])


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError):
        encode(np.zeros((2, 5), int), np.zeros((2, 5), int), max_len=4)
    with pytest.raises(ValueError):
        encode(np.zeros((2, 3), int), np.zeros((3, 3), int), max_len=4)


def test_poison_touches_train_only():
    calls = []

    def reverse(x, y, rng):
        calls.append((x.shape, y.shape))
        assert isinstance(rng, np.random.Generator)
        return x, y[:, ::-1]

    clean = make_client_data(CFG, 1, 10)
    bad = make_client_data(CFG, 1, 10, poison=reverse)
    assert calls and calls[0][0] == (CFG.num_train, clean.seq_len)
    assert torch.equal(clean.test_inputs, bad.test_inputs)
    assert torch.equal(clean.test_labels, bad.test_labels)
    assert torch.equal(clean.train_inputs[:, : clean.seq_len + 2], bad.train_inputs[:, : clean.seq_len + 2])
    assert not torch.equal(clean.train_labels, bad.train_labels)


def test_pretrain_batch_uses_seen_vocab_only():
    rng = np.random.default_rng(0)
    inputs, labels = make_pretrain_batch(CFG, 256, rng)
    content = labels[labels != IGNORE_INDEX] - NUM_SPECIAL
    assert content.max() < CFG.pretrain_vocab
    _, unseen = restricted_eval_set(CFG, 16, seen=False)
    assert (unseen[unseen != IGNORE_INDEX] - NUM_SPECIAL).min() >= CFG.pretrain_vocab


# --------------------------------------------------------------------------- planted structure

from clair_flower.copytask.task import planted_mapping, planted_probs, planted_tokens  # noqa: E402

PLANTED = TaskConfig(planted=True, planted_rank=4)


def _content(t: torch.Tensor) -> np.ndarray:
    return t.numpy() - NUM_SPECIAL


def test_planted_off_by_default_changes_nothing():
    assert not CFG.planted
    a = make_client_data(CFG, 2, 10)
    b = make_client_data(TaskConfig(planted_rank=6, planted_mass=0.9), 2, 10)
    assert torch.equal(a.train_labels, b.train_labels) and torch.equal(a.test_labels, b.test_labels)


def test_planted_tokens_shared_seen_and_seeded():
    t = planted_tokens(PLANTED)
    assert t.size == 4 and len(set(t.tolist())) == 4
    assert np.all(t < PLANTED.pretrain_vocab)
    assert np.array_equal(t, planted_tokens(PLANTED))
    assert not np.array_equal(t, planted_tokens(TaskConfig(planted=True, seed=5)))


def test_planted_mapping_is_a_derangement_of_T_and_identity_elsewhere():
    t = planted_tokens(PLANTED)
    maps = [planted_mapping(PLANTED, k) for k in range(10)]
    off = np.setdiff1d(np.arange(PLANTED.vocab_size), t)
    for m in maps:
        assert np.array_equal(m[off], off)
        assert sorted(m[t].tolist()) == t.tolist() and np.all(m[t] != t)
    assert len({tuple(m[t]) for m in maps}) >= 3  # clients differ, inside T only
    assert np.array_equal(maps[3], planted_mapping(PLANTED, 3))


def test_planted_data_targets_follow_the_client_mapping_and_share_the_distribution():
    for k in (0, 7):
        d = make_client_data(PLANTED, k, 10)
        m = planted_mapping(PLANTED, k)
        for inp, lab in ((d.train_inputs, d.train_labels), (d.test_inputs, d.test_labels)):
            mask = lab != IGNORE_INDEX
            L = d.seq_len
            x = _content(inp[:, 1 : 1 + L])
            y = _content(lab[mask].reshape(-1, L))
            assert np.array_equal(y, m[x])
        assert np.allclose(d.token_probs, planted_probs(PLANTED))
        # same sequence length as the natural task of the same seed
        assert d.seq_len == make_client_data(CFG, k, 10).seq_len
    p = planted_probs(PLANTED)
    assert np.isclose(p.sum(), 1.0) and np.isclose(p[planted_tokens(PLANTED)].sum(), PLANTED.planted_mass)


def test_planted_poison_sees_remapped_train_targets_only():
    seen = {}

    def poison(x, y, rng):
        seen["y"] = y.copy()
        return x, y[:, ::-1].copy()

    d = make_client_data(PLANTED, 1, 10, poison=poison)
    clean = make_client_data(PLANTED, 1, 10)
    L = clean.seq_len
    mask = clean.train_labels != IGNORE_INDEX
    assert np.array_equal(seen["y"], _content(clean.train_labels[mask].reshape(-1, L)))
    assert torch.equal(d.test_labels, clean.test_labels)
    assert not torch.equal(d.train_labels, clean.train_labels)


@pytest.mark.parametrize("kwargs", [dict(planted_rank=1), dict(planted_rank=17), dict(planted_mass=1.0)])
def test_planted_config_validated(kwargs):
    with pytest.raises(ValueError):
        TaskConfig(planted=True, **kwargs)


def test_planted_seen_background_stays_on_the_seen_vocabulary():
    cfg = TaskConfig(planted=True, planted_rank=4, planted_background="seen")
    probs = planted_probs(cfg)
    assert np.isclose(probs.sum(), 1.0)
    assert np.all(probs[cfg.pretrain_vocab:] == 0.0)
    assert np.isclose(probs[planted_tokens(cfg)].sum(), cfg.planted_mass)
    data = make_client_data(cfg, 3, 10)
    content = data.train_inputs[data.train_inputs >= 3] - 3
    assert int(content.max()) < cfg.pretrain_vocab
    # the default background is every content token, as before
    assert np.all(planted_probs(PLANTED)[PLANTED.pretrain_vocab:] > 0.0)


@pytest.mark.parametrize("kw", [dict(planted_background="unseen"),
                                dict(planted_background="seen", planted_rank=16)])
def test_planted_background_checked(kw):
    with pytest.raises(ValueError, match="planted_background"):
        TaskConfig(planted=True, **kw)
