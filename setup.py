"""Build shim: the package list, found from the source tree (the rest is in pyproject.toml).

Each top-level folder below is one subpackage of `hubquant` (`core/` is `hubquant` itself), so that
nothing is installed at the top level (Hugging Face's own `evaluate` stays importable). Every folder
with an `__init__.py` under them is a package, so a new one (`evaluate/tasks/`) cannot be left out
of the wheel; every package's `templates/` folder travels as package data.
"""

from pathlib import Path

from setuptools import setup

FOLDERS = {
    "hubquant": "core",
    "hubquant.convert": "convert",
    "hubquant.evaluate": "evaluate",
    "hubquant.models": "models",
    "hubquant.quantize": "quantize",
    "hubquant.reports": "reports",
}


def packages() -> list[str]:
    """Every package under FOLDERS, by its installed name."""
    root = Path(__file__).parent
    found = []
    for name, folder in FOLDERS.items():
        for init in sorted((root / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(root / folder).parts
            if "__pycache__" not in parts:
                found.append(".".join((name, *parts)))
    return found


if __name__ == "__main__":  # setuptools runs this file as __main__; .ci/wheel_check.py imports it
    setup(packages=packages(), package_dir=FOLDERS, package_data={"": ["templates/*"]})
