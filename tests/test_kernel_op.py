"""The ``persedit::gated_edit`` custom op (opcheck, torch.compile) and the kernel metadata cached on a PackedBank."""

from __future__ import annotations

import pytest
import torch
from helpers import IDS, add_random_clusters, edit_layers
from peft import get_peft_model
from tiny_models import make_tiny_model

from peft_persedit import PersonalizationEditConfig
from peft_persedit.kernels import EditBank, PackedBank, gated_edit, gated_edit_op, gated_edit_reference, pack_banks
from peft_persedit.kernels.op import BANK_FIELDS

D_IN, D_OUT = 12, 10


def make_bank(num_clusters: int, seed: int, rank: int = 2, shuffle: bool = False, tau: float = 0.3) -> EditBank:
    """``num_clusters`` clusters of two keys and ``rank`` rank rows each (rank rows in random order if ``shuffle``)."""
    g = torch.Generator().manual_seed(seed)
    rank_cluster = torch.arange(num_clusters).repeat_interleave(rank)
    if shuffle:
        rank_cluster = rank_cluster[torch.randperm(rank_cluster.numel(), generator=g)]
    return EditBank(
        keys=torch.nn.functional.normalize(torch.randn(2 * num_clusters, D_IN, generator=g), dim=-1),
        key_cluster=torch.arange(num_clusters).repeat_interleave(2), tau=torch.full((num_clusters,), tau),
        A=torch.randn(rank * num_clusters, D_IN, generator=g), B=torch.randn(D_OUT, rank * num_clusters, generator=g),
        rank_cluster=rank_cluster, shift=torch.randn(num_clusters, D_OUT, generator=g),
        center=torch.zeros(D_IN))


def op_args(x: torch.Tensor, bank: PackedBank, index: torch.Tensor, use_triton: bool = False) -> tuple:
    meta = bank.kernel_meta
    return (x, index, [getattr(bank, f) for f in BANK_FIELDS], meta.tensors if use_triton else [],
            meta.sizes if use_triton else [], use_triton)


CASES = {
    "one_adapter": lambda: (pack_banks([make_bank(4, seed=1)]), [0] * 9),
    "mixed_adapters": lambda: (pack_banks([make_bank(3, seed=2), make_bank(5, seed=3, shuffle=True)]),
                               [-1, 0, 1, 1, 0, -1, 1, 0]),
    "nothing_fires": lambda: (pack_banks([make_bank(2, seed=4, tau=2.0)]), [0] * 5),
    "no_tokens": lambda: (pack_banks([make_bank(2, seed=5)]), []),
}


@pytest.mark.parametrize("name", CASES)
def test_op_matches_reference_and_passes_opcheck(name: str) -> None:
    bank, index = CASES[name]()
    index = torch.tensor(index, dtype=torch.long)
    x = torch.randn(index.numel(), D_IN, generator=torch.Generator().manual_seed(0))
    if index.numel():
        x[0] = bank.keys[0] * 3  # the first token hits its adapter's first key
    args = op_args(x, bank, index)
    torch.testing.assert_close(gated_edit_op(*args), gated_edit_reference(x, bank, index))
    torch.library.opcheck(gated_edit_op, args)


def test_dispatch_uses_the_op_for_inference_and_the_reference_for_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft_persedit.kernels import dispatch

    calls = []
    op = dispatch.gated_edit_inference
    monkeypatch.setattr(dispatch, "gated_edit_inference", lambda *a: calls.append(a[-1]) or op(*a))
    bank = pack_banks([make_bank(4, seed=6)])
    x = torch.randn(6, D_IN).requires_grad_(True)
    expected = gated_edit_reference(x.detach(), bank)
    out = gated_edit(x, bank, backend="reference")
    assert out.requires_grad and not calls
    with torch.no_grad():
        torch.testing.assert_close(gated_edit(x, bank, backend="reference"), expected)
    assert calls == [False]  # CPU tensors, backend "reference": the op runs the reference


def test_kernel_meta_is_cached_regrouped_and_rebuilt_after_in_place_updates() -> None:
    bank = pack_banks([make_bank(3, seed=7, shuffle=True), make_bank(2, seed=8)])
    meta = bank.kernel_meta
    assert bank.kernel_meta is meta  # cached on the pack
    assert (meta.c_max, meta.k_max, meta.r_max) == (3, 6, 2)
    perm = torch.argsort(bank.rank_cluster, stable=True)
    torch.testing.assert_close(meta.A, bank.A[perm])
    torch.testing.assert_close(meta.B, bank.B[:, perm])
    assert meta.rank_count.tolist() == [2] * 5 and meta.rank_start.tolist() == [0, 2, 4, 6, 8]
    bank.A.add_(1.0)  # an in-place update (an optimizer step) bumps A's version: the regrouped copy is rebuilt
    assert bank.kernel_meta is not meta
    torch.testing.assert_close(bank.kernel_meta.A, bank.A[perm])
    grouped = pack_banks([make_bank(2, seed=9)])
    assert grouped.kernel_meta.A.data_ptr() == grouped.A.data_ptr()  # already grouped: a view, no copy


def persedit_model(**config) -> torch.nn.Module:
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(**config))
    layer = edit_layers(pm)[0]
    add_random_clusters(layer, "default", 3, rank=2, keys_per=2, tau=-0.05)  # some tokens fire, some not
    return pm


def test_layer_pack_follows_training_steps() -> None:
    """Training (reference path) updates A/B in place; the eval pack and its kernel metadata see every step."""
    pm = persedit_model(trainable=["A", "B"])
    layer = edit_layers(pm)[0]
    layer.persedit_rank_cluster["default"].copy_(torch.tensor([2, 0, 1, 0, 2, 1]))  # ungrouped: metadata copies
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        with torch.no_grad():
            before = pm(IDS).logits
            meta = layer.packed_bank(["default"]).kernel_meta
        perm = torch.argsort(layer.persedit_rank_cluster["default"], stable=True)
        torch.testing.assert_close(meta.A, layer.persedit_A["default"].detach()[perm])
        pm(IDS).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            assert not torch.equal(pm(IDS).logits, before)


def test_torch_compile_traces_the_op_and_matches_eager() -> None:
    pm = persedit_model().eval()
    with torch.no_grad():
        expected = pm(IDS).logits
        graphs = []

        def recording(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            graphs.append(gm)
            return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

        torch._dynamo.reset()
        out = torch.compile(pm, backend=recording, fullgraph=False)(IDS).logits
    torch.testing.assert_close(out, expected)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert any("persedit.gated_edit" in t for t in targets), sorted(targets)


def test_folder_imported_as_top_level_kernels_stays_empty() -> None:
    """A probe that imports the repository's ``kernels/`` as ``kernels`` registers nothing a second time."""
    import importlib.util
    from pathlib import Path

    import peft_persedit.kernels as installed

    init = Path(installed.__file__)
    spec = importlib.util.spec_from_file_location("kernels", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__all__ == [] and not hasattr(module, "gated_edit")
    assert torch.ops.persedit.gated_edit is not None  # the op registered by peft_persedit.kernels still works
