"""The whole report: every section in both formats, self-contained HTML, skipped dirs, mixed caches, CLI."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from geo.cli import cli
from geo.reports.build import build_report
from geo.reports.runs import ReportError
from support.runs import PROVENANCE, base_config, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("Runs", "Results (paper table 2 layout)", "Claims of the paper", "Accuracy against c",
            "Accuracy against κ0", "Training curves", "Maps")
FIGURES = ("accuracy_vs_c.png", "accuracy_vs_kappa0.png", "training_curves.png")


def make_sweep(root: Path) -> Path:
    """mvmf at 3 values of c x 2 of κ0, softmax at 3 values of c, and one corrupt directory."""
    for c_index, c in enumerate((16, 64, 256)):
        for kappa0 in (8.0, 16.0):
            write_run(root / f"mvmf-c{c}-k{kappa0:g}", n_cells=c, kappa0=kappa0,
                      acc=[0.1 + 0.1 * c_index + (0.05 if kappa0 == 16 else 0)] * 5)
        write_run(root / f"softmax-c{c}", head="softmax", n_cells=c, kappa0=None, acc=[0.05 + 0.02 * c_index] * 5)
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{")
    return root


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.refs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    sweep = make_sweep(root / "sweep")
    result = build_report([sweep], root / "out", n_maps=0)
    return result, root / "out"


def test_every_section_table_figure_and_claim_in_both_formats(report):
    result, out = report
    md = (out / "report.md").read_text()
    parser = _Collector()
    parser.feed((out / "index.html").read_text())
    html_text = " ".join(parser.text)
    for title in SECTIONS:
        assert f"## {title}" in md
        assert title in html_text
    for number in (1, 2, 3, 4):
        assert f"**Claim {number}.**" in md and f"Claim {number}." in html_text
    assert md.count("| mvmf |") == 6 and md.count("| softmax |") == 3
    assert (out / "index.html").read_text().count('<tr title="') == 9  # one results row per run
    assert "≤ X km" in md and "not the mean" in md  # metric conventions under the table
    for name in FIGURES:
        assert f"](figures/{name})" in md
    assert parser.tags.count("img") == len(FIGURES)
    assert {p.name for p in result.files} >= {"table.csv", "table.parquet", "report.md", "index.html", *FIGURES}


def test_html_is_self_contained_and_md_references_existing_files(report):
    _, out = report
    parser = _Collector()
    parser.feed((out / "index.html").read_text())
    for ref in parser.refs:
        if ref.startswith("#"):
            continue
        assert ref.startswith("data:image/png;base64,"), ref
        assert base64.b64decode(ref.split(",", 1)[1]).startswith(PNG_MAGIC)
    md = (out / "report.md").read_text()
    for ref in re.findall(r"\]\(([^)]+)\)", md):
        assert (out / ref).read_bytes().startswith(PNG_MAGIC)


def test_skipped_dirs_are_listed(report):
    result, out = report
    assert [s.path.name for s in result.skipped] == ["broken"]
    assert "broken`: incomplete: missing metrics.json" in (out / "report.md").read_text()
    assert "incomplete: missing metrics.json" in (out / "index.html").read_text()


def test_verdicts_in_the_report(report):
    _, out = report
    md = (out / "report.md").read_text()
    # MvMF: +0.1 per step with ±0.01 intervals, at every scale; softmax +0.02 with ±0.01 (touching: overlap).
    assert "**Claim 1.** MvMF accuracy rises monotonically with c, at every distance scale. Verdict: **holds**." in md
    assert re.search(r"\*\*Claim 3\.\*\*.*Verdict: \*\*holds\*\*", md)
    # κ0=16 is better at every scale: fine scales hold, the coarse one fails.
    assert re.search(r"\*\*Claim 4\.\*\*.*Verdict: \*\*fails\*\*", md)


def test_mixed_caches_refused_then_labelled(tmp_path):
    write_run(tmp_path / "runs" / "a", n_cells=16)
    write_run(tmp_path / "runs" / "b", config=base_config("mvmf", 64, 16, cache_path="/x/other.h5",
                                                          provenance=dict(PROVENANCE, backbone="resnet18")))
    with pytest.raises(ReportError, match="--allow-mixed-caches"):
        build_report([tmp_path / "runs"], tmp_path / "out", n_maps=0)
    assert not (tmp_path / "out").exists()
    build_report([tmp_path / "runs"], tmp_path / "out", n_maps=0, allow_mixed_caches=True, fmt="md")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "different feature caches" in md and "| cache |" in md and "- cache B: other.h5" in md
    assert "**On cache A:**" in md and not (tmp_path / "out" / "index.html").exists()


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no usable run directory"):
        build_report([tmp_path / "empty"], tmp_path / "out")


def test_cli_report(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    runner = CliRunner()
    result = runner.invoke(cli, ["report", str(sweep), "--out", str(tmp_path / "out"), "--format", "html",
                                 "--n-maps", "0"])
    assert result.exit_code == 0, result.output
    assert "9 run(s) reported, 1 skipped" in result.output and "broken" in result.output
    assert (tmp_path / "out" / "index.html").exists() and not (tmp_path / "out" / "report.md").exists()
    # Mixed caches without the flag: one clear error line, exit code 2.
    write_run(sweep / "other", config=base_config("mvmf", 16, 16, provenance={"backbone": "x"}))
    result = runner.invoke(cli, ["report", str(sweep), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 2 and result.output.startswith("Error: runs were made on different feature caches")
    help_text = runner.invoke(cli, ["report", "--help"]).output
    assert "Example:" in help_text and "--allow-mixed-caches" in help_text


def test_learning_curves_section_and_data_efficiency_claim(tmp_path):
    for n, (acc_mvmf, acc_softmax) in zip((100, 1000), ((0.3, 0.1), (0.5, 0.3))):
        write_run(tmp_path / "runs" / f"mvmf-c64-k16-f{n / 1000:g}", n_cells=64, acc=[acc_mvmf] * 5, n_train=n,
                  train_fraction=n / 1000)
        write_run(tmp_path / "runs" / f"softmax-c64-f{n / 1000:g}", head="softmax", n_cells=64, kappa0=None,
                  acc=[acc_softmax] * 5, n_train=n, train_fraction=n / 1000)
    result = build_report([tmp_path / "runs"], tmp_path / "out", n_maps=0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Learning curves: accuracy and NLL against training-set size" in md
    assert "](figures/learning_curves.png)" in md and (tmp_path / "out" / "figures" / "learning_curves.png").exists()
    assert re.search(r"\*\*Claim 5\.\*\* The MvMF reaches a given accuracy with less training data .*"
                     r"Verdict: \*\*holds\*\*", md)
    # report.md escapes link syntax in generated text: the brackets render as [29.0, 31.0]
    assert r"| n=100 (f=0.1) @25 km | mvmf (mvmf-c64-k16-f0.1) 30.0% \[29.0, 31.0\] vs softmax" in md
    assert len(result.runs) == 4
    # the table tells the runs of one head apart by their training rows
    assert "| head | c | κ0 | prediction | train rows |" in md and md.count("| 1,000 |") == 2
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / "out" / "table.parquet").to_pylist()
    assert sorted((r["run"], r["n_train"], r["train_fraction"]) for r in table)[:2] == [
        ("mvmf-c64-k16-f0.1", 100, 0.1), ("mvmf-c64-k16-f1", 1000, 1.0)]


def test_kappa0_note_gives_the_half_mass_radius_of_each_kappa0(tmp_path):
    from geo.reports.runs import find_runs
    from geo.reports.tables import kappa0_note

    write_run(tmp_path / "a", head="mvmf", kappa0=16.0)
    write_run(tmp_path / "b", head="mvmf", kappa0=8.0)
    write_run(tmp_path / "c", head="softmax", kappa0=None)
    runs, _ = find_runs([tmp_path])
    # kappa = e^16 holds half its mass within ~2.52 km (DESIGN.md); e^8: sqrt(2 ln 2 / e^8) rad = 137.4 km.
    assert kappa0_note(runs) == ("Half of an initial MvMF component's mass lies within "
                                 "(κ0 = 8: 137 km, κ0 = 16: 2.52 km).")
    assert kappa0_note([r for r in runs if r.head == "softmax"]) == ""


def test_report_of_heads_without_cells_draws_their_maps_and_no_partition(tmp_path):
    # retrieval and regression runs have no partition: the report still draws their density maps
    from geo.training.config import FitConfig
    from geo.training.sweep import sweep
    from support.caches import make_location_cache

    cache = make_location_cache(tmp_path / "c.h5", n=600)
    sweep(cache, tmp_path / "sw", heads=["knn", "regression"], n_cells=[16], kappa0s=[12.0],
          base_config=FitConfig(batch_size=128, epochs=1, precision="fp32", device="cpu"), progress=False)
    build_report([tmp_path / "sw"], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "figures/density_maps.png" in text and "partition.png" not in text
    assert (tmp_path / "report" / "figures" / "density_maps.png").exists()
