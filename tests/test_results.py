"""The committed studies under docs/results are data first: each report regenerates from
the per-run files committed beside it (`largebatch report docs/results/<study>`)."""

from pathlib import Path

import pytest

from largebatch.report import collect_runs, write_report

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.parent.name for p in (ROOT / "docs" / "results").glob("*/report.md"))


def test_the_committed_studies_are_found():
    assert {
        "cpu-fashion-mnist-c1",
        "cpu-analysis-fashion-mnist",
        "study-fashion-mnist",
        "study-digits",
    } <= set(STUDIES)


@pytest.mark.parametrize("study", STUDIES)
def test_a_committed_report_regenerates_from_its_committed_runs(study, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the report names its folder as the command was given it
    folder = Path("docs") / "results" / study
    runs = collect_runs(folder)
    assert all(r["history"] and r["robust"] for r in runs), "per-run files are missing"
    path = write_report(folder, out=tmp_path)
    assert path.read_text() == (folder / "report.md").read_text()
    # a batch-size study's verdicts too, and only there
    assert (tmp_path / "claims.md").exists() == (folder / "claims.md").exists()
    if (folder / "claims.md").exists():
        assert (tmp_path / "claims.md").read_text() == (folder / "claims.md").read_text()
    for figure in (folder).glob("*.png"):
        assert (tmp_path / figure.name).exists(), figure.name
