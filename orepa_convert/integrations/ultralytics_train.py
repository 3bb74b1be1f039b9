"""``orepa-convert train key=value ...``: ``yolo train`` with OREPA, for users who do not write Python.

Every ``yolo train`` argument passes through as ``key=value`` and is checked by ultralytics' own config checks
before anything is built (a typo is ultralytics' message, in one line). The OREPA keys (:data:`OREPA_KEYS`) select
and configure the blocks. The run converts the model, trains it with the real trainer (multi-GPU included), and
leaves the run folder as ``yolo train`` does (stock ``best.pt``/``last.pt``) plus ``orepa.json``: the conversion
record, the report and the fold check of ``best.pt``. ``resume=True`` with ``model=.../last.pt`` resumes the OREPA
run. Imported only by the CLI's ``train`` command (it imports ultralytics).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..block import OREPAConv
from ..config import OREPAConfig
from ..convert import convert_to_orepa
from ..state import orepa_state

logger = logging.getLogger(__name__)

#: OREPA key -> (OREPAConfig field, how to read the value); ``orepa_seed`` because ultralytics has ``seed``.
OREPA_KEYS: dict[str, tuple[str, str]] = {
    "init": ("init", "one of preserve, preserve_live, scratch, paper (default preserve)"),
    "kernel_sizes": ("kernel_sizes", "comma-separated square kernel sizes to convert, e.g. 1,3 (default: all >1 tap)"),
    "include": ("include", "comma-separated module-path globs: only these convs"),
    "exclude": ("exclude", "comma-separated module-path globs: never these convs"),
    "min_channels": ("min_channels", "leave convs with fewer output channels alone"),
    "depthwise": ("depthwise", "False leaves depthwise convs alone"),
    "branches": ("branches", "comma-separated OREPA branches (default all six)"),
    "dws_expansion": ("dws_expansion", "depthwise-separable branch expansion"),
    "orepa_seed": ("seed", "seed of the branch initialisation (ultralytics' seed= is the training seed)"),
}
_TUPLES = {"kernel_sizes", "include", "exclude", "branches"}
DOCS = "https://docs.ultralytics.com/usage/cfg/"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # ultralytics colours the key it names


@dataclass
class TrainSummary:
    """What ``orepa-convert train`` did: the run folder, the blocks, the fold check of ``best.pt``, the time."""

    save_dir: Path
    blocks: int
    init: str
    fold_rel_err: float | None
    seconds: float
    restored: bool

    def lines(self) -> list[str]:
        fold = "n/a (no best.pt)" if self.fold_rel_err is None else f"{self.fold_rel_err:.2e} (<= 1e-5 expected)"
        how = "resumed/restored" if self.restored else "converted"
        return [
            f"OREPA: {how} {self.blocks} blocks (init={self.init}); trained in {self.seconds:.0f} s",
            f"OREPA: best.pt folded vs OREPA relative error {fold}",
            f"OREPA: run folder {self.save_dir} (stock best.pt / last.pt, orepa.json)",
        ]


def _tuple(key: str, value: Any) -> tuple:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [v for v in str(value).split(",") if v]
    return tuple(int(v) if key == "kernel_sizes" else v for v in items)


def parse_pairs(pairs: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``key=value`` words into (ultralytics overrides, OREPA config overrides), values parsed the way the
    ``yolo`` command parses them; the ultralytics ones are checked by ultralytics' own config checks."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_dict_alignment, get_cfg, parse_key_value_pair

    yolo: dict[str, Any] = {}
    orepa: dict[str, Any] = {}
    for word in pairs:
        if "=" not in word:
            raise ValueError(f"expected key=value (as in `yolo train`), got {word!r}")
        try:
            key, value = parse_key_value_pair(word)
        except AssertionError as exc:
            raise ValueError(str(exc)) from None
        if key in OREPA_KEYS:
            field = OREPA_KEYS[key][0]
            orepa[field] = _tuple(key, value) if key in _TUPLES else value
        else:
            yolo[key] = value
    if yolo.pop("mode", "train") != "train":
        raise ValueError("orepa-convert train only trains: leave mode= out")
    if "model" not in yolo:
        raise ValueError(
            "give model=... (a .yaml to train from scratch, a .pt to fine-tune, or last.pt with resume=True)"
        )
    ul_logger = logging.getLogger("ultralytics")
    level = ul_logger.level
    ul_logger.setLevel(logging.ERROR)  # check_dict_alignment logs the whole CLI help before it raises
    try:
        check_dict_alignment(DEFAULT_CFG_DICT, yolo)
        get_cfg(DEFAULT_CFG_DICT, {**yolo, "mode": "train"})  # ultralytics' type and range checks
    except SyntaxError as exc:  # one sentence per unknown key; older versions append their whole CLI help
        text = _ANSI.sub("", str(exc))
        keys = [line.strip() for line in text.splitlines() if "is not a valid YOLO argument" in line]
        raise ValueError(" ".join(keys or text.split()[:40]) + f" (ultralytics' arguments: {DOCS})") from None
    finally:
        ul_logger.setLevel(level)
    OREPAConfig().replace(**orepa)  # a bad OREPA value fails here, before anything is built
    return yolo, orepa


def _fold_error(best: Path, imgsz: int) -> float | None:
    """Relative error of ``best.pt``'s folded model against the OREPA model it carries (eval, float32)."""
    from ultralytics import YOLO

    if not best.is_file():
        return None
    restored = YOLO(str(best))
    net: Any = restored.model  # ultralytics types YOLO.model loosely (str | None); here it is the network
    stock = copy.deepcopy(net).float().eval()
    convert_to_orepa(restored)  # the trained blocks the file carries
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    first = lambda t: t[0] if isinstance(t, (list, tuple)) else t  # noqa: E731
    with torch.no_grad():
        a, b = first(net.float().eval()(x)), first(stock(x))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def train(pairs: Sequence[str]) -> TrainSummary:
    """Run ``orepa-convert train`` (see the module docstring); returns what the closing summary reports."""
    from ultralytics import YOLO

    yolo_args, orepa_args = parse_pairs(pairs)
    model: Any = YOLO(yolo_args.pop("model"))  # its .model and .trainer are typed loosely by ultralytics
    _, report = convert_to_orepa(model, return_report=True, **orepa_args)
    blocks = report.converted + report.already_converted
    if blocks == 0:
        raise ValueError(f"nothing to train with OREPA: {report.summary()}")
    init = {b.init for b in model.model.modules() if isinstance(b, OREPAConv)}
    record = orepa_state(model.model)
    imgsz = yolo_args.get("imgsz") or 640
    imgsz = int(imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz)
    start = time.perf_counter()
    model.train(**yolo_args)
    seconds = time.perf_counter() - start
    save_dir = Path(model.trainer.save_dir)
    best = Path(model.trainer.best)
    summary = TrainSummary(save_dir, blocks, ",".join(sorted(init)), _fold_error(best, imgsz), seconds, report.restored)
    data = {
        "orepa_state": record,
        "report": report.to_dict(),
        "fold_check": {"checkpoint": str(best), "rel_err": summary.fold_rel_err},
        "train_seconds": seconds,
    }
    if save_dir.is_dir():
        (save_dir / "orepa.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return summary


def help_text() -> str:
    keys = "\n".join(f"  {k}=...  {what}" for k, (_, what) in OREPA_KEYS.items())
    return (
        "usage: orepa-convert train model=M data=D [yolo train key=value ...] [OREPA key=value ...]\n"
        "       orepa-convert train --timm NAME --data-dir DIR [timm recipe options, see --timm --help]\n\n"
        "Converts the model to OREPA, trains it with the ultralytics trainer and writes the run folder as\n"
        "`yolo train` does (stock best.pt / last.pt) plus orepa.json. `model=runs/.../last.pt resume=True`\n"
        f"resumes an OREPA run.\n\nOREPA keys:\n{keys}\n\nEvery other key is a `yolo train` argument "
        f"(epochs, imgsz, batch, device=0,1, ...): {DOCS}"
    )
