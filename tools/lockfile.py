"""Read `requirements.lock`, the project's locked install (made by `make lock`, installed by `make install`).

The lock is a `uv pip compile --generate-hashes` file: one `name==version` per package, each followed by the
sha256 of every file of that release. It holds everything `pip install -e '.[dev,cluster]'` needs except torch,
which the Makefile installs first from wherever this machine's pip finds `torch==<TORCH_VERSION>` (the CPU
wheel on the development machines; see DESIGN.md section 6).

Standard library only: the Makefile runs it in a fresh venv, before anything is installed.

    python tools/lockfile.py pins              # name==version lines, no hashes (a pip constraints file)
    python tools/lockfile.py entry uv          # one package's block, hashes included (to bootstrap uv)
    python tools/lockfile.py diff OLD NEW      # what a refresh changed: added, removed, moved
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503 name: `Flask_Login` and `flask-login` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def blocks(path: Path = LOCK) -> dict[str, list[str]]:
    """{normalized name: the lines of its entry (the pin, its hashes, its `# via` comments)}."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            current = out.setdefault(normalize(match.group(1)), [])
        elif not line.startswith(" "):  # a top-level comment ends the entry before it
            current = None
        if current is not None:
            current.append(line)
    return out


def pins(path: Path = LOCK) -> dict[str, str]:
    """{normalized name: exact version} of every locked package."""
    return {name: _PIN.match(lines[0]).group(2) for name, lines in blocks(path).items()}


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Lines saying what moved between two locks, sorted by package."""
    lines = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if before is None:
            lines.append(f"+ {name} {after}")
        elif after is None:
            lines.append(f"- {name} {before}")
        else:
            lines.append(f"~ {name} {before} -> {after}")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["pins"]:
        print("\n".join(f"{name}=={version}" for name, version in sorted(pins().items())))
    elif argv[:1] == ["entry"] and len(argv) == 2:
        entry = blocks().get(normalize(argv[1]))
        if entry is None:
            print(f"error: {argv[1]} is not in {LOCK.name}", file=sys.stderr)
            return 1
        print("\n".join(entry))
    elif argv[:1] == ["diff"] and len(argv) == 3:
        changes = diff(pins(Path(argv[1])), pins(Path(argv[2])))
        print("\n".join(changes) if changes else "no version changed")
    else:
        print("usage: lockfile.py pins | entry NAME | diff OLD NEW", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
