"""Installs ``peft_persedit_hook.pth`` into site-packages' root with the package (metadata: pyproject.toml).

The ``.pth`` runs ``_peft_persedit_hook.install()`` at interpreter start, so that importing peft registers the
PERSEDIT adapter type. setuptools has no declarative way to place a file at site-packages' root, hence this
``build_py`` step: a regular wheel gets the file from ``build_lib``; an editable wheel (``pip install -e``)
from the unpacked wheel's root, which editable_wheel hands to the ``install`` command as ``install_lib``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path(__file__).parent / "peft_persedit_hook.pth"


class BuildPyWithPth(build_py):
    """``build_py`` that also puts ``peft_persedit_hook.pth`` at the wheel's root."""

    def run(self) -> None:
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(str(PTH), str(Path(root) / PTH.name), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, str(Path(self.build_lib) / PTH.name)]


setup(cmdclass={"build_py": BuildPyWithPth})
