"""The packages the GPU machine lacks: bigrm's dependencies and its benchmarks' (the `bench` extra), with every
requirement of theirs followed through this environment's installed metadata (so each is pinned to the version
tested here), less what that machine already has (present.txt). Prints one `name==version` a line.

    python bench/gpu/wheelset.py [--extras bench] [--present bench/gpu/present.txt]
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The GPU machine's interpreter and platform, for the requirements' environment markers.
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip


def present(path: Path) -> set[str]:
    words = (w for line in path.read_text().splitlines() if not line.startswith("#") for w in line.split())
    return {canonicalize_name(w) for w in words}


def roots(extras: list[str]) -> list[str]:
    import tomllib  # Python 3.11+: wheels.sh's machine, not every machine that imports this module

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]


def applies(req: Requirement, extras: frozenset[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**TARGET, "extra": e}) for e in extras or {""})


def closure(requirements: list[str], have: set[str]) -> tuple[dict[str, str], list[str]]:
    """name → this environment's version for each package reachable from `requirements` and not in `have`; and the
    requirements that are not installed here (they cannot be pinned)."""
    pinned: dict[str, str] = {}
    missing: list[str] = []
    todo = [(Requirement(r), frozenset()) for r in requirements]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if not applies(req, extras) or name in have or name in pinned:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        pinned[name] = dist.version
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or []]
    return dict(sorted(pinned.items())), missing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--extras", nargs="*", default=["bench"], help="pyproject extras to carry as well")
    p.add_argument("--present", type=Path, default=HERE / "present.txt")
    args = p.parse_args()
    pinned, missing = closure(roots(args.extras), present(args.present))
    if missing:
        sys.exit(f"not installed here, so not pinned: {', '.join(missing)}")
    print("".join(f"{name}=={version}\n" for name, version in pinned.items()), end="")


if __name__ == "__main__":
    main()
