"""Lists loraplex's subpackages; the folder mapping itself lives in pyproject.toml."""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
MAPPED = {"server": "loraplex.server", "training": "loraplex.training", "export": "loraplex.export"}


def mapped_packages() -> list[str]:
    packages = []
    for folder, package in MAPPED.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder)
            packages.append(".".join([package, *relative.parts]))
    return packages


setup(packages=mapped_packages())
