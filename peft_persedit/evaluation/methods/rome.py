"""ROME-per-synonym, the paper's baseline, reproduced with this engine's ungated single-edit mode.

Config ``PersonalizationEditConfig(gate="none", mom2="none", synonyms=0, request_templates=0,
value_histories=[], key_histories=[])``: plain rank-one edits ΔW = δ kᵀ/‖k‖² (no gate, C = I), δ fit on the
question alone as the paper does (not on persedit's request templates and chat histories; no keys after chat
turns). A preference's cluster — its question and
one rewrite per synonym (the data's cluster, else the synonyms the base model gives, as persedit uses) — is edited
one question at a time, each as its own ``Preference(subject=synonym, question=synonym question, target)``, in
sequence: edit j sees edits < j.
Users are independent adapters, so round j edits question j of every user in one batched call.
"""

from __future__ import annotations

from peft import get_peft_model

from ...config import PersonalizationEditConfig
from ...editing import PersonalizationEditor
from ...editing.clusters import cluster_members, model_synonyms
from ...preferences import Preference
from .method import AdapterMethod, Users

ROME_CONFIG = dict(gate="none", mom2="none", synonyms=0, request_templates=0, value_histories=[],
                   key_histories=[], value_warmup_steps=0)


def synonym_edits(users: Users, synonyms: dict[str, list[str]]) -> dict[str, list[Preference]]:
    """Per user, the single-question preferences to edit in order (cluster by cluster)."""
    return {user: [Preference(subject, question, pref.target, id=f"{pref.id}~{j}")
                   for pref in prefs
                   for j, (question, subject) in enumerate(cluster_members(pref, synonyms.get(pref.subject)))]
            for user, prefs in users.items()}


class ROME(AdapterMethod):
    name = "rome"

    def personalize(self, users: Users) -> None:
        n = PersonalizationEditConfig().synonyms  # as many synonyms as persedit asks for
        subjects = [p.subject for prefs in users.values() for p in prefs if not p.questions]
        synonyms = model_synonyms(self.model, self.tokenizer, subjects, n) if subjects and n else {}
        self.model = get_peft_model(self.model, PersonalizationEditConfig(**ROME_CONFIG),
                                    adapter_name="template").eval()
        editor = PersonalizationEditor(self.model, self.tokenizer, adapter_name="template", progress=False)
        queues = synonym_edits(users, synonyms)
        rounds = max(len(q) for q in queues.values())
        for j in range(rounds):
            editor.edit_users({u: q[j:j + 1] for u, q in queues.items() if j < len(q)}, verify=False)
        self.info.update(rounds=rounds, edits_per_preference=sum(map(len, queues.values())) / max(
            1, sum(map(len, users.values()))))
