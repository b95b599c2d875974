"""Group + difference adapters (DPL-style) vs. independent per-user adapters, embedded SmolLM2 on CPU.

Simulated users: UPQA-dev items with pairwise distinct subjects and questions; ``--groups`` latent groups of
``--shared`` items each; user i belongs to latent group i mod G and holds its group's items plus ``--own`` items
of its own. The users are clustered from their preferences alone (``group_users``, model embeddings).

Reports (``--out``, default benchmarks/results/groups/results.json):
  * clustering: purity of the found groups w.r.t. the latent ones;
  * storage per user (adapter_model.safetensors bytes, group adapters amortised over their users) and clusters;
  * efficacy (target in the greedy answer to each held preference's question) of group+user, independent,
    the DPL-style prompting baseline (``dpl_context`` as system prompt) and no edit;
  * locality: share of held-out generic prompts whose greedy answer is unchanged (prompt j answered by user
    j mod U's adapters);
  * edit time (one batched editor call each) and its linear extrapolation to 100 users (same structure).

    python benchmarks/bench_groups.py [--users 20 --groups 4 --shared 3 --own 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_edit import distinct_subject_items  # noqa: E402

from peft_persedit import PersonalizationEditConfig, load_default_model  # noqa: E402
from peft_persedit.editing import PersonalizationEditor  # noqa: E402
from peft_persedit.editing.verify import answer_questions, target_hit  # noqa: E402
from peft_persedit.groups import TEMPLATE, build_group_adapters, dpl_context, group_users  # noqa: E402
from peft_persedit.preferences import Preference  # noqa: E402
from peft_persedit.prompts import load_prompt_set  # noqa: E402


def simulate(n_users: int, n_groups: int, shared: int, own: int, seed: int) -> tuple[dict, dict[str, int]]:
    """``{user: prefs}`` and each user's latent group."""
    items = distinct_subject_items(n_groups * shared + n_users * own)
    random.Random(seed).shuffle(items)
    groups = [items[g * shared:(g + 1) * shared] for g in range(n_groups)]
    rest = iter(items[n_groups * shared:])
    users = {f"u{i:02d}": groups[i % n_groups] + [next(rest) for _ in range(own)] for i in range(n_users)}
    return users, {u: i % n_groups for i, u in enumerate(users)}


def purity(members: dict[str, list[str]], latent: dict[str, int]) -> float:
    """Share of users whose found group's majority latent group is their own."""
    hit = 0
    for users in members.values():
        labels = [latent[u] for u in users]
        hit += max(labels.count(v) for v in set(labels))
    return hit / len(latent)


def sizes(folder: Path, names: list[str]) -> dict[str, int]:
    return {n: (folder / n / "adapter_model.safetensors").stat().st_size for n in names}


def hits(pm, tokenizer, rows: list[tuple[str, Preference]], routes: dict[str, str], max_new_tokens: int) -> float:
    answers = answer_questions(pm, tokenizer, [p.question for _, p in rows], [routes[u] for u, _ in rows],
                               max_new_tokens=max_new_tokens)
    return sum(target_hit(a, p.target) for a, (_, p) in zip(answers, rows)) / len(rows)


def write_results(results: dict, out: str) -> None:
    """``out/results.json`` (with the command that produced it), also printed."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--shared", type=int, default=3)
    parser.add_argument("--own", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--locality", type=int, default=20, help="held-out generic prompts")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/groups")
    args = parser.parse_args()
    torch.set_num_threads(2)
    users, latent = simulate(args.users, args.groups, args.shared, args.own, args.seed)
    model, tokenizer = load_default_model()
    results: dict = {"command": "python " + " ".join(sys.argv), "args": vars(args)}

    start = time.perf_counter()
    plan = group_users(users, args.groups, model=model, tokenizer=tokenizer)
    results["clustering"] = {"seconds": time.perf_counter() - start, "purity": purity(plan.members, latent),
                             "composed_users": sum(g is not None for g in plan.user_group.values()),
                             "group_preferences": {g: len(p) for g, p in plan.group_preferences.items()},
                             "purity_ids_embedding": purity(group_users(users, args.groups).members, latent)}
    print(json.dumps(results["clustering"]))
    tmp = Path(tempfile.mkdtemp(prefix="bench_groups."))
    config = PersonalizationEditConfig()
    start = time.perf_counter()
    pm, report = build_group_adapters(model, tokenizer, plan, out=tmp / "grouped", config=config)
    grouped_seconds = time.perf_counter() - start
    grouped_edits = len(report.results)
    print(f"grouped: {grouped_edits} edits in {grouped_seconds:.0f}s")

    independent = {f"ind_{u}": prefs for u, prefs in users.items()}
    start = time.perf_counter()
    PersonalizationEditor(pm, tokenizer, adapter_name=TEMPLATE, progress=False).edit_users(independent, verify=False)
    independent_seconds = time.perf_counter() - start
    independent_edits = sum(len(p) for p in users.values())
    print(f"independent: {independent_edits} edits in {independent_seconds:.0f}s")
    pm.save_pretrained(tmp / "independent", selected_adapters=list(independent))
    pm.eval()

    group_files = sizes(tmp / "grouped" / "groups", [g for g in plan.members if (tmp / "grouped/groups" / g).is_dir()])
    user_files = sizes(tmp / "grouped" / "users", list(users))
    ind_files = sizes(tmp / "independent", list(independent))
    n = len(users)
    results["storage_bytes_per_user"] = {"grouped": (sum(group_files.values()) + sum(user_files.values())) / n,
                                         "independent": sum(ind_files.values()) / n,
                                         "grouped_group_adapters": group_files}
    held = {"grouped": sum(len(p) for p in plan.group_preferences.values() if p) +
            sum(len(p) for p in plan.user_preferences.values()), "independent": independent_edits}
    results["clusters_stored"] = held

    rows = [(u, p) for u, prefs in users.items() for p in prefs]
    routes = {"grouped": {u: plan.adapter_names(u) for u in users}, "independent": {u: f"ind_{u}" for u in users},
              "no_edit": {u: "__base__" for u in users}}
    results["efficacy"] = {m: hits(pm, tokenizer, rows, r, args.max_new_tokens) for m, r in routes.items()}
    dpl_hits = []
    for u, prefs in users.items():
        answers = answer_questions(pm, tokenizer, [p.question for p in prefs], ["__base__"] * len(prefs),
                                   max_new_tokens=args.max_new_tokens, system=dpl_context(u, users, plan))
        dpl_hits += [target_hit(a, p.target) for a, p in zip(answers, prefs)]
    results["efficacy"]["dpl_prompting"] = sum(dpl_hits) / len(dpl_hits)
    print(json.dumps(results["efficacy"]))

    neutral = load_prompt_set("neutral_prompts")[:args.locality]
    order = [list(users)[j % n] for j in range(len(neutral))]
    base = answer_questions(pm, tokenizer, neutral, ["__base__"] * len(neutral), max_new_tokens=24)
    results["locality"] = {}
    for method in ("grouped", "independent"):
        out = answer_questions(pm, tokenizer, neutral, [routes[method][u] for u in order], max_new_tokens=24)
        results["locality"][method] = sum(a == b for a, b in zip(base, out)) / len(neutral)

    per_edit = {"grouped": grouped_seconds / grouped_edits, "independent": independent_seconds / independent_edits}
    edits_100 = {"grouped": args.groups * args.shared + 100 * args.own, "independent": 100 * (args.shared + args.own)}
    results["edit_seconds"] = {"grouped": grouped_seconds, "independent": independent_seconds,
                               "per_preference_edit": per_edit}
    results["extrapolated_100_users"] = {
        "note": "linear in the number of preference edits at the measured seconds per edit (not run)",
        "edits": edits_100, "seconds": {m: edits_100[m] * per_edit[m] for m in per_edit},
        "storage_bytes_per_user": {
            "grouped": (sum(group_files.values()) + 100 * sum(user_files.values()) / n) / 100,
            "independent": results["storage_bytes_per_user"]["independent"]}}
    write_results(results, args.out)


if __name__ == "__main__":
    main()
