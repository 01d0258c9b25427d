"""The fidelity frontier: F6 and sub-8-bit Winograd, lever by lever (a section of paper_claims).

Every row is one uniform static Winograd architecture (tap-wise Winograd-domain ranges, the
granularity section 3 of paper_claims found necessary) or a normal reference at the same bits,
measured three ways on the same base: converted without training, adapted under the section's
budget, and, layer by layer on the base's own activations, its numerical error against the float
direct convolution with each quantized stage alone. The levers (each an option of the layer, the
Arch YAML, train.py and the search space):

* ``transforms: tap``: one power-of-two scale per tile position for the transform matrices
  (columns of ``A^T``, rows of ``B^T``; rows of ``G``), which holds the Cook-Toom matrices of
  the default points exactly at 8 bits and folds into a tap-wise kernel's requantization;
* ``wd_bits``: the Winograd domain's own precision (the transformed weights and inputs and
  their product), e.g. 8-bit layers with a 10-bit domain;
* ``distill``: knowledge distillation from the base during adaptation (a training option).

This module holds the plan, the measurement loop and the tables; ``paper_claims.py`` supplies
the base, the data and the budget (the callables of :func:`measure`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from wasearch.arch import LayerChoice

__all__ = ["ERROR_STAGES", "Lever", "measure", "plan", "render", "summary"]

#: The stages whose error the table splits out: the transforms and the Winograd domain.
ERROR_STAGES = ("transform", "weight_wd", "input_wd", "product")


@dataclass(frozen=True)
class Lever:
    """One row: a uniform architecture (``tile`` None: normal) and the adaptation option."""

    tile: int | None
    bits: int
    transforms: str = "tensor"
    wd_bits: int | None = None
    distill: float = 0.0

    @property
    def choice(self) -> LayerChoice:
        if self.tile is None:
            return LayerChoice("normal", None, self.bits)
        return LayerChoice("static", self.tile, self.bits, "tap", self.transforms, self.wd_bits)

    @property
    def levers(self) -> str:
        """The levers in words (``-`` for none)."""
        parts = []
        if self.transforms == "tap":
            parts.append("tap transforms")
        if self.wd_bits is not None:
            parts.append(f"{self.wd_bits}-bit domain")
        if self.distill:
            parts.append(f"distill {self.distill:g}")
        return " + ".join(parts) or "-"

    @property
    def name(self) -> str:
        what = "normal" if self.tile is None else f"F{self.tile}"
        return f"{what} {self.bits}-bit"

    def key(self) -> tuple:
        return (self.tile, self.bits, self.transforms, self.wd_bits, self.distill)

    def as_dict(self) -> dict:
        return {
            "tile": self.tile,
            "bits": self.bits,
            "transforms": self.transforms,
            "wd_bits": self.wd_bits,
            "distill": self.distill,
        }


def plan(distill: float, tiles_bits: Sequence[tuple[int, int]] | None = None) -> list[Lever]:
    """The rows, the decisive ones first. For each bits: normal, then normal distilled (the
    like-for-like reference of a distilled Winograd row). For the first two (tile, bits)
    cells, the issue's targets: the baseline (tensor-scaled transforms), each of the two layer
    levers alone, both, and both with distillation; for the others the baseline, tap
    transforms, both layer levers, and both with distillation.

    A Winograd domain wider than the layer is tried at 10 bits for 8-bit layers and at 8 bits
    for narrower ones (the widths integer kernels have: int16 and int8 products)."""
    cells = list(tiles_bits or ((6, 8), (4, 6), (4, 4), (6, 6), (4, 8)))
    rows: list[Lever] = []
    for i, (tile, bits) in enumerate(cells):
        if not any(r.tile is None and r.bits == bits for r in rows):
            rows += [Lever(None, bits), Lever(None, bits, distill=distill)]
        wide = 10 if bits >= 8 else 8
        rows += [Lever(tile, bits), Lever(tile, bits, "tap")]
        if i < 2:
            rows.append(Lever(tile, bits, "tensor", wide))
        rows += [Lever(tile, bits, "tap", wide), Lever(tile, bits, "tap", wide, distill)]
    return rows


def measure(
    levers: Sequence[Lever],
    *,
    convert: Callable[[LayerChoice], float],
    adapt: Callable[[Lever], dict],
    layer_errors: Callable[[LayerChoice, Sequence[str] | None], list[float]],
    rows: list[dict],
    error_rows: list[dict],
    reuse: dict[tuple, dict],
    reuse_errors: dict[tuple, dict],
    save: Callable[[], None],
    log: Callable[[str], None],
) -> int:
    """Measure every lever into ``rows`` (and each distinct choice's errors into
    ``error_rows``), taking what ``reuse`` already holds; ``save`` after every row. Returns
    how many rows were taken from ``reuse``.

    ``convert(choice)``: test accuracy of the base converted to ``choice`` without training;
    ``adapt(lever)``: the adapted row's fields (``test_acc``, ``seconds``, ...);
    ``layer_errors(choice, stages)``: per-layer relative errors against the float direct conv
    with only ``stages`` quantized (None: all)."""
    converted: dict[LayerChoice, float] = {}
    kept = 0
    for lever in levers:
        choice = lever.choice
        ekey = _error_key(choice)
        if ekey not in {error_key(r) for r in error_rows}:
            if ekey in reuse_errors:
                error_rows.append(reuse_errors[ekey])
            else:
                error_rows.append(_errors(choice, layer_errors))
                log(f"frontier: errors of {choice.label} measured")
        if lever.key() in reuse:
            rows.append(reuse[lever.key()])
            converted.setdefault(choice, reuse[lever.key()]["converted_acc"])
            kept += 1
            continue
        if choice not in converted:
            converted[choice] = convert(choice)
        row = {**lever.as_dict(), "converted_acc": converted[choice], **adapt(lever)}
        rows.append(row)
        log(
            f"frontier: {lever.name} [{lever.levers}]: converted "
            f"{100 * row['converted_acc']:.1f}%, adapted {100 * row['test_acc']:.1f}% "
            f"({row['seconds']:.0f}s)"
        )
        save()
    return kept


def _errors(
    choice: LayerChoice,
    layer_errors: Callable[[LayerChoice, Sequence[str] | None], list[float]],
) -> dict:
    row = {
        "tile": choice.tile,
        "bits": choice.bits,
        "transforms": choice.transforms,
        "wd_bits": choice.wd_bits,
    }
    stages: Iterable[str] = ERROR_STAGES if choice.conv != "normal" else ()
    for stage in (None, *stages):
        errs = layer_errors(choice, None if stage is None else (stage,))
        row[stage or "all"] = sum(errs) / len(errs)
        if stage is None:
            row["all_max"] = max(errs)
    return row


def _error_key(choice: LayerChoice) -> tuple:
    return (choice.tile, choice.bits, choice.transforms, choice.wd_bits)


def row_key(row: dict) -> tuple:
    """A measured row's identity (what :attr:`Lever.key` gives for its lever)."""
    return _lever_of(row).key()


def error_key(row: dict) -> tuple:
    """An error row's identity (what ``_error_key`` gives for its choice)."""
    return (row["tile"], row["bits"], row["transforms"], row["wd_bits"])


# -- tables --------------------------------------------------------------------------------------
def _reference(rows: Sequence[dict], bits: int, distill: float) -> dict | None:
    """The normal row at ``bits`` with the same adaptation (distilled or not), else the plain
    one."""
    normal = [r for r in rows if r["tile"] is None and r["bits"] == bits]
    same = [r for r in normal if r["distill"] == distill]
    return (same or [r for r in normal if not r["distill"]] or [None])[0]


def _lever_of(row: dict) -> Lever:
    return Lever(row["tile"], row["bits"], row["transforms"], row["wd_bits"], row["distill"])


def render(
    rows: Sequence[dict],
    error_rows: Sequence[dict],
    base_acc: float | None,
    steps: int,
    *,
    acc: Callable[[float | None], str],
    diff: Callable[[float, float], str],
    pct: Callable[[float | None], str],
    table: Callable[[Sequence[str], Iterable[Sequence[object]]], str],
) -> str:
    """The section's markdown: the accuracy table, the error table and the targets, in the
    report's formats: ``acc`` writes an accuracy with its standard error, ``diff`` a
    difference with its own, ``pct`` a bare percentage, ``table`` a markdown table."""
    out = [
        "## 7. The fidelity frontier: F6 and sub-8-bit, lever by lever",
        "",
        f"Every Winograd row is uniform static Winograd with tap-wise Winograd-domain ranges; "
        f"'converted' is the base swapped without training (ranges warmed up), 'adapted' the "
        f"same {steps}-batch budget as section 3 (with the lever's distillation when it has "
        "one). 'vs normal' compares the adapted row with normal at the same bits and the same "
        "adaptation (distilled or not). Levers: 'tap transforms' = one power-of-two scale per "
        "tile position for A^T and B^T (exact Cook-Toom values) and per row of G; 'N-bit "
        "domain' = the transformed weights, inputs and their product at N bits; 'distill a' = "
        f"knowledge distillation from the base, weight a, temperature 4. Base "
        f"{acc(base_acc)}.",
        "",
    ]
    atable = []
    for row in rows:
        lever = _lever_of(row)
        ref = None if row["tile"] is None else _reference(rows, row["bits"], row["distill"])
        atable.append(
            (
                lever.name,
                lever.levers,
                acc(row["converted_acc"]),
                acc(row["test_acc"]),
                "-" if ref is None else diff(row["test_acc"], ref["test_acc"]),
                f"{row['seconds']:.0f}",
            )
        )
    out.append(
        table(
            ("configuration", "levers", "converted", "adapted", "vs normal (same bits)", "s"),
            atable,
        )
    )
    out += [
        "",
        "Numerical error on the base's activations: relative error of each layer's output "
        "against the float direct convolution, mean over layers (max), with everything "
        "quantized, then with one stage quantized alone (the rest float). The stage with the "
        "largest error is the one a lever has to remove.",
        "",
    ]
    etable = []
    for row in error_rows:
        lever = Lever(row["tile"], row["bits"], row["transforms"], row["wd_bits"])
        etable.append(
            (
                lever.name,
                lever.levers,
                f"{row['all']:.2e} ({row['all_max']:.2e})",
                *(f"{row[s]:.2e}" if s in row else "-" for s in ERROR_STAGES),
            )
        )
    out.append(table(("configuration", "levers", "all stages", *ERROR_STAGES), etable))
    out += ["", "Targets (the issue's; met or not, as measured here):", ""]
    out += [f"- {line}" for line in _targets(rows, base_acc, diff, pct)]
    return "\n".join(out)


def _best(rows: Sequence[dict], tile: int, bits: int) -> dict | None:
    cands = [r for r in rows if r["tile"] == tile and r["bits"] == bits]
    return max(cands, key=lambda r: r["test_acc"], default=None)


def _targets(
    rows: Sequence[dict],
    base_acc: float | None,
    diff: Callable[[float, float], str],
    pct: Callable[[float | None], str],
) -> list[str]:
    lines = []
    for tile, bits, margin in ((6, 8, 0.01), (4, 6, 0.01)):
        best = _best(rows, tile, bits)
        if best is None:
            lines.append(f"F{tile} {bits}-bit within 1 point of normal {bits}-bit: not measured")
            continue
        ref = _reference(rows, bits, best["distill"])
        if ref is None:
            lines.append(f"F{tile} {bits}-bit: no normal {bits}-bit row to compare with")
            continue
        gap = best["test_acc"] - ref["test_acc"]
        met = "met" if gap >= -margin else "not met"
        lines.append(
            f"F{tile} {bits}-bit within 1 point of normal {bits}-bit: **{met}**; best row "
            f"({_lever_of(best).levers}) {pct(best['test_acc'])}% against "
            f"{pct(ref['test_acc'])}%, {diff(best['test_acc'], ref['test_acc'])} points"
        )
    for tile, bits in ((4, 4), (6, 6)):
        best = _best(rows, tile, bits)
        if best is not None:
            ref = _reference(rows, bits, best["distill"])
            versus = "" if ref is None else f" (normal {bits}-bit {pct(ref['test_acc'])}%)"
            lines.append(
                f"F{tile} {bits}-bit measured: best {pct(best['test_acc'])}% with "
                f"{_lever_of(best).levers}{versus}"
            )
    conv = [r for r in rows if r["tile"] == 6 and r["bits"] == 8]
    if conv and base_acc is not None:
        best = max(conv, key=lambda r: r["converted_acc"])
        gap = best["converted_acc"] - base_acc
        met = "met" if gap >= -0.03 else "not met"
        lines.append(
            f"F6 8-bit converted without training within 3 points of the base: **{met}**; "
            f"best ({_lever_of(best).levers}) {pct(best['converted_acc'])}% against "
            f"{pct(base_acc)}%"
        )
    return lines


def summary(rows: Sequence[dict]) -> dict:
    """The best adapted accuracy per (tile, bits), for the JSON line."""
    out = {}
    for row in rows:
        name = "normal" if row["tile"] is None else f"F{row['tile']}"
        key = f"frontier_{name}_{row['bits']}bit"
        out[key] = max(out.get(key, 0.0), row["test_acc"])
    return out
