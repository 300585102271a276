"""How a test gets its tier (tests/tiers.py): the highest of what it uses and how it is marked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from tiers import tier_of

pytestmark = pytest.mark.tier("pure")


@dataclass
class _Item:
    """What tier_of reads of a collected test."""

    fixturenames: tuple[str, ...] = ()
    marks: tuple[str, ...] = ()
    path: Path = Path("tests/test_x.py")
    nodeid: str = "tests/test_x.py::test_x"

    def iter_markers(self, name: str) -> list[pytest.Mark]:
        return [pytest.mark.tier(t).mark for t in self.marks] if name == "tier" else []


@pytest.mark.parametrize(("item", "tier"), [
    (_Item(), "pure"),
    (_Item(fixturenames=("tiny_bundle",)), "inproc"),
    (_Item(fixturenames=("tiny_bundle", "prefix")), "broker"),
    (_Item(marks=("inproc",), fixturenames=("broker",)), "broker"),  # a mark is a floor
    (_Item(marks=("broker",)), "broker"),
    (_Item(path=Path("tests/deploy/test_x.py")), "deploy"),
])
def test_a_test_is_in_the_highest_tier_of_what_it_uses_and_how_it_is_marked(
        item: _Item, tier: str) -> None:
    assert tier_of(item) == tier  # type: ignore[arg-type]


def test_an_unknown_tier_is_one_clear_error() -> None:
    with pytest.raises(pytest.UsageError, match="unknown tier \\['fast'\\]"):
        tier_of(_Item(marks=("fast",)))  # type: ignore[arg-type]
