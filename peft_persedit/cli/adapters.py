"""``persedit edit/ask/show/forget/update``, and adapter directories: check ``--out`` before work, save safely.

Saving never deletes or renames a path it did not create: the adapter is saved into a temp sibling folder, then
each file written there is moved into place with :func:`.atomic.move_into_place` (atomic per file, a replaced
file keeps its permissions; ``adapter_config.json`` last).
Other files in the adapter folder (a README.md or notes of the user's) are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..atomic import move_into_place, staging_dir
from ..editing.report import EditReport, PreferenceResult
from ..loading import CONFIG_NAME, check_adapter_dir
from ..preferences import Preference
from .common import EPILOG, load_adapter, load_base

REPORT_NAME = "edit_report.json"
ADAPTER_BASE_HELP = "base model (default: the adapter's base, else embedded SmolLM2)"


def writable_adapter_dir(out: str | os.PathLike) -> bool:
    """Check ``--out`` before any work: ``False`` when free (absent or an empty folder), ``True`` when it is a
    PERSEDIT adapter to extend; anything else (a file, a folder of other things, another adapter type) raises."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir():
        raise FileExistsError(f"{out} is an existing file, not an adapter directory; refusing to replace it")
    if not any(out.iterdir()):
        return False
    if not (out / CONFIG_NAME).is_file():
        raise FileExistsError(f"{out} is a non-empty folder that is not a PERSEDIT adapter (no {CONFIG_NAME}); "
                              "refusing to write into it: choose a new or empty folder")
    check_adapter_dir(out)
    return True


def held_preferences(path: Path) -> list[Preference]:
    """The preferences a saved adapter holds (read from its ``adapter_config.json``; no model loaded)."""
    from ..editing.editor import preferences_from_entries

    return preferences_from_entries(json.loads((path / CONFIG_NAME).read_text()).get("preferences", []))


def merged_report(out: Path, report: EditReport, drop: Iterable[str] = ()) -> EditReport:
    """``report`` after the still-held results of ``out``'s old report (minus ``drop`` and re-edited ids)."""
    gone = set(drop) | {r.id for r in report.results}
    kept: list[PreferenceResult] = []
    if (out / REPORT_NAME).is_file():
        try:
            entries = json.loads((out / REPORT_NAME).read_text()).get("results", [])
            known = PreferenceResult.__dataclass_fields__
            kept = [PreferenceResult(**{k: v for k, v in r.items() if k in known}) for r in entries
                    if r.get("id") not in gone]
        except (ValueError, TypeError, AttributeError):
            kept = []  # an unreadable old report: only the new results are known
    return EditReport(kept + report.results, report.timings, verified=report.verified)


def save_adapter(peft_model, out: str | os.PathLike, report: EditReport | None = None,
                 drop: Iterable[str] = ()) -> None:
    """Save the adapter (and ``report`` merged into the old ``edit_report.json``) into ``out``; see the module
    docstring. A failure while saving leaves ``out`` as it was."""
    out = Path(out)
    with staging_dir(out) as tmp:
        peft_model.save_pretrained(tmp)
        if report is not None:
            merged_report(out, report, drop).save(str(tmp / REPORT_NAME))
        out.mkdir(exist_ok=True)
        written = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.name == CONFIG_NAME, str(p)))
        for src in written:
            dest = out / src.relative_to(tmp)
            if src.name == "README.md" and dest.exists():
                continue  # peft's model card never replaces a README that is already there
            dest.parent.mkdir(parents=True, exist_ok=True)
            move_into_place(src, dest)


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
    """``persedit edit``: edit new preferences into ``--out`` (a new adapter, or the one already there)."""
    from peft import get_peft_model

    from .. import PersonalizationEditConfig
    from ..editing import PersonalizationEditor
    from ..editing.editor import find_conflicts
    from ..preferences import load_preferences

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
    """``persedit ask``: answer the questions through the adapter."""
    from ..editing.verify import answer_questions

    peft_model, tokenizer = load_adapter(Path(args.adapter), args.model)
    for answer in answer_questions(peft_model, tokenizer, args.question, max_new_tokens=args.max_new_tokens):
        print(answer)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``persedit show``: the adapter's config, then each preference with its gate thresholds."""
    from safetensors import safe_open

    path = check_adapter_dir(args.adapter)
    config = json.loads((path / CONFIG_NAME).read_text())
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


def _pick(held: list[Preference], tokens: list[str], path: Path) -> list[Preference]:
    """The held preferences named by id (or, failing that, by subject) in ``tokens``."""
    chosen: dict[str, Preference] = {}
    for token in tokens:
        hits = [h for h in held if h.id == token] or [h for h in held if h.subject.casefold() == token.casefold()]
        if not hits:
            holds = ", ".join(f"{h.id} ({h.subject})" for h in held) or "nothing"
            raise ValueError(f"{path} holds no preference with id or subject {token!r}; it holds: {holds}")
        chosen.update((h.id, h) for h in hits)
    return list(chosen.values())


def cmd_forget(args: argparse.Namespace) -> int:
    """``persedit forget``: remove the named preferences and save the adapter in place."""
    from ..editing import PersonalizationEditor

    path = check_adapter_dir(args.adapter)
    gone = _pick(held_preferences(path), args.ids, path)
    peft_model, tokenizer = load_adapter(path, args.model)
    editor = PersonalizationEditor(peft_model, tokenizer)
    for pref in gone:
        editor.forget(pref.id)
    save_adapter(peft_model, path, EditReport([], verified=False), drop=[p.id for p in gone])
    for pref in gone:
        print(f"forgot [{pref.id}] {pref.subject}: {pref.question} → {pref.target}")
    print(f"saved adapter with {len(editor.preferences)} preferences to {path}")
    return 0


def update_preferences(args: argparse.Namespace) -> list[Preference]:
    """``--preferences FILE``, or the one preference given by ``--subject/--question/--target``."""
    from ..preferences import load_preferences

    single = [args.subject, args.question, args.target]
    given = [v is not None for v in single]
    if (args.preferences is None) != all(given) or (args.preferences is not None and any(given)):
        raise ValueError("update needs --preferences FILE, or all of --subject, --question and --target")
    return load_preferences(args.preferences) if args.preferences else [Preference(*single)]


def cmd_update(args: argparse.Namespace) -> int:
    """``persedit update``: replace held preferences (same id or subject) or add new ones, in place."""
    from ..editing import PersonalizationEditor
    from ..editing.editor import find_conflicts

    path = check_adapter_dir(args.adapter)
    held = held_preferences(path)
    new = [p for p in update_preferences(args) if p not in held]
    if not new:
        print(f"nothing to update: {path} already holds these preferences; left unchanged")
        return 0
    same_id = [h for h in held if h.id in {p.id for p in new}]
    replaced = list({h.id: h for h in same_id + [h for _, h in find_conflicts(new, held)]}.values())
    peft_model, tokenizer = load_adapter(path, args.model)
    editor = PersonalizationEditor(peft_model, tokenizer)
    report = editor.update(new, **edit_options(args))
    save_adapter(peft_model, path, report, drop=[h.id for h in replaced])
    print(report)
    for old in replaced:
        print(f"replaced [{old.id}] {old.subject} → {old.target}")
    print(f"saved adapter with {len(editor.preferences)} preferences to {path}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``edit``, ``ask``, ``show``, ``forget`` and ``update`` on the ``persedit`` subcommand parser."""
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
    ask.add_argument("--model", help=ADAPTER_BASE_HELP)
    ask.add_argument("--max-new-tokens", type=int, default=48)
    ask.set_defaults(func=cmd_ask)
    show = sub.add_parser("show", help="list an adapter's preferences, clusters and gate thresholds")
    show.add_argument("adapter", help="adapter directory")
    show.set_defaults(func=cmd_show)
    forget = sub.add_parser("forget", help="remove preferences (by id or subject) from an adapter", epilog=EPILOG)
    forget.add_argument("adapter", help="adapter directory")
    forget.add_argument("ids", nargs="+", metavar="ID_OR_SUBJECT", help="preference ids or subjects (see 'show')")
    forget.add_argument("--model", help=ADAPTER_BASE_HELP)
    forget.set_defaults(func=cmd_forget)
    update = sub.add_parser("update", help="replace preferences (same id or subject) in an adapter, or add them",
                            epilog=EPILOG)
    update.add_argument("adapter", help="adapter directory")
    update.add_argument("--preferences", help="preference file (any format edit reads)")
    update.add_argument("--subject", help="one preference: its subject (attribute type), e.g. 'hobby'")
    update.add_argument("--question", help="one preference: a question containing the subject")
    update.add_argument("--target", help="one preference: the new answer")
    add_edit_options(update)
    update.set_defaults(func=cmd_update)
