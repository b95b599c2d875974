"""Packaging: peft loads PERSEDIT adapters without ``import peft_persedit`` (the .pth import hook), the hook is
cheap, the top-level API, the wheel (kernels from the top-level ``kernels/`` folder, the .pth at its root), and
the README's claim about transformers' ``load_adapter``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import peft
import pytest
import torch
import transformers
import transformers.integrations.peft
from helpers import IDS, add_random_clusters, edit_layers
from packaging import version
from peft import get_peft_model
from tiny_models import make_tiny_model

import peft_persedit
from peft_persedit import PersonalizationEditConfig

ROOT = Path(__file__).resolve().parent.parent
PTH = "peft_persedit_hook.pth"
HOOK = "_peft_persedit_hook"
#: what a build needs from the source tree
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", PTH, f"{HOOK}.py", "peft_persedit", "kernels")


def run_python(code: str, *args: str, python: str = sys.executable, cwd: Path | None = None,
               pythonpath: Path | None = None, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter (auto-registration on, the repository not on ``sys.path``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PEFT_PERSEDIT_NO_AUTOREGISTER", "PYTHONPATH")}
    env.update({"PYTHONPATH": str(pythonpath)} if pythonpath else {})
    result = subprocess.run([python, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=cwd or Path.home())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_startup_installs_only_the_cheap_hook():
    code = """
        import sys, json
        print(json.dumps({name: name in sys.modules for name in
                          ("_peft_persedit_hook", "torch", "peft", "transformers", "peft_persedit")}))
    """
    loaded = json.loads(run_python(code))
    assert loaded.pop(HOOK), f"{PTH} is not installed: reinstall the package (pip install --no-deps -e .)"
    assert not any(loaded.values()), loaded


LOAD_WITHOUT_IMPORT = """
    import importlib.util, json, sys
    import torch
    assert importlib.util.find_spec("peft") is not None  # a probe (as transformers makes) loads nothing
    assert "peft" not in sys.modules
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
    reference = torch.load(adapter + "/reference_logits.pt")
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).eval(), adapter)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter)
    print(json.dumps({"peft_type": str(pm.peft_config["default"].peft_type),
                      "PeftModel": torch.equal(pm(ids).logits, reference),
                      "AutoPeftModelForCausalLM": torch.equal(auto(ids).logits, reference)}))
"""


def test_peft_loads_an_adapter_without_importing_peft_persedit(tmp_path, saved_tiny_base):
    pm = get_peft_model(saved_tiny_base, PersonalizationEditConfig(gate="soft"))
    add_random_clusters(edit_layers(pm)[0], "default", 3, seed=3)
    pm.save_pretrained(tmp_path / "adapter")
    torch.save(pm(IDS).logits, tmp_path / "adapter" / "reference_logits.pt")
    assert "peft_persedit" not in LOAD_WITHOUT_IMPORT
    out = run_python(LOAD_WITHOUT_IMPORT, str(tmp_path / "base"), str(tmp_path / "adapter"), json.dumps(IDS.tolist()))
    assert json.loads(out) == {"peft_type": "PeftType.PERSEDIT", "PeftModel": True, "AutoPeftModelForCausalLM": True}


def test_importing_peft_registers_once_and_keeps_peft_s_loader():
    code = """
        import json, sys, _peft_persedit_hook as hook
        watching = [isinstance(f, hook.PeftImportWatcher) for f in sys.meta_path].count(True)
        import peft
        import peft_persedit
        print(json.dumps([watching, [isinstance(f, hook.PeftImportWatcher) for f in sys.meta_path].count(True),
                          type(peft.__loader__).__name__, type(peft.__spec__.loader).__name__,
                          "peft_persedit.editing" in sys.modules, peft_persedit.kernels.__name__,
                          peft_persedit.Preference.__module__]))
    """
    assert json.loads(run_python(code)) == [1, 0, "SourceFileLoader", "SourceFileLoader", False,
                                            "peft_persedit.kernels", "peft_persedit.preferences"]


def test_hook_install_opt_out_and_watcher(monkeypatch):
    import _peft_persedit_hook as hook

    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, hook.PeftImportWatcher)])
    monkeypatch.setenv(hook.OPT_OUT, "1")
    monkeypatch.delitem(sys.modules, "peft")
    hook.install()
    assert not any(isinstance(f, hook.PeftImportWatcher) for f in sys.meta_path)
    monkeypatch.delenv(hook.OPT_OUT)
    hook.install()
    hook.install()
    watchers = [f for f in sys.meta_path if isinstance(f, hook.PeftImportWatcher)]
    assert len(watchers) == 1 and sys.meta_path[0] is watchers[0]
    assert watchers[0].find_spec("peft_persedit") is None
    spec = watchers[0].find_spec("peft")
    assert spec.origin == peft.__spec__.origin and isinstance(spec.loader, hook._RegisteringLoader)
    hook.uninstall()
    assert not any(isinstance(f, hook.PeftImportWatcher) for f in sys.meta_path)


def test_a_failing_registration_warns_instead_of_breaking_peft(monkeypatch):
    import _peft_persedit_hook as hook

    monkeypatch.setattr(hook, "PACKAGE", "peft_persedit_no_such_package")
    with pytest.warns(ImportWarning, match="could not register the PERSEDIT adapter type"):
        hook.register_persedit()


def test_top_level_api():
    from peft_persedit.editing import PersonalizationEditor
    from peft_persedit.preferences import Preference, load_preferences

    assert peft_persedit.PersonalizationEditor is PersonalizationEditor
    assert (peft_persedit.Preference, peft_persedit.load_preferences) == (Preference, load_preferences)
    for name in peft_persedit.__all__:
        assert getattr(peft_persedit, name) is not None and name in dir(peft_persedit)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = peft_persedit.nope


def source_copy(dest: Path) -> Path:
    """The build inputs of the repository, copied to ``dest`` (so that builds leave the checkout alone)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in BUILD_INPUTS:
        src = ROOT / name
        shutil.copytree(src, dest / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """A regular and an editable wheel built from a copy of the source tree (no build isolation: seconds)."""
    src = source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out / "regular"), str(src)], check=True, capture_output=True, timeout=300)
    editable = run_python("import sys; from setuptools import build_meta; "
                          "print(build_meta.build_editable(sys.argv[1]))", str(out / "editable"), cwd=src)
    return {"regular": next((out / "regular").glob("*.whl")), "editable": out / "editable" / editable,
            "src": src}


def package_dirs() -> set[str]:
    """Every package of the source tree, as a path inside the wheel (``kernels/`` installs as peft_persedit's)."""
    found = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "peft_persedit").rglob("__init__.py")}
    found |= {"peft_persedit/" + p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").rglob("__init__.py")}
    return found


def test_wheel_contents(wheels):
    names = set(zipfile.ZipFile(wheels["regular"]).namelist())
    assert {PTH, f"{HOOK}.py", "peft_persedit/kernels/dispatch.py", "peft_persedit/kernels/triton_gated_edit.py",
            "peft_persedit/data/neutral_prompts.json"} <= names
    assert {f"{d}/__init__.py" for d in package_dirs()} <= names  # pyproject's explicit package list is whole
    assert (ROOT / PTH).read_text() == zipfile.ZipFile(wheels["regular"]).read(PTH).decode()
    assert not any(name.startswith("kernels/") for name in names)


def test_editable_wheel_carries_the_pth_and_maps_the_kernels(wheels):
    wheel = zipfile.ZipFile(wheels["editable"])
    assert PTH in wheel.namelist()
    finder = next(n for n in wheel.namelist() if n.startswith("__editable__") and n.endswith("_finder.py"))
    assert f"'peft_persedit.kernels': '{wheels['src'] / 'kernels'}'" in wheel.read(finder).decode()


def fresh_venv(path: Path) -> tuple[str, Path]:
    """A new venv (python, site-packages) reaching this one's packages through a path entry, not a site dir:
    their .pth files (the editable install's finder, the hook) stay off."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = str(path / "bin" / "python")
    site = Path(run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", python=python))
    deps = Path(run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    (site / "zz_dev_dependencies.pth").write_text(f"{deps}\n")
    return python, site


KERNELS_FROM = """
    import sys, peft
    from peft.utils import PeftType
    import peft_persedit.kernels
    from peft_persedit.kernels import dispatch
    print(PeftType.PERSEDIT.value, peft_persedit.kernels.__file__.startswith(sys.argv[1]), dispatch.__name__)
"""


def test_a_source_tree_then_the_wheel_in_a_fresh_venv(wheels, tmp_path):
    """``PYTHONPATH=checkout`` (``__init__`` maps ``kernels/`` itself), then the wheel alone (its .pth registers)."""
    python, site = fresh_venv(tmp_path / "venv")
    code = "import peft_persedit\n" + textwrap.dedent(KERNELS_FROM)  # no .pth in this venv yet: import it
    out = run_python(code, str(wheels["src"] / "kernels"), python=python, pythonpath=wheels["src"])
    assert out == "PERSEDIT True peft_persedit.kernels.dispatch"
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                    str(wheels["regular"])], check=True, capture_output=True, timeout=300)
    assert (site / PTH).exists()
    out = run_python(KERNELS_FROM, str(site / "peft_persedit" / "kernels"), python=python)
    assert out == "PERSEDIT True peft_persedit.kernels.dispatch"


def readme_load_adapter_claim() -> tuple[str, str]:
    """``(peft version, transformers version)`` from the README's ``base.load_adapter(...)`` line."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "base.load_adapter(" in line)
    peft_claim, transformers_claim = re.search(r"peft >= ([\d.]+)", line), re.search(r"transformers ([\d.]+)", line)
    assert peft_claim and transformers_claim, line
    return peft_claim.group(1), transformers_claim.group(1)


def test_readme_states_what_transformers_load_adapter_needs():
    needed = getattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "0")
    peft_claim, transformers_claim = readme_load_adapter_claim()
    installed = version.parse(transformers.__version__)
    if installed.release[:2] != version.parse(transformers_claim).release[:2]:
        pytest.skip(f"the README names transformers {transformers_claim}; {transformers.__version__} is installed")
    assert version.parse(peft_claim) == version.parse(needed)


def test_transformers_load_adapter_loads_and_older_peft_is_refused_the_rest(tmp_path):
    """``load_adapter`` loads under any supported peft; transformers' other adapter methods check its minimum."""
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(gate="soft"))
    add_random_clusters(edit_layers(pm)[0], "default", 3, seed=3)
    pm.save_pretrained(tmp_path / "adapter")
    model = make_tiny_model("llama")
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="alice")
    assert torch.equal(model(IDS).logits, pm(IDS).logits)
    needed = getattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "0")
    if version.parse(peft.__version__) >= version.parse(needed):
        pytest.skip(f"peft {peft.__version__} >= {needed}: test_transformers_load_adapter covers set_adapter & co.")
    for method, args in (("active_adapters", ()), ("set_adapter", ("alice",)), ("disable_adapters", ()),
                         ("delete_adapter", ("alice",))):
        with pytest.raises(ValueError, match=re.escape(f"please use a version >= {needed}")):
            getattr(model, method)(*args)
