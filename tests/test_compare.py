"""`orepa-convert compare`: paired runs with the real trainers on tiny generated data, the statistics, resume,
learning-rate selection, the time budget and one-line errors."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from orepa_convert import cli
from orepa_convert.compare import CompareError, CompareSettings, Job, run_compare, t_quantile_975
from orepa_convert.compare.stats import Paired


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 61)) + [100, 1000]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_paired_interval_is_the_t_interval_of_the_differences():
    p = Paired([0, 1, 2, 3], [0.02, -0.01, 0.03, 0.01])
    half = 3.18244631 * statistics.stdev(p.deltas) / 2
    assert p.mean == pytest.approx(0.0125) and p.better == 3
    assert p.interval == pytest.approx((0.0125 - half, 0.0125 + half))
    assert Paired([0], [0.1]).interval is None


def _check_outputs(project, settings_seeds, metric):
    data = json.loads((project / "compare.json").read_text())
    md = (project / "compare.md").read_text()
    assert (project / "compare.png").stat().st_size > 1000
    runs = [r for r in data["runs"] if r["split"] == data["reported_split"]]
    plain = {r["seed"]: r[metric] for r in runs if r["variant"] == "plain"}
    orepa = {r["seed"]: r[metric] for r in runs if r["variant"] == "preserve"}
    assert sorted(plain) == sorted(orepa) == sorted(settings_seeds)
    deltas = [orepa[s] - plain[s] for s in sorted(plain)]
    row = next(r for r in data["summary"] if r["variant"] == "preserve")
    assert row["deltas"] == pytest.approx(deltas)
    assert row["mean_delta"] == pytest.approx(statistics.fmean(deltas))
    if len(deltas) > 1:
        stats = pytest.importorskip("scipy.stats")
        sd = statistics.stdev(deltas)
        half = stats.t.ppf(0.975, len(deltas) - 1) * sd / math.sqrt(len(deltas))
        assert row["ci95"] == pytest.approx([statistics.fmean(deltas) - half, statistics.fmean(deltas) + half], abs=1e-6)
    plain_time = statistics.fmean(r["wall_seconds"] for r in runs if r["variant"] == "plain")
    orepa_time = statistics.fmean(r["wall_seconds"] for r in runs if r["variant"] == "preserve")
    assert row["time_ratio"] == pytest.approx(orepa_time / plain_time)
    assert all(r["wall_seconds"] > 0 and r["epochs"] == 1 for r in data["runs"])
    assert "## Verdict" in md and "95% CI" in md and "| preserve |" in md
    return data


@pytest.fixture(scope="module")
def detect_data(tmp_path_factory):
    from orepa_convert.data.synthetic import make_detection_benchmark

    return make_detection_benchmark(tmp_path_factory.mktemp("cmp"), n_train=8, n_val=4, imgsz=64, n_test=4)


def test_ultralytics_compare_writes_everything_and_resumes(detect_data, tmp_path, capsys):
    pytest.importorskip("ultralytics")
    project = tmp_path / "cmp"
    argv = ["compare", "yolov8n.yaml", "--data", str(detect_data), "--epochs", "1", "--imgsz", "64", "--seeds", "0", "1",
            "--batch", "4", "--device", "cpu", "--workers", "0", "--project", str(project), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    data = _check_outputs(project, [0, 1], "map50_95")
    assert data["reported_split"] == "test" and "on the **test** split" in out
    assert {r["split"] for r in data["runs"]} == {"val", "test"}
    assert all(r["peak_memory_mb"] is None or r["peak_memory_mb"] > 100 for r in data["runs"])
    # the OREPA runs really trained OREPA blocks: their checkpoints carry the record; plain ones do not
    import torch

    for name, blocks in (("preserve-lrdefault-s0-e1", 39), ("plain-lrdefault-s0-e1", 0)):
        ckpt = torch.load(project / "runs" / name / "train" / "weights" / "last.pt", weights_only=False)
        carried = (ckpt.get("ema") or ckpt["model"]).__dict__.get("orepa_training_state")
        assert (len(carried["orepa_state"]["groups"][0]["paths"]) if carried else 0) == blocks

    # resume: every run is in compare.json, so nothing runs again and the outputs are the same
    def no_runs(*_):
        raise AssertionError("a finished run ran again")

    settings = CompareSettings(backend="ultralytics", model="yolov8n.yaml", data=str(detect_data), project=str(project),
                               seeds=(0, 1), epochs=1, imgsz=64, train_args={"batch": 4, "device": "cpu", "workers": 0})
    again = run_compare(settings, runner=no_runs, has_test=True, progress=False)
    assert again["runs"] == data["runs"] and again["summary"] == data["summary"]


def test_timm_compare_on_an_image_folder_without_test_split(tmp_path, capsys):
    pytest.importorskip("timm")
    from orepa_convert.data.synthetic import make_dataset

    folder = make_dataset(tmp_path / "imgs", "classify", n_train=8, n_val=4, imgsz=32)
    project = tmp_path / "cmp"
    code = cli.main(["compare", "--timm", "resnet10t", "--data-dir", str(folder), "--epochs", "1", "--imgsz", "32",
                     "--seeds", "0", "--batch", "4", "--device", "cpu", "--project", str(project), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0
    assert "one seed gives no confidence interval" in captured.err
    data = _check_outputs(project, [0], "top1")
    assert data["reported_split"] == "val" and "the dataset has no test split" in captured.out
    assert "cannot give an interval" in captured.out


def _fake_runner(calls: list[Job]):
    """Deterministic records for planning tests: val metric peaks at lr 0.02 for plain and 0.01 for preserve; OREPA
    takes twice as long per epoch."""
    best = {"plain": 0.02, "preserve": 0.01}

    def run(settings, job, run_dir):
        calls.append(job)
        value = 0.5 - abs(job.lr - best[job.variant]) + 0.001 * job.seed + 0.0001 * job.epochs
        seconds = job.epochs * (2.0 if job.variant != "plain" else 1.0)
        return [{"variant": job.variant, "lr": job.lr, "seed": job.seed, "split": split, "epochs": job.epochs,
                 "map50_95": value + (0.01 if split == "test" else 0.0), "wall_seconds": seconds, "peak_memory_mb": 100.0}
                for split in ("val", "test")]

    return run


def test_learning_rate_selection_and_time_budget_plan(tmp_path):
    calls: list[Job] = []
    settings = CompareSettings(backend="ultralytics", model="m.yaml", data="d.yaml", project=str(tmp_path), seeds=(0, 1, 2),
                               epochs=4, lrs=(0.01, 0.02, 0.04), select_seeds=(0,), budget="time")
    data = run_compare(settings, runner=_fake_runner(calls), has_test=True, progress=False)
    assert data["epochs_of"] == {"plain": 8, "preserve": 4}  # plain gets the epochs of OREPA's measured time
    assert data["chosen_lr"] == {"plain": 0.02, "preserve": 0.01}
    selection = [(j.variant, j.lr) for j in calls if j.role == "select"]
    assert sorted(selection) == sorted((v, lr) for v in ("plain", "preserve") for lr in (0.01, 0.02, 0.04))
    report = {(j.variant, j.lr, j.seed, j.epochs) for j in calls if j.role == "report"}
    assert report == {("plain", 0.02, s, 8) for s in (1, 2)} | {("preserve", 0.01, s, 4) for s in (1, 2)}
    assert len(calls) == len({j.key() for j in calls})  # no run twice
    md = (tmp_path / "compare.md").read_text()
    assert "Learning-rate selection" in md and "plain trained 8 epochs" in md
    row = next(r for r in data["summary"] if r["variant"] == "preserve")
    assert row["time_ratio"] == pytest.approx(1.0)  # equal wall time by construction
    # more seeds later: only the new seed's runs are added
    more = CompareSettings(**{**settings.__dict__, "seeds": (0, 1, 2, 3)})
    calls.clear()
    run_compare(more, runner=_fake_runner(calls), has_test=True, progress=False)
    assert {(j.variant, j.seed) for j in calls} == {("plain", 3), ("preserve", 3)}
    # other settings in the same project are refused
    with pytest.raises(CompareError, match="other settings"):
        run_compare(CompareSettings(**{**settings.__dict__, "epochs": 5}), runner=_fake_runner([]), progress=False)


@pytest.mark.parametrize("select_seeds", [(0,), (0, 1), (3,)])
def test_progress_bar_counts_each_run_once(select_seeds, tmp_path, capsys):
    calls: list[Job] = []
    settings = CompareSettings(backend="ultralytics", model="m.yaml", data="d.yaml", project=str(tmp_path),
                               seeds=(0, 1, 2), epochs=4, lrs=(0.01, 0.02, 0.04), select_seeds=select_seeds)
    run_compare(settings, runner=_fake_runner(calls), has_test=True, progress=True)
    n = len({j.key() for j in calls})
    assert n == len(calls) == 3 * 2 + (3 * len(select_seeds) - len(set(select_seeds) & {0, 1, 2})) * 2
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"| {n}/{n} [" in final, final  # the bar ends full, not past its total


def test_progress_bar_with_a_time_budget_that_keeps_plain_epochs(tmp_path, capsys):
    """OREPA as fast as plain: plain keeps its epochs, so the timing run is one of the comparison's runs."""
    calls: list[Job] = []
    fake = _fake_runner(calls)

    def same_speed(settings, job, run_dir):
        return [{**r, "wall_seconds": float(job.epochs)} for r in fake(settings, job, run_dir)]

    settings = CompareSettings(backend="ultralytics", model="m.yaml", data="d.yaml", project=str(tmp_path),
                               seeds=(0, 1), epochs=4, lrs=(0.01,), budget="time")
    data = run_compare(settings, runner=same_speed, has_test=True, progress=True)
    assert data["epochs_of"] == {"plain": 4, "preserve": 4} and len(calls) == 4
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "| 4/4 [" in final, final


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["yolov8n.yaml", "--data", "missing.yaml"], "dataset YAML missing.yaml does not exist"),
        (["nothere.pt", "--data", "DATA"], "model file nothere.pt does not exist"),
        (["yolov8n.yaml", "--data", "DATA", "--variants", "plain", "fancy"], "unknown variant 'fancy'"),
        (["yolov8n.yaml", "--data", "DATA", "--variants", "preserve", "scratch"], "needs 'plain'"),
        (["--timm", "resnet18", "--data-dir", "nowhere"], "dataset folder nowhere does not exist"),
        (["--timm", "resnet18"], "--timm needs --data-dir"),
        (["yolov8n.yaml"], "give MODEL and --data"),
    ],
)
def test_compare_user_mistakes_are_one_line_errors(args, message, detect_data, tmp_path):
    args = [str(detect_data) if a == "DATA" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "orepa_convert.cli", "compare", *args, "--project", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", ("plain", {})),
        ("preserve_live", ("preserve_live", {})),
        ("preserve_live:live_scale=0.25", ("preserve_live", {"live_scale": 0.25})),
        ("preserve:branches=origin+avg+pw,dws_expansion=4", ("preserve", {"branches": ("origin", "avg", "pw"), "dws_expansion": 4})),
    ],
)
def test_variant_specs_name_an_init_and_block_options(text, expected):
    from orepa_convert.compare.variants import parse_variant

    assert parse_variant(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fancy", "unknown variant 'fancy'"),
        ("preserve_live:seed=3", "is not FIELD=VALUE with FIELD one of"),
        ("preserve_live:live_scale", "is not FIELD=VALUE"),
        ("preserve_live:live_scale=lots", "cannot read live_scale='lots'"),
        ("preserve:live_scale=0.5", "applies to init='preserve_live' only"),
        ("preserve:branches=avg+pw", "needs the 'origin' branch"),
    ],
)
def test_bad_variant_specs_are_one_line_compare_errors(text, message):
    with pytest.raises(CompareError, match=message.replace("(", r"\(").replace("[", r"\[")):
        CompareSettings(backend="ultralytics", model="m.yaml", data="d.yaml", project="p", variants=("plain", text))


def test_variant_options_reach_both_backends():
    from orepa_convert.compare.runners import timm_recipe

    recipe = timm_recipe(
        {"model": "resnet18", "data": "d", "imgsz": 32, "train_args": {"hflip": 0.0, "amp": False, "batch": 8}},
        {"epochs": 2, "seed": 1, "variant": "preserve_live:live_scale=0.25", "lr": 0.01},
        Path("out"),
    )
    assert recipe.init == "preserve_live" and recipe.orepa_options == {"live_scale": 0.25} and not recipe.plain
    assert recipe.hflip == 0.0 and recipe.amp is False  # 0.0 is a value, False is "off"
    assert (recipe.batch_size, recipe.img_size, recipe.lr, recipe.epochs, recipe.seed) == (8, 32, 0.01, 2, 1)
    pytest.importorskip("timm")
    from orepa_convert import OREPAConv
    from orepa_convert.integrations.timm_recipe import TimmRecipe, build

    recipe = TimmRecipe(
        data_dir="d", model="resnet10t", seed=1, init="preserve_live", orepa_options={"live_scale": 0.25}
    )
    model, count = build(recipe, num_classes=3)
    blocks = [m for m in model.modules() if isinstance(m, OREPAConv)]
    assert count == len(blocks) > 0 and {b.block_config().live_scale for b in blocks} == {0.25}


@pytest.mark.parametrize(
    ("train_args", "message"),
    [
        ({"epoch": 3}, "the timm recipe has no option 'epoch'; its options: amp, batch_size"),
        ({"lr": "fast"}, "timm recipe option lr='fast': expected float"),
        ({"batch": 0}, "batch_size must be at least 1, got 0"),
        ({"amp": "yes"}, "timm recipe option amp='yes': expected True or False"),
    ],
)
def test_bad_timm_train_args_are_one_line_compare_errors(train_args, message):
    from orepa_convert.compare.runners import timm_recipe

    settings = {"model": "resnet18", "data": "d", "imgsz": None, "train_args": train_args}
    job = {"epochs": 1, "seed": 0, "variant": "preserve", "lr": None}
    with pytest.raises(CompareError, match=re.escape(message)):
        timm_recipe(settings, job, Path("out"))


def test_timm_recipe_options_fail_before_any_data_is_read():
    from orepa_convert.errors import RecipeError
    from orepa_convert.integrations.timm_recipe import TimmRecipe

    with pytest.raises(RecipeError, match="orepa_options="):
        TimmRecipe(data_dir="missing", orepa_options={"live_scales": 0.25})
    with pytest.raises(ValueError, match="applies to init='preserve_live' only"):
        TimmRecipe(data_dir="missing", orepa_options={"live_scale": 0.25})


def test_the_old_timm_train_path_still_runs_and_says_where_it_went():
    import importlib
    import sys

    sys.modules.pop("orepa_convert.timm_train", None)
    with pytest.warns(FutureWarning, match="moved to orepa_convert.integrations.timm_recipe"):
        old = importlib.import_module("orepa_convert.timm_train")
    from orepa_convert.integrations import timm_recipe

    assert old.main is timm_recipe.main and old.train_timm is timm_recipe.train_timm


def test_timm_recipe_runs_are_reproducible_from_their_seed(tmp_path):
    """Same seed, same weights: the recipe seeds the generators timm's augmentations draw from (a comparison's
    pairs see the same crops, and a pretrained checkpoint rebuilds bit for bit)."""
    pytest.importorskip("timm")
    import torch

    from orepa_convert.data.synthetic import make_dataset
    from orepa_convert.integrations.timm_recipe import main

    folder = make_dataset(tmp_path / "imgs", "classify", n_train=8, n_val=4, imgsz=32)
    states = []
    for run in ("a", "b"):
        argv = ["--model", "resnet10t", "--data-dir", str(folder), "--epochs", "1", "--img-size", "32",
                "--batch-size", "4", "--device", "cpu", "--plain", "--seed", "3", "--output", str(tmp_path / run)]
        assert main(argv) == 0
        states.append(torch.load(tmp_path / run / "folded.pth", weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
