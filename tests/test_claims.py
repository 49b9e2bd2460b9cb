"""The claims' verdicts on studies whose answer is known by construction."""

import pytest

from largebatch.claims import judge, study_cells, welch, write_claims

PNG = b"\x89PNG\r\n\x1a\n"


def _run(batch, adversarial, seed, eig, pgd=80.0, mass=0.001, gap=2.0, clean=90.0, loss=0.3):
    """A run as ``report.collect_runs`` gives it, with the numbers the claims read."""
    return {
        "name": f"b{batch}-adv{adversarial}-seed{seed}",
        "config": {"dataset": "toy", "model": "mlp", "method": "bl", "batch_size": batch,
                   "adversarial": adversarial, "seed": seed},
        "summary": {"final_train_loss": loss, "target_train_loss": 0.3, "reached_target": True,
                    "final_test_acc": clean / 100, "epochs": 3, "updates": 30},
        "history": [],
        "robust": {"clean_acc": clean / 100, "generalization_gap": gap / 100,
                   "train_loss": loss, "by_eps": [{"eps": 0.1, "pgd_acc": pgd / 100}]},
        "hessian": {"eigenvalues": {"values": [eig]}, "trace": {"estimate": 10 * eig},
                    "density": {"negative_mass": mass, "min_eigenvalue": -0.01 * eig,
                                "grid": [-1.0, 0.0, 1.0], "density": [0.1, 0.8, 0.1]}},
    }  # fmt: skip


def _verdicts(runs):
    (cells,) = study_cells(runs).values()
    return {claim.claim.split(":")[0]: claim.verdict for claim in judge(cells)}


def _study(eig, pgd=None, mass=None, gap=None, clean=None, adversarial_eig=None):
    """Runs at B 32 and 1024 (3 seeds each); each argument maps a batch size to the
    three seeds' values."""
    runs = []
    for batch in (32, 1024):
        for seed in range(3):
            extra = {
                k: v[batch][seed]
                for k, v in (("pgd", pgd), ("mass", mass), ("gap", gap), ("clean", clean))
                if v
            }
            runs.append(_run(batch, False, seed, eig[batch][seed], **extra))
            if adversarial_eig:
                runs.append(_run(batch, True, seed, adversarial_eig[batch][seed]))
    return runs


SPECTRUM = "Large-batch training converges to points with a larger Hessian spectrum"
ROBUST = "Large-batch models are less robust to adversarial attacks"
ADVERSARIAL = "Adversarial training leads to regions with a smaller Hessian spectrum"
SADDLE = "Saddle points are not the cause of the generalization gap"
CORRELATION = "Points with a larger Hessian spectrum are less robust to adversarial perturbation"
ACCURACY = (
    "Large-batch training loses accuracy (the generalization gap), here at equal training loss"
)


def test_welch_matches_the_closed_form():
    # t = -3 / sqrt(1/3 + 1/3) = -3.674 with 4 degrees of freedom: p = 0.02131 (tables)
    assert welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.02131, abs=2e-5)
    assert welch([1.0], [2.0, 3.0]) is None
    assert welch([2.0, 2.0], [2.0, 2.0]) == 1.0 and welch([2.0, 2.0], [3.0, 3.0]) == 0.0


def test_a_clearly_sharper_large_batch_is_shown_and_the_reverse_contradicted():
    sharper = {32: [10.0, 11.0, 12.0], 1024: [20.0, 21.0, 22.0]}
    assert _verdicts(_study(sharper))[SPECTRUM] == "shown"
    flatter = {32: sharper[1024], 1024: sharper[32]}
    assert _verdicts(_study(flatter))[SPECTRUM] == "contradicted"
    noisy = {32: [10.0, 20.0, 15.0], 1024: [12.0, 22.0, 14.0]}
    assert _verdicts(_study(noisy))[SPECTRUM] == "not shown"


def test_robustness_accuracy_and_correlation():
    eig = {32: [10.0, 11.0, 12.0], 1024: [20.0, 21.0, 22.0]}
    pgd = {32: [82.0, 81.0, 80.0], 1024: [62.0, 61.0, 60.0]}  # falls as the eigenvalue rises
    clean = {32: [90.0, 90.5, 91.0], 1024: [85.0, 85.5, 86.0]}
    verdicts = _verdicts(_study(eig, pgd=pgd, clean=clean))
    assert verdicts[ROBUST] == "shown" and verdicts[ACCURACY] == "shown"
    assert verdicts[CORRELATION] == "shown"
    (cells,) = study_cells(_study(eig, pgd=pgd)).values()
    (row,) = [c for c in judge(cells) if c.claim == CORRELATION]
    assert row.numbers[0].startswith("rho -1.00 over 6 models")  # a monotone relation
    more_robust = {32: [60.0, 61.0, 62.0], 1024: [80.0, 81.0, 82.0]}
    assert _verdicts(_study(eig, pgd=more_robust))[CORRELATION] == "contradicted"


def test_adversarial_training_must_be_flatter_at_every_batch_size():
    eig = {32: [10.0, 11.0, 12.0], 1024: [20.0, 21.0, 22.0]}
    flatter = {32: [5.0, 5.5, 6.0], 1024: [9.0, 9.5, 10.0]}
    assert _verdicts(_study(eig, adversarial_eig=flatter))[ADVERSARIAL] == "shown"
    # flatter at 32, sharper (not significantly) at 1024: not every batch size
    mixed = {32: [5.0, 5.5, 6.0], 1024: [20.0, 23.0, 22.5]}
    assert _verdicts(_study(eig, adversarial_eig=mixed))[ADVERSARIAL] == "not shown"
    sharper = {32: [30.0, 31.0, 32.0], 1024: [40.0, 41.0, 42.0]}
    assert _verdicts(_study(eig, adversarial_eig=sharper))[ADVERSARIAL] == "contradicted"
    assert _verdicts(_study(eig))[ADVERSARIAL] == "not shown"  # no adversarial runs


def test_a_negative_part_with_a_growing_gap_contradicts_the_saddle_claim():
    eig = {32: [10.0, 11.0, 12.0], 1024: [20.0, 21.0, 22.0]}
    small = {32: [0.001] * 3, 1024: [0.004, 0.002, 0.003]}
    assert _verdicts(_study(eig, mass=small))[SADDLE] == "shown"
    large = {32: [0.001] * 3, 1024: [0.05, 0.06, 0.07]}
    growing_gap = {32: [2.0, 2.1, 2.2], 1024: [6.0, 6.2, 6.1]}
    assert _verdicts(_study(eig, mass=large, gap=growing_gap))[SADDLE] == "contradicted"
    assert _verdicts(_study(eig, mass=large))[SADDLE] == "not shown"  # the gap did not grow


def test_claims_md_and_its_figures(tmp_path):
    eig = {32: [10.0, 11.0, 12.0], 1024: [20.0, 21.0, 22.0]}
    runs = _study(eig, adversarial_eig={32: [5.0] * 3, 1024: [9.0] * 3})
    runs[0]["summary"]["final_train_loss"] = 0.4  # one run short of the target
    path = write_claims(runs, tmp_path, folder="toy")
    text = path.read_text()
    assert text.count("| **") == 6  # one verdict per claim
    assert "Not within 5% of the target: B 32." in text
    for figure in ("spectrum", "robustness", "negative", "densities"):
        assert (tmp_path / f"toy-mlp-claims-{figure}.png").read_bytes()[:8] == PNG


def test_runs_that_are_not_a_batch_size_study_give_no_claims(tmp_path):
    runs = [_run(32, False, seed, 10.0) for seed in range(3)]  # one batch size
    assert write_claims(runs, tmp_path) is None
    for run in runs:
        run["config"]["method"] = "abs"
    runs += [_run(64, False, 0, 10.0)]
    assert write_claims(runs, tmp_path) is None and not (tmp_path / "claims.md").exists()
