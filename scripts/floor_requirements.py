"""Print the lowest versions pyproject.toml allows, one requirement a line, for `make test-floor`.

Every runtime dependency declared as `name>=X,<Y` becomes `name==X`: the suite then runs
against exactly the floor we promise to support. The `sim` extra (the simulator the tests
run) is floored the same way, since users install it for `make run` too.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)")


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = []
    for requirement in project["dependencies"] + project["optional-dependencies"]["sim"]:
        match = _FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f"{requirement!r} declares no floor (name>=X): cannot test it")
        name, extras, version = match.groups()
        pins.append(f"{name}{extras or ''}=={version}")
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("pyproject.toml")
    sys.stdout.write("\n".join(floors(path)) + "\n")
