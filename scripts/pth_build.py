"""Build hook (pyproject.toml [tool.setuptools.cmdclass]): ship ``hf_deltacome-peft.pth`` into site-packages, in
wheels and in editable installs alike.

Python runs the ``import`` line of every ``.pth`` file in site-packages at start-up. Ours imports ``hf_deltacome``
(a few milliseconds: nothing heavy, see ``hf_deltacome/bootstrap.py``), whose import watcher registers the DELTACOME
method the moment PEFT is imported. So tools that load adapters through PEFT or transformers without importing us
(``lm_eval --model hf --model_args pretrained=B,peft=A``, ``pipeline(model=ADAPTER)`` in a fresh script) find the
method and run our checks. ``DELTACOME_NO_AUTOLOAD=1`` turns it off for a process. Everything else is in
pyproject.toml (which points setuptools at this module; no setup.py).
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py

PTH_NAME = "hf_deltacome-peft.pth"  # sorts after __editable__.*.pth, whose finder an editable install needs first
PTH_LINE = (
    "import os, importlib.util; os.environ.get('DELTACOME_NO_AUTOLOAD') "
    "or importlib.util.find_spec('hf_deltacome') is None or __import__('hf_deltacome')\n"
)


class build_py_with_pth(build_py):
    """``build_py`` that also writes the ``.pth`` file at the root of what becomes site-packages."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # PEP 660: setuptools' editable_wheel points install_lib at the unpacked editable wheel, whose root
            # files are installed into site-packages (the packages themselves stay in the source tree)
            root = self.get_finalized_command("install").install_lib
        else:
            root = self.build_lib
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs

