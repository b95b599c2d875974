"""``persedit group`` / ``persedit group-ask``: group + difference adapters (see :mod:`peft_persedit.groups`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EPILOG, load_base


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``group`` and ``group-ask`` on the ``persedit`` subcommand parser."""
    group = sub.add_parser("group", help="cluster users into group adapters + per-user difference adapters",
                           epilog=EPILOG)
    group.add_argument("--users", required=True, help="JSON {user: [preference items]} (any format edit reads)")
    group.add_argument("--groups", type=int, required=True, help="number of groups (k-means over the users)")
    group.add_argument("--out", required=True, help="output directory: groups/<g>, users/<u>, index.json")
    group.add_argument("--model", help="base model: local folder or Hub id (default: embedded SmolLM2)")
    group.add_argument("--layers", type=int, nargs="+", help="layer indices to edit (default: per architecture)")
    group.add_argument("--gate", choices=["hard", "soft", "none"], default="hard", help="gate type (default hard)")
    group.add_argument("--method", choices=["rome", "representation"], default="rome", help="edit method")
    group.add_argument("--embedding", choices=["model", "ids"], default="model",
                       help="user embedding: model hidden states of the preferences, or which preferences (ids)")
    group.add_argument("--representatives", type=int, default=3, help="representative users per group")
    group.add_argument("--share", type=float, default=0.5,
                       help="a preference goes to the group adapter if this share of representatives hold it")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--no-verify", action="store_true", help="skip generating answers before/after")
    group.set_defaults(func=cmd_group)
    ask = sub.add_parser("group-ask", help="answer as a user, through their group + difference adapters",
                         epilog=EPILOG)
    ask.add_argument("dir", help="directory written by 'persedit group'")
    ask.add_argument("user", help="user name (a key of the users file)")
    ask.add_argument("question", nargs="+", help="one or more questions")
    ask.add_argument("--model", help="base model (default: the adapters' base, else embedded SmolLM2)")
    ask.add_argument("--max-new-tokens", type=int, default=48)
    ask.set_defaults(func=cmd_group_ask)


def check_group_out(out: Path) -> None:
    """Refuse, before any work, an ``--out`` that is a file or a non-empty folder not written by ``group``."""
    from ..groups import INDEX

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is an existing file, not a directory; refusing to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX).is_file():
        raise FileExistsError(f"{out} is a non-empty folder not written by 'persedit group' (no {INDEX}); "
                              "refusing to write into it: choose a new or empty folder")


def cmd_group(args: argparse.Namespace) -> int:
    """``persedit group``: cluster the users, save group + per-user difference adapters and ``index.json``."""
    from .. import PersonalizationEditConfig
    from ..groups import build_group_adapters, group_users, load_users, used_groups

    check_group_out(Path(args.out))
    users = load_users(args.users)
    base, tokenizer = load_base(args.model)
    plan = group_users(users, args.groups, model=base, tokenizer=tokenizer, embedding=args.embedding,
                       representatives=args.representatives, share=args.share, seed=args.seed)
    config = PersonalizationEditConfig(layers_to_transform=args.layers, gate=args.gate)
    _, report = build_group_adapters(base, tokenizer, plan, out=args.out, config=config, method=args.method,
                                     verify=not args.no_verify)
    print(report)
    for name, members in plan.members.items():
        print(f"{name}: {len(plan.group_preferences[name])} shared preferences, members {', '.join(members)} "
              f"(representatives {', '.join(plan.representatives[name])})")
    alone = [u for u, g in plan.user_group.items() if g is None]
    if alone:
        print(f"used alone (they lack a preference of their group): {', '.join(alone)}")
    print(f"saved {len(used_groups(plan))} group and {len(users)} user adapters to {args.out} "
          f"(routing: {Path(args.out) / 'index.json'})")
    return 0


def cmd_group_ask(args: argparse.Namespace) -> int:
    """``persedit group-ask``: answer as ``user``, routed through their group + difference adapters."""
    from ..editing.verify import answer_questions
    from ..groups import load_group_adapters

    base, tokenizer = load_base(args.model, Path(args.dir) / "users" / args.user)
    pm, index = load_group_adapters(base, args.dir, users=[args.user])
    route = [index["users"][args.user]["adapter_names"]] * len(args.question)
    for answer in answer_questions(pm, tokenizer, args.question, route, max_new_tokens=args.max_new_tokens):
        print(answer)
    return 0
