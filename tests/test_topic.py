"""Scope router and topic banks on tiny models: tail features, router training, gating, routing, span values."""

from __future__ import annotations

import torch

from peft_persedit.editing.scope import ScopeRouter, _supcon, tail_inputs, train_router
from peft_persedit.editing.topic import TopicBank, calibrate_tau
from tests.tiny_models import make_tiny_model, mlp_out


def test_tail_inputs_match_per_sequence_runs():
    model = make_tiny_model("llama")
    module = mlp_out(model, 2)
    seqs = [[5, 6, 7, 8, 9], [3, 4, 5], [10, 11, 12, 13, 14, 15, 16]]
    batched = tail_inputs(model, module, seqs, pad=2, n_tail=2, batch_size=3)
    for i, s in enumerate(seqs):
        alone = tail_inputs(model, module, [s], pad=2, n_tail=2)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-4)
    assert batched.shape == (3, 2, module.in_features)


def test_supcon_prefers_clustered_labels():
    labels = torch.tensor([0, 0, 1, 1, -1])
    good = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1], [-1, -1]]), dim=-1)
    bad = good[[0, 2, 1, 3, 4]]
    assert _supcon(good, labels, 0.1) < _supcon(bad, labels, 0.1)


def test_train_router_separates_topics():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 0.5
    noise = torch.randn(3, 40, 16, generator=g) * 2.0
    noise[:, :, :4] *= 0.1  # the topic lives in a few low-variance directions the raw cosine drowns
    feats = (centers[:, None] + noise).reshape(-1, 16)
    labels = torch.arange(3).repeat_interleave(40)
    router = train_router(feats, labels, layer=0, rank=4, steps=150, lr=0.05, progress=False)
    z = router.project(feats)
    sim = z @ z.T
    same = labels[:, None] == labels[None]
    assert sim[same].mean() > sim[~same].mean() + 0.3


def test_topic_bank_gates_routes_and_shifts():
    router = ScopeRouter(torch.eye(4), torch.zeros(4), layer=0)
    bank = TopicBank(router, d_out=3)
    bank.add(torch.tensor([[1.0, 0, 0, 0]]), tau=0.9, shift=torch.tensor([1.0, 0, 0]), user=0)
    bank.add(torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0]]), tau=0.9, shift=torch.tensor([0, 2.0, 0]), user=1)
    x = torch.tensor([[[2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1.0]]]).repeat(2, 1, 1)  # [2 rows, 3 tokens, 4]
    delta = bank(x)
    assert delta[0, 0].tolist() == [1.0, 0, 0] and delta[0, 1].tolist() == [0, 2.0, 0] and not delta[0, 2].any()
    bank.row_user = torch.tensor([0, 1])  # row 0 is user 0, row 1 user 1
    delta = bank(x)
    assert delta[0, 0].tolist() == [1.0, 0, 0] and not delta[0, 1].any()
    assert not delta[1, 0].any() and delta[1, 1].tolist() == [0, 2.0, 0]


def test_topic_bank_hook_leaves_model_unchanged_when_nothing_fires():
    model = make_tiny_model("llama")
    module = mlp_out(model, 1)
    router = ScopeRouter(torch.randn(4, module.in_features), torch.zeros(module.in_features), layer=1)
    bank = TopicBank(router, module.out_features)
    bank.add(torch.randn(2, 4), tau=2.0, shift=torch.randn(module.out_features), user=0)  # cos ≤ 1 < τ
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits
    handle = bank.attach(module)
    try:
        assert torch.equal(model(ids).logits, before)
        bank.tau[:] = -2.0  # always fires: the output moves
        assert not torch.allclose(model(ids).logits, before)
    finally:
        handle.remove()


def test_calibrate_tau_quantile_and_cap():
    neg = torch.linspace(0, 1, 201)
    assert abs(calibrate_tau(torch.tensor([0.99]), neg, false_fire=0.05) - 0.95) < 1e-6
    assert abs(calibrate_tau(torch.tensor([0.5, 0.6, 0.7]), neg, false_fire=0.0) - 0.6) < 1e-6  # own median cap
