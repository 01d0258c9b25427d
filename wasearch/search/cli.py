"""``search.py run | pretrain | export | inspect``: the search's command line (printing only).

The work is done by :mod:`wasearch.search.run`, :mod:`.base` and :mod:`.export`; this module
parses flags, sets up logging, prints one line per trial plus a progress bar, turns the result
into an exit code, and wires the report writer (:func:`refresh_report`) into the run: it is the
only module of the search that imports :mod:`wasearch.report`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Any

from ..cli import UserError, nonnegative_float, positive_float, positive_int
from ..fileio import display_path, shell_path
from .record import TrialEvent
from .run import RunOptions

__all__ = ["format_event", "inspect_text", "refresh_report", "register"]


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
    add_tolerance_flag(run)
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

    ins = sub.add_parser(
        "inspect",
        help="list a space's network: every convolution, searchable or why not (no training)",
        description=(
            "Build the space's model, run one forward pass at its input size and print every "
            "convolution: its module path, channels, kernel, stride, padding, input size, and "
            "whether it is searchable (3x3, stride 1, dilation 1, groups 1) or why not; then "
            "the searched units."
        ),
    )
    ins.add_argument("space", help="search space YAML")
    ins.set_defaults(func=_cmd_inspect)


def add_tolerance_flag(p: argparse.ArgumentParser) -> None:
    """``--tolerance K`` (``search.py run`` and ``report``): accuracies within K standard errors
    of their difference count as the same (wasearch/stats.py); overrides the space's
    ``report.tolerance`` for this command."""
    p.add_argument(
        "--tolerance",
        type=nonnegative_float,
        metavar="K",
        help="accuracies within K standard errors of their difference are the same: the pick "
        "is the fastest trial within K of the best (default: the space's report.tolerance, "
        "else 1.0)",
    )


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


def refresh_report(
    study_dir: Any, storage: str, study: Any, *, tolerance: float | None = None
) -> None:
    """``RunOptions.on_report``: write the study's report.html and CSVs (module level, so that
    worker processes can be given it; ``--tolerance`` is bound with ``functools.partial``)."""
    from ..report import write_report

    write_report(
        study_dir,
        storage=storage,
        study_name=study.study_name if study else None,
        study=study,
        tolerance=tolerance,
    )


def format_event(e: TrialEvent) -> str:
    """One line per trial: choices summarized, accuracy, latency, front size."""
    width = len(str(e.target))
    head = f"[{e.done:>{width}}/{e.target}] trial {e.number:<4}"
    if e.state == "FAIL":
        return f"{head} FAIL  {e.summary}  {e.reason or ''}".rstrip()
    acc = f"acc {e.val_acc:.4f}" if isinstance(e.val_acc, float) else "acc    -  "
    acc += f" ± {e.val_se:.4f}" if isinstance(e.val_acc, float) and e.val_se is not None else ""
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
        f"{data}Columns: [completed/wanted] trial number, choices, validation accuracy "
        "± its standard error (binomial, from the validation images), "
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
    # The page a run refreshes uses the tolerance of this command (flag, else this space file).
    tolerance = _tolerance(args, space)
    options.on_report = functools.partial(refresh_report, tolerance=tolerance)
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
        pick = pick_line(result, tolerance=tolerance)
        if pick:
            print(pick)
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


def _tolerance(args: argparse.Namespace, space: Any) -> float:
    flag = getattr(args, "tolerance", None)
    return flag if flag is not None else float(space.report["tolerance"])


def pick_line(result: Any, *, tolerance: float) -> str | None:
    """The decision the search was run for, one line: the fastest trial whose accuracy is
    within ``tolerance`` standard errors of the best (and of all-normal), with its speed-up.
    None when the study cannot be read back or holds no completed, feasible trial."""
    from ..stats import fmt_acc_se, trial_se
    from .export import load_study_for
    from .record import noise_pick

    try:
        study, _ = load_study_for(
            result.study_dir, storage=result.storage, study_name=result.study_name
        )
        trials = study.get_trials(deepcopy=False)
        objectives = study.user_attrs.get("objectives") or []
        ref_ms = study.user_attrs.get("reference_latency_ms")
    except Exception:  # noqa: BLE001 - a summary line must not turn a finished run into an error
        return None
    picked = noise_pick(trials, objectives, tolerance=tolerance)
    if picked is None:
        return None

    def said(t: Any) -> str:
        a = t.user_attrs
        ref = f"{a['reference']}: " if a.get("reference") else ""
        text = f"trial {t.number} ({ref}{fmt_acc_se(a['val_acc'], trial_se(a))}"
        if isinstance(a.get("latency_ms"), int | float):
            text += f", {a['latency_ms']:.3g} ms"
            if ref_ms and a.get("reference") != "all-normal":
                text += f", {ref_ms / a['latency_ms']:.2f}x faster than all-normal"
        return text + ")"

    how = "most accurate"
    if picked.cost:
        how = "fastest" if picked.cost == "latency_ms" else f"smallest in {picked.cost}"
    line = (
        f"Pick: {said(picked.pick)}: the {how} of {picked.within} trial(s) within "
        f"{tolerance:g} standard error(s) of the best"
        + ("" if picked.best is picked.pick else f", trial {picked.best.number}")
    )
    ref_pick = picked.reference_pick
    if ref_pick is not None:
        same = ref_pick.number == picked.pick.number
        line += f"; the fastest as good as all-normal: {'the pick' if same else said(ref_pick)}"
    return line


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


def inspect_text(space: Any) -> str:
    """What ``search.py inspect`` prints: the convolution table and the searched units."""
    from ..discovery import discover, format_table, trace_convs

    if space.model_ref.is_paper:
        from ..models import build

        arch = space.base_arch()
        found = trace_convs(build(arch), (3, space.input_size, space.input_size))
    else:
        found = discover(
            space.model_ref, num_classes=space.num_classes, input_size=space.input_size
        )
    shape = "x".join(map(str, found.input_shape))
    lines = [f"{space.path}: {space.model_ref.text} at {shape}, {space.num_classes} classes", ""]
    lines.append(format_table(found))
    lines.append("")
    lines.append(f"{len(space.units)} searched unit(s), {space.size} architectures:")
    for unit in space.units:
        layers = (
            ", ".join(unit.layers)
            if len(unit.layers) <= 3
            else (f"{unit.layers[0]} .. {unit.layers[-1]} ({len(unit.layers)} layers)")
        )
        lines.append(f"  {unit.name}: {layers}: {' | '.join(unit.labels)}")
    lines.extend(f"note: {n}" for n in space.notes)
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .space import load_space

    print(inspect_text(load_space(args.space, require_latency_table=False)))
    return 0
