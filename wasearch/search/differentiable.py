"""``strategy: differentiable``: the wiNAS-style supernet sweep inside a study.

For every lambda of ``strategy.lambdas`` (the weight of the expected latency, relative to the
base architecture's latency, against the cross-entropy: 0 ignores latency, 1 trades one nat of
loss for the whole network's latency), a supernet is trained from the shared base
(:func:`wasearch.dnas.differentiable_search`), its argmax
architecture is fine-tuned from the supernet's weights for the space's trial budget, evaluated and
priced, and recorded in the study as an ordinary COMPLETE trial with ``source: differentiable``,
its ``lambda`` and the per-epoch candidate ``probabilities`` (docs/study_format.md), so that
``search.py report`` draws it on the same axes as Optuna's trials. Each lambda gives one point:
a sweep draws a front. Points already in the study are not searched again (resume).

The supernet searches per layer: ``choices.tie``/``groups`` do not tie its logits (wiNAS chose
per layer); the candidates of a layer are the options of the unit it belongs to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..arch import Arch, LayerChoice
from .space import SearchSpace

__all__ = ["DIFFERENTIABLE_DEFAULTS", "layer_candidates", "run_sweep"]

logger = logging.getLogger(__name__)

#: Keys of ``strategy`` for ``name: differentiable`` and their defaults.
DIFFERENTIABLE_DEFAULTS: dict[str, Any] = {
    "lambdas": [0.0, 0.5, 2.0],  # weights of E[latency] / latency(all-normal) in the logit loss
    "epochs": 3,  # supernet epochs, warm-up included
    "warmup_epochs": 1,  # epochs that train weights only
    "arch_lr": 0.01,  # Adam lr of the architecture logits
    "tau": 1.0,  # Gumbel-softmax temperature
}


def layer_candidates(space: SearchSpace) -> dict[str, list[LayerChoice]]:
    """Per searchable layer, the choices the space allows it."""
    out: dict[str, list[LayerChoice]] = {name: [choice] for name, choice in space.fixed}
    for unit in space.units:
        for layer in unit.layers:
            out[layer] = list(unit.options)
    return out


def run_sweep(
    space: SearchSpace,
    study: Any,
    study_dir: Path,
    *,
    data: Any,
    base: Path,
    latency_model: Any,
    device: str,
    on_event: Callable[[Any], None] | None = None,
    report: Callable[[], None] | None = None,
) -> int:
    """Run the sweep points the study does not hold yet; return how many were added."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    from ..dnas import differentiable_search, transfer_weights
    from ..engine import count_params, fit
    from ..models import build
    from . import record
    from .base import trial_config, trial_lr

    cfg = {**DIFFERENTIABLE_DEFAULTS, **{k: v for k, v in space.strategy.items() if v is not None}}
    lambdas = [float(v) for v in cfg["lambdas"]]
    done = {
        float(t.user_attrs["lambda"])
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE and t.user_attrs.get("source") == "differentiable"
    }
    candidates = layer_candidates(space)

    def cost(spec, choice):
        return latency_model.layer_cost(spec, choice)

    added = 0
    for lam in lambdas:
        if lam in done:
            logger.info("differentiable: lambda %g is already in the study", lam)
            continue
        started = time.perf_counter()
        result = differentiable_search(
            str(base),
            data,
            candidates,
            cost,
            lam=lam,
            epochs=int(cfg["epochs"]),
            warmup_epochs=int(cfg["warmup_epochs"]),
            batch_size=space.data["batch_size"],
            lr=trial_lr(space),
            arch_lr=float(cfg["arch_lr"]),
            tau=float(cfg["tau"]),
            max_batches_per_epoch=space.trial["max_batches"],
            seed=space.seed,
            device=device,
            log=logger.info,
        )
        arch: Arch = result.arch
        model = build(arch)
        transfer_weights(result.supernet, arch, model)
        config = trial_config(space)
        number = len(study.get_trials(deepcopy=False))
        trial_dir = study_dir / "trials" / f"dnas_lambda_{lam:g}"
        fitted = fit(
            model,
            data,
            config,
            out_dir=trial_dir,
            device=device,
            progress=False,
            log=logger.debug,
            extra={"study": study.study_name, "lambda": lam},
            teacher_from=base,  # trial.distill learns from the shared base, as trials do
        )
        priced = latency_model.price(arch)
        probabilities = [
            {
                layer: dict(zip([c.label for c in candidates[layer]], probs, strict=True))
                for layer, probs in epoch.items()
            }
            for epoch in result.probabilities
        ]
        attrs = {
            **record.start_attrs("differentiable"),
            **record.arch_attrs(arch, params=count_params(model)),
            **record.latency_attrs(priced, limit_ms=space.constraints["latency_ms"]),
            **record.fit_attrs(
                fitted.best_val_acc,
                seconds=time.perf_counter() - started,
                history=fitted.history,
                val_images=fitted.val_images,
            ),
            **record.differentiable_attrs(
                lam=lam,
                supernet_seconds=result.seconds,
                probabilities=probabilities,
                checkpoint=trial_dir / "best.pt",
            ),
        }
        values = record.objective_values(
            space, attrs, reference_ms=study.user_attrs.get("reference_latency_ms")
        )
        params = space.params_of(arch)
        dists = {u.name: CategoricalDistribution(list(u.labels)) for u in space.units}
        study.add_trial(
            optuna.trial.create_trial(
                params=params or {},
                distributions=dists if params else {},
                values=values,
                user_attrs=attrs,
                state=TrialState.COMPLETE,
            )
        )
        added += 1
        trials = study.get_trials(deepcopy=False)
        objectives = study.user_attrs.get("objectives") or list(space.study_objectives)
        front = record.front_trials(trials, objectives)
        if on_event is not None:
            frozen = next(t for t in trials if t.number == number)
            on_event(
                record.trial_event(
                    frozen, trials, front, target=len(lambdas), seconds=attrs["train_seconds"]
                )
            )
        if report is not None:
            report()
    return added
