"""MoELanguageModel on one process: shapes, causality, gradients, router skew, learning."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_eplb.demo import MoELanguageModel

_TINY = dict(hidden_size=16, ffn_hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2, seq_len=16)


def test_forward_backward_and_causality() -> None:
    torch.manual_seed(0)
    model = MoELanguageModel(**_TINY, num_redundant_experts=2)
    tokens = torch.randint(0, 256, (3, 16))
    logits = model(tokens)
    assert logits.shape == (3, 16, 256)
    # Causal: changing byte 10 leaves the logits of positions 0..9 unchanged, changes later ones.
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    logits2 = model(changed)
    torch.testing.assert_close(logits2[:, :10], logits[:, :10], rtol=0, atol=0)
    assert not torch.allclose(logits2[:, 10:], logits[:, 10:])
    # Every parameter gets a gradient (experts, router, attention, embeddings).
    for block in model.blocks:
        block.moe.reset_expert_load()
    loss = model._loss((tokens, torch.roll(tokens, -1, 1)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Counters: every token copy counted once per layer: 3 * 16 tokens * top_k 2.
    for block in model.blocks:
        assert int(block.moe.expert_load.sum()) == 3 * 16 * 2


def test_router_skew_makes_load_zipf_like() -> None:
    torch.manual_seed(0)
    flat = MoELanguageModel(**{**_TINY, "num_experts": 8}, router_skew=0.0)
    torch.manual_seed(0)
    skewed = MoELanguageModel(**{**_TINY, "num_experts": 8}, router_skew=2.0)
    # Same weights; the skew is a buffer-held bias, not a parameter.
    assert [n for n, _ in flat.named_parameters()] == [n for n, _ in skewed.named_parameters()]
    tokens = torch.randint(0, 256, (8, 16))
    flat(tokens)
    skewed(tokens)
    for i, (a, b) in enumerate(zip(flat.blocks, skewed.blocks, strict=True)):
        bias = skewed.router_biases[i].bias  # (E,)
        hot = int(bias.argmax())
        assert float(bias.max()) == 0.0 and bias.min() < -4.0  # -2 ln 8 = -4.16
        load_flat, load_skew = a.moe.expert_load.double(), b.moe.expert_load.double()
        assert load_skew[hot] > load_flat[hot]
        assert load_skew.max() / load_skew.mean() > load_flat.max() / load_flat.mean()
    # The hook survives a deep copy (the copy's bias is used, not the original's).
    clone = copy.deepcopy(skewed)
    torch.testing.assert_close(clone(tokens), skewed(tokens), rtol=0, atol=0)


def test_learns_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = MoELanguageModel(**_TINY, lr=3e-2)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    text = torch.tensor(list(b"def f(x):\n    return x + 1\n" * 2))[:17]
    batch = (text[:-1].unsqueeze(0), text[1:].unsqueeze(0))
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model._loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_hyperparameters_raise() -> None:
    with pytest.raises(ValueError, match=r"hidden_size \(10\) must be divisible by num_heads \(4\)"):
        MoELanguageModel(hidden_size=10, num_heads=4)
    with pytest.raises(ValueError, match=r"router_skew \(-1.0\) must be >= 0"):
        MoELanguageModel(**_TINY, router_skew=-1.0)
    model = MoELanguageModel(**_TINY)
    with pytest.raises(ValueError, match=r"sequence length \(17\) must be <= seq_len \(16\)"):
        model(torch.zeros(1, 17, dtype=torch.long))
