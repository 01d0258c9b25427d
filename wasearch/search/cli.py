"""``search.py run | pretrain | export``: the command-line layer of the search (printing only).

The work is done by :mod:`wasearch.search.run`, :mod:`.base` and :mod:`.export`; this module
parses flags, sets up logging, prints one line per trial plus a progress bar, turns the result
into an exit code, and wires the report writer (:func:`refresh_report`) into the run: it is the
only module of the search that imports :mod:`wasearch.report`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..cli import UserError, positive_float, positive_int
from ..fileio import display_path, shell_path
from .record import TrialEvent
from .run import RunOptions

__all__ = ["format_event", "refresh_report", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``, ``pretrain`` and ``export`` to ``search.py``."""
    run = sub.add_parser(
        "run",
        help="search a space (creates or resumes its study)",
        description=(
            "Search per-layer convolution algorithm, tile and bit-width for accuracy against "
            "latency. Rerunning the same command resumes the study; several processes or "
            "machines running it against one storage cooperate on one study."
        ),
    )
    run.add_argument("space", help="search space YAML (see spaces/README.md)")
    _common(run)
    run.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage: postgresql://..., mysql://..., sqlite:///... or a journal file "
        "path (default: the space's storage.url, else sqlite:///results/<study>/study.db)",
    )
    run.add_argument(
        "--workers", type=positive_int, default=1, help="local worker processes (default 1)"
    )
    run.add_argument(
        "--trials",
        type=positive_int,
        help="completed trials wanted in the whole study (default: the space's budget.trials)",
    )
    run.add_argument(
        "--timeout",
        type=positive_float,
        metavar="S",
        help="stop starting trials after S seconds (default: the space's budget.timeout)",
    )
    run.add_argument("--no-report", action="store_true", help="do not refresh report.html")
    run.set_defaults(func=_cmd_run)

    pre = sub.add_parser(
        "pretrain",
        help="train only the shared base checkpoint of a space (once)",
        description="Train the base every trial is adapted from: results/<study>/base/best.pt.",
    )
    pre.add_argument("space", help="search space YAML")
    _common(pre)
    pre.set_defaults(func=_cmd_pretrain)

    exp = sub.add_parser(
        "export",
        help="write the Arch YAML of a trial or of the Pareto front",
        description=(
            "Write results/<study>/pareto/trial_<n>.yaml for one trial (--trial N) or for every "
            "trial on the Pareto front (--pareto, the default), and print the train.py command "
            "that trains each fully."
        ),
    )
    exp.add_argument("study_dir", metavar="results/<study>", help="the study folder")
    which = exp.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, metavar="N", help="export trial number N")
    which.add_argument("--pareto", action="store_true", help="export the front (default)")
    exp.add_argument("--storage", metavar="URL", help="the study's storage when not its SQLite")
    exp.add_argument("--study-name", help="default: the folder's name")
    exp.set_defaults(func=_cmd_export)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--study-name",
        metavar="NAME",
        help="default: the space's name; the same rule (letters, digits, '-', '_', '.', not "
        "starting with '.'): it names the folder results/<study>",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--results", default="results", help="parent folder of study folders (results)")
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads per worker (default: the idle cores, i.e. all cores less the "
        "one-minute load average, shared among --workers; at least 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", module="optuna")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def _options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        storage=getattr(args, "storage", None),
        workers=getattr(args, "workers", 1),
        trials=getattr(args, "trials", None),
        timeout=getattr(args, "timeout", None),
        study_name=args.study_name,
        device=args.device,
        results=args.results,
        threads=args.threads,
        report=not getattr(args, "no_report", False),
        on_report=refresh_report,
    )


def refresh_report(study_dir: Any, storage: str, study: Any) -> None:
    """``RunOptions.on_report``: write the study's report.html and CSVs (module level, so that
    worker processes can be given it)."""
    from ..report import write_report

    write_report(
        study_dir, storage=storage, study_name=study.study_name if study else None, study=study
    )


def format_event(e: TrialEvent) -> str:
    """One line per trial: choices summarized, accuracy, latency, front size."""
    width = len(str(e.target))
    head = f"[{e.done:>{width}}/{e.target}] trial {e.number:<4}"
    if e.state == "FAIL":
        return f"{head} FAIL  {e.summary}  {e.reason or ''}".rstrip()
    acc = f"acc {e.val_acc:.4f}" if isinstance(e.val_acc, float) else "acc    -  "
    lat = f"{e.latency_ms:9.3f} ms" if isinstance(e.latency_ms, float) else "        - ms"
    flags = []
    if e.feasible is False:
        flags.append("infeasible")
    if e.state == "PRUNED":
        flags.append(e.reason or "pruned")
    if e.reference:
        flags.append(f"ref {e.reference}")
    if e.on_front:
        flags.append("on the front so far")
    summary = e.summary if len(e.summary) <= 44 else e.summary[:41] + "..."
    tail = f"  ({', '.join(flags)})" if flags else ""
    return f"{head} {summary:<44} {acc}  {lat}  front {e.front:<3} {e.seconds:6.1f} s{tail}"


def columns_line(*, synthetic: bool) -> str:
    """The line above the trial lines that says what their columns are."""
    data = "SYNTHETIC data: accuracies say nothing about a real dataset.\n" if synthetic else ""
    return (
        f"{data}Columns: [completed/wanted] trial number, choices, validation accuracy, "
        "latency, front N = trials on the Pareto front so far, seconds the trial took;\n"
        "(on the front so far) = on that front when the trial ended (later trials may "
        "dominate it; the final front is printed at the end)"
    )


def print_event(e: TrialEvent) -> None:
    """``on_event`` of worker processes (module level, so it can be sent to them)."""
    prefix = f"[w{e.worker}] "
    print(prefix + format_event(e), flush=True)


class _Display:
    """The trial lines and one progress bar (when the terminal shows one)."""

    def __init__(self, *, progress: bool) -> None:
        self.enabled = progress and sys.stderr.isatty()
        self.bar: Any = None

    def _ensure(self, done: int, target: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=target, initial=done, desc="trials", unit="trial", leave=False)
        if self.bar.total != target:
            self.bar.total = target
        self.bar.n = min(done, target)
        self.bar.refresh()

    def on_event(self, e: TrialEvent) -> None:
        line = format_event(e)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        self._ensure(e.done, e.target)

    def on_progress(self, done: int, target: int) -> None:
        self._ensure(done, target)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run_search
    from .space import load_space

    _setup_logging()
    space = load_space(args.space)
    options = _options(args)
    display = _Display(progress=not args.no_progress)
    synthetic = space.data["dataset"] == "synthetic"
    print(space.describe())
    print(columns_line(synthetic=synthetic))
    try:
        result = run_search(
            space,
            options,
            on_event=display.on_event if options.workers == 1 else print_event,
            on_progress=display.on_progress,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    finally:
        display.close()
    print(result.message)
    if result.front:
        shown = ", ".join(map(str, result.front[:20])) + (" ..." if len(result.front) > 20 else "")
        label = " (SYNTHETIC data: accuracies say nothing about a real dataset)"
        print(f"Pareto front: trials {shown}{label if synthetic else ''}")
        where = display_path(result.study_dir)
        flag = ""
        if (
            options.storage
            and "://" in options.storage
            and not options.storage.startswith("sqlite")
        ):
            flag = " --storage URL"
        print(f"export: python search.py export {shell_path(result.study_dir)} --pareto{flag}")
        if (result.study_dir / "report.html").is_file():
            print(f"report: {where}/report.html")
    if result.status == "interrupted":
        return 130
    if result.status == "stopped":
        return 1
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .run import pretrain
    from .space import load_space

    _setup_logging()
    space = load_space(args.space)
    path = pretrain(space, _options(args), progress=not args.no_progress and sys.stderr.isatty())
    print(f"base checkpoint: {display_path(path)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_trials

    _setup_logging()
    exported = export_trials(  # --pareto (the default) is trial=None
        args.study_dir,
        trial=args.trial,
        storage=args.storage,
        study_name=args.study_name,
    )
    for e in exported:
        acc = f"{e.val_acc:.4f}" if isinstance(e.val_acc, float) else "?"
        lat = f"{e.latency_ms:.3f} ms" if isinstance(e.latency_ms, float) else "?"
        print(f"wrote {display_path(e.path)}: {e.arch.summary()} (acc {acc}, latency {lat})")
        print(f"  train fully:  {e.commands[0]}")
        if len(e.commands) > 1:
            print(f"  or fine-tune the search's checkpoint:  {e.commands[1]}")
    if not exported:
        raise UserError("nothing exported")
    return 0
