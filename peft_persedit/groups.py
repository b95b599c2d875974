"""Difference-aware group + user adapters (after DPL, "Measuring What Makes You Unique").

Users are embedded by their preferences and clustered by spherical k-means (best of ``restarts`` seeds):

    embedding="model":  e(p) = mean over the tokens of statement(p) of the base model's residual stream after
                        block l (the default edit layer), centred over all preferences and scaled to unit
                        length;  e(u) = mean_{p∈u} e(p)
    embedding="ids":    e(u) = multi-hot over preference ids (which exact preferences the user holds)

Per group the ``representatives`` members closest (cosine) to the centroid are chosen. The **group adapter**
holds the preferences held by ≥ ``share`` of them; each member's **difference adapter** holds only its
preferences that are not in the group adapter. At inference ``"group+user"`` composes both banks in one
forward (also inside mixed-user batches). A member that lacks one of the group's preferences is not composed:
its own adapter then holds all of its preferences and is used alone, so a group never speaks for a user
about something the user did not say.

Saved as ordinary PERSEDIT adapter directories ``out/groups/<group>``, ``out/users/<user>`` with
``out/index.json`` (user → group and the ``adapter_names`` entry to route the user with).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .atomic import write_text_atomic
from .config import PersonalizationEditConfig, default_layers
from .editing.chat import encode, pad_id
from .editing.clusters import kmeans
from .editing.report import EditReport
from .editing.texts import Texts, span_means, statement
from .preferences import Preference, PreferenceError, _read_items, load_preferences

__all__ = ["GroupPlan", "build_group_adapters", "dpl_context", "group_users", "load_group_adapters", "load_users",
           "preference_embeddings", "save_group_adapters"]

INDEX = "index.json"
TEMPLATE = "__group_template__"


@dataclass
class GroupPlan:
    """Who is in which group, who represents it, and what each group / user adapter holds."""

    members: dict[str, list[str]]
    representatives: dict[str, list[str]]
    group_preferences: dict[str, list[Preference]]
    user_preferences: dict[str, list[Preference]]
    user_group: dict[str, str | None]  # the group composed with the user's adapter (None: the user stands alone)
    embedding: str = "ids"
    extra: dict[str, Any] = field(default_factory=dict)

    def group_of(self, user: str) -> str:
        """The cluster the user was put in (whether or not its adapter is composed with the user's)."""
        return next(g for g, users in self.members.items() if user in users)

    def adapter_names(self, user: str) -> str:
        """The ``adapter_names`` entry for ``user``: ``"group+user"`` or ``"user"``."""
        group = self.user_group[user]
        return f"{group}+{user}" if group else user

    def to_index(self) -> dict[str, Any]:
        return {
            "users": {u: {"group": g, "adapter_names": self.adapter_names(u)} for u, g in self.user_group.items()},
            "groups": {g: {"members": users, "representatives": self.representatives[g],
                           "preferences": [p.id for p in self.group_preferences[g]]}
                       for g, users in self.members.items()},
            "embedding": self.embedding, **self.extra,
        }


def load_users(path: str | os.PathLike[str]) -> dict[str, list[Preference]]:
    """``{user: [preference items]}`` from a JSON file (items in any format :func:`load_preferences` reads)."""
    path = Path(path)
    data = _read_items(path)[0]  # the preference loader's reader: its one-line errors name the file
    if not isinstance(data, dict) or not data:
        raise PreferenceError(f"{path.name}: expected a non-empty JSON object {{user: [preference items]}}")
    users = {}
    for user, items in data.items():
        check_user_name(user)
        try:
            users[user] = load_preferences(items)
        except PreferenceError as err:
            raise PreferenceError(f"{path.name}: user {user!r}: {err.detail}", err.detail) from None
    return users


def check_user_name(name: str) -> None:
    if not name or "+" in name or name.startswith("__") or "/" in name or name in ("groups", "users"):
        raise ValueError(f"user name {name!r} cannot name an adapter (no '+', '/', leading '__', or groups/users)")


# ----------------------------------------------------------------------------------------- embeddings
@torch.no_grad()
def preference_embeddings(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase,
                          prefs: list[Preference], block: int | None = None) -> torch.Tensor:
    """[n, d]: mean over the tokens of statement(p) of the residual stream after ``block`` (default: the default
    edit layer), from the base model (a PeftModel's adapters are disabled)."""
    disabled = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if block is None:
        block = default_layers(base.config.num_hidden_layers)[0]
    sequences = [encode(tokenizer, statement(p)) or [pad_id(tokenizer)] for p in prefs]
    with disabled:
        return span_means(base, Texts(sequences, [(0, len(s)) for s in sequences]), [block], pad_id(tokenizer))[0]


def user_embeddings(users_prefs: dict[str, list[Preference]], embedding: str, model=None, tokenizer=None
                    ) -> torch.Tensor:
    """[users, d] per :data:`embedding` (see module docstring)."""
    unique = {p.id: p for prefs in users_prefs.values() for p in prefs}
    index = {pid: j for j, pid in enumerate(unique)}
    if embedding == "ids":
        x = torch.zeros(len(users_prefs), len(unique))
        for row, prefs in enumerate(users_prefs.values()):
            x[row, [index[p.id] for p in prefs]] = 1.0
        return x
    if embedding != "model":
        raise ValueError(f"embedding must be 'model' or 'ids', got {embedding!r}")
    if model is None or tokenizer is None:
        raise ValueError("embedding='model' needs model and tokenizer (or use embedding='ids')")
    e = preference_embeddings(model, tokenizer, list(unique.values()))
    e = torch.nn.functional.normalize(e - e.mean(0), dim=-1)  # every preference weighs the same in its user's mean
    return torch.stack([e[[index[p.id] for p in prefs]].mean(0) for prefs in users_prefs.values()])


def spherical_assign(x: torch.Tensor, k: int, restarts: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment [n], unit centroids [k', d]) of the best of ``restarts`` spherical k-means runs (Σ max cos)."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for s in range(restarts):
        centroids = torch.nn.functional.normalize(kmeans(x, k, seed=seed + s), dim=-1)
        sims = unit @ centroids.T
        score = float(sims.max(-1).values.sum())
        if best is None or score > best[0] + 1e-6:
            best = (score, sims.argmax(-1), centroids)
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------- plan
def group_users(users_prefs: dict[str, list[Preference]], n_groups: int, *, model=None, tokenizer=None,
                embedding: str | None = None, representatives: int = 3, share: float = 0.5, restarts: int = 8,
                seed: int = 0, prefix: str = "group") -> GroupPlan:
    """Cluster users into ≤ ``n_groups`` groups and split their preferences into group and difference adapters.

    ``embedding`` defaults to ``"model"`` when a model is given, else ``"ids"`` (see module docstring).
    """
    if not users_prefs or n_groups < 1 or representatives < 1 or not 0 < share <= 1:
        raise ValueError("need ≥ 1 user, n_groups ≥ 1, representatives ≥ 1 and 0 < share ≤ 1")
    for user, prefs in users_prefs.items():
        check_user_name(user)
        if not prefs:
            raise ValueError(f"user {user!r} has no preferences")
    embedding = embedding or ("model" if model is not None else "ids")
    users = list(users_prefs)
    x = user_embeddings(users_prefs, embedding, model, tokenizer)
    assign, centroids = spherical_assign(x, min(n_groups, len(users)), restarts, seed)
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    names: dict[int, str] = {}
    for c in assign.tolist():  # groups numbered in order of their first user
        names.setdefault(c, f"{prefix}{len(names)}")
    plan = GroupPlan({}, {}, {}, {}, {}, embedding)
    for c, group in names.items():
        rows = (assign == c).nonzero().flatten()
        closeness = unit[rows] @ centroids[c]
        reps = [users[int(rows[j])] for j in closeness.argsort(descending=True)[:representatives]]
        counts: dict[str, int] = {}
        for rep in reps:
            for p in users_prefs[rep]:
                counts[p.id] = counts.get(p.id, 0) + 1
        need = math.ceil(share * len(reps) - 1e-9)
        common = {p.id: p for rep in reps for p in users_prefs[rep] if counts[p.id] >= need}
        plan.members[group] = [users[int(r)] for r in rows]
        plan.representatives[group] = reps
        plan.group_preferences[group] = list(common.values())
        for user in plan.members[group]:
            held = {p.id for p in users_prefs[user]}
            composed = bool(common) and set(common) <= held
            plan.user_group[user] = group if composed else None
            plan.user_preferences[user] = [p for p in users_prefs[user] if not (composed and p.id in common)]
    plan.user_group = {u: plan.user_group[u] for u in users}
    return plan


# ------------------------------------------------------------------------------------- build / save / load
def build_group_adapters(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, plan: GroupPlan,
                         out: str | os.PathLike[str] | None = None, config: PersonalizationEditConfig | None = None,
                         method: str = "rome", verify: bool = False, progress: bool = False,
                         **options: Any) -> tuple[PeftModel, EditReport]:
    """Edit every group adapter and difference adapter in one batched editor run (and save them to ``out``).

    ``model``: a base model (wrapped here with ``config``, default :class:`PersonalizationEditConfig`) or a
    PERSEDIT ``PeftModel`` whose active adapter's config is the template. Groups no user is composed with are
    not built. Returns the PeftModel holding all adapters and the edit report.
    """
    from .editing import PersonalizationEditor

    if isinstance(model, PeftModel):
        pm, template = model, model.active_adapter
    else:
        pm, template = get_peft_model(model, config or PersonalizationEditConfig(), adapter_name=TEMPLATE), TEMPLATE
    groups = used_groups(plan)
    clash = (set(groups) & set(plan.user_preferences)) | ({*groups, *plan.user_preferences} & set(pm.peft_config))
    if clash:
        raise ValueError(f"adapter names already taken: {sorted(clash)}")
    editor = PersonalizationEditor(pm, tokenizer, adapter_name=template, progress=progress)
    for name in [*groups, *plan.user_preferences]:
        editor.ensure_adapter(name)  # users whose preferences all live in the group still get an (empty) adapter
    jobs = {**{g: plan.group_preferences[g] for g in groups}, **plan.user_preferences}
    report = editor.edit_users(jobs, verify=verify, method=method, **options)
    pm.eval()
    if out is not None:
        save_group_adapters(pm, plan, out)
    return pm, report


def used_groups(plan: GroupPlan) -> list[str]:
    """Groups at least one user is composed with (those get an adapter)."""
    return [g for g in plan.members if any(plan.user_group[u] == g for u in plan.members[g])]


def save_group_adapters(pm: PeftModel, plan: GroupPlan, out: str | os.PathLike[str]) -> Path:
    """``out/groups/<g>``, ``out/users/<u>`` (ordinary adapter directories) and ``out/index.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(out / "groups", selected_adapters=used_groups(plan))
    pm.save_pretrained(out / "users", selected_adapters=list(plan.user_preferences))
    write_text_atomic(out / INDEX, json.dumps(plan.to_index(), indent=1))
    return out


def load_group_adapters(base_model: PreTrainedModel, out: str | os.PathLike[str], users: list[str] | None = None
                        ) -> tuple[PeftModel, dict[str, Any]]:
    """Load the adapters ``users`` (default: all) are routed through; returns the PeftModel and the index.

    Route with ``pm(ids, adapter_names=[index["users"][u]["adapter_names"] for u in batch_users])``.
    """
    from .loading import check_adapter_dir

    out = Path(out)
    if not (out / INDEX).is_file():
        raise FileNotFoundError(f"{str(out)!r} has no {INDEX}: not a directory written by build_group_adapters")
    index = json.loads((out / INDEX).read_text())
    users = list(index["users"]) if users is None else users
    unknown = [u for u in users if u not in index["users"]]
    if unknown:
        raise KeyError(f"unknown user(s) {unknown}; {out / INDEX} lists {sorted(index['users'])}")
    groups = sorted({index["users"][u]["group"] for u in users} - {None})
    paths = [(g, out / "groups" / g) for g in groups] + [(u, out / "users" / u) for u in users]
    pm = None
    for name, path in paths:
        check_adapter_dir(path)
        if pm is None:
            pm = PeftModel.from_pretrained(base_model, str(path), adapter_name=name)
        else:
            pm.load_adapter(str(path), adapter_name=name)
    return pm.eval(), index


# --------------------------------------------------------------------------------- prompting baseline
def dpl_context(user: str, users_prefs: dict[str, list[Preference]], plan: GroupPlan, max_items: int = 8) -> str:
    """DPL-style prompting baseline: a system prompt saying what ``user`` shares with the representative users
    of their group (held by more than half of the other representatives), what makes the user different (the rest of
    their preferences) and what most representatives say that the user does not."""
    others = [r for r in plan.representatives[plan.group_of(user)] if r != user]
    counts: dict[str, int] = {}
    pool: dict[str, Preference] = {}
    for rep in others:
        for p in users_prefs[rep]:
            counts[p.id] = counts.get(p.id, 0) + 1
            pool[p.id] = p
    typical = {pid for pid, n in counts.items() if n > len(others) / 2}
    own = users_prefs[user]
    held = {p.id for p in own}
    parts = [
        ("Like most similar users, this user says:", [p for p in own if p.id in typical]),
        ("What makes this user different from similar users:", [p for p in own if p.id not in typical]),
        ("Unlike most similar users, this user never said:",
         [p for i, p in pool.items() if i in typical and i not in held]),  # first-seen order, not set order
    ]
    lines = ["You are talking to a user. Compared with similar users:"]
    for head, prefs in parts:
        if prefs:
            lines += [head] + [f"- {statement(p)}" for p in prefs[:max_items]]
    return "\n".join(lines)
