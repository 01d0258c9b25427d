"""Every space shipped under spaces/ loads through the one parser and plans its measurement.

Parametrized over the files found, so a new space is covered without touching this file. Only
the measurement plan is built; nothing is timed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wasearch.cli import UserError
from wasearch.latency.ops import network_ops
from wasearch.latency.plan import MeasurePlan, plan_networks
from wasearch.search.space import load_space, study_name_problem

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "spaces").glob("*.yaml"))


def test_spaces_are_shipped() -> None:
    assert SPACES, "no space under spaces/"


def _table_missing(path: Path) -> bool:
    """Whether the space prices with a latency table that is not built here yet."""
    space = load_space(path, require_latency_table=False)
    kind, table = space.latency.get("kind"), space.latency.get("path")
    return kind in ("measured", "table") and not Path(table).expanduser().is_file()


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_space_loads_and_plans(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # a space's relative paths (latency tables) are from the repository
    if _table_missing(path):
        # `search.py measure` builds the table; until then loading says to run it, in one line
        with pytest.raises(UserError, match=r"latency\.path: .*build it with: python search\.py"):
            load_space(path)
        space = load_space(path, require_latency_table=False)
    else:
        space = load_space(path)

    assert study_name_problem(space.name) is None
    assert space.units and space.size >= 2

    plan = MeasurePlan.for_space(space)
    keys = set(plan.keys())
    assert keys
    assert isinstance(plan_networks(plan), list)  # builds; empty where no int kernel exists here
    # every architecture the search starts from is made of planned operations only
    references = space.references()
    assert references
    for name, params in references:
        arch = space.arch(params)
        missing = [
            op.name for op in network_ops(arch) if op.key.with_batch(plan.batch) not in keys
        ]
        assert not missing, f"{path.name}: {name}: unplanned {missing}"
