import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import with_alarm
from largebatch.cli import main
from largebatch.compare import expand_grid, load_experiment, run_experiment, run_name
from largebatch.errors import ConfigError
from largebatch.report import collect_runs, summarize
from largebatch.train import train

BASE = {
    "dataset": "synthetic",
    "model": "mlp",
    "epochs": 2,
    "batch_size": 32,
    "max_batch_size": 128,
    "lr": 0.05,
    "device": "cpu",
    "hessian_samples": 32,
    "abs_duration": 1,
    "lr_decay_epochs": [],
}


def _experiment(tmp_path, grid, **extra):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "grid": grid, **extra}))
    return path


PNG = b"\x89PNG\r\n\x1a\n"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    path = _experiment(
        tmp,
        {"method": ["bl", "absa"], "seed": [0, 1]},
        evaluate={"attacks": ["fgsm", "pgd"], "eps": 0.1, "pgd_steps": 2},
        hessian={"samples": 32},
    )
    out = tmp / "out"
    # an interrupted run: one epoch of absa seed 1 before the grid starts
    name, config = expand_grid(load_experiment(path), out)[3]
    assert name == "absa-seed1"
    train(config, echo=None, show_progress=False, stop_after=1)
    status = run_experiment(load_experiment(path), out, show_progress=False, echo=lambda _: None)
    return path, out, status


def test_grid_runs_every_point_and_resumes_the_interrupted_one(finished_grid):
    _, out, status = finished_grid
    assert status == dict.fromkeys(["bl-seed0", "bl-seed1", "absa-seed0", "absa-seed1"], "done")
    history = [json.loads(line) for line in (out / "runs/absa-seed1/metrics.jsonl").open()]
    assert [h["epoch"] for h in history] == [1, 2]
    for run in status:
        robust = json.loads((out / "runs" / run / "robust.json").read_text())
        assert {"clean_acc", "fgsm_acc", "pgd_acc"} <= set(robust)
        assert (out / "runs" / run / "hessian.json").exists()


def test_finished_runs_are_skipped(finished_grid):
    path, out, _ = finished_grid
    stamp = (out / "runs/bl-seed0/summary.json").stat().st_mtime_ns
    status = run_experiment(load_experiment(path), out, show_progress=False, echo=lambda _: None)
    assert set(status.values()) == {"skipped"}
    assert (out / "runs/bl-seed0/summary.json").stat().st_mtime_ns == stamp


def test_table_numbers_are_the_runs_numbers(finished_grid):
    _, out, _ = finished_grid
    rows = summarize(collect_runs(out))
    assert [(r["method"], r["seeds"]) for r in rows] == [("bl", 2), ("absa", 2)]
    for row in rows:
        summaries = [
            json.loads((out / f"runs/{row['method']}-seed{s}/summary.json").read_text())
            for s in (0, 1)
        ]
        accs = [s["final_test_acc"] for s in summaries]
        assert row["final_test_acc"] == pytest.approx(sum(accs) / 2)
        assert row["updates"] == pytest.approx(sum(s["updates"] for s in summaries) / 2)
        assert row["final_test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert rows[0]["updates_vs_bl"] == 1.0
    assert rows[1]["adversarial"] is True and rows[1]["hessian_share"] > 0


def test_report_writes_markdown_and_figures(finished_grid, capsys):
    _, out, _ = finished_grid
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| synthetic | mlp | absa |" in text
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == ["synthetic-mlp-accuracy-vs-updates.png", "synthetic-mlp-schedules.png"]
    assert all((out / f).read_bytes()[:8] == PNG for f in figures)
    assert "report:" in capsys.readouterr().out


def test_curvature_figure_for_a_batch_size_study(tmp_path):
    path = _experiment(
        tmp_path,
        {"batch_size": [32, 64], "adversarial": [False, True]},
        evaluate={"attacks": ["fgsm"], "eps": 0.1},
        hessian={"samples": 32},
    )
    out = tmp_path / "out"
    assert main(["compare", "--config", str(path), "--out", str(out)]) == 0
    assert (out / "synthetic-mlp-curvature-vs-batch.png").read_bytes()[:8] == PNG
    rows = summarize(collect_runs(out))
    assert {(r["batch_size"], r["adversarial"]) for r in rows} == {
        (32, False),
        (32, True),
        (64, False),
        (64, True),
    }
    assert all(r["top_eigenvalue"] > 0 for r in rows)


def test_a_failed_run_is_recorded_and_the_grid_goes_on(tmp_path):
    spec = {"base": {**BASE, "epochs": 1, "momentum": 0.0}, "grid": {"lr": [1e12, 0.05]}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    status = run_experiment(load_experiment(path), out, show_progress=False, echo=lambda _: None)
    assert status == {"lr1000000000000.0": "failed", "lr0.05": "done"}
    assert "non-finite" in (out / "runs/lr1000000000000.0/error.txt").read_text()


def test_bad_experiment_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": BASE, "grid": {"method": ["bl", "lamb"]}}))
    with pytest.raises(ConfigError, match="unknown method 'lamb'"):
        load_experiment(bad)
    bad.write_text(yaml.safe_dump({"base": BASE, "grids": {}}))
    with pytest.raises(ConfigError, match="sections"):
        load_experiment(bad)
    bad.write_text(yaml.safe_dump({"base": BASE, "grid": {"seed": []}}))
    with pytest.raises(ConfigError, match="non-empty"):
        load_experiment(bad)


def test_run_names_are_short_and_stable():
    assert run_name({"method": "absa", "max_batch_size": 4096, "seed": 0}) == "absa-bmax4096-seed0"
    assert run_name({"lr_decay_epochs": [3, 6]}) == "lrdecayepochs3-6"
    assert run_name({}) == "run"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_experiment_configs_are_valid(name):
    experiment = load_experiment(CONFIGS / name)
    assert expand_grid(experiment, CONFIGS.parent / "runs")


def test_compare_set_overrides_the_base(tmp_path):
    experiment = load_experiment(CONFIGS / "paper-c1-cifar10.yaml", {"data_dir": "/d"})
    assert {c.data_dir for _, c in expand_grid(experiment, tmp_path)} == {"/d"}


def test_a_signal_stops_the_grid_instead_of_failing_the_run(tmp_path, monkeypatch):

    import largebatch.train as train_module
    from largebatch.train import TrainingInterrupted

    monkeypatch.setattr(train_module, "build_model", with_alarm(train_module.build_model, 1))
    path = _experiment(tmp_path, {"seed": [0, 1]}, evaluate={"attacks": []})
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted):
        run_experiment(load_experiment(path), out, show_progress=False, echo=lambda _: None)
    assert not (out / "runs/seed0/error.txt").exists()
    assert not (out / "runs/seed1").exists()
    monkeypatch.undo()
    status = run_experiment(load_experiment(path), out, show_progress=False, echo=lambda _: None)
    assert status == {"seed0": "done", "seed1": "done"}


def test_a_group_of_one_run_shows_no_spread(finished_grid, tmp_path):
    from largebatch.report import markdown_table

    _, out, _ = finished_grid
    runs = [r for r in collect_runs(out) if r["name"].endswith("seed0")]
    rows = summarize(runs)
    assert all(r["seeds"] == 1 and r["final_test_acc_std"] is None for r in rows)
    table = markdown_table(rows)
    assert "±" not in table
    acc = 100 * runs[0]["summary"]["final_test_acc"]
    assert f"| {acc:.2f} |" in table
    assert "±" in markdown_table(summarize(collect_runs(out)))  # two seeds: mean ± std


def test_bundles_set_several_keys_together(tmp_path):
    grid = {"adversarial": [False], "point": [{"batch_size": 32, "lr": 0.02},
                                               {"batch_size": 64, "lr": 0.03}]}  # fmt: skip
    runs = expand_grid(load_experiment(_experiment(tmp_path, grid)), tmp_path)
    assert [(n, c.batch_size, c.lr) for n, c in runs] == [
        ("advFalse-b32-lr0.02", 32, 0.02),
        ("advFalse-b64-lr0.03", 64, 0.03),
    ]
    for bad, match in (
        ({"point": [{"batch_size": 32}, 64]}, "mixes mappings"),
        ({"point": [{}]}, "each bundle"),
        ({"batch_size": [32], "point": [{"batch_size": 64}]}, "batch_size is set twice"),
        ({"point": [{"batch_sise": 64}]}, "batch_sise"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_experiment(_experiment(tmp_path, bad))


def test_hessian_and_evaluate_sections_are_checked_before_any_run(tmp_path):
    for extra, match in (
        ({"hessian": {"samples": "most"}}, "samples"),
        ({"hessian": {"density": "yes"}}, "density must be true or false"),
        ({"hessian": {"trace": True, "trace_probes": 2}}, "hutch\\+\\+ needs trace_probes"),
        ({"hessian": {"lanczos_step": 3}}, "unknown keys \\['hessian.lanczos_step'\\]"),
        ({"evaluate": {"eps": []}}, "non-empty list"),
        ({"evaluate": {"eps": [0.1, -1]}}, "eps"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_experiment(_experiment(tmp_path, {"seed": [0]}, **extra))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def study_grid(tmp_path_factory):
    """Two batch sizes trained to one training loss, each final model evaluated at two eps
    and analysed over its whole training set (eigenvalues, trace, density)."""
    tmp = tmp_path_factory.mktemp("study")
    base = {**BASE, "epochs": 8, "target_train_loss": 1.5, "limit_train": 128}
    spec = {
        "base": base,
        "grid": {"point": [{"batch_size": 16, "lr": 0.05}, {"batch_size": 64, "lr": 0.1}]},
        "evaluate": {"attacks": ["fgsm", "pgd"], "eps": [0.05, 0.2], "pgd_steps": 2},
        "hessian": {"samples": "all", "batch_size": 64, "top_k": 2, "trace": True,
                    "trace_probes": 6, "trace_tol": 0, "density": True,
                    "density_probes": 2, "lanczos_steps": 12},
    }  # fmt: skip
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp / "out"
    status = run_experiment(load_experiment(path), out, show_progress=False, echo=lambda _: None)
    return path, spec, out, status


def test_each_attack_runs_at_each_eps_and_the_gap_is_measured(study_grid):
    from largebatch.data import load_dataset
    from largebatch.evaluate import load_trained

    _, _, out, status = study_grid
    assert set(status.values()) == {"done"}
    run = out / "runs/b16-lr0.05"
    robust = json.loads((run / "robust.json").read_text())
    assert [row["eps"] for row in robust["by_eps"]] == [0.05, 0.2]
    assert robust["fgsm_acc"] == robust["by_eps"][0]["fgsm_acc"]
    # a larger budget never helps the model (the same samples, a stronger attack)
    assert robust["by_eps"][1]["pgd_acc"] <= robust["by_eps"][0]["pgd_acc"] + 1e-12
    # the training-set accuracy and loss, recomputed from the checkpoint by hand
    model, saved = load_trained(run / "checkpoint.pt", torch.device("cpu"))
    config = saved["config"]
    data = load_dataset(config["dataset"], None, seed=config["seed"], limit_train=128)
    with torch.no_grad():
        logits = model(data.train_x)
    assert len(data.train_y) == 128
    expected = (logits.argmax(1) == data.train_y).double().mean().item()
    assert robust["train_acc"] == pytest.approx(expected, abs=1e-12)
    loss = torch.nn.functional.cross_entropy(logits, data.train_y).item()
    assert robust["train_loss"] == pytest.approx(loss, rel=1e-5)
    assert robust["generalization_gap"] == pytest.approx(robust["train_acc"] - robust["clean_acc"])


def test_the_analysis_covers_the_whole_training_set(study_grid):
    _, _, out, _ = study_grid
    hessian = json.loads((out / "runs/b64-lr0.1/hessian.json").read_text())
    assert hessian["samples"] == 128 and len(hessian["eigenvalues"]["values"]) == 2
    density = hessian["density"]
    assert density["probes"] == 2 and 0 <= density["negative_mass"] <= 1
    assert density["min_eigenvalue"] == min(density["nodes"])
    assert hessian["trace"]["matvecs"] == 6  # a fixed budget: trace_tol 0


def test_a_changed_evaluation_evaluates_again_without_training(study_grid, tmp_path):
    path, spec, out, _ = study_grid
    run = out / "runs/b16-lr0.05"
    records = (run / "metrics.jsonl").read_text()
    stamp = (run / "checkpoint.pt").stat().st_mtime_ns
    hessian_stamp = (run / "hessian.json").stat().st_mtime_ns
    changed = tmp_path / "exp.yaml"
    changed.write_text(yaml.safe_dump({**spec, "evaluate": {**spec["evaluate"], "eps": [0.1]}}))
    status = run_experiment(load_experiment(changed), out, show_progress=False, echo=lambda _: None)
    assert set(status.values()) == {"done"}
    robust = json.loads((run / "robust.json").read_text())
    assert [row["eps"] for row in robust["by_eps"]] == [0.1]
    # not trained again: the checkpoint untouched, the records the same
    assert (run / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert (run / "metrics.jsonl").read_text() == records
    assert (run / "hessian.json").stat().st_mtime_ns == hessian_stamp  # its settings held
    status = run_experiment(load_experiment(changed), out, show_progress=False, echo=lambda _: None)
    assert set(status.values()) == {"skipped"}
    # a new final model (here: its checkpoint rewritten) is evaluated and analysed again
    robust_stamp = (run / "robust.json").stat().st_mtime_ns
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    status = run_experiment(load_experiment(changed), out, show_progress=False, echo=lambda _: None)
    assert status["b16-lr0.05"] == "done"
    assert (run / "robust.json").stat().st_mtime_ns != robust_stamp
    assert (run / "hessian.json").stat().st_mtime_ns != hessian_stamp
