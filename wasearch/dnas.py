"""Differentiable per-layer search (wiNAS-style): one supernet, a latency-aware loss.

The Winograd-aware paper searched with wiNAS, a differentiable NAS over a supernet in which every
searchable convolution holds all candidate algorithms (Fernandez-Marques et al., MLSys 2020,
section 5; in the spirit of ProxylessNAS, Cai et al., ICLR 2019). This module implements it:

* :class:`MixedConv` holds the candidates a layer may take (normal, static/flex x tile, x bits).
  All share the layer's single 3x3 weight (its shape is the same in every mode, which is what makes
  a Winograd supernet cheap); each keeps its own transforms (flex) and quantizer ranges. A vector
  of architecture logits per layer.
* One candidate per layer runs per step (hard Gumbel-softmax with a straight-through gradient),
  so memory stays near a single network's, not the sum over candidates.
* Weights learn on the training split, logits on the validation split, alternating. The logit
  loss adds ``lambda * E[latency] / latency(all-normal)``, where the expectation over the current
  softmax is differentiable in the logits and every candidate is priced by the latency model.
* A warm-up phase trains the weights only, starting from the shared base checkpoint.

The argmax of the logits is the architecture read off at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import cycle

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Arch, LayerChoice
from .data import DataSplits
from .engine import read_checkpoint, select_device, selection_split, split_loader, warmup_ranges
from .models import ConvSpec, build, layer_for, make_conv
from .quant import FakeQuantize

__all__ = ["DnasResult", "MixedConv", "Supernet", "differentiable_search", "expected_latency"]

logger = logging.getLogger(__name__)


class MixedConv(nn.Module):
    """A searchable 3x3 convolution holding every candidate, with one shared weight.

    ``forward`` runs one candidate: the sampled one in training (``sample=True``), else
    ``self.active`` (set by :meth:`fix` or the argmax). Its output is multiplied by the
    straight-through gate ``1 - p.detach() + p`` of that candidate, which is 1 in value and carries
    the gradient to the logits.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        candidates: Sequence[LayerChoice],
        *,
        template: nn.Conv2d | None = None,
    ):
        super().__init__()
        if not candidates:
            raise ValueError("a mixed layer needs at least one candidate")
        self.candidates = list(candidates)
        if template is None:  # the paper's network: 3x3, padding 1, no bias
            ops = [make_conv(in_channels, out_channels, c) for c in candidates]
        else:  # any network: each candidate made from the model's own conv (padding, bias kept)
            ops = [layer_for(template, c) for c in candidates]
        self.ops = nn.ModuleList(ops)
        self.weight = self.ops[0].weight
        for op in self.ops[1:]:
            op.weight = self.weight  # one shared parameter, registered in each op
        if self.ops[0].bias is not None:
            self.bias = self.ops[0].bias
            for op in self.ops[1:]:
                op.bias = self.bias
        self.logits = nn.Parameter(torch.zeros(len(candidates)))
        self.sample = False
        self.tau = 1.0
        self.active: int | None = None

    def probabilities(self) -> torch.Tensor:
        return F.softmax(self.logits, dim=0)

    def fix(self, index: int | None) -> None:
        """Run candidate ``index`` from now on (None: argmax of the logits)."""
        self.active = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample and self.training:
            gumbel = -torch.empty_like(self.logits).exponential_().log()
            soft = F.softmax((self.logits + gumbel) / self.tau, dim=0)
            index = int(soft.argmax())
            gate = 1.0 - soft[index].detach() + soft[index]
            return self.ops[index](x) * gate
        index = self.active if self.active is not None else int(self.logits.argmax())
        return self.ops[index](x)


class Supernet(nn.Module):
    """The backbone with every searchable conv replaced by a :class:`MixedConv`."""

    def __init__(self, base: Arch, candidates: Mapping[str, Sequence[LayerChoice]]):
        super().__init__()
        self.net = build(base)
        self.specs = {s.name: s for s in base.specs()}
        self.mixed: dict[str, MixedConv] = {}
        for name, spec in self.specs.items():
            cands = list(candidates.get(name) or [base.choice(name)])
            own = None if base.model.is_paper else self.net.get_submodule(name)
            if own is not None and not isinstance(own, nn.Conv2d):
                raise ValueError(f"{name}: the base arch must keep it a direct convolution")
            mixed = MixedConv(spec.in_channels, spec.out_channels, cands, template=own)
            parent, leaf = name.rsplit(".", 1)
            setattr(self.net.get_submodule(parent), leaf, mixed)
            self.mixed[name] = mixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def set_sampling(self, enabled: bool) -> None:
        for m in self.mixed.values():
            m.sample = enabled

    def arch_parameters(self) -> list[nn.Parameter]:
        return [m.logits for m in self.mixed.values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def argmax_arch(self, base: Arch) -> Arch:
        return base.with_layers(
            {n: m.candidates[int(m.logits.argmax())] for n, m in self.mixed.items()}
        )

    def probabilities(self) -> dict[str, list[float]]:
        return {n: m.probabilities().tolist() for n, m in self.mixed.items()}

    def load_base(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the base checkpoint's weights: shared conv weights, BN, shortcuts, stem, fc."""
        own = self.net.state_dict()
        load = {}
        for key, value in state.items():
            if key in own and own[key].shape == value.shape:
                load[key] = value
                continue
            layer, _, leaf = key.rpartition(".")
            if layer in self.mixed and leaf in ("weight", "bias"):
                load[f"{layer}.{leaf}"] = value
        self.net.load_state_dict(load, strict=False)
        for m in self.mixed.values():  # the candidates' ranges are warmed up afresh
            for q in m.modules():
                if isinstance(q, FakeQuantize):
                    q.reset_range()


def expected_latency(supernet: Supernet, costs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over layers of ``softmax(logits) . cost``: differentiable in the logits."""
    total = torch.zeros(())
    for name, m in supernet.mixed.items():
        total = total + (m.probabilities() * costs[name].to(m.logits.device)).sum().cpu()
    return total


@dataclass
class DnasResult:
    arch: Arch
    lam: float
    expected_latency_s: float
    probabilities: list[dict[str, list[float]]] = field(default_factory=list)  # per epoch
    seconds: float = 0.0
    supernet: Supernet | None = None  # to fine-tune the result from (transfer_weights)


def transfer_weights(supernet: Supernet, arch: Arch, model: nn.Module) -> None:
    """Load the supernet's weights for ``arch``'s chosen candidates into a built ``model``."""
    src = supernet.net.state_dict()
    state = {}
    for key in model.state_dict():
        layer = next((n for n in supernet.mixed if key.startswith(n + ".")), None)
        if layer is None:
            if key in src:
                state[key] = src[key]
            continue
        m = supernet.mixed[layer]
        index = m.candidates.index(arch.choice(layer))
        sub = key[len(layer) + 1 :]
        shared = sub in ("weight", "bias") and f"{layer}.{sub}" in src
        state[key] = src[f"{layer}.{sub}"] if shared else src[f"{layer}.ops.{index}.{sub}"]
    model.load_state_dict(state)


def differentiable_search(
    base_checkpoint: str,
    data: DataSplits,
    candidates: Mapping[str, Sequence[LayerChoice]],
    cost: Callable[[ConvSpec, LayerChoice], float],
    *,
    lam: float,
    epochs: int = 4,
    warmup_epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    arch_lr: float = 3e-3,
    weight_decay: float = 4e-5,
    tau: float = 1.0,
    max_batches_per_epoch: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> DnasResult:
    """Train a supernet from the base checkpoint and read off one architecture.

    ``cost(spec, choice)`` prices a candidate (seconds); ``lam`` weighs the expected latency,
    normalized by the latency of the base's own choices, against the cross-entropy.
    """
    log = log or logger.info
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lambda={lam!r} must be a finite number >= 0")
    device = select_device(device)
    torch.manual_seed(seed)
    payload = read_checkpoint(base_checkpoint)
    base = Arch.from_dict(payload["arch"])
    supernet = Supernet(base, candidates)
    supernet.load_base(payload["model"])
    supernet.to(device)
    specs = supernet.specs
    costs = {
        n: torch.tensor([cost(specs[n], c) for c in m.candidates], dtype=torch.float32)
        for n, m in supernet.mixed.items()
    }
    reference = sum(cost(specs[n], base.choice(n)) for n in supernet.mixed) or 1.0

    train_loader = split_loader(
        data, data.train, batch_size=batch_size, train=True, device=device, seed=seed
    )
    val_loader = split_loader(
        data,
        selection_split(data),
        batch_size=batch_size,
        train=True,  # shuffled: the logits see a fresh validation batch each step
        augment=False,
        device=device,
        seed=seed,
    )
    # Every candidate's ranges: warm up with each candidate active in turn.
    for index in range(max(len(m.candidates) for m in supernet.mixed.values())):
        for m in supernet.mixed.values():
            m.fix(min(index, len(m.candidates) - 1))
        warmup_ranges(supernet, train_loader, batches=3)
    for m in supernet.mixed.values():
        m.fix(None)
        m.tau = tau

    w_opt = torch.optim.Adam(supernet.weight_parameters(), lr=lr, weight_decay=weight_decay)
    a_opt = torch.optim.Adam(supernet.arch_parameters(), lr=arch_lr, betas=(0.5, 0.999))
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        searching = epoch > warmup_epochs
        supernet.train()
        supernet.set_sampling(True)
        n = len(train_loader)
        if max_batches_per_epoch:
            n = min(n, max_batches_per_epoch)
        val_iter = cycle(val_loader) if searching else None
        for i, (x, y) in enumerate(train_loader):
            if i >= n:
                break
            loss = F.cross_entropy(supernet(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"supernet loss became {loss.item()} at epoch {epoch}")
            w_opt.zero_grad(set_to_none=True)
            loss.backward()
            w_opt.step()
            a_opt.zero_grad(set_to_none=True)  # the weight step must not move the logits
            if searching:
                xv, yv = next(val_iter)
                lat = expected_latency(supernet, costs) / reference
                aloss = F.cross_entropy(supernet(xv), yv) + lam * lat.to(device)
                grads = torch.autograd.grad(aloss, supernet.arch_parameters())
                for p, g in zip(supernet.arch_parameters(), grads, strict=True):
                    p.grad = g
                a_opt.step()
        probs = supernet.probabilities()
        history.append(probs)
        with torch.no_grad():
            lat_s = float(expected_latency(supernet, costs))
        log(
            f"supernet lambda={lam:g} epoch {epoch}/{epochs} "
            f"{'search' if searching else 'warm-up'}: E[latency] {lat_s * 1e3:.3f} ms, "
            f"argmax {supernet.argmax_arch(base).summary()}"
        )
    supernet.set_sampling(False)
    arch = supernet.argmax_arch(base)
    return DnasResult(
        arch=arch,
        lam=lam,
        expected_latency_s=float(sum(cost(specs[n], arch.choice(n)) for n in supernet.mixed)),
        probabilities=history,
        seconds=time.perf_counter() - t0,
        supernet=supernet,
    )
