"""Command-line interface: ``orepa-convert inspect MODEL`` and ``orepa-convert fold CHECKPOINT -o OUT``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import OREPAConfig
from .convert import inspect_model
from .models import build_model


def _config_from_args(args: argparse.Namespace) -> OREPAConfig:
    kernel_sizes = tuple(args.kernel_sizes) if args.kernel_sizes else None
    return OREPAConfig(
        init=args.init,
        include=tuple(args.include or ()),
        exclude=tuple(args.exclude or ()),
        kernel_sizes=kernel_sizes,
        min_channels=args.min_channels,
        depthwise=not args.no_depthwise,
    )


def _inspect(args: argparse.Namespace) -> int:
    model = build_model(args.model)
    report = inspect_model(model, _config_from_args(args))
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

    from .fold import fold_orepa
    from .state import STATE_KEY, is_orepa_state_dict, restore_from_orepa_state, state_from_layout

    source = Path(args.checkpoint)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    out = Path(args.output)
    obj = torch.load(source, map_location="cpu", weights_only=False)  # unpickles: trusted files only (see --help)
    if isinstance(obj, dict) and isinstance(obj.get("ema") or obj.get("model"), nn.Module):
        import ultralytics  # noqa: F401  (the checkpoint unpickled, so ultralytics is installed)

        from .integrations import ultralytics as ul

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
        raise ValueError(f"{source}: expected an ultralytics checkpoint, a pickled module, an orepa_convert checkpoint or a state_dict")
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


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", choices=["preserve", "paper", "scratch"], default="preserve")
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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and why each region was traced by parts")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never let ultralytics reach for the network from our CLI
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"orepa-convert: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `orepa-convert inspect MODEL | head`: the reader left, nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
