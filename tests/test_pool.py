"""`orepa-convert compare --pool`: random-effects pooling of finished comparisons, against a hand computation."""

from __future__ import annotations

import json
import math

import pytest

from orepa_convert import cli
from orepa_convert.compare import CompareSettings, run_compare
from orepa_convert.compare.pool import PoolError, TaskEffect, pool_effects, pool_studies

# Three tasks, two seeds each, paired differences (variant - plain) chosen so that every quantity is exact by hand:
# means 0.02, 0.01, 0.06; each sample variance 2e-4, so each squared standard error v = 1e-4 and w = 1/v = 1e4.
DELTAS = {"taskA": (0.01, 0.03), "taskB": (0.00, 0.02), "taskC": (0.05, 0.07)}


def _study(tmp_path, name: str, deltas: tuple[float, ...]):
    """A real compare.json, written by the harness from runs whose metric gives exactly ``deltas``."""

    def runner(settings, job, run_dir):
        value = 0.5 + 0.01 * job.seed + (deltas[job.seed] if job.variant != "plain" else 0.0)
        return [{"variant": job.variant, "lr": job.lr, "seed": job.seed, "split": "val", "epochs": job.epochs,
                 "map50_95": value, "wall_seconds": 1.0, "peak_memory_mb": None}]

    folder = tmp_path / name
    settings = CompareSettings(backend="ultralytics", model="m.yaml", data="d.yaml", project=str(folder),
                               variants=("plain", "preserve_live"), seeds=tuple(range(len(deltas))), epochs=1)
    run_compare(settings, runner=runner, progress=False)
    return folder


def test_random_effects_pooling_equals_the_hand_computation(tmp_path):
    folders = [_study(tmp_path, name, d) for name, d in DELTAS.items()]
    (pooled,) = pool_studies(folders)
    # fixed-effect mean 0.03; Q = 1e4 * (0.01^2 + 0.02^2 + 0.03^2) = 14; C = 3e4 - 3e8 / 3e4 = 2e4
    assert pooled.q == pytest.approx(14.0)
    assert pooled.tau2 == pytest.approx((14 - 2) / 2e4)  # 6e-4
    assert pooled.mu == pytest.approx(0.03)  # equal weights 1 / (1e-4 + 6e-4)
    assert pooled.se == pytest.approx(math.sqrt(7e-4 / 3))
    # Hartung-Knapp: q = sum w* (y - mu)^2 / (k - 1) = (14e-4 / 7e-4) / 2 = 1, so half = t_{0.975,2} * se
    half = 4.30265273 * math.sqrt(7e-4 / 3)
    assert pooled.interval == pytest.approx((0.03 - half, 0.03 + half))
    pred = 12.7062047 * math.sqrt(6e-4 + 7e-4 / 3)  # t_{0.975,1} * sqrt(tau^2 + se^2)
    assert pooled.prediction == pytest.approx((0.03 - pred, 0.03 + pred))
    assert pooled.i2 == pytest.approx(12 / 14)
    assert [t.task for t in pooled.tasks] == list(DELTAS)


def test_homogeneous_tasks_pool_to_the_inverse_variance_mean_with_no_between_task_variance():
    tasks = [TaskEffect("a", "v", "epochs", "m", (0.01, 0.03)), TaskEffect("b", "v", "epochs", "m", (0.00, 0.04, 0.02))]
    pooled = pool_effects(tasks)
    va, vb = 2e-4 / 2, 4e-4 / 3  # sample variances 2e-4 and 4e-4 over n = 2 and 3
    # Q = sum w (y - fixed)^2 = 0 < k - 1: tau^2 = 0 and the pooled effect is the inverse-variance mean (both 0.02)
    assert pooled.tau2 == 0 and pooled.i2 == 0
    assert pooled.mu == pytest.approx(0.02) and pooled.se == pytest.approx(math.sqrt(1 / (1 / va + 1 / vb)))
    assert pooled.prediction is None  # two tasks give no prediction interval


def test_standardised_effect_is_the_paired_mean_over_its_sd():
    t = TaskEffect("a", "v", "epochs", "m", (0.01, 0.03, 0.05), effect="standardised")
    assert t.estimate == pytest.approx(0.03 / 0.02)
    assert t.variance == pytest.approx(1 / 3 + 1.5**2 / 6)


def test_cli_pool_writes_json_markdown_and_forest_plot_and_updates_with_a_new_study(tmp_path, capsys):
    folders = [_study(tmp_path, name, d) for name, d in list(DELTAS.items())[:2]]
    out = tmp_path / "pool"
    assert cli.main(["compare", "--pool", *map(str, folders), "--project", str(out)]) == 0
    first = json.loads((out / "pool.json").read_text())
    assert [p["k"] for p in first["pooled"]] == [2]
    assert (out / "pool.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "| taskA |" in text and "pooled" in text and "preserve_live (epochs budget)" in text
    folders.append(_study(tmp_path, "taskC", DELTAS["taskC"]))  # a study finished later: pool again
    assert cli.main(["compare", "--pool", *map(str, folders), "--project", str(out)]) == 0
    (row,) = json.loads((out / "pool.json").read_text())["pooled"]
    assert row["k"] == 3 and row["mu"] == pytest.approx(0.03)
    assert "no evidence of a difference" in row["verdict"] and "on a new task expect" in row["verdict"]


def test_equal_time_studies_pool_apart_from_equal_epoch_ones(tmp_path):
    folders = [_study(tmp_path, "a", (0.01, 0.03)), _study(tmp_path, "b", (0.02, 0.05))]
    data = json.loads((folders[1] / "compare.json").read_text())
    data["settings"]["budget"] = "time"  # as `--budget time` records it
    (folders[1] / "compare.json").write_text(json.dumps(data))
    pooled = pool_studies(folders)
    assert sorted((p.budget, p.k) for p in pooled) == [("epochs", 1), ("time", 1)]
    assert all(p.interval is None for p in pooled)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "has no compare.json"),
        (lambda d: (d / "compare.json").write_text("{not json"), "is not a finished comparison"),
        (lambda d: (d / "compare.json").write_text(json.dumps({"settings": {}, "metric": "m"})), "is not a finished"),
    ],
)
def test_bad_study_folders_are_one_line_errors(make, message, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    make(bad)
    assert cli.main(["compare", "--pool", str(bad), "--project", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_study_with_one_seed_or_identical_differences_is_refused(tmp_path):
    with pytest.raises(PoolError, match="1 paired seed"):
        pool_studies([_study(tmp_path, "one", (0.01,))])
    with pytest.raises(PoolError, match="all equal"):
        pool_studies([_study(tmp_path, "flat", (0.0, 0.0))])
    with pytest.raises(PoolError, match="appears twice"):
        folder = _study(tmp_path, "twice", (0.01, 0.02))
        pool_studies([folder, folder])
    with pytest.raises(ValueError, match="give only the study folders"):
        cli._compare(cli.build_parser().parse_args(["compare", "m.yaml", "--pool", str(folder)]))
