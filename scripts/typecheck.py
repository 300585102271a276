"""Run mypy on the offramp package as it is imported, not as it is laid out in folders.

Folders like services/segment-worker are not valid module paths, so mypy cannot be pointed at
them. This builds a symlink tree (.cache/typecheck/offramp/...) from pyproject.toml's
package-dir mapping, the same mapping the installer uses, and runs ``mypy -p offramp`` on it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_tree(dest: Path) -> None:
    mapping: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-dir"]
    if dest.exists():
        shutil.rmtree(dest)
    for package, folder in sorted(mapping.items()):
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for src in (ROOT / folder).iterdir():
            if src.suffix in (".py", ".pyi") or src.name == "py.typed":
                (target / src.name).symlink_to(src)
            elif src.is_dir() and (src / "__init__.py").exists() and not any(
                    (ROOT / f).resolve() == src.resolve() for f in mapping.values()):
                (target / src.name).symlink_to(src, target_is_directory=True)


def main() -> int:
    tree = ROOT / ".cache" / "typecheck"
    build_tree(tree)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           "-p", "offramp", *sys.argv[1:]]
    return subprocess.call(cmd, cwd=tree)


if __name__ == "__main__":
    sys.exit(main())
