"""The lowest version of every direct dependency qx declares, as pip constraints.

``python scripts/minimum_versions.py`` prints ``name==version`` for each ``>=`` bound in
``[project].dependencies`` and ``[project.optional-dependencies]`` of ``pyproject.toml``
(``make test-min`` installs with them). ``--check`` compares them with what the running
environment holds and exits 1 on a difference, so the run cannot test newer versions by
accident.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def minimums() -> dict[str, str]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    found: dict[str, str] = {}
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            continue  # qx[...] self-references, exact pins
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        version = match.group(3)
        if name in found and found[name] != version:
            sys.exit(f"{name} is declared with two minimums: {found[name]} and {version}")
        found[name] = version
    return found


def main() -> int:
    wanted = minimums()
    if "--check" not in sys.argv[1:]:
        for name, version in sorted(wanted.items()):
            print(f"{name}=={version}")
        return 0
    wrong = []
    for name, version in sorted(wanted.items()):
        installed = metadata.version(name)
        if _release(installed) != _release(version):
            wrong.append(f"{name} {installed} (declared minimum {version})")
    if wrong:
        print("not at the declared minimum: " + ", ".join(wrong), file=sys.stderr)
        return 1
    print(f"{len(wanted)} direct dependencies at their declared minimum")
    return 0


def _release(version: str) -> tuple[int, ...]:
    parts = [int(part) for part in re.findall(r"\d+", version)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


if __name__ == "__main__":
    raise SystemExit(main())
