"""``PeftType.PERSEDIT``: the peft type member alone (as peft's ``utils/peft_types.py``); registering the config
and tuner classes happens at the bottom of the package ``__init__``, as in peft's own tuners."""

from __future__ import annotations

import enum

from peft.utils import PeftType

NAME = "persedit"
PREFIX = "persedit_"
#: The adapter name that means "no edit" for a row of a mixed-adapter batch (reserved).
BASE_ADAPTER = "__base__"


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

