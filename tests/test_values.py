"""The value step (δ* for every preference at once): prefix caches, chunk subsets, shared chat-turn caches,
sampled prompts per step and the continuation KL, on tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers import PREFS, edit_layers, multi_prompt_requests, tiny_pm
from peft import get_peft_model
from tiny_models import TINY_ARCHS, make_tiny_model

from peft_persedit import PersonalizationEditConfig
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing.chat import chat_text, encode, subject_token_index


@pytest.mark.parametrize("frozen", [False, True])
def test_value_chunk_subset_scores_its_rows_as_the_full_chunk_does(tokenizer, frozen):
    from peft_persedit.editing.frozen_blocks import FrozenBlocks
    from peft_persedit.editing.prefix_cache import decoder_of
    from peft_persedit.editing.value_chunks import Chunk, ValueRequest, value_rows

    pm = tiny_pm()
    requests = []
    for pref in PREFS:
        text = chat_text(tokenizer, pref.question)
        prompt = (encode(tokenizer, text), subject_token_index(tokenizer, text, pref.question, pref.subject))
        requests.append(ValueRequest([prompt], encode(tokenizer, pref.target), (encode(tokenizer, "pet is a"), 0)))
    rows = value_rows(requests, kl_weight=0.0625)
    blocks = FrozenBlocks(decoder_of(pm), edit_layers(pm)[0]) if frozen else None
    chunk = Chunk(pm, rows, list(range(len(rows))), 2, None, torch.device("cpu"), blocks)
    assert (chunk.frozen_output is not None) == frozen
    with torch.no_grad():
        full = chunk.log_probs(pm)
        keep = torch.tensor([r.owner != 1 for r in chunk.rows])
        part = chunk.subset(keep)
        kept_positions = keep[chunk.flat_rows]
        assert [r.owner for r in part.rows] == [0, 0, 2, 2] and part.cache is not chunk.cache
        torch.testing.assert_close(part.log_probs(pm), full[kept_positions], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunk.log_probs(pm), full)  # the full chunk's prefix cache is untouched


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_value_chunks_score_as_plain_forwards_of_each_row(tokenizer, arch, frozen):
    """Each chunk's log-probs, δ at every row's subject token, equal a plain forward of the row's whole sequence:
    rows after one history (a shared batch-1 cache), rows that share only the system turn (one batch-1 cache of it,
    extended by each row's own rest) and KL rows with one prefix (the lead alone, per row), on every architecture;
    also when the blocks below δ's layer replay the output captured when the chunk was built (``frozen``)."""
    from peft_persedit.editing.frozen_blocks import FrozenBlocks
    from peft_persedit.editing.prefix_cache import decoder_of
    from peft_persedit.editing.value_chunks import ValueRequest, make_chunks, value_rows
    from peft_persedit.editing.values import _AddDelta

    pm = get_peft_model(make_tiny_model(arch), PersonalizationEditConfig(layers_to_transform=[1])).eval()
    layer = edit_layers(pm)[0]
    history = [("Hi", "Hello!")]
    split = encode(tokenizer, chat_text(tokenizer, "x", history=history))
    requests = []
    for pref in PREFS:
        prompts, shared = [], []
        for turns in ((), history):
            text = chat_text(tokenizer, pref.question, history=turns)
            ids = encode(tokenizer, text)
            prompts.append((ids, subject_token_index(tokenizer, text, pref.question, pref.subject)))
            shared.append(next(i for i, (a, b) in enumerate(zip(ids, split)) if a != b) if turns else 0)
        kl_prompt = (encode(tokenizer, "my pet is a"), len(encode(tokenizer, "my pet")) - 1)  # one lead, no rest
        requests.append(ValueRequest(prompts, encode(tokenizer, pref.target), kl_prompt, None, shared))
    rows = value_rows(requests, kl_weight=0.1)
    blocks = FrozenBlocks(decoder_of(pm), layer) if frozen else None
    assert not frozen or len(blocks.blocks) == 1
    chunks = make_chunks(pm, requests, rows, 2, 2, torch.device("cpu"), frozen=blocks)
    kinds = {"shared" if c.shared else "lead + rest" if c.prefix_len > c.lead > 0 else "lead" if c.lead else "own"
             for c in chunks}
    assert kinds == {"shared", "lead + rest", "lead"}, kinds
    shared = [c for c in chunks if c.shared]  # the rows after the history, 2 per chunk: one cache of it for all
    assert len(shared) > 1 and all(c.cache is shared[0].cache for c in shared)
    delta = torch.randn(len(PREFS), layer.out_features)
    hook = _AddDelta()
    handle = layer.register_forward_hook(hook)
    try:
        for chunk in chunks:
            hook.delta, hook.owner, hook.at = delta, chunk.owner, chunk.at
            with torch.no_grad():
                got = chunk.log_probs(pm)
            for j, r in enumerate(chunk.rows):
                hook.owner, hook.at = chunk.owner[j:j + 1], torch.tensor([len(r.prefix) + r.at])
                with torch.no_grad():
                    logits = pm(input_ids=torch.tensor([r.prefix + r.suffix])).logits[0]
                expected = torch.log_softmax(logits[[len(r.prefix) + p for p in r.loss_pos]].float(), -1)
                torch.testing.assert_close(got[chunk.flat_rows == j], expected, atol=1e-4, rtol=1e-4)
    finally:
        handle.remove()


def test_value_chunk_losses_equal_a_row_by_row_computation(tokenizer):
    """The chunk's vectorized losses (target NLL rows, neutral KL rows, continuation KL rows), greedy flags and their
    gradient equal a plain row-by-row computation of the same definitions."""
    from peft_persedit.editing.value_chunks import Chunk, ValueRequest, value_rows

    requests = []
    for pref in PREFS:
        text = chat_text(tokenizer, pref.question)
        prompt = (encode(tokenizer, text), subject_token_index(tokenizer, text, pref.question, pref.subject))
        kl_prompt = (encode(tokenizer, "pet is a"), 0)
        requests.append(ValueRequest([prompt, prompt], encode(tokenizer, pref.target), kl_prompt,
                                     continuation=encode(tokenizer, " It is calm.")))
    rows = value_rows(requests, kl_weight=0.0625, continuation_weight=0.5)
    chunk = Chunk(tiny_pm(), rows, list(range(len(rows))), 2, None, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    positions, vocab = len(chunk.flat_pos), int(chunk.labels.max()) + 8
    logits = torch.randn(positions, vocab, generator=generator)
    first = next(j for j, r in enumerate(chunk.rows) if not r.is_kl)  # this row's target is the argmax: greedy
    span = (chunk.flat_rows == first).nonzero().flatten()
    logits[span, chunk.labels[span]] = 50.0
    logp = torch.log_softmax(logits, -1).requires_grad_(True)
    reference = {chunk.index[j]: torch.log_softmax(torch.randn(len(r.loss_pos), vocab, generator=generator), -1)
                 for j, r in enumerate(chunk.rows) if r.is_kl}
    loss, greedy = chunk.losses(logp, reference)
    expected, expected_greedy, offset = [], [], 0
    for j, r in enumerate(chunk.rows):
        at = slice(offset, offset + len(r.loss_pos))
        offset += len(r.loss_pos)
        if r.is_kl:
            ref = reference[chunk.index[j]]
            expected.append(torch.sum(ref.exp() * (ref - logp[at])) / len(r.loss_pos))
            expected_greedy.append(True)
        else:
            labels = chunk.labels[at]
            expected.append(-logp[at].gather(1, labels[:, None]).mean())
            expected_greedy.append(bool((logp[at].argmax(-1) == labels).all()))
    expected = torch.stack(expected)
    assert greedy.tolist() == expected_greedy and greedy[first] and not greedy.all()
    torch.testing.assert_close(loss, expected)
    weights = torch.rand(len(chunk.rows), generator=generator)
    (grad,) = torch.autograd.grad((loss * weights).sum(), logp)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logp)
    torch.testing.assert_close(grad, expected_grad)


def test_sampled_value_steps_use_the_question_and_k_minus_1_drawn_prompts(tokenizer):
    """rows_per_step=k: a sampled step keeps each preference's bare question, k − 1 of its other prompts (drawn
    afresh) and its KL row."""
    from peft_persedit.editing.value_chunks import value_rows
    from peft_persedit.editing.values import sampled_rows, target_rows

    rows = value_rows(multi_prompt_requests(tokenizer), kl_weight=0.0625)
    generator = torch.Generator().manual_seed(0)
    draws = [sampled_rows(rows, target_rows(rows), 2, generator) for _ in range(8)]
    for use in draws:
        for owner in range(len(PREFS)):
            mine = [j for j, r in enumerate(rows) if r.owner == owner]
            targets = [j for j in mine if not rows[j].is_kl]
            assert use[targets[0]] and sum(bool(use[j]) for j in targets) == 2
            assert all(use[j] for j in mine if rows[j].is_kl)
    assert len({tuple(u.tolist()) for u in draws}) > 1  # the other prompt changes from step to step
    assert sampled_rows(rows, target_rows(rows), 9, generator).all()


def test_sampled_value_steps_equal_full_steps_when_k_covers_every_prompt(tokenizer, monkeypatch):
    """With k ≥ a preference's prompts, sampled steps are full steps (same loss normalization): same δ — and the
    same references (‖v‖, KL), recorded by the first step when it runs every row and by a pass of their own when it
    is sampled. With k = 2 only the last (and every full_every-th) step runs every row."""
    from peft_persedit.editing import values

    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    requests = multi_prompt_requests(tokenizer)
    common = dict(steps=4, lr=0.5, nll_stop=-1.0, progress=False)  # nll_stop < 0: nobody finishes early
    every = values.optimize_values(pm, layer, requests, 2, **common).deltas
    covered = values.optimize_values(pm, layer, requests, 2, rows_per_step=4, **common).deltas
    torch.testing.assert_close(covered, every)
    seen, backward = [], values._backward
    monkeypatch.setattr(values, "_backward", lambda *a, **k: seen.append(a[-1] is None) or backward(*a, **k))
    sampled = values.optimize_values(pm, layer, requests, 2, rows_per_step=2, full_every=2, **common).deltas
    assert seen == [False, True, False, True] and sampled.isfinite().all() and not torch.equal(sampled, every)


def test_value_warmup_runs_the_bare_question_until_it_is_said_then_every_prompt(tokenizer, monkeypatch):
    """warmup = w: a preference's first steps run only its warm-up rows (here, without history prompts, its bare
    question and KL rows, counted as one target row) until greedy decoding says its target there; from the next
    step on they run every row, and only such a step can finish it. From step w, and on the last step, every row
    of every preference runs, so each final NLL is over all its prompts."""
    from peft_persedit.editing import values
    from peft_persedit.editing.value_chunks import value_rows

    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    requests = multi_prompt_requests(tokenizer)  # 3 preferences × (4 prompts + 1 KL row)
    rows = value_rows(requests, kl_weight=0.0625)
    alone = torch.tensor([r.is_kl or j == min(i for i, x in enumerate(rows) if x.owner == r.owner)
                          for j, r in enumerate(rows)])
    backward, steps = values._backward, []

    def first_says_it_at_once(*args, **kwargs):  # preference 0's bare question is said from the first step
        steps.append((args[6].tolist(), None if args[7] is None else args[7].tolist()))
        nll, greedy = backward(*args, **kwargs)
        first = torch.arange(3) == 0
        return torch.where(first, 0.0, nll), greedy | first

    monkeypatch.setattr(values, "_backward", first_says_it_at_once)
    common = dict(steps=4, lr=0.5, nll_stop=0.1, progress=False)
    result = values.optimize_values(pm, layer, requests, 2, warmup=9, **common)
    owner = torch.tensor([r.owner for r in rows])
    assert steps[0] == ([1.0, 1.0, 1.0], alone.tolist())
    assert steps[1] == ([4.0, 1.0, 1.0], (alone | (owner == 0)).tolist())  # preference 0: every row
    assert steps[3] == ([4.0, 4.0, 4.0], None)  # the last step: every row of every preference
    assert result.final_nll[0] == 0.0 and result.final_nll.isfinite().all()
    quiet = values.optimize_values(pm, layer, requests, 2, **common)
    assert not torch.equal(quiet.deltas, result.deltas)
    steps.clear()
    values.optimize_values(pm, layer, requests, 2, warmup=1, **common)  # every row from step 1 on
    assert steps[0][1] == alone.tolist() and [use for _, use in steps[1:]] == [None] * 3


def test_value_warmup_is_a_no_op_for_preferences_whose_warmup_rows_are_all_their_rows(tokenizer, monkeypatch):
    """One prompt per preference (the paper's ROME): nothing to narrow, so δ and the final NLL are those without a
    warm-up; a warming preference could not finish on the step its target is first said (here preference 0's, at
    step 0, so it keeps δ = 0)."""
    from peft_persedit.editing import values

    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    requests = multi_prompt_requests(tokenizer, prompts_per_pref=1)
    backward, first = values._backward, torch.arange(len(requests)) == 0

    def first_says_it_at_once(*args, **kwargs):
        nll, greedy = backward(*args, **kwargs)
        return torch.where(first, 0.0, nll), greedy | first

    monkeypatch.setattr(values, "_backward", first_says_it_at_once)
    common = dict(steps=4, lr=0.5, nll_stop=0.1, progress=False)
    plain = values.optimize_values(pm, layer, requests, 2, **common)
    warmed = values.optimize_values(pm, layer, requests, 2, warmup=10, **common)
    assert not plain.deltas[0].any() and plain.deltas[1:].norm(dim=-1).gt(0).all()
    torch.testing.assert_close(warmed.deltas, plain.deltas)
    torch.testing.assert_close(warmed.final_nll, plain.final_nll)


def test_warmup_rows_are_the_bare_question_the_longest_history_prompt_and_the_kl_rows():
    """A warming preference runs its first target row, its target row after the longest shared chat history (none
    when it has no history prompt) and its KL rows."""
    from peft_persedit.editing.value_chunks import Row
    from peft_persedit.editing.values import target_rows, warmup_rows

    def row(owner: int, prefix: int, shared: bool = False, kl: bool = False) -> Row:
        return Row(owner, [1] * prefix, [2], [0], [-1 if kl else 3], kl, shared=shared)

    rows = [row(0, 1), row(0, 2), row(0, 9, shared=True), row(0, 5, shared=True), row(0, 1, kl=True),
            row(1, 1), row(1, 3)]
    assert warmup_rows(rows, target_rows(rows)).tolist() == [True, False, True, False, True, True, False]


def test_value_rows_of_unfinished_preferences_are_regrouped_when_most_rows_are_finished(tokenizer, monkeypatch):
    """Once at most half of the chunks' rows are unfinished, those rows are regrouped into new, fuller chunks (one
    forward per chunk instead of many near-empty ones); δ is what the chunks of every row give."""
    from peft_persedit.editing import values

    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    requests = multi_prompt_requests(tokenizer)  # 3 preferences × (4 prompts + 1 KL row)
    backward, chunked = values._backward, values.make_chunks

    def first_two_finish_at_once(*args, **kwargs):  # preferences 0 and 1 say their target after the first step
        nll, greedy = backward(*args, **kwargs)
        return torch.where(torch.arange(3) < 2, 0.0, nll), greedy | (torch.arange(3) < 2)

    monkeypatch.setattr(values, "_backward", first_two_finish_at_once)
    grouped, built = [], []

    def chunks(*args, regroup: bool = True, **kwargs):
        grouped.append(args[6:])
        if args[6:] and not regroup:  # keep the chunks of every row (the finished ones are skipped in each step)
            return built[0]
        built.append(chunked(*args, **kwargs))
        return built[-1]

    common = dict(steps=4, lr=0.5, nll_stop=0.25, progress=False, batch_size=2)
    monkeypatch.setattr(values, "make_chunks", chunks)
    small = values.optimize_values(pm, layer, requests, 2, **common).deltas
    assert grouped == [(), ([10, 11, 12, 13, 14],)]  # 8 chunks of 15 rows, then preference 2's 5 rows in 3
    assert len(built[0]) == 8 and len(built[1]) == 3
    grouped.clear(), built.clear()
    monkeypatch.setattr(values, "make_chunks", lambda *args, **kwargs: chunks(*args, regroup=False, **kwargs))
    kept = values.optimize_values(pm, layer, requests, 2, **common).deltas
    assert grouped == [(), ([10, 11, 12, 13, 14],)] and len(built) == 1
    torch.testing.assert_close(small, kept, atol=1e-5, rtol=1e-4)
    assert small[2].norm() > 0 and not small[:2].any()  # finished at step 0 (δ = 0); preference 2 kept moving


def test_value_rows_after_one_history_share_a_batch_one_cache_and_score_as_own_prefixes(tokenizer):
    """Prompts after the same earlier turns (``ValueRequest.shared``) run on one batch-1 cache of those turns,
    repeated per forward; their log-probs and δ's effect equal those of rows with their own prefix caches."""
    from peft_persedit.editing.value_chunks import Chunk, ValueRequest, make_chunks, value_rows
    from peft_persedit.editing.values import _AddDelta

    pm = tiny_pm()
    history = [("Tell me a fact.", "Water boils at 100 degrees."), ("And another?", "The sky is blue.")]
    split = encode(tokenizer, chat_text(tokenizer, "x", history=history))
    requests = []
    for pref in PREFS:
        text = chat_text(tokenizer, pref.question, history=history)
        ids = encode(tokenizer, text)
        shared = next(i for i, (a, b) in enumerate(zip(ids, split)) if a != b)
        prompt = (ids, subject_token_index(tokenizer, text, pref.question, pref.subject))
        requests.append(ValueRequest([prompt], encode(tokenizer, pref.target), None, None, [shared]))
    rows = value_rows(requests)
    assert all(r.shared and r.at > 0 and r.prefix == rows[0].prefix for r in rows)
    chunks = make_chunks(pm, requests, rows, 2, 32, torch.device("cpu"))
    assert len(chunks) == 1 and chunks[0].shared and chunks[0].cache.get_seq_length() == len(rows[0].prefix)
    own = value_rows([ValueRequest(r.prompts, r.target_ids) for r in requests])  # prefix = all before the subject
    reference = Chunk(pm, own, list(range(len(own))), 2, None, torch.device("cpu"))
    hook = _AddDelta()
    layer = edit_layers(pm)[0]
    handle = layer.register_forward_hook(hook)
    try:
        delta = torch.randn(len(PREFS), layer.out_features)
        results = []
        for chunk in (chunks[0], reference):
            hook.delta, hook.owner, hook.at = None, chunk.owner, chunk.at
            with torch.no_grad():
                plain = chunk.log_probs(pm)
                hook.delta = delta
                edited = chunk.log_probs(pm)
            order = torch.argsort(chunk.owner)  # rows of both chunks by owner (flat positions: one row at a time)
            results.append([torch.cat([x[chunk.flat_rows == j] for j in order.tolist()]) for x in (plain, edited)])
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(results[0][0], results[0][1])  # δ at the subject token changes the target's odds
    finally:
        handle.remove()


def test_continuation_kl_keeps_what_the_model_says_after_the_target(tokenizer):
    """A request's ``continuation`` becomes a KL row over the positions after prompt 0 + target (the last target
    token predicts c_1); weighting it leaves the edited continuation closer to the unedited one, and the
    editor (``continuation_tokens`` > 0) fills it with the adapter's own greedy tokens."""
    from peft_persedit.editing.value_chunks import Chunk, ValueRequest, value_rows
    from peft_persedit.editing.values import _AddDelta, optimize_values

    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    with torch.no_grad():  # a random tiny model answers near-uniformly: sharpen it so δ visibly moves P
        for weight in pm.get_base_model().parameters():
            if weight.dim() == 2:
                weight.mul_(10)
    pref = PREFS[1]
    text = chat_text(tokenizer, pref.question)
    prompt = (encode(tokenizer, text), subject_token_index(tokenizer, text, pref.question, pref.subject))
    target, continuation = encode(tokenizer, pref.target), encode(tokenizer, " It is very calm.")
    request = ValueRequest([prompt], target, continuation=continuation)
    rows = value_rows([request], continuation_weight=2.0)
    assert [r.is_kl for r in rows] == [False, True] and rows[1].weight == 2.0
    kl_row = rows[1]
    # the last continuation token is only scored, never run
    assert kl_row.suffix[-len(continuation) + 1:] == continuation[:-1] and len(kl_row.loss_pos) == len(continuation)
    assert kl_row.loss_pos[-1] == len(kl_row.suffix) - 1
    assert kl_row.suffix[kl_row.loss_pos[0]] == target[-1] and kl_row.suffix[kl_row.loss_pos[0] + 1] == continuation[0]

    def continuation_kl(delta: torch.Tensor) -> float:
        chunk = Chunk(pm, [kl_row], [0], 2, None, torch.device("cpu"))
        hook = _AddDelta()
        handle = layer.register_forward_hook(hook)
        try:
            hook.owner, hook.at = chunk.owner, chunk.at
            with torch.no_grad():
                plain = chunk.log_probs(pm)
                hook.delta = delta
                edited = chunk.log_probs(pm)
        finally:
            handle.remove()
        return float((plain.exp() * (plain - edited)).sum(-1).mean())

    kls = []
    for weight in (0.0, 20.0):
        torch.manual_seed(0)
        result = optimize_values(pm, layer, [request], 2, steps=8, lr=1.0, kl_weight=0.0, nll_stop=0.0,
                                 clamp_norm_factor=1e3, progress=False, continuation_weight=weight)
        kls.append(continuation_kl(result.deltas))
    assert kls[1] < 0.2 * kls[0]

    seen_requests = []
    editor = PersonalizationEditor(tiny_pm(continuation_tokens=4), tokenizer, progress=False)
    original = editor._continuations
    editor._continuations = lambda requests, tokens: (original(requests, tokens), seen_requests.extend(requests))
    editor.edit(PREFS[1:2], verify=False)
    assert seen_requests and 0 < len(seen_requests[0].continuation) <= editor.config.continuation_tokens
