"""Command-line interface: ``orepa-convert inspect MODEL``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

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
        print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orepa-convert",
        description="OREPA re-parameterization for PyTorch CNNs: inspect which convs would be converted.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect",
        help="print the conversion report of a model without changing anything",
        description="Print, for every conv of MODEL, whether convert_to_orepa would convert it and why not. "
        "MODEL is an ultralytics YAML or .pt (e.g. yolov8n.yaml; a .pt is unpickled, so only use trusted files), "
        "timm:NAME or torchvision:NAME (built with random weights, nothing is downloaded).",
    )
    p.add_argument("model", help="yolov8n.yaml, path/to/model.pt, timm:resnet50, torchvision:resnet18, ...")
    p.add_argument("--init", choices=["preserve", "paper"], default="preserve")
    p.add_argument("--include", nargs="+", metavar="GLOB", help="only convert module paths matching a glob")
    p.add_argument("--exclude", nargs="+", metavar="GLOB", help="never convert module paths matching a glob")
    p.add_argument("--kernel-sizes", nargs="+", type=int, metavar="K", help="only convert these square kernel sizes")
    p.add_argument("--min-channels", type=int, default=0, metavar="N")
    p.add_argument("--no-depthwise", action="store_true", help="leave depthwise convs alone")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout only)")
    p.set_defaults(func=_inspect)
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


if __name__ == "__main__":
    raise SystemExit(main())
