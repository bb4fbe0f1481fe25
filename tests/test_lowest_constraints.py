"""The lowest-versions CI step (.ci/lowest.sh) installs .ci/lowest-constraints.txt: one pin per
dependency and extra in pyproject.toml, at its declared minimum. This keeps the two equal."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def declared_minimums() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    out: dict[str, Version] = {}
    for req in map(Requirement, reqs):
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{req}: each requirement has one '>=' bound, its tested minimum"
        name = canonicalize_name(req.name)
        assert out.setdefault(name, lows[0]) == lows[0], f"{req.name} has two different minimums"
    return out


def pinned() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in (ROOT / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line!r}: constraints are exact pins, name==version"
            out[canonicalize_name(name)] = Version(version)
    return out


def test_lowest_constraints_pin_every_declared_minimum():
    declared = declared_minimums()
    declared.pop("torch")  # declared from the code and diffusers, not tested: the CI installs the README's 2.13.0
    assert pinned() == declared
