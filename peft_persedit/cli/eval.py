"""``persedit eval``: compare editing methods and baselines on UPQA data (see :mod:`peft_persedit.evaluation`)."""

from __future__ import annotations

import argparse
import re

from .common import EPILOG


def cmd_eval(args: argparse.Namespace) -> int:
    """``persedit eval``: run the evaluation harness, print its tables, write results and plots."""
    from ..data_paths import dataset_path
    from ..evaluation import EvalConfig, evaluate

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "no_plots") and v is not None}
    config = EvalConfig(**options, plots=not args.no_plots)
    dataset_path(config.data)  # an unknown dataset name fails here, before any model work
    results = evaluate(config)
    from ..evaluation.report import tables

    print(tables(results))
    print(f"wrote {config.out_dir / 'results.json'}, results.md and plots ({results['total_seconds']:.0f} s)")
    return 0


def _turns(text: str) -> list[int]:
    """``--turns``: comma-separated distractor turn counts (an argparse type)."""
    from ..evaluation.config import parse_turns

    try:
        return parse_turns(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _offsets(text: str) -> list[float]:
    """``--gate-sweep``: comma-separated gate-threshold offsets (an argparse type)."""
    from ..evaluation.config import parse_offsets

    try:
        return parse_offsets(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``eval`` on the ``persedit`` subcommand parser."""
    from ..evaluation.config import METHODS, PROTOCOLS, EvalConfig

    d = EvalConfig()
    ev = sub.add_parser("eval", help="compare base, ICE, LoRA, ROME, persedit, representation, DPL on UPQA data",
                        epilog=f"{EPILOG} Writes OUT/results.json, results.md, accuracy.png, multiturn.png and "
                        "frontier.png.")
    # values such as "-0.3,-0.1" are option values, not options (Python < 3.13 only takes "-0.3" for a number)
    ev._negative_number_matcher = re.compile(r"^-\.?\d")
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
    sweep = ",".join(map(str, d.gate_sweep))
    ev.add_argument("--gate-sweep", default=sweep, type=_offsets,
                    help="gated methods only (persedit, representation; protocol single): offsets o added to every "
                    "gate threshold τ (τ ← τ + o); at each, the questions and locality are re-measured: the "
                    f"accuracy/locality frontier (results frontier, frontier.png). Comma-separated; '' = no sweep "
                    f"(default {sweep})")
    ev.add_argument("--workers", type=int, default=d.workers,
                    help="processes running the method × protocol jobs side by side (2 on a 2-core CPU)")
    ev.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ev.set_defaults(func=cmd_eval)
