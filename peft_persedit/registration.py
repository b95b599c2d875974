"""Adds ``PeftType.PERSEDIT`` (a real enum member) and registers the tuner with peft, idempotently."""

from __future__ import annotations

import enum

from peft.utils import PeftType

NAME = "persedit"
PREFIX = "persedit_"


def add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to a closed ``str`` enum as a genuine member (Python 3.10–3.13); idempotent.

    The member is built the way ``EnumType`` builds its own: ``str.__new__`` then ``_name_``/``_value_``,
    and inserted into ``_member_map_``, ``_value2member_map_`` and ``_member_names_`` so that
    ``enum_cls(value)``, ``enum_cls[name]``, ``getattr`` and iteration all see it.
    """
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    member._sort_order_ = len(enum_cls._member_names_)
    if hasattr(enum_cls, "_add_member_"):  # Python ≥ 3.13 (does not list the name for iteration)
        enum_cls._add_member_(name, member)
    else:
        type.__setattr__(enum_cls, name, member)
        enum_cls._member_map_[name] = member
    if name not in enum_cls._member_names_:
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    return member


PERSEDIT: PeftType = add_enum_member(PeftType, NAME.upper(), NAME.upper())


def register() -> None:
    """Register config and tuner classes for ``PeftType.PERSEDIT`` with peft (no-op when already done).

    Also installs, idempotently: atomic adapter saves (:mod:`.saving`), load errors that name the file
    (:mod:`.validation`) and private-by-default pushes of adapters holding preferences (:mod:`.privacy`).
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from . import privacy, saving, validation
    from .config import PersonalizationEditConfig
    from .model import PersEditModel

    for module in (saving, validation, privacy):
        module.install()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PERSEDIT) is PersEditModel:
        return
    if PERSEDIT in PEFT_TYPE_TO_TUNER_MAPPING:  # registered by an earlier (reloaded) copy of this package
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        PEFT_TYPE_TO_CONFIG_MAPPING[PERSEDIT] = PersonalizationEditConfig
        PEFT_TYPE_TO_TUNER_MAPPING[PERSEDIT] = PersEditModel
        return
    register_peft_method(name=NAME, config_cls=PersonalizationEditConfig, model_cls=PersEditModel, prefix=PREFIX)
