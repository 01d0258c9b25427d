"""The search: YAML spaces, Optuna studies under a latency model, the adaptation shortcut.

``search.py run spaces/<space>.yaml`` drives :func:`run_search`; see ``docs/search.md`` and
``spaces/README.md``. Importing this package has no side effects (Optuna and torch are imported
when a function needs them).
"""

from __future__ import annotations

from .space import SearchSpace, Unit, load_space, parse_space
from .study import (
    RunOptions,
    RunResult,
    TrialEvent,
    bitops,
    ensure_base,
    export_trials,
    front_trials,
    open_storage,
    open_study,
    pretrain,
    run_search,
)

__all__ = [
    "RunOptions",
    "RunResult",
    "SearchSpace",
    "TrialEvent",
    "Unit",
    "bitops",
    "ensure_base",
    "export_trials",
    "front_trials",
    "load_space",
    "open_storage",
    "open_study",
    "parse_space",
    "pretrain",
    "run_search",
]
