"""Preferences: what a user wants the model to know, and loaders for UPQA, UPQA cluster9 and PrefEval-pro."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


class PreferenceError(ValueError):
    """Bad preference data; the message names the file, the item and the field."""


@dataclass(frozen=True)
class Preference:
    """One preference: ``subject`` (attribute type) occurs in ``question``; ``target`` is the short answer.

    ``synonyms``/``questions``/``targets`` are the cluster (parallel lists; UPQA cluster9: 8 + the original).
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
        for name in ("subject", "question", "target"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise PreferenceError(f"preference {self.id or ''}: field {name!r} must be a string, got "
                                      f"{type(value).__name__}")
            if not value.strip():
                raise PreferenceError(f"preference {self.id or ''}: field {name!r} is empty")
            object.__setattr__(self, name, value.strip())
        for name in ("synonyms", "questions", "targets"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise PreferenceError(f"preference {self.id or ''}: field {name!r} must be a list of strings")
            object.__setattr__(self, name, tuple(v.strip() for v in value))
        if self.questions and self.synonyms and len(self.questions) != len(self.synonyms):
            raise PreferenceError(f"preference {self.id or ''}: 'questions' and 'synonyms' differ in length")
        if self.targets and len(self.targets) != len(self.questions):
            raise PreferenceError(f"preference {self.id or ''}: 'targets' must be parallel to 'questions'")
        if not self.id:
            key = f"{self.subject}\n{self.question}\n{self.target}\n{self.text}"
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            object.__setattr__(self, "id", digest)

    def cluster_questions(self) -> list[str]:
        """Own question, then the cluster's questions (deduplicated, in order)."""
        return list(dict.fromkeys((self.question, *self.questions)))

    def cluster_targets(self) -> list[str]:
        """Targets parallel to :meth:`cluster_questions` (falling back to ``target``)."""
        by_question = dict(zip(self.questions, self.targets or (self.target,) * len(self.questions)))
        return [self.target if q == self.question else by_question.get(q, self.target)
                for q in self.cluster_questions()]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preference:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_UPQA = {"input_attribute", "attribute_type", "question", "target"}
_PREFEVAL = {"preference", "question", "subject", "target"}


def _from_item(item: Any, where: str) -> Preference:
    if not isinstance(item, dict):
        raise PreferenceError(f"{where}: item is not an object")
    try:
        if _UPQA <= item.keys():
            extra = {"text": item["input_attribute"], "paraphrased_question": item.get("question_paraphrased"),
                     "implicit_question": item.get("implicit_question"),
                     "product_question": item.get("product_recommendation_question")}
            if isinstance(item["question"], list):  # cluster9: the original is last
                subjects, questions, targets = item["attribute_type"], item["question"], item["target"]
                if not (len(subjects) == len(questions) == len(targets)) or not questions:
                    raise PreferenceError(f"{where}: cluster lists 'attribute_type', 'question', 'target' differ")
                return Preference(subjects[-1], questions[-1], targets[-1], tuple(subjects[:-1]),
                                  tuple(questions[:-1]), tuple(targets[:-1]), **extra)
            return Preference(item["attribute_type"], item["question"], item["target"], **extra)
        if _PREFEVAL <= item.keys():
            return Preference(item["subject"], item["question"], item["target"], text=item["preference"])
        if {"subject", "question", "target"} <= item.keys():
            return Preference.from_dict(item)
    except PreferenceError as err:
        raise PreferenceError(f"{where}: {str(err).split(': ', 1)[-1]}") from None
    except TypeError as err:
        raise PreferenceError(f"{where}: {err}") from None
    missing = sorted({"subject", "question", "target"} - item.keys())
    raise PreferenceError(f"{where}: missing field {missing[0]!r} (not UPQA, PrefEval-pro or Preference JSON)")


def load_preferences(source: str | os.PathLike | list) -> list[Preference]:
    """Preferences from a .json/.jsonl file or a parsed list (UPQA flat/cluster9, PrefEval-pro, Preference)."""
    name = "<list>"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = path.name
        if not path.is_file():
            raise PreferenceError(f"{path}: file not found")
        text = path.read_text()
        if not text.strip():
            raise PreferenceError(f"{name}: file is empty")
        if path.suffix == ".jsonl":
            items = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise PreferenceError(f"{name}: line {lineno}: malformed JSON ({err.msg})") from None
        else:
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise PreferenceError(f"{name}: malformed JSON ({err.msg} at line {err.lineno})") from None
    else:
        items = source
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        raise PreferenceError(f"{name}: expected a non-empty list of preferences")
    prefs = [_from_item(item, f"{name}: item {i}") for i, item in enumerate(items)]
    seen: dict[str, int] = {}
    for i, p in enumerate(prefs):
        if p.id in seen and prefs[seen[p.id]] != p:
            raise PreferenceError(f"{name}: items {seen[p.id]} and {i} share the id {p.id!r}")
        seen.setdefault(p.id, i)
    return prefs


def save_preferences(prefs: list[Preference], path: str | os.PathLike) -> None:
    """Write preferences as JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([p.to_dict() for p in prefs], indent=1))
    os.replace(tmp, path)
