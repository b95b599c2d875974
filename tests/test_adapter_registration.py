"""``PeftType.PERSEDIT`` is a real enum member; registration with peft is idempotent (also across reloads)."""

from __future__ import annotations

import enum
import inspect
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_persedit
from peft_persedit.peft_type import add_enum_member

REPLICA_CHECK = textwrap.dedent("""
    class T(str, enum.Enum):
        A = "A"
        B = "B"

    m = add_enum_member(T, "NEW", "NEW")
    assert add_enum_member(T, "NEW", "NEW") is m and add_enum_member(T, "A", "A") is T.A
    assert T("NEW") is m is T["NEW"] is T.NEW is getattr(T, "NEW")
    assert list(T) == [T.A, T.B, m] and len(T) == 3 and "NEW" in T.__members__
    assert m == "NEW" and m.value == "NEW" and m.name == "NEW" and isinstance(m, T) and isinstance(m, str)
    assert m in T and hash(m) == hash("NEW") and {m: 1}["NEW"] == 1
    print("OK")
""")


def test_persedit_is_a_real_peft_type():
    assert PeftType("PERSEDIT") is PeftType.PERSEDIT is PeftType["PERSEDIT"] is peft_persedit.PERSEDIT
    assert PeftType.PERSEDIT in list(PeftType) and PeftType.PERSEDIT.value == "PERSEDIT"
    assert isinstance(PeftType.PERSEDIT, PeftType) and PeftType.PERSEDIT == "PERSEDIT"
    assert pickle.loads(pickle.dumps(PeftType.PERSEDIT)) is PeftType.PERSEDIT
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PERSEDIT] is peft_persedit.PersonalizationEditConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PERSEDIT] is peft_persedit.PersEditModel


def test_registration_is_idempotent():
    members = list(PeftType)
    peft_persedit.register()
    peft_persedit.register()
    assert add_enum_member(PeftType, "PERSEDIT", "PERSEDIT") is PeftType.PERSEDIT
    assert list(PeftType) == members


def test_saved_config_round_trips_through_peft(tmp_path):
    config = peft_persedit.PersonalizationEditConfig(gate="soft", layers_to_transform=[1, 2], init_clusters=1)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is peft_persedit.PersonalizationEditConfig and loaded.peft_type is PeftType.PERSEDIT
    assert (loaded.gate, loaded.layers_to_transform, loaded.init_clusters) == ("soft", [1, 2], 1)


def test_replica_enum_in_this_python():
    namespace = {"enum": enum, "add_enum_member": add_enum_member}
    exec(REPLICA_CHECK.replace('print("OK")', "ok = True"), namespace)
    assert namespace["ok"]


@pytest.mark.parametrize("version", ["3.10.13", "3.12.1", "3.13.0"])
def test_replica_enum_in_other_pythons(version):
    """``add_enum_member``'s source alone (no torch there) on a replica ``class T(str, enum.Enum)``."""
    python = Path(f"/root/.pyenv/versions/{version}/bin/python3")
    if not python.exists():
        pytest.skip(f"Python {version} is not installed")
    code = "import enum\n" + inspect.getsource(add_enum_member) + REPLICA_CHECK
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "OK", result.stderr


RELOAD = textwrap.dedent("""
    import importlib
    import peft_persedit
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    members = list(PeftType)
    for name in ("peft_type", "config", "layer", "model", "loading"):
        importlib.reload(getattr(peft_persedit, name))
    importlib.reload(peft_persedit)
    import peft_persedit  # a second import is a no-op
    peft_persedit.register()
    assert list(PeftType) == members
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PERSEDIT] is peft_persedit.PersEditModel
    print("OK")
""")


def test_reloading_the_package_re_registers_in_place():
    result = subprocess.run([sys.executable, "-c", RELOAD], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "OK", result.stderr[-2000:]
