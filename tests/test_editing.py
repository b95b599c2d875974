"""The editing engine step by step on tiny models, and end to end on the embedded model (real_model)."""

from __future__ import annotations

import pytest
import torch
from helpers import PREFS, edit_layers, tiny_pm
from peft import get_peft_model
from tiny_models import TINY_ARCHS, make_tiny_model

from peft_persedit import PersonalizationEditConfig
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing.chat import SubjectNotFoundError, chat_text, encode, subject_token_index
from peft_persedit.editing.clusters import cluster_members, kmeans, parse_synonyms
from peft_persedit.editing.decoding import generate_texts
from peft_persedit.editing.gate import calibrate, cluster_max_scores, leaked_inputs
from peft_persedit.editing.keys import layer_inputs
from peft_persedit.editing.solve import solve_clusters
from peft_persedit.preferences import Preference

EARLIER_TURNS = [
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Can you suggest a name for a sailing boat?", "How about 'Sea Breeze'?"),
    ("What is 12 times 7?", "12 times 7 is 84."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
    ("Translate 'good morning' into Spanish.", "Buenos días."),
    ("Give me a tip for sleeping better.", "Keep a regular bedtime and avoid screens before bed."),
]


def test_key_token_is_the_subjects_last_token(tokenizer):
    text = chat_text(tokenizer, "What's my hobby?")
    index = subject_token_index(tokenizer, text, "What's my hobby?", "hobby")
    ids = encode(tokenizer, text)
    assert tokenizer.decode(ids[: index + 1]).endswith("hobby")
    assert subject_token_index(tokenizer, text, "What's my hobby?", "x", key_token="prompt_last") == len(ids) - 1
    with pytest.raises(SubjectNotFoundError, match="'color'.*does not occur"):
        subject_token_index(tokenizer, text, "What's my hobby?", "color", name="p1")


def test_layer_inputs_match_a_forward_hook(tokenizer):
    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    seqs = [encode(tokenizer, chat_text(tokenizer, q)) for q in ("What's my pet?", "Hi")]
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach().clone()))
    pm(input_ids=torch.tensor([seqs[0]]))
    handle.remove()
    got = layer_inputs(pm, [layer], seqs, pad=2, positions=[4, 1])[0]
    assert torch.allclose(got[0], seen[0][4], atol=1e-6)
    every = layer_inputs(pm, [layer], seqs, pad=2)[0]
    assert every.shape[0] == sum(len(s) for s in seqs)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_layer_inputs_on_a_shared_prefix_cache_match_full_forwards(tokenizer, arch):
    """Sequences that share leading tokens (a system turn, earlier chat turns) run on one cache of them: the inputs
    read are those of full forwards, in the order given, whatever the grouping and batching (every architecture)."""
    pm = get_peft_model(make_tiny_model(arch), PersonalizationEditConfig(layers_to_transform=[0, 1])).eval()
    layers = edit_layers(pm)
    history = [("Hi", "Hello!"), ("A color?", "Blue.")]
    texts = [chat_text(tokenizer, q, history=history if i % 2 else ()) for i, q in
             enumerate(["My pet?", "My job?", "Where do I live?", "My car?", "Hi"])]
    seqs = [encode(tokenizer, t) for t in texts]
    assert max(len(s) for s in seqs) <= 128  # gpt2 and gptj learn 128 positions
    positions = [len(s) - 2 for s in seqs]
    lead = [len(encode(tokenizer, chat_text(tokenizer, "a", history=history if i % 2 else ()))) - 4
            for i in range(len(seqs))]
    plain = layer_inputs(pm, layers, seqs, 2, positions)
    for batch_size in (2, 32):
        cached = layer_inputs(pm, layers, seqs, 2, positions, batch_size=batch_size, shared=lead)
        for a, b in zip(plain, cached):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    capped = layer_inputs(pm, layers, seqs, 2, [3] * len(seqs), shared=lead)  # a key token inside the prefix
    assert torch.allclose(capped[0], layer_inputs(pm, layers, seqs, 2, [3] * len(seqs))[0], atol=1e-5)
    with pytest.raises(ValueError, match="need positions"):
        layer_inputs(pm, layers, seqs, 2, shared=lead)


def test_solve_maps_every_key_to_its_residual():
    torch.manual_seed(0)
    keys = [torch.randn(3, 64), torch.randn(1, 64), torch.randn(5, 64)]
    residuals = torch.randn(3, 32)
    x = torch.randn(500, 64)
    for c_inv in (None, torch.linalg.inv(x.T @ x / 500 + 0.01 * torch.eye(64))):
        A, B = solve_clusters(keys, residuals, c_inv, ridge=1e-6)
        for c, k in enumerate(keys):
            assert A[c].shape == (1, 64) and B[c].shape == (32, 1)
            assert torch.allclose(k @ A[c].T @ B[c].T, residuals[c].expand(k.shape[0], -1), atol=1e-3)


def test_solve_preserves_what_the_gate_lets_through():
    torch.manual_seed(0)
    keys = [torch.randn(2, 64), torch.randn(1, 64)]
    twin = keys[1] + 0.05 * torch.randn(1, 64)  # another preference's subject token, nearly the same input
    residuals = torch.randn(2, 32)
    A, B = solve_clusters(keys, residuals, None, ridge=1e-8, preserve=[torch.zeros(0, 64), twin])
    assert torch.allclose(keys[1] @ A[1].T @ B[1].T, residuals[1][None], atol=1e-3)
    assert torch.allclose(twin @ A[1].T @ B[1].T, torch.zeros(1, 32), atol=1e-3)
    assert torch.allclose(keys[0] @ A[0].T @ B[0].T, residuals[0].expand(2, -1), atol=1e-3)
    leaks = leaked_inputs(torch.cat([twin, torch.randn(3, 64)]), torch.tensor([[0.2, 0.95], [0.1, 0.2], [0.9, 0.1],
                                                                                 [0.3, 0.3]]),
                          torch.tensor([[True, True], [True, True], [False, True], [True, True]]),
                          torch.tensor([0.8, 0.9]), limit=4)
    assert leaks[0].shape == (0, 64) and torch.equal(leaks[1], twin)  # masked rows never leak


def test_gate_calibration_separates_near_and_far():
    torch.manual_seed(0)
    center = torch.zeros(16)
    key = torch.nn.functional.normalize(torch.randn(1, 16), dim=-1)
    near = key + 0.05 * torch.randn(10, 16)
    far = torch.randn(2000, 16)
    pos = cluster_max_scores(near, center, [key])[:, 0]
    neg = cluster_max_scores(far, center, [key])
    cal = calibrate([pos], neg, false_fire_rate=1e-3)
    tau = cal.tau[0]
    assert bool((pos >= tau).all()) and float((neg[:, 0] >= tau).float().mean()) <= 1e-3


def test_synonym_parsing_and_cluster_members():
    assert parse_synonyms("1. Pastime, interest\n- Hobby, leisure activity.", "hobby", 4) == [
        "pastime", "interest", "leisure activity"]
    members = cluster_members(PREFS[1], ["animal", "companion"])
    assert members == [("What's my pet?", "pet"), ("What's my animal?", "animal"),
                       ("What's my companion?", "companion")]
    assert cluster_members(PREFS[0])[1] == ("What's my pastime?", "pastime")
    x = torch.randn(20, 8)
    assert kmeans(x, 4).shape == (4, 8) and kmeans(x[:3], 4).shape == (3, 8)


def test_a_later_edit_is_calibrated_against_the_adapters_earlier_preferences(tokenizer, monkeypatch):
    import peft_persedit.editing.editor as editor_module

    seen = []
    real = editor_module.calibrate
    monkeypatch.setattr(editor_module, "calibrate",
                        lambda pos, neg, *a: seen.append(neg.shape[0]) or real(pos, neg, *a))
    pm = tiny_pm()
    editor = PersonalizationEditor(pm, tokenizer, progress=False)
    editor.edit([PREFS[1]], verify=False)  # round 1: the pet
    assert [(a, p.id) for a, p in editor._held(["default"], exclude=set())] == [("default", PREFS[1].id)]
    assert editor._held(["default"], exclude={PREFS[1].id}) == []
    editor.edit([PREFS[2]], verify=False)  # round 2: the city, in the same adapter

    def answered(pref: Preference) -> int:  # question + answer tokens (mom2="none": no neutral samples)
        return len(encode(tokenizer, chat_text(tokenizer, pref.question)) + encode(tokenizer, pref.target))

    assert seen == [answered(PREFS[1]), answered(PREFS[2]) + answered(PREFS[1])]
    editor.edit_users({"other": [PREFS[0]]}, verify=False)
    assert seen[-1] == answered(PREFS[0])  # another adapter's preferences are not this one's negatives


def test_edit_forget_update_on_tiny_model(tokenizer):
    pm = tiny_pm()
    editor = PersonalizationEditor(pm, tokenizer, progress=False)
    report = editor.edit([PREFS[0], PREFS[2]], verify=False)
    layer = edit_layers(pm)[0]
    assert layer.num_clusters("default") == 2 and set(report.timings) >= {"values", "keys", "solve", "gate"}
    ids = torch.tensor([encode(tokenizer, chat_text(tokenizer, q)) for q in ("What's my pet?", "What's my cat?")])
    before = pm(ids).logits.detach()
    bank_before = {n: t.clone() for n, t in vars(layer.bank("default")).items() if torch.is_tensor(t)}
    editor.edit([PREFS[1]], verify=False)
    assert [p.id for p in editor.preferences] == [PREFS[0].id, PREFS[2].id, PREFS[1].id]
    editor.forget(PREFS[1].id)  # back to exactly the state before it was added
    assert torch.equal(pm(ids).logits, before)
    for name, tensor in vars(layer.bank("default")).items():
        if torch.is_tensor(tensor):
            assert torch.equal(tensor, bank_before[name]), name
    with pytest.raises(ValueError, match="already holds"):
        editor.edit([PREFS[0]], verify=False)
    editor.update(Preference("hobby", "What's my hobby?", "Chess", id=PREFS[0].id), verify=False)
    assert [p.target for p in editor.preferences] == ["Oslo", "Chess"] and layer.num_clusters("default") == 2
    with pytest.raises(KeyError, match="no preference"):
        editor.forget("nope")


def test_forget_leaves_other_adapters_and_clusters_bit_identical(tokenizer):
    pm = tiny_pm(mom2="none")
    editor = PersonalizationEditor(pm, tokenizer, progress=False)
    editor.edit_users({"alice": PREFS[:2], "bob": PREFS[2:]}, verify=False)
    ids = torch.tensor([encode(tokenizer, chat_text(tokenizer, "Which city do I live in?"))])
    pm.set_adapter("bob")
    bob = pm(ids).logits.detach()
    PersonalizationEditor(pm, tokenizer, adapter_name="alice", progress=False).forget(PREFS[0].id)
    assert torch.equal(pm(ids).logits, bob)


def test_saved_adapter_keeps_its_preferences(tokenizer, tmp_path):
    pm = tiny_pm()
    PersonalizationEditor(pm, tokenizer, progress=False).edit(PREFS[:2], verify=False)
    pm.save_pretrained(tmp_path / "a")
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "a")
    assert [p.id for p in PersonalizationEditor(loaded, tokenizer).preferences] == [p.id for p in PREFS[:2]]


@pytest.mark.real_model
def test_real_model_three_preferences(smol):
    model, tokenizer = smol
    from peft_persedit.data_paths import dataset_path
    from peft_persedit.preferences import load_preferences

    prefs = load_preferences(dataset_path("upqa_balanced100"))[::40][:3]
    pm = get_peft_model(model, PersonalizationEditConfig())
    editor = PersonalizationEditor(pm, tokenizer, progress=False)
    report = editor.edit_users({f"user{i}": [p] for i, p in enumerate(prefs)})
    assert report.efficacy >= 2 / 3, str(report)
    neutral = "What is the capital of France?"
    from peft_persedit.editing.verify import answer_questions, target_hit

    base = answer_questions(pm, tokenizer, [neutral], ["__base__"])
    adapters = [r.adapter for r in report.results]
    assert answer_questions(pm, tokenizer, [neutral] * 3, adapters) == base * 3
    # a product request the edit never saw (UPQA's, not a shipped template) is answered with the preference
    product = answer_questions(pm, tokenizer, [p.product_question for p in prefs], adapters)
    assert sum(target_hit(a, p.target) for a, p in zip(product, prefs)) >= 2, product
    # deep in a chat: the literal question after six earlier turns, written here (the edit never saw them)
    chat = [encode(tokenizer, chat_text(tokenizer, p.question, history=EARLIER_TURNS)) for p in prefs]
    pm.eval()  # mixed-adapter generation
    later = [a.strip() for a in generate_texts(pm, tokenizer, chat, max_new_tokens=24, batch_size=4,
                                                  adapters=adapters)]
    assert sum(target_hit(a, p.target) for a, p in zip(later, prefs)) >= 2, later


def test_synonym_keys_never_sit_inside_another_members_question():
    pref = Preference("food preference", "What's my food preference?", "Granola")
    assert cluster_members(pref, ["food", "diet"]) == [("What's my food preference?", "food preference"),
                                                        ("What's my diet?", "diet")]
    short = Preference("food", "What's my food?", "Granola")
    assert cluster_members(short, ["food preference", "meal"]) == [("What's my food?", "food"),
                                                                   ("What's my meal?", "meal")]


@pytest.fixture
def seen(monkeypatch) -> list:
    """The value requests every ``optimize_values`` call of the editor receives, collected while it runs."""
    from peft_persedit.editing import editor as editor_module

    class Requests(list):
        spy = None

    requests = Requests()
    optimize = editor_module.optimize_values

    def spy(*args, **kwargs):
        requests.extend(args[2])
        spy.options = kwargs
        return optimize(*args, **kwargs)

    requests.spy = spy  # .spy.options: the keyword arguments of the last call

    monkeypatch.setattr(editor_module, "optimize_values", spy)
    return requests


def test_values_are_also_fit_after_earlier_chat_turns(tokenizer, seen):
    """value_histories=[1, 2]: each preference's δ is optimized on its question bare and after 1 and 2 turns of
    the model's own chat (its answers to held-in neutral prompts), ending in the same question."""
    from peft_persedit.editing.selftext import chat_turns

    pm = tiny_pm(value_histories=[1, 2], request_templates=0)
    PersonalizationEditor(pm, tokenizer, progress=False).edit(PREFS[1:], verify=False)
    with pm.disable_adapter():
        turns = chat_turns(pm, tokenizer)
    assert [len(request.prompts) for request in seen] == [3, 3]
    for request, pref in zip(seen, PREFS[1:]):
        texts = [tokenizer.decode(ids) for ids, _ in request.prompts]
        assert texts[0] == tokenizer.decode(encode(tokenizer, chat_text(tokenizer, pref.question)))
        for text, count in zip(texts[1:], (1, 2)):
            held = [text.rfind(p) for p, _ in turns if p in text]
            assert len(held) >= count and text.rfind(pref.question) > max(held)  # the question comes last
        for ids, index in request.prompts:  # the key token is the subject's, in the final question
            assert pref.subject in tokenizer.decode(ids[: index + 1])[-len(pref.subject) - 2:]
    assert edit_layers(pm)[0].num_clusters("default") == 2


def test_value_rows_per_step_reaches_the_value_steps(tokenizer, seen):
    pm = tiny_pm(value_rows_per_step=2, value_histories=[1], request_templates=1)
    PersonalizationEditor(pm, tokenizer, progress=False).edit(PREFS[1:2], verify=False)
    assert seen.spy.options["rows_per_step"] == 2 and len(seen[0].prompts) == 3


def test_value_warmup_reaches_the_value_steps(tokenizer, seen):
    pm = tiny_pm(value_warmup_steps=6)
    PersonalizationEditor(pm, tokenizer, progress=False).edit(PREFS[1:2], verify=False)
    assert seen.spy.options["warmup"] == 6


def test_request_templates_add_subject_requests_to_keys_and_values(tokenizer, seen):
    """request_templates=2: each cluster is also keyed on, and its δ fit on, the first two shipped requests about
    its subject ("Any recommendations related to my pet?", ...), after its own question."""
    from peft_persedit.editing.clusters import request_members
    from peft_persedit.prompts import load_prompt_set

    templates = load_prompt_set("request_templates")
    assert len(templates) >= 4 and all("{subject}" in t for t in templates)
    assert request_members(PREFS[1], 2) == [(t.format(subject="pet"), "pet") for t in templates[:2]]
    pm = tiny_pm(request_templates=2, value_histories=[])
    editor = PersonalizationEditor(pm, tokenizer, progress=False)
    members = editor.members([("default", p) for p in PREFS[1:]])
    assert [m[-2:] for m in members] == [request_members(p, 2) for p in PREFS[1:]]
    report = editor.edit(PREFS[1:], verify=False)
    assert [r.cluster_size for r in report.results] == [3, 3]
    for request, pref in zip(seen, PREFS[1:]):
        texts = [tokenizer.decode(ids) for ids, _ in request.prompts]
        assert len(texts) == 3 and pref.question in texts[0]
        assert all(q in text for (q, _), text in zip(request_members(pref, 2), texts[1:]))
        for ids, index in request.prompts:
            assert pref.subject in tokenizer.decode(ids[: index + 1])[-len(pref.subject) - 2:]


def test_clusters_are_also_keyed_after_earlier_chat_turns(tokenizer):
    """key_histories=[1, 3]: each cluster gets, besides its k-means keys, the keys of its own question after 1 and
    3 earlier turns of the model's own chat, so the gate fires on that question deep in a conversation."""
    from peft_persedit.editing.keys import cluster_keys

    pm = tiny_pm(key_histories=[1, 3], value_histories=[], request_templates=0)
    editor = PersonalizationEditor(pm, tokenizer, progress=False)
    jobs = [("default", p) for p in PREFS[1:]]
    members, contexts = editor.members(jobs), editor.key_contexts()
    prompts, owner, shared = editor.key_prompts(jobs, members, contexts)
    plain = sum(len(c) for c in members) * len(contexts)
    assert len(prompts) == plain + 2 * len(jobs) and owner[plain:].tolist() == [0, 0, 1, 1]
    histories = editor.chat_histories([1, 3], seed=7)
    assert [len(h) for h in histories] == [1, 3]
    for (ids, index), (_, pref), history in zip(prompts[plain:], [jobs[0]] * 2 + [jobs[1]] * 2, histories * 2):
        text = tokenizer.decode(ids)
        assert all(q in text for q, _ in history) and text.rfind(pref.question) > text.rfind(history[-1][0])
        assert tokenizer.decode(ids[: index + 1]).endswith(pref.subject)
    x = layer_inputs(pm, edit_layers(pm), [p for p, _ in prompts], 2, [i for _, i in prompts])[0]
    keys = cluster_keys(x, owner, [len(c) for c in members], len(contexts), 16, 2)
    for i, k in enumerate(keys):  # the history keys are kept as they are, after the k-means keys
        assert torch.equal(k[-2:], x[plain:][owner[plain:] == i])
    layer = edit_layers(pm)[0]
    editor.edit(PREFS[1:], verify=False)
    assert torch.bincount(layer.persedit_key_cluster["default"]).tolist() == [len(k) for k in keys]


def test_questions_about_the_same_subject_are_not_gate_negatives(tokenizer):
    """Another user's question about the same subject ("Where does my family live?" for "What's my family
    like?") is one a cluster's gate should fire on: its subject token is not a negative for τ."""
    from peft_persedit.editing.gate import own_subject_mask

    prefs = [Preference("family", "Where does my family live?", "Oslo"),
             Preference("family", "What's my family like?", "Two sons"), PREFS[1]]
    editor = PersonalizationEditor(tiny_pm(request_templates=0), tokenizer, progress=False)
    jobs = [(f"u{i}", p) for i, p in enumerate(prefs)]
    editor._check_jobs(jobs)  # creates the users' adapters
    negatives = editor._negatives(jobs, editor.members(jobs))
    assert negatives.same_subject.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    usable = own_subject_mask(0, negatives.token_owner, negatives.is_subject, negatives.same_subject)
    subject_rows = negatives.is_subject.nonzero().flatten()
    assert usable[subject_rows].tolist() == negatives.same_subject.logical_not().tolist()
