"""Everything a GPU session should prove, in one command: the CUDA tests, inference latency before and after
folding, training-cost ratios at the sizes users train at (AMP on, eager and compiled) and the ops a training
step adds.

    python benchmarks/gpu_suite.py --out gpu_results               # on a machine with a GPU (~8 minutes)
    python benchmarks/gpu_suite.py --out /tmp/suite --device cpu --tiny   # the same pipeline on the CPU (~1 minute)

Writes ``gpu_suite.json``, ``gpu_suite.md`` and ``gpu_suite.png`` (training step and memory ratios) under
``--out``, plus the CUDA tests' JUnit XML and log; the JSON and Markdown are rewritten after every step, so a run
cut short keeps what it measured. It installs nothing: what is missing is reported and its part
skipped (ultralytics for the yolov8n cases and the ultralytics CUDA test; pytest for the tests; matplotlib for the
plot). A bare GPU machine with torch, timm, onnx and onnxruntime runs everything but the yolov8n parts; bring an
ultralytics wheel (``pip install --no-deps ultralytics-*.whl``) for those.

Training cases (model@batchximgsz): yolov8n@32x640, torchvision:resnet18@64x224, torchvision:resnet50@64x224 by
default; ``--tiny``: @2x64. Each case times plain and OREPA (every k x k conv converted, branch scales randomised
as after training) training steps (forward, mean-square loss, backward, SGD) under AMP: float16 with a GradScaler
on CUDA, bfloat16 on the CPU. Compiled runs (``torch.compile``, ``--compile-backend``) are done for
``--compile-cases`` while the time budget (``--budget-s``) lasts; cases past it are listed as skipped.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import cpu_name, median_ms, proxy_loss  # noqa: E402

FULL_CASES = ["yolov8n@32x640", "torchvision:resnet18@64x224", "torchvision:resnet50@64x224"]
TINY_CASES = ["yolov8n@2x64", "torchvision:resnet18@2x64", "torchvision:resnet50@2x64"]
LATENCY_MODELS = ["yolov8n", "torchvision:resnet18", "torchvision:resnet50"]


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def requirements() -> dict[str, Any]:
    """What this machine has of what the suite can use, and what each missing piece disables."""
    needs = {"ultralytics": "the yolov8n cases and the ultralytics CUDA test", "pytest": "the CUDA tests",
             "matplotlib": "gpu_suite.png"}
    return {name: {"installed": available(name), "used_for": why} for name, why in needs.items()}


def run_cuda_tests(out: Path, device: str, timeout_s: float = 360.0) -> dict[str, Any]:
    """``pytest tests/test_cuda.py`` in a subprocess (stopped after ``timeout_s``); its counts from the JUnit XML."""
    if not available("pytest"):
        return {"status": "skipped", "reason": "pytest is not installed"}
    xml, log = out / "cuda_tests.xml", out / "cuda_tests.log"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else dict(os.environ)
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={xml}"]
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        text = "".join(o.decode(errors="replace") if isinstance(o, bytes) else (o or "") for o in (exc.stdout, exc.stderr))
        log.write_text(f"{text}\ntimed out after {timeout_s:g} s\n", encoding="utf-8")
        return {"status": "failed", "reason": f"the CUDA tests did not finish within {timeout_s:g} s", "log": log.name}
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    failed = proc.returncode not in (0, 5) or counts["failures"] or counts["errors"]
    return {"status": "failed" if failed else ("skipped" if counts["tests"] == counts["skipped"] else "passed"),
            **counts, "exit_code": proc.returncode, "seconds": time.perf_counter() - start, "log": log.name}


def _parse_case(case: str) -> tuple[str, int, int]:
    spec, _, size = case.rpartition("@")
    batch, _, imgsz = size.partition("x")
    return spec, int(batch), int(imgsz)


def _needs_ultralytics(spec: str) -> bool:
    return not spec.startswith(("torchvision:", "timm:"))


def _models(spec: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The plain model and its conversion (branch scales randomised), on the CPU."""
    from benchmarks.latency import randomise_scales
    from orepa_convert import convert_to_orepa
    from orepa_convert.cli.model_specs import build_model

    torch.manual_seed(0)
    plain = build_model(spec)
    orepa = convert_to_orepa(copy.deepcopy(plain))
    randomise_scales(orepa)
    return plain, orepa


def _step_fn(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """One AMP training step: float16 with a GradScaler on CUDA, bfloat16 on the CPU."""
    cuda = x.device.type == "cuda"
    dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler(x.device.type, enabled=cuda)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()

    def step() -> None:
        if cuda and getattr(model, "_orig_mod", None) is not None:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(x.device.type, dtype=dtype):
            loss = proxy_loss(model(x))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def training_case(case: str, device: torch.device, steps: int, compiled: bool, backend: str) -> dict[str, Any]:
    """Median AMP step time and peak memory of plain and OREPA for one case, eager or compiled."""
    spec, batch, imgsz = _parse_case(case)
    plain, orepa = _models(spec)
    x = torch.randn(batch, 3, imgsz, imgsz, device=device)
    row: dict[str, Any] = {"case": case, "mode": f"compiled ({backend})" if compiled else "eager"}
    for name, model in (("plain", plain), ("orepa", orepa)):  # one model on the device at a time: fair peaks
        start = time.perf_counter()
        model.to(device)
        run = torch.compile(model, backend=backend) if compiled else model
        step = _step_fn(run, x)
        step()  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        row[f"{name}_first_step_s"] = time.perf_counter() - start
        row[f"{name}_step_ms"] = median_ms(step, device, warmup=1, iters=steps)
        row[f"{name}_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        del run, step
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["step_ratio"] = row["orepa_step_ms"] / row["plain_step_ms"]
    row["memory_ratio"] = row["orepa_peak_mb"] / row["plain_peak_mb"] if row["plain_peak_mb"] else None
    return row


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"# GPU suite: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, {meta['date']}", "",
             f"Command: `{meta['command']}`; total {results['seconds']:.0f} s.", "", "## CUDA tests", ""]
    t = results["cuda_tests"]
    lines.append(f"- {t['status']}" + (f": {t['tests']} tests, {t['failures']} failures, {t['errors']} errors, "
                                       f"{t['skipped']} skipped ({t['seconds']:.0f} s)" if "tests" in t else f" ({t.get('reason')})"))
    lines += ["", "## Inference latency (eval, ms)", "", "| model | batch | imgsz | dtype | plain | OREPA unfolded | folded | fold rel. error |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["inference"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['imgsz']} | {r['dtype']} | {r['plain_ms']:.2f} | {r['orepa_ms']:.2f} | "
                     f"{r['folded_ms']:.2f} | {r['fold_rel_err']:.1e} |")
    lines += ["", f"## Training step with AMP ({results['meta']['amp']})", "",
              "| case | mode | plain ms | OREPA ms | OREPA / plain | plain peak MB | OREPA peak MB | memory ratio |",
              "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    for r in results["training"]:
        lines.append(f"| {r['case']} | {r['mode']} | {r['plain_step_ms']:.1f} | {r['orepa_step_ms']:.1f} | {r['step_ratio']:.2f}x | "
                     f"{fmt(r['plain_peak_mb'], '.0f')} | {fmt(r['orepa_peak_mb'], '.0f')} | {fmt(r['memory_ratio'], '.2f')} |")
    lines += ["", "## Ops a training step adds (GPU kernel launches, views excluded)", "",
              "| model | blocks | groups | plain ops | OREPA ops | added |", "|---|---|---|---|---|---|"]
    for r in results["ops"]:
        lines.append(f"| {r['model']} | {r['blocks']} | {r['groups']} | {r['plain_ops']} | {r['orepa_ops']} | {r['extra_ops']} |")
    if results["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def save(results: dict[str, Any], out: Path, begin: float) -> str:
    """Write ``gpu_suite.json`` and ``gpu_suite.md`` as they stand; the Markdown text."""
    results["seconds"] = time.perf_counter() - begin
    (out / "gpu_suite.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = markdown(results)
    (out / "gpu_suite.md").write_text(text, encoding="utf-8")
    return text


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["training"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['case']}\n{r['mode']}" for r in rows]
    axes[0].bar(range(len(rows)), [r["step_ratio"] for r in rows], color="tab:orange")
    axes[0].set_title("training step time, OREPA / plain (AMP)")
    mem = [r["memory_ratio"] or 0.0 for r in rows]
    axes[1].bar(range(len(rows)), mem, color="tab:blue")
    axes[1].set_title("peak memory, OREPA / plain" + ("" if any(mem) else " (CUDA only)"))
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json/.md/.png and the test log")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and few iterations (a smoke run)")
    parser.add_argument("--cases", nargs="+", help="training cases MODEL@BATCHxIMGSZ (default: the sizes users train at)")
    parser.add_argument("--compile-cases", nargs="*", help="cases also timed compiled (default: the resnet18 and yolov8n cases)")
    parser.add_argument("--compile-backend", help="torch.compile backend (default: inductor; eager with --device cpu "
                        "--tiny, where an inductor compile alone takes minutes)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting compiled cases after this many seconds")
    parser.add_argument("--skip-tests", action="store_true", help="do not run tests/test_cuda.py")
    parser.add_argument("--tests-timeout-s", type=float, default=360.0, help="stop the CUDA tests after this many seconds")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (use --device cpu --tiny for a dry run)")
    device = torch.device(args.device)
    if args.compile_backend is None:
        args.compile_backend = "eager" if device.type == "cpu" and args.tiny else "inductor"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    reqs = requirements()
    skipped: list[str] = [f"{name} not installed: {r['used_for']} skipped" for name, r in reqs.items()
                          if not r["installed"] and name != "matplotlib"]
    cases = args.cases or (TINY_CASES if args.tiny else FULL_CASES)
    compile_cases = args.compile_cases if args.compile_cases is not None else [c for c in cases if "resnet18" in c or "yolov8n" in c]
    steps, iters = (2, 3) if args.tiny else (10, 30)
    results: dict[str, Any] = {
        "meta": {"device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                 "torch": torch.__version__, "date": date.today().isoformat(), "tiny": args.tiny,
                 "amp": "float16 + GradScaler" if device.type == "cuda" else "bfloat16",
                 "command": " ".join(["python", "benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
                 "requirements": reqs},
        "cuda_tests": {"status": "skipped", "reason": "--skip-tests"} if args.skip_tests else run_cuda_tests(args.out, device.type, args.tests_timeout_s),
        "inference": [], "training": [], "ops": [], "skipped": skipped,
    }
    from tqdm import tqdm

    from benchmarks.generation import count_generation_ops
    from benchmarks.latency import DTYPES, inference

    have_ultralytics = reqs["ultralytics"]["installed"]
    dtype = "fp16" if device.type == "cuda" else "fp32"
    latency_batch, latency_size = (1, 64) if args.tiny else (8, 640)
    models = [m for m in LATENCY_MODELS if have_ultralytics or not _needs_ultralytics(m)]
    save(results, args.out, begin)  # after every step, so a run cut short still leaves what it measured
    for spec in tqdm(models, desc="inference", unit="model"):
        size = latency_size if _needs_ultralytics(spec) or args.tiny else 224
        results["inference"].append(inference(spec, latency_batch, size, DTYPES[dtype], device, 2 if args.tiny else 5, iters))
        save(results, args.out, begin)
    for spec in models:
        results["ops"].append(count_generation_ops(spec, imgsz=64, device=device))
    jobs = [(c, False) for c in cases] + [(c, True) for c in compile_cases]
    for case, compiled in tqdm(jobs, desc="training", unit="case"):
        if _needs_ultralytics(_parse_case(case)[0]) and not have_ultralytics:
            continue
        if compiled and time.perf_counter() - begin > args.budget_s:
            skipped.append(f"{case} compiled: past the {args.budget_s:.0f} s budget")
            continue
        results["training"].append(training_case(case, device, steps, compiled, args.compile_backend))
        save(results, args.out, begin)
    if not available("matplotlib"):
        skipped.append("matplotlib not installed: no gpu_suite.png")
    text = save(results, args.out, begin)
    plot(results, args.out / "gpu_suite.png")
    print(text)
    return 1 if results["cuda_tests"]["status"] == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
