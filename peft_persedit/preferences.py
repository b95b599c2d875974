"""Preferences: what a user wants the model to know, and loaders for UPQA, UPQA cluster9 and PrefEval-pro.

Formats understood by :func:`load_preferences` (detected per item):

* UPQA flat — ``input_attribute, attribute_type, question, question_paraphrased, implicit_question,
  product_recommendation_question, target``;
* UPQA cluster9 — the same keys, with ``attribute_type``/``question``/``target`` parallel lists whose LAST
  element is the original (the others become ``synonyms``/``questions``/``targets``);
* PrefEval-pro — ``topic, preference, question, explanation, subject, target``;
* :meth:`Preference.to_dict` output.

Every error is a :class:`PreferenceError` with a one-line message naming the file, the item (0-based) and
the field, e.g. ``upqa.json: item 3: field 'target' is empty``.

Length limits (characters; module constants, read whenever a :class:`Preference` is made, so they can be
raised by assigning e.g. ``peft_persedit.preferences.MAX_TARGET_CHARS = 2000``): a target is the short answer
an edit makes the model say, and the cost of making the edit grows with its token count (a 10,000-character
target took 23 min and 10.6 GB in the values step), so ``target``/``targets`` ≤ :data:`MAX_TARGET_CHARS`;
``question``/``questions`` and the optional questions ≤ :data:`MAX_QUESTION_CHARS`; ``subject``/``synonyms`` (a
phrase inside the question) ≤ :data:`MAX_SUBJECT_CHARS`. The bundled UPQA and PrefEval data stay below 60, 170
and 30 characters.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic

__all__ = ["MAX_QUESTION_CHARS", "MAX_SUBJECT_CHARS", "MAX_TARGET_CHARS", "Preference", "PreferenceError",
           "load_preferences", "save_preferences"]

#: longest ``target`` / ``targets`` entry accepted, in characters
MAX_TARGET_CHARS = 512
#: longest ``question`` / ``questions`` entry / optional question accepted, in characters
MAX_QUESTION_CHARS = 1000
#: longest ``subject`` / ``synonyms`` entry accepted, in characters
MAX_SUBJECT_CHARS = 200


class PreferenceError(ValueError):
    """Bad preference data; the one-line message names the file, the item and the field.

    ``detail`` is the message without its location prefix (what went wrong with which field).
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


_REQUIRED = ("subject", "question", "target")
_CLUSTER = ("synonyms", "questions", "targets")
_OPTIONAL = ("id", "text", "paraphrased_question", "implicit_question", "product_question")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _too_long(pref: Preference) -> str | None:
    """What exceeds a length limit in ``pref`` (its fields already validated and stripped), or None."""
    limits = {"MAX_TARGET_CHARS": (MAX_TARGET_CHARS, ("target", "targets")),
              "MAX_QUESTION_CHARS": (MAX_QUESTION_CHARS, ("question", "questions", "paraphrased_question",
                                                          "implicit_question", "product_question")),
              "MAX_SUBJECT_CHARS": (MAX_SUBJECT_CHARS, ("subject", "synonyms"))}
    for constant, (limit, names) in limits.items():
        for name in names:
            value = getattr(pref, name)
            entries = enumerate(value) if isinstance(value, tuple) else [(None, value)]
            for i, entry in entries:
                if entry is not None and len(entry) > limit:
                    where = f"{name!r}" + (f"[{i}]" if i is not None else "")
                    return (f"field {where} is {len(entry):,} characters long; the limit is {limit:,} "
                            f"(peft_persedit.preferences.{constant})")
    return None


@dataclass(frozen=True)
class Preference:
    """One preference: ``subject`` (attribute type) occurs in ``question``; ``target`` is the short answer.

    ``synonyms``/``questions``/``targets`` are the cluster: parallel tuples (UPQA cluster9: 8 besides the
    original). ``id`` defaults to a short sha1 of subject, question, target and text.
    """

    subject: str
    question: str
    target: str
    synonyms: tuple[str, ...] = ()
    questions: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    id: str | None = None
    text: str | None = None
    paraphrased_question: str | None = None
    implicit_question: str | None = None
    product_question: str | None = None

    def __post_init__(self) -> None:
        label = "preference"
        if isinstance(self.id, str) and self.id.strip():
            label = f"preference {self.id.strip()!r}"
        elif isinstance(self.subject, str) and self.subject.strip():
            label = f"preference (subject {self.subject.strip()[:40]!r})"

        def fail(detail: str) -> None:
            raise PreferenceError(f"{label}: {detail}", detail)

        for name in _REQUIRED:
            value = getattr(self, name)
            if not isinstance(value, str):
                fail(f"field {name!r} must be a string, got {_type_name(value)}")
            if not value.strip():
                fail(f"field {name!r} is empty")
            object.__setattr__(self, name, value.strip())
        for name in _CLUSTER:
            value = getattr(self, name)
            if value is None:
                value = ()
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
                fail(f"field {name!r} must be a list of strings, got {_type_name(value)}")
            value = tuple(value)
            for i, v in enumerate(value):
                if not isinstance(v, str):
                    fail(f"field {name!r}[{i}] must be a string, got {_type_name(v)}")
                if not v.strip():
                    fail(f"field {name!r}[{i}] is empty")
            object.__setattr__(self, name, tuple(v.strip() for v in value))
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                fail(f"field {name!r} must be a string or null, got {_type_name(value)}")
            object.__setattr__(self, name, (value.strip() or None) if isinstance(value, str) else None)
        if self.synonyms and self.questions and len(self.synonyms) != len(self.questions):
            fail(f"fields 'synonyms' and 'questions' differ in length ({len(self.synonyms)} vs {len(self.questions)})")
        if self.targets and len(self.targets) != len(self.questions):
            fail(f"field 'targets' must be empty or parallel to 'questions' ({len(self.targets)} vs "
                 f"{len(self.questions)})")
        if (detail := _too_long(self)) is not None:
            fail(detail)
        if self.id is None:
            key = f"{self.subject}\n{self.question}\n{self.target}\n{self.text}"
            object.__setattr__(self, "id", hashlib.sha1(key.encode()).hexdigest()[:10])

    def cluster_questions(self) -> list[str]:
        """Own question, then the cluster's questions (deduplicated, in order)."""
        return list(dict.fromkeys((self.question, *self.questions)))

    def cluster_targets(self) -> list[str]:
        """Targets parallel to :meth:`cluster_questions` (falling back to ``target``)."""
        return list(self._cluster_map(self.targets or (self.target,) * len(self.questions), self.target).values())

    def cluster_subjects(self) -> list[str]:
        """Subjects (synonyms) parallel to :meth:`cluster_questions` (falling back to ``subject``)."""
        return list(self._cluster_map(self.synonyms or (self.subject,) * len(self.questions), self.subject).values())

    def _cluster_map(self, values: Sequence[str], own: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for question, value in zip((self.question, *self.questions), (own, *values)):
            out.setdefault(question, value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples as lists); :meth:`from_dict` inverts it."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preference:
        """Preference from :meth:`to_dict` output; unknown or missing fields raise :class:`PreferenceError`."""
        if not isinstance(data, Mapping):
            raise PreferenceError(f"preference: expected an object, got {_type_name(data)}",
                                  f"expected an object, got {_type_name(data)}")
        known = [f.name for f in fields(cls)]
        label = f"preference {data['id']!r}" if isinstance(data.get("id"), str) else "preference"
        for name in _REQUIRED:
            if name not in data:
                raise PreferenceError(f"{label}: missing field {name!r}", f"missing field {name!r}")
        unknown = [k for k in data if k not in known]
        if unknown:
            detail = f"unknown field {unknown[0]!r} (known: {', '.join(known)})"
            raise PreferenceError(f"{label}: {detail}", detail)
        return cls(**data)


# ---------------------------------------------------------------------------------------------- loading


def _read_items(path: Path) -> tuple[Any, list[int] | None]:
    """Parsed .json (list, or one object) or .jsonl file, and for JSONL each item's line number."""
    if not path.is_file():
        raise PreferenceError(f"{path}: file not found")
    name = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PreferenceError(f"{name}: cannot read ({err})") from None
    if not text.strip():
        raise PreferenceError(f"{name}: file is empty")
    if path.suffix.lower() != ".jsonl":
        try:
            return json.loads(text), None
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # several top-level values: try JSONL
                raise PreferenceError(f"{name}: malformed JSON at line {err.lineno}: {err.msg}") from None
    items: list[Any] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PreferenceError(f"{name}: malformed JSON at line {lineno}: {err.msg}") from None
            lines.append(lineno)
    return items, lines


def _string(item: Mapping[str, Any], key: str, optional: bool = False) -> str | None:
    if key not in item or (optional and item[key] is None):
        if optional:
            return None
        raise PreferenceError(f"missing field {key!r}")
    value = item[key]
    if not isinstance(value, str):
        raise PreferenceError(f"field {key!r} must be a string, got {_type_name(value)}")
    if not value.strip() and not optional:
        raise PreferenceError(f"field {key!r} is empty")
    return value


def _strings(item: Mapping[str, Any], key: str, length: int) -> list[str]:
    value = item[key]
    if not isinstance(value, list):
        raise PreferenceError(f"field {key!r} must be a list (cluster9), got {_type_name(value)}")
    if len(value) != length:
        raise PreferenceError(f"field {key!r} has {len(value)} entries, 'attribute_type' has {length}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise PreferenceError(f"field {key!r}[{i}] must be a string, got {_type_name(v)}")
        if not v.strip():
            raise PreferenceError(f"field {key!r}[{i}] is empty")
    return value


def _from_upqa(item: Mapping[str, Any]) -> Preference:
    for key in ("input_attribute", "attribute_type", "question", "target"):
        if key not in item:
            raise PreferenceError(f"missing field {key!r}")
    extra = {"text": _string(item, "input_attribute"),
             "paraphrased_question": _string(item, "question_paraphrased", optional=True),
             "implicit_question": _string(item, "implicit_question", optional=True),
             "product_question": _string(item, "product_recommendation_question", optional=True)}
    if any(isinstance(item[k], list) for k in ("attribute_type", "question", "target")):  # cluster9
        n = len(item["attribute_type"]) if isinstance(item["attribute_type"], list) else 0
        if n == 0:
            raise PreferenceError("field 'attribute_type' must be a non-empty list (cluster9)")
        subjects, questions, targets = (_strings(item, k, n) for k in ("attribute_type", "question", "target"))
        return Preference(subjects[-1], questions[-1], targets[-1], tuple(subjects[:-1]), tuple(questions[:-1]),
                          tuple(targets[:-1]), **extra)
    return Preference(_string(item, "attribute_type"), _string(item, "question"), _string(item, "target"), **extra)


def _from_prefeval(item: Mapping[str, Any]) -> Preference:
    for key in ("preference", "question", "subject", "target"):
        _string(item, key)
    return Preference(item["subject"], item["question"], item["target"], text=item["preference"])


def _from_item(item: Any) -> Preference:
    """One item of any supported format (errors carry only the detail; the caller adds the location)."""
    if isinstance(item, Preference):
        return item
    if not isinstance(item, Mapping):
        raise PreferenceError(f"item is not an object (got {_type_name(item)})")
    if "attribute_type" in item or "input_attribute" in item:
        return _from_upqa(item)
    if "preference" in item or "topic" in item:
        return _from_prefeval(item)
    for key in _REQUIRED:
        _string(item, key)
    return Preference.from_dict(item)


def load_preferences(source: str | os.PathLike[str] | Sequence[Any] | Mapping[str, Any]) -> list[Preference]:
    """Preferences from a .json/.jsonl file or an already-parsed list (UPQA flat/cluster9, PrefEval-pro, ours).

    A single object is read as a one-item list. Ids must be unique.
    """
    name = "<list>"
    lines: list[int] | None = None  # JSONL: the line number of each item
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = path.name
        items, lines = _read_items(path)
    else:
        items = source
    if isinstance(items, (Mapping, Preference)):
        items = [items]
    if isinstance(items, Iterable) and not isinstance(items, (str, bytes, Sequence)):
        items = list(items)
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise PreferenceError(f"{name}: expected a list of preference objects, got {_type_name(items)}")
    if not items:
        raise PreferenceError(f"{name}: no preferences (empty list)")
    prefs: list[Preference] = []
    for i, item in enumerate(items):
        try:
            prefs.append(_from_item(item))
        except PreferenceError as err:
            where = f"{name}: item {i}" + (f" (line {lines[i]})" if lines else "")
            raise PreferenceError(f"{where}: {err.detail}", err.detail) from None
    _check_unique(prefs, name)
    return prefs


def _check_unique(prefs: Sequence[Preference], name: str) -> None:
    first: dict[str, int] = {}
    for i, pref in enumerate(prefs):
        if pref.id in first:
            detail = f"duplicate id {pref.id!r} (items {first[pref.id]} and {i})"
            raise PreferenceError(f"{name}: {detail}", detail)
        first[pref.id] = i


def save_preferences(prefs: Iterable[Preference], path: str | os.PathLike[str]) -> Path:
    """Write preferences atomically (:func:`.atomic.write_text_atomic`): a JSON list, or JSONL for a ``.jsonl`` path."""
    path = Path(path)
    prefs = list(prefs)
    for i, pref in enumerate(prefs):
        if not isinstance(pref, Preference):
            raise PreferenceError(f"{path.name}: item {i}: not a Preference (got {_type_name(pref)})")
    _check_unique(prefs, path.name)
    dicts = [p.to_dict() for p in prefs]
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dicts)
    else:
        text = json.dumps(dicts, indent=1, ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text, durable=True)
