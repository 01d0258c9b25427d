"""The search: YAML spaces, Optuna studies under a latency model, the adaptation shortcut.

``search.py run spaces/<space>.yaml`` drives :func:`run_search`; see ``docs/search.md`` and
``spaces/README.md``. One module per job of the data flow: ``space`` (the YAML space),
``storage`` (where a study lives), ``study`` (samplers and opening the study), ``record`` (what a
trial records, the Pareto front, the train commands), ``base`` (the shared pretrained base),
``worker`` (the objective), ``failover``, ``run`` (the run loop), ``export``, ``differentiable``
(the supernet sweep) and ``cli``. Importing this package has no side effects (Optuna is imported
when a function needs it).
"""

from __future__ import annotations

from .base import ensure_base
from .export import export_trials
from .record import TrialEvent, bitops, front_trials, pareto_front
from .run import RunOptions, RunResult, pretrain, run_search
from .space import SearchSpace, Unit, load_space, parse_space
from .storage import open_storage
from .study import open_study

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
    "pareto_front",
    "parse_space",
    "pretrain",
    "run_search",
]
