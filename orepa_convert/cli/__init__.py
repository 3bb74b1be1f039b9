"""Command-line interface: ``orepa-convert inspect MODEL``, ``fold CHECKPOINT -o OUT``, ``train key=value ...`` and
``compare MODEL --data DATA``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import INITS
from ..convert import inspect_model
from ..errors import OREPAError
from .model_specs import build_model


def _overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user set on the command line (a model carrying a trained state is restored unless
    one of them says otherwise)."""
    given = {
        "init": args.init,
        "include": tuple(args.include) if args.include else None,
        "exclude": tuple(args.exclude) if args.exclude else None,
        "kernel_sizes": tuple(args.kernel_sizes) if args.kernel_sizes else None,
        "min_channels": args.min_channels or None,
        "depthwise": False if args.no_depthwise else None,
    }
    return {k: v for k, v in given.items() if v is not None}


def _inspect(args: argparse.Namespace) -> int:
    model = build_model(args.model)
    report = inspect_model(model, **_overrides_from_args(args))
    if args.json:
        text = json.dumps(report.to_dict(), indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
    if args.json != "-":
        print(f"{report.summary()}\n{report.table(verbose=args.verbose)}")
    return 0


def _fold(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from ..fold import fold_orepa
    from ..state import STATE_KEY, is_orepa_state_dict, load_file, restore_from_orepa_state, state_from_layout

    source = Path(args.checkpoint)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    out = Path(args.output)
    # unpickles: trusted files only (see --help)
    obj = load_file(source, weights_only=False, expected="an ultralytics checkpoint, a pickled module or a state_dict")
    if isinstance(obj, dict) and isinstance(obj.get("ema") or obj.get("model"), nn.Module):
        import ultralytics  # noqa: F401  (the checkpoint unpickled, so ultralytics is installed)

        from ..integrations import ultralytics as ul

        ul.fold_checkpoint(source, out)
        print(f"folded ultralytics checkpoint -> {out}")
        return 0
    if isinstance(obj, nn.Module):
        fold_orepa(obj, fuse_bn=args.fuse_bn)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, out)
        print(f"folded pickled module -> {out}")
        return 0
    if not isinstance(obj, dict):
        raise ValueError(
            f"{source}: expected an ultralytics checkpoint, a pickled module, an orepa_convert checkpoint or a state_dict"
        )
    # an orepa_convert checkpoint (orepa_convert.save, the timm recipe's last.pth) or a bare OREPA state_dict
    record, state_dict = (obj[STATE_KEY], obj.get("orepa_model")) if STATE_KEY in obj else (None, obj)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{source}: no OREPA state_dict found (expected an 'orepa_model' entry or a bare state_dict)")
    if record is None and not is_orepa_state_dict(state_dict):
        raise ValueError(f"{source} holds no OREPA blocks: it is already a plain state_dict")
    if not args.model:
        raise ValueError(f"{source} is a state_dict: give its architecture with --model (e.g. --model timm:resnet18)")
    model = build_model(args.model, num_classes=args.num_classes)
    # the file's own record, or one rebuilt from the blocks' saved layouts: whatever config it was trained with
    restore_from_orepa_state(model, record if record is not None else state_from_layout(model, state_dict))
    model.load_state_dict(state_dict, strict=True)
    fold_orepa(model, fuse_bn=args.fuse_bn)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    print(f"folded state_dict of {args.model} -> {out}")
    return 0


def _train_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as a Python literal where it is one (``0.9``, ``True``), else a string."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    lowered = {"true": True, "false": False, "none": None}
    if value.lower() in lowered:
        return key, lowered[value.lower()]
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _compare(args: argparse.Namespace) -> int:
    from ..compare import CompareSettings, run_all

    if args.pool:
        return _pool(args)
    if args.project is None:
        args.project = Path("runs/compare")
    if args.timm:
        if args.model or args.data:
            raise ValueError("give either MODEL --data DATA (ultralytics) or --timm NAME --data-dir DIR, not both")
        if not args.data_dir:
            raise ValueError("--timm needs --data-dir DIR (an ImageFolder with train/ and val/, optionally test/)")
        backend, model, data = "timm", args.timm, args.data_dir
    else:
        if not args.model or not args.data:
            raise ValueError("give MODEL and --data DATA.yaml (ultralytics), or --timm NAME --data-dir DIR")
        backend, model, data = "ultralytics", args.model, args.data
    train_args = dict(args.train_arg or ())
    for key in ("batch", "device", "workers"):
        if getattr(args, key) is not None:
            train_args[key] = getattr(args, key)
    settings = CompareSettings(
        backend=backend,
        model=model,
        data=str(data),
        project=str(args.project),
        variants=tuple(args.variants),
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        imgsz=args.imgsz,
        lrs=tuple(args.lr0 or ()),
        select_seeds=tuple(args.select_seeds or ()),
        budget=args.budget,
        train_args=train_args,
    )
    if len(settings.seeds) == 1:
        print(
            "orepa-convert compare: one seed gives no confidence interval; the verdict will say so "
            "(use e.g. --seeds 0 1 2)",
            file=sys.stderr,
        )
    data = run_all(settings, progress=not args.no_progress)
    project = Path(args.project)
    print((project / "compare.md").read_text(encoding="utf-8"))
    print(f"wrote {project / 'compare.json'}, {project / 'compare.md'}, {project / 'compare.png'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    words = list(args.words)
    if "--timm" in words:  # the timm recipe's options, with --timm NAME for its --model
        from ..integrations.timm_recipe import main as timm_main

        i = words.index("--timm")
        if i + 1 >= len(words):
            raise ValueError("--timm needs a timm model name, e.g. --timm resnet18")
        return timm_main(words[:i] + ["--model", words[i + 1]] + words[i + 2 :])
    from ..integrations import ultralytics_train

    if not words or {"-h", "--help", "help"} & set(words):
        print(ultralytics_train.help_text())
        return 0
    summary = ultralytics_train.train(words)
    print("\n".join(summary.lines()))
    return 0


def _pool(args: argparse.Namespace) -> int:
    from ..compare.pool import write_pool

    if args.model or args.data or args.timm or args.data_dir:
        raise ValueError("--pool reads finished comparisons: give only the study folders (and --project, --effect)")
    project = args.project or Path("runs/pool")
    write_pool(args.pool, project, effect=args.effect)
    print((project / "pool.md").read_text(encoding="utf-8"))
    print(f"wrote {project / 'pool.json'}, {project / 'pool.md'}, {project / 'pool.png'}")
    return 0


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", choices=list(INITS), help="block init (default preserve)")
    p.add_argument("--include", nargs="+", metavar="GLOB", help="only convert module paths matching a glob")
    p.add_argument("--exclude", nargs="+", metavar="GLOB", help="never convert module paths matching a glob")
    p.add_argument("--kernel-sizes", nargs="+", type=int, metavar="K", help="only convert these square kernel sizes")
    p.add_argument("--min-channels", type=int, default=0, metavar="N")
    p.add_argument("--no-depthwise", action="store_true", help="leave depthwise convs alone")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orepa-convert",
        description="OREPA re-parameterization for PyTorch CNNs: inspect which convs would be converted, and fold "
        "OREPA checkpoints back into plain ones.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and why each region was traced by parts"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect",
        help="print the conversion report of a model without changing anything",
        description="Print, for every conv of MODEL, whether convert_to_orepa would convert it and why not. "
        "MODEL is an ultralytics YAML or .pt (e.g. yolov8n.yaml; a .pt is unpickled, so only use trusted files), "
        "timm:NAME or torchvision:NAME (built with random weights, nothing is downloaded).",
    )
    p.add_argument("model", help="yolov8n.yaml, path/to/model.pt, timm:resnet50, torchvision:resnet18, ...")
    _add_selection_args(p)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout only)")
    p.set_defaults(func=_inspect)
    f = sub.add_parser(
        "fold",
        help="fold an OREPA checkpoint into a plain, stock one",
        description="Fold every OREPA block of CHECKPOINT into its original conv and write the result to OUT: an "
        "ultralytics checkpoint (last.pt / best.pt of an OREPA run) becomes a stock ultralytics checkpoint; a pickled "
        "module (torch.save(model)) becomes the folded module; an orepa_convert checkpoint (orepa_convert.save, the "
        "timm recipe's last.pth) or a bare state_dict of a converted model, with its architecture given by --model, "
        "becomes the plain state_dict (the conversion is rebuilt from the file's record or from the blocks' saved "
        "layouts, whatever config it was trained with). "
        "WARNING: checkpoints and pickled modules are unpickled (torch.load(weights_only=False)), which runs code "
        "from the file: only fold files you trust.",
    )
    f.add_argument("checkpoint", help="OREPA checkpoint, pickled module or state_dict (trusted files only)")
    f.add_argument("-o", "--output", required=True, help="where to write the folded result")
    f.add_argument("--model", help="architecture of a state_dict: timm:NAME, torchvision:NAME or an ultralytics YAML")
    f.add_argument("--num-classes", type=int, help="number of classes of that architecture (timm/torchvision)")
    f.add_argument("--fuse-bn", action="store_true", help="also fold each block's batch norm (modules and state_dicts)")
    f.set_defaults(func=_fold)
    t = sub.add_parser(
        "train",
        add_help=False,
        help="train with OREPA from the command line: `yolo train` key=value arguments plus OREPA keys (init=, "
        "kernel_sizes=, include=, exclude=, ...); --timm NAME --data-dir DIR for timm models; train --help lists them",
    )
    t.add_argument("words", nargs=argparse.REMAINDER)
    t.set_defaults(func=_train)

    c = sub.add_parser(
        "compare",
        help="paired plain-vs-OREPA training runs on your data: does OREPA pay off, and at what cost?",
        description="Train every variant (plain and OREPA inits) on every seed from the same start weights and data "
        "order, optionally select each variant's learning rate on the validation split, evaluate on the test split "
        "when the dataset has one, and write compare.json (every run), compare.md (mean ± std, paired difference to "
        "plain with a 95%% interval, seeds better, time and memory ratios, a verdict) and compare.png to --project. "
        "Each run is its own process; runs already in compare.json are not run again (resume by rerunning). "
        "ultralytics: MODEL --data DATA.yaml (MODEL a .pt to fine-tune, or a YAML to train from scratch); "
        "timm: --timm NAME --data-dir DIR (ImageFolder train/ val/ [test/]).",
    )
    c.add_argument("model", nargs="?", help="ultralytics model: yolov8n.pt (fine-tune its weights) or yolov8n.yaml")
    c.add_argument("--data", help="ultralytics dataset YAML (a 'test:' entry is used for the reported metric)")
    c.add_argument(
        "--timm",
        metavar="NAME",
        help="compare a timm model instead (built with random weights; "
        "start from plain weights with --train-arg pretrained_checkpoint=PATH)",
    )
    c.add_argument("--data-dir", help="timm: ImageFolder dataset with train/ and val/ (and optionally test/)")
    c.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "preserve"],
        metavar="V",
        help="plain and OREPA inits (preserve, paper, scratch, preserve_live), an init with block options as 'INIT:FIELD=VALUE,...' (e.g. preserve_live:live_scale=0.25); default: plain preserve",
    )
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S", help="paired seeds (default 0 1 2)")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--imgsz", "--img-size", type=int, help="image size (ultralytics imgsz, timm --img-size)")
    c.add_argument(
        "--lr0",
        nargs="+",
        type=float,
        metavar="LR",
        help="learning rate(s); several: each variant picks its own on the validation split",
    )
    c.add_argument(
        "--select-seeds",
        nargs="+",
        type=int,
        metavar="S",
        help="seeds of the learning-rate selection runs (default: the first of --seeds)",
    )
    c.add_argument(
        "--budget",
        choices=["epochs", "time"],
        default="epochs",
        help="equal epochs (default), or equal wall time: plain gets the epochs that match OREPA's measured time",
    )
    c.add_argument(
        "--project",
        type=Path,
        help="output folder (resumes if it has compare.json; default runs/compare, runs/pool with --pool)",
    )
    c.add_argument(
        "--pool",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="pool finished comparisons (their folders, one task each) into one random-effects verdict: "
        "pool.json, pool.md and a forest plot pool.png in --project",
    )
    c.add_argument(
        "--effect",
        choices=["raw", "standardised"],
        default="raw",
        help="with --pool: pool raw metric differences, or per-task standardised paired differences",
    )
    c.add_argument("--batch", type=int, help="batch size (passed to the trainer)")
    c.add_argument("--device", help="device, e.g. 0, cpu, cuda (passed to the trainer)")
    c.add_argument("--workers", type=int, help="data loader workers (passed to the trainer)")
    c.add_argument(
        "--train-arg",
        nargs="+",
        type=_train_arg,
        metavar="KEY=VALUE",
        help="more trainer options, e.g. optimizer=SGD momentum=0.9 (ultralytics) or opt=adamw (timm)",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never let ultralytics reach for the network from our CLI
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # `yolo train`-style words and the timm recipe's options pass through as given
        args.words = argv[argv.index("train") + 1 :]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (OREPAError, ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"orepa-convert: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `orepa-convert inspect MODEL | head`: the reader left, nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return 0
