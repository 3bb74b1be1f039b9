"""A --quick CPU run of benchmarks/latency.py: the JSON shape and the invariants it must show."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import latency  # noqa: E402

META = {"device", "device_name", "torch", "dtype", "date", "memory"}
INFERENCE = {"model", "batch", "imgsz", "dtype", "plain_ms", "orepa_ms", "folded_ms", "fold_max_abs_err",
             "params_plain", "params_orepa", "params_folded"}
TRAINING = {"model", "batch", "imgsz", "plain_step_ms", "orepa_step_ms", "offline_step_ms", "plain_peak_mb",
            "orepa_peak_mb", "offline_peak_mb"}


def test_quick_cpu_run(tmp_path):
    out, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    code = latency.main(["--quick", "--device", "cpu", "--models", "torchvision:mobilenet_v3_small", "--batch", "2",
                         "--imgsz", "64", "--threads", "2", "--json", str(out), "--markdown", str(md), "--plot", str(png)])
    assert code == 0
    data = json.loads(out.read_text())
    assert META <= set(data["meta"]) and data["meta"]["device"] == "cpu" and data["meta"]["memory"] == "rss"
    (inf,) = data["inference"]
    (train,) = data["training"]
    assert INFERENCE <= set(inf) and TRAINING <= set(train)
    assert inf["params_folded"] == inf["params_plain"] < inf["params_orepa"]
    assert inf["fold_rel_err"] <= 1e-5 and inf["fold_max_abs_err"] >= 0
    assert all(train[k] > 0 for k in TRAINING if k.endswith(("_ms", "_mb")))
    assert "| torchvision:mobilenet_v3_small | 2 | 64 |" in md.read_text()
    assert png.stat().st_size > 10_000


def test_efficacy_sweep_selects_on_validation_and_reports_int8(tmp_path):
    from benchmarks import efficacy

    out = tmp_path / "e.json"
    code = efficacy.main(["--models", "small-resnet", "--variants", "plain,orepa-scratch", "--lrs", "0.1", "0.5",
                          "--select-seeds", "0", "--seeds", "0", "1", "--epochs", "1", "--n-train", "160",
                          "--n-val", "40", "--threads", "2", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    runs, selection = data["runs"], data["meta"]["selection"]["small-resnet"]
    assert {"model", "variant", "lr", "seed", "val_acc", "test_acc", "int8_test_acc"} <= set(runs[0])
    assert len(runs) == 4 and all(r["lr"] == selection[r["variant"]] for r in runs)
    for variant, lr in selection.items():  # the chosen rate has the best validation accuracy of the sweep
        swept = {r["lr"]: r["val_acc"] for r in data["selection_runs"] if r["variant"] == variant}
        assert swept[lr] == max(swept.values())
    assert all(r["test_acc"] == r["test_acc_folded"] and 0 <= r["int8_test_acc"] <= 1 for r in runs)
    by = {(r["variant"], r["seed"]): r["test_acc"] for r in runs}
    row = next(r for r in data["summary"] if r["variant"] == "orepa-scratch")  # the harness' pairing
    deltas = [by["orepa-scratch", s] - by["plain", s] for s in (0, 1)]
    assert row["per_seed_delta"] == deltas and row["delta_vs_plain"] == sum(deltas) / 2
    assert row["delta_ci95"][0] <= row["delta_vs_plain"] <= row["delta_ci95"][1]
    stats = data["init_statistics"]["small-resnet"]
    assert set(stats) == {"plain", "orepa-scratch"} and abs(stats["plain"]["norm_ratio"] - 1) < 1e-6
    assert abs(stats["orepa-scratch"]["norm_ratio"] - 1) < 1e-4  # scratch matches the default-init norms


def test_gpu_suite_dry_run_on_the_cpu(tmp_path):
    """``benchmarks/gpu_suite.py --device cpu --tiny``: the pipeline a GPU session runs, end to end, so the command
    is known to work before a GPU is lent (the CUDA tests report skipped here)."""
    from benchmarks import gpu_suite

    code = gpu_suite.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--cases", "yolov8n@2x64",
                           "torchvision:resnet18@2x64", "--compile-cases", "torchvision:resnet18@2x64"])
    assert code == 0
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert data["cuda_tests"]["status"] == "skipped" and data["cuda_tests"]["tests"] >= 1
    assert (tmp_path / "cuda_tests.xml").exists() and data["meta"]["amp"] == "bfloat16"
    assert {r["model"] for r in data["inference"]} == set(gpu_suite.LATENCY_MODELS)
    assert all(r["fold_rel_err"] <= 1e-5 for r in data["inference"])
    modes = [(r["case"], r["mode"]) for r in data["training"]]
    assert modes == [("yolov8n@2x64", "eager"), ("torchvision:resnet18@2x64", "eager"),
                     ("torchvision:resnet18@2x64", "compiled (eager)")]
    assert all(r["plain_step_ms"] > 0 and r["orepa_step_ms"] > 0 for r in data["training"])
    assert all(r["blocks"] > 0 and r["extra_ops"] > 0 for r in data["ops"])
    text = (tmp_path / "gpu_suite.md").read_text()
    assert "| yolov8n@2x64 | eager |" in text and "## Ops a training step adds" in text
    assert (tmp_path / "gpu_suite.png").stat().st_size > 10_000


def test_real_digit_tasks_are_deterministic_hold_out_their_test_scans_and_label_validly(tmp_path):
    pytest.importorskip("sklearn")
    import hashlib

    from benchmarks import finetune_tasks as ft

    def digest(folder):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
                                       and p.name != "data.yaml")).hexdigest()

    a = ft.make_digits_detection(tmp_path / "a", ft.FINETUNE_DIGITS, n_train=6, n_val=2, n_test=2, seed=3)
    b = ft.make_digits_detection(tmp_path / "b", ft.FINETUNE_DIGITS, n_train=6, n_val=2, n_test=2, seed=3)
    assert digest(a.parent) == digest(b.parent)  # the same seed writes the same files
    for label in (a.parent / "labels").rglob("*.txt"):
        for row in label.read_text().split("\n")[:-1]:
            cls, *box = row.split()
            assert 0 <= int(cls) < 5 and all(0 < float(v) <= 1 for v in box)
    fit, _ = ft.digit_scans(range(10), "fit")
    test, _ = ft.digit_scans(range(10), "test")
    assert len(fit) + len(test) == 1797
    fit_set = {f.tobytes() for f in fit}
    assert sum(t.tobytes() in fit_set for t in test) < 0.02 * len(test)  # other scans (a few are pixel twins)
    cls = ft.make_digits_classification(tmp_path / "c", ft.PRETRAIN_DIGITS, n_train=10, n_val=5, n_test=5)
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (cls / split).iterdir()) == [f"digit{d}" for d in range(5)]
        assert all(any((cls / split / f"digit{d}").iterdir()) for d in range(5))
    assert not (ft.make_digits_classification(tmp_path / "d", ft.PRETRAIN_DIGITS, 10, 5, n_test=0) / "test").exists()
    shapes = [ft.make_shapes_classification(tmp_path / f"s{i}", "targets", 12, 4, 4, seed=1) for i in range(2)]
    assert digest(shapes[0]) == digest(shapes[1])
    assert sorted(p.name for p in (shapes[0] / "train").iterdir()) == ["bar", "diamond", "hexagon", "ring", "star"]
    from PIL import Image

    assert Image.open(next((shapes[0] / "test").rglob("*.png"))).size == (32, 32)


def test_finetune_study_shares_runs_with_its_equal_time_study_and_exports_the_results_file(tmp_path):
    """The benchmark driver: the equal-time study starts with the OREPA runs (and plain's timing run) of the
    equal-epochs study, and the export names tasks, budgets and pooled estimates as docs/results expects."""
    from benchmarks import finetune_study as fs
    from orepa_convert.compare import CompareSettings, run_compare

    def fake(settings, job, run_dir):
        value = {"plain": 0.5, "preserve": 0.52, "preserve_live": 0.53}[job.variant] + 0.01 * ((job.seed * 7) % 3)
        value += 0.001 * job.epochs + (0.004 * job.seed if job.variant != "plain" else 0)
        return [{"variant": job.variant, "lr": job.lr, "seed": job.seed, "split": split, "epochs": job.epochs,
                 "map50_95": value, "wall_seconds": job.epochs * (2.0 if job.variant != "plain" else 1.0),
                 "peak_memory_mb": 1.0} for split in ("val", "test")]

    tasks = []
    for name in ("t1", "t2"):
        folder = tmp_path / name
        base = dict(backend="ultralytics", model="m.yaml", data="d.yaml", variants=fs.BASELINE, seeds=(0, 1, 2),
                    epochs=3, lrs=(0.01, 0.02), select_seeds=(0,))
        ep = CompareSettings(project=str(folder / "epochs"), **base)
        run_compare(ep, runner=fake, has_test=True, progress=False)
        tm = CompareSettings(project=str(folder / "time"), budget="time", **base)
        fs.seed_time_study(ep, tm)
        calls = []
        run_compare(tm, runner=lambda s, j, d: calls.append(j) or fake(s, j, d), has_test=True, progress=False)
        assert calls and {j.variant for j in calls} == {"plain"} and {j.epochs for j in calls} == {6}
        (folder / "pretrain.json").write_text('{"tensor_sha256": "x"}')
        tasks.append(fs.Task(name, "ultralytics", name == "t1", "test", lambda d: d, lambda d: d, "m.yaml", 64, 1,
                             0.01, 3, (0.01, 0.02)))
    out = fs.export(tmp_path, tmp_path / "results" / "finetune_tasks.json", tasks)
    assert [t["name"] for t in out["tasks"]] == ["t1", "t2"] and out["tasks"][0]["real_data"] is True
    assert {r["budget"] for r in out["runs"]} == {"epochs", "time"}
    assert set(out["runs"][0]) >= {"task", "variant", "lr", "seed", "split", "budget", "metric", "value", "wall_s"}
    pooled = out["pooled"]["epochs"]["raw"]["pooled"]
    assert {p["variant"] for p in pooled} == {"preserve", "preserve_live"} and all(p["k"] == 2 for p in pooled)
    assert {t["task"] for t in pooled[0]["tasks"]} == {"t1", "t2"}
    assert (tmp_path / "results" / "finetune_tasks.md").read_text().count("| t1 |") == 6  # 3 variants x 2 budgets
