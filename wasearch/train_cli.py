"""The ``train.py`` / ``adapt.py`` command line: train one architecture.

The classic flags of the Winograd-aware paper's code keep their meaning (``--use_normal_conv |
--static | --flex``, ``--F``, ``--Q``, ``--bits``, ``--mult``, ``--epochs``, ``--batch_size``,
``--lr``, ``--use_cpu``, ``--seed``, ``--outDir``, ``--modelDir``/``--modelToLoad``); ``--arch
FILE.yaml`` trains a per-layer architecture instead. Quantized Winograd layers default to per-tap
Winograd-domain ranges and per-tap transform scales (the best combination measured,
docs/fidelity.md); ``--granularity tensor --transforms tensor`` is the paper's pipeline. A run
writes one folder, named after its configuration, holding ``config.json``, ``arch.yaml``,
``summary.txt``, ``metrics.csv``/``.json``, ``best.pt``, ``last.pt`` and ``final.json``.

Flags that would be silently ignored are errors instead: ``--arch`` with any of ``--mult``,
``--Q``, ``--bits``, ``--F``, ``--granularity``, ``--transforms``, ``--wd-bits`` (the file sets
them all), ``--bits`` without ``--Q``, ``--F`` without ``--static``/``--flex``,
``--granularity``, ``--transforms`` or ``--wd-bits`` without a quantized Winograd conv.
``config.json`` records only the flags that were used.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from .arch import Arch
from .cli import UserError, nonnegative_float, positive_float, positive_int
from .data import DATASETS, load_dataset
from .engine import (
    CheckpointError,
    DivergenceError,
    TrainConfig,
    check_init_from,
    checkpoint_arch,
    count_params,
    evaluate,
    fit,
    load_checkpoint,
    select_device,
    split_loader,
)
from .fileio import atomic_write_text, refused_writes_as_user_errors
from .models import build
from .netref import ModelRef
from .stats import binomial_se

__all__ = ["build_parser", "main", "summary_table"]

# Defaults of the classic flags, filled in after parsing where they apply. The parser leaves them
# None ("not given"), so that one given with --arch, or where it means nothing, is an error.
# Quantized Winograd layers default to per-tap ranges and per-tap transform scales, the best
# combination measured on real CIFAR-10 (docs/fidelity.md, sections 3 and 6) and free at deploy;
# --granularity tensor --transforms tensor is the paper's original pipeline.
_CLASSIC_DEFAULTS = {"mult": 0.5, "F": 4, "bits": 8, "granularity": "tap", "transforms": "tap"}
# what --arch sets instead
_CLASSIC_FLAGS = ("mult", "Q", "bits", "F", "granularity", "transforms", "wd_bits")
# Winograd-domain options: need --static or --flex and --Q; None when not given
_DOMAIN_FLAGS = {
    "granularity": "it sets the ranges of the quantizers in the Winograd domain",
    "transforms": "it sets the scales of the quantized transforms",
    "wd_bits": "it sets the precision of the quantized Winograd domain",
}


def build_parser(prog: str = "train.py", *, adapt: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Adapt a trained run to another architecture (weights, BN and ranges carried over)."
            if adapt
            else "Train one Winograd-aware (or normal) network."
        ),
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--use_normal_conv", action="store_true", help="direct convolutions")
    kind.add_argument("--static", action="store_true", help="Winograd, Cook-Toom transforms")
    kind.add_argument("--flex", action="store_true", help="Winograd, learned transforms")
    kind.add_argument(
        "--arch",
        metavar="FILE.yaml",
        help="per-layer architecture file; it sets the width, tiles, bit-widths and "
        "Winograd-domain options, so --mult, --Q, --bits, --F, --granularity, --transforms "
        "and --wd-bits are errors with it",
    )
    p.add_argument(
        "--F",
        type=int,
        choices=(2, 4, 6),
        help="Winograd output tile m of F(m x m, 3 x 3) (default 4); needs --static or --flex",
    )
    p.add_argument("--Q", action="store_true", help="quantize, to --bits (default 8) bits")
    p.add_argument(
        "--bits",
        type=int,
        help="bit-width 2..16 (default 8); needs --Q: --bits alone is an error, it does not "
        "turn quantization on",
    )
    p.add_argument(
        "--granularity",
        choices=("tensor", "tap"),
        help="Winograd-domain quantizer ranges: per tap (default) or per tensor (the "
        "paper's); needs --static or --flex, and --Q",
    )
    p.add_argument(
        "--transforms",
        choices=("tensor", "tap"),
        help="scales of the quantized transforms: one power-of-two scale per tap (default; "
        "exact Cook-Toom matrices, docs/fidelity.md) or one per matrix (the paper's); needs "
        "--static or --flex, and --Q",
    )
    p.add_argument(
        "--wd-bits",
        dest="wd_bits",
        type=int,
        help="bit-width 2..16 of the Winograd domain (transformed weights and inputs, their "
        "product); default --bits; needs --static or --flex, and --Q",
    )
    p.add_argument(
        "--model",
        metavar="REF",
        help="the network: resnet18_cifar (the paper's, default), torchvision:NAME, timm:NAME "
        "or your own package.module:function (imported from the working directory); an --arch "
        "file names its own",
    )
    p.add_argument(
        "--input-size",
        type=positive_int,
        metavar="N",
        help="image side the network runs at; images of another size are resized (shorter "
        "side) and centre-cropped to it (default: the data's own size; an --arch file sets it)",
    )
    p.add_argument(
        "--mult", type=positive_float, help="width multiplier of the paper's network (0.5)"
    )
    p.add_argument("--epochs", type=positive_int, default=120, help="epochs (default 120)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="batch size (64)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (1e-3)")
    p.add_argument(
        "--transform-lr",
        type=positive_float,
        help="Adam learning rate of flex transforms, no weight decay (default: --lr); "
        "10x --lr recovered F4 8-bit clearly faster in docs/fidelity.md",
    )
    p.add_argument(
        "--weight-decay", type=nonnegative_float, default=4e-5, help="weight decay (4e-5)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10", help="dataset (cifar10)")
    p.add_argument("--data-dir", help="dataset folder (default ~/.cache/wasearch/data)")
    p.add_argument("--download", action="store_true", help="download CIFAR when missing")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of the full training set held out for validation, before --limit-train "
        "(0.1); 0: the best epoch is picked on the test set",
    )
    p.add_argument(
        "--limit-train",
        type=positive_int,
        help="train on at most N images; the validation split is held out of the full training "
        "set first and is not cut (the same images whatever N)",
    )
    p.add_argument("--limit-test", type=positive_int, help="use at most N test images")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--use_cpu", action="store_true", help="same as --device cpu")
    p.add_argument(
        "--outDir",
        "--out-dir",
        dest="out_dir",
        default="runs",
        help="parent folder of run folders (runs)",
    )
    p.add_argument("--run-name", help="run folder name (default: from the configuration)")
    p.add_argument("--resume", action="store_true", help="continue the run folder's last.pt")
    p.add_argument("--modelDir", help="adapt from this trained run folder")
    p.add_argument(
        "--distill",
        type=float,
        metavar="A",
        help="knowledge distillation from the --modelDir checkpoint: loss = (1 - A) CE + A "
        "T^2 KL(teacher || student), A in (0, 1]; needs --modelDir (default: off)",
    )
    p.add_argument(
        "--modelToLoad", default="best.pt", help="checkpoint file inside --modelDir (best.pt)"
    )
    p.add_argument(
        "--latency-model",
        default="cortex-a73",
        help="price the architecture with: a shipped profile (cortex-a73, "
        "cortex-a53), a profile .yaml or a latency table .csv (cortex-a73)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(adapt=adapt)
    return p


def _resolve_classic_flags(args: argparse.Namespace) -> None:
    """Refuse classic flags that would be ignored; fill the defaults of those that apply.

    Afterwards a classic flag (``_CLASSIC_FLAGS``) is None exactly when it is not used: all of
    them with ``--arch``, ``F`` for normal convolutions, ``bits`` without ``--Q``,
    ``granularity`` unless both.
    """
    if args.arch:
        sets = {
            "mult": "the width",
            "Q": "the bit-widths",
            "bits": "the bit-widths",
            "F": "the tiles",
            "granularity": "the granularities",
            "transforms": "the transforms' scales",
            "wd_bits": "the Winograd-domain bit-widths",
        }
        for name in _CLASSIC_FLAGS:
            value = getattr(args, name)
            if value is not None and value is not False:  # given (--Q is store_true)
                flag = name.replace("_", "-")
                raise UserError(
                    f"--{flag} conflicts with --arch: the architecture file sets {sets[name]}"
                )
            setattr(args, name, None)
        if args.model is not None:
            raise UserError("--model conflicts with --arch: the architecture file names its model")
        return
    try:
        ref = ModelRef.parse(args.model if args.model is not None else "resnet18_cifar")
    except ValueError as err:
        raise UserError(str(err).replace("model:", "--model:", 1)) from None
    if not ref.is_paper and args.mult is not None:
        raise UserError(
            f"--mult applies only to the paper's network, not --model {args.model}; "
            "give your factory its own options through an --arch file's model.kwargs"
        )
    winograd = args.static or args.flex
    if args.F is not None and not winograd:
        raise UserError(
            f"--F {args.F} needs --static or --flex: it is the Winograd tile, and the network "
            "runs direct convolutions"
        )
    if args.bits is not None and not args.Q:
        raise UserError(
            f"--bits {args.bits} needs --Q: without --Q the network runs in floating point"
        )
    for name, what in _DOMAIN_FLAGS.items():
        value = getattr(args, name)
        if value is not None and not (winograd and args.Q):
            flag = name.replace("_", "-")
            raise UserError(f"--{flag} {value} needs --static or --flex, and --Q: {what}")
    if args.wd_bits is not None and not 2 <= args.wd_bits <= 16:
        raise UserError(f"--wd-bits {args.wd_bits} is out of range; use 2..16")
    args.mult = _CLASSIC_DEFAULTS["mult"] if args.mult is None else args.mult
    if winograd and args.F is None:
        args.F = _CLASSIC_DEFAULTS["F"]
    if args.Q and args.bits is None:
        args.bits = _CLASSIC_DEFAULTS["bits"]
    if winograd and args.Q and args.granularity is None:
        args.granularity = _CLASSIC_DEFAULTS["granularity"]
    if winograd and args.Q and args.transforms is None:
        args.transforms = _CLASSIC_DEFAULTS["transforms"]


def _arch_from_args(
    args: argparse.Namespace, *, input_size: int = 32, num_classes: int = 10
) -> Arch:
    if args.arch:
        return Arch.load(args.arch)
    bits = args.bits if args.Q else None
    if args.Q and not 2 <= args.bits <= 16:
        raise UserError(f"--bits {args.bits} is out of range; use 2..16")
    conv = "flex" if args.flex else "static" if args.static else "normal"
    return Arch.uniform(
        conv,
        args.F if conv != "normal" else None,
        bits,
        # None: no quantized Winograd domain (normal, or floating point): nothing to scale
        granularity=args.granularity or "tensor",
        transforms=args.transforms or "tensor",
        wd_bits=None if args.wd_bits == bits else args.wd_bits,
        width=args.mult,
        input_size=input_size,
        num_classes=num_classes,
        model=ModelRef.parse(args.model or "resnet18_cifar"),
    )


def _input_size(args: argparse.Namespace, arch: Arch) -> int | None:
    """The image side the data is fitted to (None: as it is): --input-size, else the arch
    file's; a classic run takes the data's own size."""
    if args.arch and args.input_size is not None and args.input_size != arch.input_size:
        raise UserError(
            f"--input-size {args.input_size} conflicts with --arch {args.arch}, which sets "
            f"input_size: {arch.input_size}"
        )
    return arch.input_size if args.arch else args.input_size


def _run_name(args: argparse.Namespace, arch: Arch) -> str:
    if args.run_name:
        return args.run_name
    if args.arch:
        kind = Path(args.arch).stem
    elif args.flex or args.static:
        kind = f"{'flex' if args.flex else 'static'}_F{args.F}"
        if args.granularity == "tap":
            kind += "_tap"
        if args.transforms == "tap":
            kind += "_ttap"
        if args.wd_bits is not None:
            kind += f"_wd{args.wd_bits}"
    else:
        kind = "normal"
    bits = f"{args.bits}bit" if args.Q else "fp32"
    if args.arch:
        bits = "arch"
    prefix = "adapt_" if args.modelDir else ""
    net = f"w{arch.width:g}"
    if not arch.is_paper:  # torchvision:resnet18 -> resnet18, pkg.nets:make_net -> make_net
        net = arch.model.name.rpartition(":")[2]
    if args.input_size is not None:
        net += f"_{arch.input_size}px"
    return f"{prefix}{args.dataset}_{kind}_{bits}_{net}_seed{args.seed}"


def _check_init_from(args: argparse.Namespace, arch: Arch, model, init_from: Path) -> None:
    """Refuse a --modelDir checkpoint that cannot initialize ``model``, naming the flag to fix."""
    source = checkpoint_arch(init_from)
    if source.network != arch.network or source.model.kwargs != arch.model.kwargs:
        raise CheckpointError(
            f"--modelDir: {init_from} was trained on {source.network} but this run asks for "
            f"{arch.network}; adaptation keeps the network"
        )
    if source.width != arch.width:
        fix = f"pass --mult {source.width:g}"
        if args.arch:
            fix = f"set width: {source.width:g} in {args.arch}"
        raise CheckpointError(
            f"--modelDir: {init_from} was trained at width {source.width:g} but this run asks for "
            f"{arch.width:g}; adaptation keeps the width: {fix}"
        )
    if source.num_classes != arch.num_classes:
        raise CheckpointError(
            f"--modelDir: {init_from} has {source.num_classes} classes but --dataset "
            f"{args.dataset} has {arch.num_classes}; adapt on a dataset with the same classes"
        )
    check_init_from(model, init_from)  # backbone, and every weight with its shape


def _split_counts(args: argparse.Namespace, data) -> str:
    """The images each split really holds, and which flags cut them."""
    train = f"train {len(data.train)}"
    if args.limit_train is not None:
        train += f" (--limit-train {args.limit_train})"
    if data.val is not None and len(data.val):
        val = f"val {len(data.val)} (--val-fraction {args.val_fraction:g}"
        if args.limit_train is not None:
            val += ", held out of the full training set before --limit-train"
        val += ")"
    else:
        val = "val 0 (the best epoch is picked on test)"
    test = f"test {len(data.test)}"
    if args.limit_test is not None:
        test += f" (--limit-test {args.limit_test})"
    return f"{train}, {val}, {test} images"


def summary_table(arch: Arch, model) -> str:
    """Per searchable layer: weight and input shape, algorithm, flex, bits, parameters."""
    rows = [("layer", "weight", "input", "Winograd", "flex", "bits", "params")]
    modules = dict(model.named_modules())
    total = 0
    for spec in arch.specs():
        c = arch.choice(spec.name)
        module = modules[spec.name]
        params = sum(p.numel() for p in module.parameters())
        total += params
        rows.append(
            (
                spec.name,
                "x".join(map(str, module.weight.shape)),
                f"{spec.in_channels}x{spec.height}x{spec.width}",
                f"F({c.tile}x{c.tile},3x3)" if c.conv != "normal" else "-",
                "yes" if c.conv == "flex" else "-",
                ("fp32" if c.bits is None else str(c.bits))
                + (" tap" if c.granularity == "tap" and c.conv != "normal" else "")
                + (" ttap" if c.transforms == "tap" else "")
                + (f" wd{c.wd_bits}" if c.wd_bits is not None else ""),
                f"{params:,}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"searchable params {total:,}; whole model {count_params(model):,}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, prog: str = "train.py", adapt: bool = False) -> int:
    args = build_parser(prog, adapt=adapt).parse_args(argv)
    if adapt and not args.modelDir:
        raise UserError("adapt.py needs --modelDir (the trained run folder to adapt from)")
    _resolve_classic_flags(args)
    if args.distill is not None:
        if not 0 < args.distill <= 1:
            raise UserError(f"--distill {args.distill} must be in (0, 1]")
        if not args.modelDir:
            raise UserError(
                f"--distill {args.distill} needs --modelDir: it distills from the checkpoint "
                "the run starts from"
            )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # A classic run on another model is built once the data says its size and classes (it is
    # traced at that size); the paper's network and an --arch file are checked right away.
    deferred = not args.arch and not ModelRef.parse(args.model or "resnet18_cifar").is_paper
    try:
        arch = None if deferred else _arch_from_args(args)
    except ValueError as err:  # ArchError is a ValueError
        raise UserError(str(err)) from None
    size = args.input_size if arch is None else _input_size(args, arch)
    init_from = None
    if args.modelDir:
        init_from = Path(args.modelDir) / args.modelToLoad
        if not init_from.is_file():
            raise UserError(f"--modelDir/--modelToLoad: {init_from} does not exist")
    try:
        device = select_device("cpu" if args.use_cpu else args.device)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"--device: {err}") from None
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    data = load_dataset(
        args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        val_fraction=args.val_fraction,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        seed=args.seed,
        image_size=size,
    )
    if args.arch and data.num_classes != arch.num_classes:
        raise UserError(
            f"--arch {args.arch} has num_classes={arch.num_classes} but {data.name} has "
            f"{data.num_classes} classes"
        )
    if not args.arch:  # the classic flags at the data's size and classes
        h, w = data.image_size
        if h != w:
            raise UserError(
                f"{data.name} images are {w}x{h}, not square; pass --input-size N to fit them "
                "to N x N"
            )
        try:
            arch = _arch_from_args(args, input_size=h, num_classes=data.num_classes)
        except ValueError as err:
            raise UserError(str(err).replace("model.name:", "--model:", 1)) from None
    for note in arch.notes():
        print(f"note: {note}")
    if data.image_size != (arch.input_size, arch.input_size):
        raise UserError(
            f"{data.name} images are {data.image_size[0]}x{data.image_size[1]} but the "
            f"architecture expects {arch.input_size}x{arch.input_size}"
        )
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        transform_lr=args.transform_lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        distill=args.distill or 0.0,
    )
    run_dir = Path(args.out_dir) / _run_name(args, arch)
    if (run_dir / "last.pt").exists() and not args.resume:
        raise UserError(
            f"{run_dir} already holds a run; pass --resume to continue it, or --run-name/--outDir "
            "for a new one"
        )
    if args.resume and not (run_dir / "last.pt").exists():
        raise UserError(f"--resume: {run_dir}/last.pt does not exist")

    try:  # flags first, then the files they name: a bad --latency-model before a checkpoint
        from .latency import format_latency_table, load_latency_model

        latency = load_latency_model(args.latency_model)
        latency_table = format_latency_table(arch, latency.price(arch, batch=1))
    except (ValueError, OSError) as err:  # LatencyError is a ValueError
        raise UserError(f"--latency-model {args.latency_model}: {err}") from None
    model = build(arch)
    if init_from is not None and not args.resume:  # a checkpoint that does not fit: before output
        _check_init_from(args, arch, model, init_from)
    table = summary_table(arch, model) + "\n\n" + latency_table
    label = " (SYNTHETIC data)" if data.synthetic else ""
    print(f"{prog}: {arch.summary()} on {data.name}{label}, {device}")
    print(f"{_split_counts(args, data)}; run folder {run_dir}")
    print(table)
    with refused_writes_as_user_errors(flag="--outDir"):  # a read-only --outDir: one line
        run_dir.mkdir(parents=True, exist_ok=True)
    # Only the flags this run used: a classic flag that does not apply is None, and left out.
    flags = {k: v for k, v in vars(args).items() if k not in _CLASSIC_FLAGS or v is not None}
    run_config = {
        "train": config.to_dict(),
        "flags": flags,
        "dataset": data.name,
        "synthetic": data.synthetic,
        "device": str(device),
        "init_from": str(init_from) if init_from else None,
    }
    with refused_writes_as_user_errors(flag="--outDir"):
        atomic_write_text(run_dir / "config.json", json.dumps(run_config, indent=1, default=str))
        arch.save(run_dir / "arch.yaml")
        atomic_write_text(run_dir / "summary.txt", table + "\n")
    try:
        result = fit(
            model,
            data,
            config,
            out_dir=run_dir,
            device=device,
            resume=args.resume,
            init_from=init_from,
            progress=not args.no_progress,
            log=print,
            extra={"flags": flags},
        )
    except DivergenceError as err:
        raise UserError(f"training diverged: {err}") from None
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    best = load_checkpoint(run_dir / "best.pt", device=device)
    test_loader = split_loader(
        data, data.test, batch_size=config.eval_batch_size, train=False, device=device
    )
    test_loss, test_acc = evaluate(best.model, test_loader)
    n_test = len(data.test)
    final = {
        "best_val_acc": result.best_val_acc,
        # the binomial standard error of each accuracy and its number of images (stats.py)
        "best_val_se": binomial_se(result.best_val_acc, result.val_images),
        "val_images": result.val_images,
        "best_epoch": result.best_epoch,
        "test_acc": test_acc,
        "test_se": binomial_se(test_acc, n_test),
        "test_images": n_test,
        "test_loss": test_loss,
        "train_seconds": result.seconds,
        "arch": arch.summary(),
        "dataset": data.name,
        "synthetic": data.synthetic,
    }
    atomic_write_text(run_dir / "final.json", json.dumps(final, indent=1))
    val_se, test_se = final["best_val_se"], final["test_se"]
    print(
        f"best val acc {result.best_val_acc:.4f}"
        + (f" ± {val_se:.4f} ({result.val_images} images)" if val_se is not None else "")
        + f" (epoch {result.best_epoch}); test acc {test_acc:.4f}"
        + (f" ± {test_se:.4f} ({n_test} images)" if test_se is not None else "")
        + f"; {run_dir}"
    )
    return 0
