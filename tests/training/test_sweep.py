"""geo.training.sweep: a grid of heads in one process equals the same heads fitted one by one."""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from support.caches import make_location_cache
from geo.cli import cli
from geo.errors import ConfigError
from geo.heads import create_head
from geo.training.sweep import estimate_memory_bytes, schedule_groups, sweep, sweep_grid
from geo.training.config import FitConfig
from geo.training.fit import fit_head

# Small and fast: 1050 train rows, 4 batches per epoch, 2 epochs, an evaluation every 3 steps.
BASE = FitConfig(batch_size=300, epochs=2, lr=5e-2, precision="fp32", device="cpu", eval_every=3)
GRID = dict(heads=["mvmf", "softmax"], n_cells=[24], kappa0s=[8.0, 12.0])
NAMES = ["mvmf-c24-k8", "mvmf-c24-k12", "softmax-c24"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_location_cache(tmp_path_factory.mktemp("cache") / "loc.h5", n=1500)


@pytest.fixture(scope="module")
def whole(cache, tmp_path_factory):
    """An uninterrupted sweep, all heads in one group."""
    out = tmp_path_factory.mktemp("whole")
    return out, sweep(cache, out, base_config=BASE, progress=False, **GRID)


def _strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("train_elapsed_s", "elapsed_s", "knn_search_s", "knn_index_search_s")}


def _log(run_dir):
    return [_strip(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a, b):
    """Two run directories hold the same training: config, log, checkpoint tensors, metrics, predictions."""
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert _log(a) == _log(b)
    assert _strip(json.loads((a / "metrics.json").read_text())) == _strip(json.loads((b / "metrics.json").read_text()))
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    for key in ("head_state", "partition"):
        assert (ca[key] is None) == (cb[key] is None), key  # heads without cells have no partition
        for name, value in (ca[key] or {}).items():
            assert torch.equal(value, cb[key][name]), (key, name)
    for name, value in ca["best"]["head_state"].items():
        assert torch.equal(value, cb["best"]["head_state"][name]), ("best", name)
    for i, state in ca["optimizer"].get("state", {}).items():  # a retrieval head has no optimizer
        for name, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][i][name]), ("optimizer", i, name)
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    assert pq.read_table(a / "predictions.parquet").equals(pq.read_table(b / "predictions.parquet"))


def test_the_grid_gives_softmax_one_run_per_c():
    grid = sweep_grid(["mvmf", "softmax"], [16, 64], [8, 16], BASE)
    assert [name for name, _ in grid] == ["mvmf-c16-k8", "mvmf-c16-k16", "mvmf-c64-k8", "mvmf-c64-k16",
                                          "softmax-c16", "softmax-c64"]
    assert {c.kappa0 for name, c in grid if c.head == "softmax"} == {BASE.kappa0}  # what fit-head would record
    grid = sweep_grid(["mvmf"], [16], [8], BASE, lrs=[1e-3, 3e-3])
    assert [(name, c.lr) for name, c in grid] == [("mvmf-c16-k8-lr0.001", 1e-3), ("mvmf-c16-k8-lr0.003", 3e-3)]


@pytest.mark.parametrize("name, config", [("mvmf-c24-k12", dict(head="mvmf", kappa0=12.0)),
                                          ("softmax-c24", dict(head="softmax"))])
def test_sweep_heads_equal_fit_head_heads(cache, whole, tmp_path, name, config):
    out, results = whole
    assert list(results) == NAMES
    alone = fit_head(cache, dataclasses.replace(BASE, n_cells=24, **config), tmp_path / name, progress=False)
    assert _strip(results[name]) == _strip(alone)
    _assert_same_run(out / name, tmp_path / name)


def test_fit_head_and_report_recognise_sweep_runs(cache, whole):
    from geo.reports.runs import find_runs

    out, results = whole
    found, skipped = find_runs([out])
    assert sorted(run.path.name for run in found) == sorted(NAMES) and not skipped
    before = (out / "softmax-c24" / "metrics.jsonl").read_text()
    again = fit_head(cache, dataclasses.replace(BASE, head="softmax", n_cells=24), out / "softmax-c24", progress=False)
    assert _strip(again) == _strip(results["softmax-c24"])  # resumed at its last step: nothing retrained
    assert (out / "softmax-c24" / "metrics.jsonl").read_text() == before
    record = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in record["runs"]] == NAMES and record["groups"][0]["runs"] == NAMES


def test_killed_sweep_in_groups_resumes_without_retraining_finished_heads(cache, whole, tmp_path):
    steps = []

    def kill_in_the_second_group(name, step, loss):
        steps.append(name)
        if len(steps) == 8 + 5:  # 8 steps per head: the first group is done, the second at step 5
            raise KeyboardInterrupt

    # 0.1 MB: less than any two of these heads (~0.13 MB each): one head per group, one group after another.
    with pytest.raises(KeyboardInterrupt):
        sweep(cache, tmp_path, base_config=BASE, progress=False, max_memory_mb=0.1,
              callback=kill_in_the_second_group, **GRID)
    groups = [g["runs"] for g in json.loads((tmp_path / "sweep.json").read_text())["groups"]]
    assert sorted(map(len, groups)) == [1, 1, 1]
    first, second, third = (g[0] for g in groups)
    assert steps == [first] * 8 + [second] * 5
    assert (tmp_path / first / "metrics.json").exists() and not (tmp_path / second / "metrics.json").exists()
    mtime = (tmp_path / first / "metrics.json").stat().st_mtime_ns

    steps.clear()
    results = sweep(cache, tmp_path, base_config=BASE, progress=False, max_memory_mb=0.1,
                    callback=lambda name, step, loss: steps.append((name, step)), **GRID)
    # the finished head is not retrained; the killed one resumes from its step-3 checkpoint
    assert (tmp_path / first / "metrics.json").stat().st_mtime_ns == mtime
    assert steps == [(second, s) for s in range(4, 9)] + [(third, s) for s in range(1, 9)]
    out, expected = whole
    for name in NAMES:  # trained in groups or together, killed or not: the same heads
        assert _strip(results[name]) == _strip(expected[name])
        _assert_same_run(tmp_path / name, out / name)


def test_heads_resumed_from_different_checkpoints_catch_up_together(cache, whole, tmp_path):
    calls = []

    def kill(name, step, loss):  # heads run in turn on each batch: step 6 of the first, step 5 of the rest
        calls.append(name)
        if len(calls) == 3 * 5 + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(cache, tmp_path, base_config=BASE, progress=False, callback=kill, **GRID)
    saved = {n: torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["step"] for n in NAMES}
    assert sorted(saved.values()) == [3, 3, 6]
    results = sweep(cache, tmp_path, base_config=BASE, progress=False, **GRID)
    out, expected = whole
    for name in NAMES:
        assert _strip(results[name]) == _strip(expected[name])
        _assert_same_run(tmp_path / name, out / name)


def test_memory_estimate_counts_the_head_parameters(cache):
    from geo.cache.store import FeatureCache
    from geo.sphere.partition import Partition
    from geo.training.config import resolve_config

    with FeatureCache(cache) as c:
        train = c.split_rows("train")
        partition = Partition.build(c.lat_deg[train], c.lon_deg[train], 24)
        for head in ("mvmf", "softmax"):
            config = resolve_config(dataclasses.replace(BASE, head=head, n_cells=24), c, cache, len(train), 10)
            n_params = sum(p.numel() for p in create_head(head, feature_dim=c.feature_dim, partition=partition)
                           .parameters())
            persistent, temporary = estimate_memory_bytes(config, c.feature_dim)
            assert persistent == 4 * 5 * n_params  # fp32: weights, gradient, 2 moments, best copy
            assert temporary == config["chunk_rows"] * 24 * 16


def test_groups_fit_the_budget_largest_first():
    mb = 2**20
    sizes = {"a": (4 * mb, 1 * mb), "b": (2 * mb, 3 * mb), "c": (1 * mb, 1 * mb), "d": (9 * mb, 0)}
    # d alone exceeds 8 MB: a group of its own; then a (5 MB), b (a + b = 6 + 3 = 9 > 8: new group), c joins a
    assert schedule_groups(sizes, 8 * mb) == [["d"], ["a", "c"], ["b"]]
    assert schedule_groups(sizes, 100 * mb) == [["a", "b", "c", "d"]]


def test_bad_input_is_refused_before_anything_is_written(cache, tmp_path):
    for grid, match in [(dict(heads=[]), "--head: the list is empty"),
                        (dict(n_cells=[]), "--n-cells: the list is empty"),
                        (dict(heads=["mvmf"], kappa0s=[]), "--kappa0: the list is empty"),
                        (dict(heads=["mvmf", "planet"]), "unknown head 'planet'; known heads: .*mvmf.*softmax"),
                        (dict(n_cells=[24, 10**6]), r"--n-cells 1000000: more cells than the \d+ rows of the train split"),
                        (dict(heads=["mvmf", "softmax"], n_cells=[3]), "--n-cells 3: .*at least 6")]:
        with pytest.raises(ConfigError, match=match):
            sweep(cache, tmp_path / "out", base_config=BASE, progress=False, **{**GRID, **grid})
    assert not (tmp_path / "out").exists()
    # a directory holding another configuration is refused, naming the difference
    sweep(cache, tmp_path / "out", base_config=dataclasses.replace(BASE, epochs=1), progress=False,
          heads=["softmax"], n_cells=[24])
    with pytest.raises(ConfigError, match="softmax-c24 holds a run with a different configuration.*epochs: 1 -> 2"):
        sweep(cache, tmp_path / "out", base_config=BASE, progress=False, heads=["softmax"], n_cells=[24])


CLI_ARGS = ["--n-cells", "24", "--batch-size", "256", "--epochs", "1", "--lr", "0.05", "--device", "cpu",
            "--precision", "fp32", "--quiet"]


def test_cli_sweep_prints_a_table_and_where_the_runs_are(cache, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["sweep", str(cache), "--head", "mvmf,softmax", "--kappa0", "8,16", *CLI_ARGS,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("mvmf-c24-k8", "mvmf-c24-k16", "softmax-c24"):
        assert name in result.output and (out / name / "metrics.json").exists()
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert f"{100 * metrics['acc@750km']:.1f}" in result.output.split(name)[1].splitlines()[0]
        assert 0 <= metrics["country_acc"] <= 1  # the CLI passes the offline country lookup
    assert str(out) in result.output and "geo report" in result.output
    config = json.loads((out / "mvmf-c24-k16" / "config.json").read_text())
    assert config["kappa0"] == 16.0 and config["lr"] == 0.05 and config["epochs"] == 1

    result = CliRunner().invoke(cli, ["sweep", str(cache), "--head", "mvmf,nope", *CLI_ARGS, "--out", str(out)])
    assert result.exit_code == 2 and "Error: unknown head 'nope'; known heads:" in result.output
    result = CliRunner().invoke(cli, ["sweep", str(cache), "--n-cells", "16,x", "--out", str(out)])
    assert result.exit_code == 2 and "comma-separated list of int" in result.output


def test_cli_sweep_defaults_are_the_fit_head_defaults():
    fit = {p.name: p.default for p in cli.commands["fit-head"].params}
    for param in cli.commands["sweep"].params:
        if param.name in fit and param.name not in ("out", "overwrite", "quiet", "max_memory_mb"):
            assert param.default == fit[param.name], param.name
    result = CliRunner().invoke(cli, ["sweep", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


# ---- learning curves: --train-fraction -------------------------------------------------------------------

def test_the_grid_tags_train_fractions_only_when_the_sweep_varies_them():
    grid = sweep_grid(["mvmf", "softmax"], [16], [8], BASE, train_fractions=[0.1, 1])
    assert [(name, c.train_fraction) for name, c in grid] == [
        ("mvmf-c16-k8-f0.1", 0.1), ("mvmf-c16-k8-f1", 1.0), ("softmax-c16-f0.1", 0.1), ("softmax-c16-f1", 1.0)]
    grid = sweep_grid(["softmax"], [16], [8], BASE, train_fractions=[0.5])
    assert [(name, c.train_fraction) for name, c in grid] == [("softmax-c16", 0.5)]
    for bad, match in [([], "--train-fraction: the list is empty"), ([0.5, 0], r"--train-fraction must be in \(0, 1\]")]:
        with pytest.raises(ConfigError, match=match):
            sweep_grid(["softmax"], [16], [8], BASE, train_fractions=bad)


def test_learning_curve_sweep_trains_each_fraction_on_its_nested_subset_like_fit_head(cache, whole, tmp_path,
                                                                                     monkeypatch):
    from geo.cache.store import FeatureCache
    from geo.sphere.partition import Partition
    from geo.training.subsets import train_subset
    from geo.training.trainer import HeadTrainer

    seen: dict[str, set] = {}
    step = HeadTrainer.step

    def recording_step(self, rows, x):
        seen.setdefault(self.out_dir.name, set()).update(rows.tolist())
        return step(self, rows, x)

    monkeypatch.setattr(HeadTrainer, "step", recording_step)
    out = tmp_path / "curves"
    results = sweep(cache, out, base_config=BASE, progress=False, heads=["mvmf", "softmax"], n_cells=[24],
                    kappa0s=[12.0], train_fractions=[0.4, 1.0])
    names = ["mvmf-c24-k12-f0.4", "mvmf-c24-k12-f1", "softmax-c24-f0.4", "softmax-c24-f1"]
    assert list(results) == names
    with FeatureCache(cache) as c:
        train = c.split_rows("train")
        subset = train_subset(train, 0.4, BASE.seed)
        lat, lon = c.lat_deg[subset], c.lon_deg[subset]
    for name in names:
        config = json.loads((out / name / "config.json").read_text())
        rows = subset if name.endswith("f0.4") else train
        assert seen[name] == set(rows.tolist())  # every batch from the run's subset, the whole subset seen
        assert (config["train_fraction"], config["n_train"], config["n_train_split"], config["train_subset_seed"]) \
            == (0.4 if name.endswith("f0.4") else 1.0, rows.size, train.size, BASE.seed)
        assert config["steps_per_epoch"] == -(-rows.size // BASE.batch_size)
    assert round(0.4 * train.size) == subset.size and set(subset.tolist()) < set(train.tolist())
    # the partition of a fraction is built from the locations of its rows only
    partition = torch.load(out / "mvmf-c24-k12-f0.4" / "checkpoint.pt", weights_only=True)["partition"]
    for key, value in Partition.build(lat, lon, 24).state_dict().items():
        assert torch.equal(torch.as_tensor(partition[key]), torch.as_tensor(value)), key
    # heads of one fraction are trained together, never with another fraction's
    groups = [g["runs"] for g in json.loads((out / "sweep.json").read_text())["groups"]]
    assert groups == [["mvmf-c24-k12-f0.4", "softmax-c24-f0.4"], ["mvmf-c24-k12-f1", "softmax-c24-f1"]]
    # a fraction's run is what fit-head gives with that fraction; fraction 1 is the plain run
    monkeypatch.setattr(HeadTrainer, "step", step)
    alone = fit_head(cache, dataclasses.replace(BASE, head="mvmf", n_cells=24, kappa0=12.0, train_fraction=0.4),
                     tmp_path / "alone", progress=False)
    assert _strip(alone) == _strip(results["mvmf-c24-k12-f0.4"])
    _assert_same_run(tmp_path / "alone", out / "mvmf-c24-k12-f0.4")
    _assert_same_run(out / "mvmf-c24-k12-f1", whole[0] / "mvmf-c24-k12")


def test_heads_on_different_fractions_are_not_trained_together(cache, tmp_path):
    from geo.cache.store import FeatureCache
    from geo.training.config import resolve_config
    from geo.training.trainer import HeadTrainer, train_together

    with FeatureCache(cache) as c:
        n_train, n_val = len(c.split_rows("train")), len(c.split_rows("val"))
        for f in (0.5, 1.0):
            (tmp_path / str(f)).mkdir()
        trainers = [HeadTrainer(c, resolve_config(dataclasses.replace(BASE, head="softmax", n_cells=24,
                                                                      train_fraction=f), c, cache, n_train, n_val),
                                tmp_path / str(f), resume=False) for f in (0.5, 1.0)]
        with pytest.raises(ConfigError, match="must share batch_size, seed, device, precision and train_fraction"):
            train_together(c, trainers)


def test_cli_train_fraction(cache, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["sweep", str(cache), "--head", "softmax", "--train-fraction", "0.5,1",
                                      *CLI_ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name, fraction in (("softmax-c24-f0.5", 0.5), ("softmax-c24-f1", 1.0)):
        assert name in result.output
        assert json.loads((out / name / "config.json").read_text())["train_fraction"] == fraction
    result = CliRunner().invoke(cli, ["fit-head", str(cache), "--head", "softmax", "--train-fraction", "0.25",
                                      *CLI_ARGS, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["train_fraction"] == 0.25 and config["n_train"] == round(0.25 * config["n_train_split"])
    for command in ("fit-head", "sweep"):
        result = CliRunner().invoke(cli, [command, str(cache), "--train-fraction", "1.5", *CLI_ARGS,
                                          "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2 and "Error: --train-fraction must be in (0, 1], not 1.5" in result.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_every_head_family_in_one_sweep_trains_as_fit_head_does(cache, tmp_path):
    # one head of every family (cells, hierarchical cells, input-dependent vMFs, regression, retrieval)
    heads = ["softmax-hier", "vmf", "vmf-mixture", "regression", "knn"]
    sweep(cache, tmp_path / "sweep", heads=heads, n_cells=[24], kappa0s=[12.0], base_config=BASE, progress=False)
    for head in heads:
        fit_head(cache, dataclasses.replace(BASE, head=head, n_cells=24), tmp_path / "alone" / head, progress=False)
        _assert_same_run(tmp_path / "sweep" / f"{head}-c24", tmp_path / "alone" / head)


@pytest.mark.slow
def test_a_flow_head_in_a_sweep_trains_as_fit_head_does(cache, tmp_path):
    # a tiny field and best-of-2 (every evaluation solves ODEs for each val row); one epoch, one evaluation
    base = dataclasses.replace(BASE, epochs=1, eval_every=4, flow_width=16, flow_depth=1, flow_samples=2)
    sweep(cache, tmp_path / "sweep", heads=["flow", "softmax"], n_cells=[24], kappa0s=[12.0], base_config=base,
          progress=False)
    alone = fit_head(cache, dataclasses.replace(base, head="flow", n_cells=24), tmp_path / "alone", progress=False)
    _assert_same_run(tmp_path / "sweep" / "flow-c24", tmp_path / "alone")
    config = json.loads((tmp_path / "alone" / "config.json").read_text())
    assert config["head_options"]["width"] == 16 and config["head_options"]["n_samples"] == 2
    assert alone["nll_nats"] is not None and alone["predict"] == "best"
