"""The one runner: every experiment config composes and runs on the organism at tiny sizes, names its own
function, figures and sweeps name each other, multiruns (basic and submitit_local launchers) write one unit per
job and never share one, and a wrong experiment, model, setting or launcher is one line naming what is allowed.
Commands run in-process (`runner.main(argv)`) except where a separate process is the point (submitit, a figure
script)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import runner as runner_module
from common.cli import CONFIG_DIR, group_choices
from common.results import find_units, load_unit, unit_dir
from runner import experiment_function, run_unit
from tests.helpers import TINY_SIZES, load_twin, make_cfg, tiny_overrides

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = group_choices("experiment")


def test_every_experiment_has_tiny_sizes_here():
    assert set(TINY_SIZES) == set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_runs_on_the_organism(experiment, tmp_path, stand_in):
    cfg = make_cfg("model=organism", f"experiment={experiment}", f"results_dir={tmp_path}",
                   *tiny_overrides(experiment, stand_in))
    if "embeddings_dir" in cfg:
        cfg.embeddings_dir = str(tmp_path / "emb")
    assert cfg.experiment.name == experiment and callable(experiment_function(cfg))
    out = run_unit(cfg, lambda: load_twin("organism"))
    assert out == unit_dir(cfg) == tmp_path / experiment / "organism" / cfg.setting.name
    record, _ = load_unit(out)
    assert record["config"]["experiment"]["name"] == experiment and record["metrics"]
    assert find_units(tmp_path, experiment) == [out]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_an_experiment_names_its_own_function_and_its_figure_has_a_plot_and_a_sweep(experiment):
    raw = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml")
    assert raw.experiment.run == make_cfg(f"experiment={experiment}").experiment.run    # not inherited
    assert raw.experiment.run.rpartition(".")[2] in (experiment, "probes", "ablation", "benchmark", "accuracy",
                                                      "amplification")
    figure = raw.experiment.figure
    if figure is None:
        return
    assert (REPO / "figures" / figure / "plot.py").is_file() and (REPO / "scripts" / f"{figure}.sh").is_file()
    sweep = make_cfg(f"sweep={figure}")
    assert sweep.experiment.name == experiment


def test_every_sweep_is_a_multirun_over_models_and_settings():
    for name in group_choices("sweep"):
        params = OmegaConf.load(Path(CONFIG_DIR) / "sweep" / f"{name}.yaml").hydra.sweeper.params
        assert set(params) == {"model", "setting"}, name
        assert (REPO / "figures" / name / "plot.py").is_file(), name


def test_the_figure_order_is_written_once():
    """configs/sweep/paper.yaml is the only list of the figures: runner.paper and the demo read it."""
    from runner.paper import figure_list

    sweeps = [entry["sweep"] for entry in figure_list()]
    assert set(sweeps) == set(group_choices("sweep")) and "paper" not in group_choices("sweep")
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "runner.paper" in demo
    assert [name for name in set(sweeps) if name in demo] == ["table2_ablation"]     # only its size: n=96
    code = ast.parse((REPO / "runner" / "paper.py").read_text())
    strings = [node.value for node in ast.walk(code) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert not [text for text in strings[1:] if any(name in text for name in sweeps)]    # past its docstring


@pytest.fixture
def cached_organism(monkeypatch):
    load_twin("organism")                # outside Hydra's job, which cannot compose another config
    monkeypatch.setattr(runner_module, "load_model", lambda cfg: load_twin(cfg.model.name))


def runner(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_a_multirun_over_two_settings_writes_two_units(tmp_path, cached_organism, capsys):
    code = runner_module.main(["-m", "experiment=last_token", "model=organism", "setting=squares,shapes",
                               "n_pairs=2", "layers=[3]", "device=cpu", f"results_dir={tmp_path / 'results'}",
                               f"cache_dir={tmp_path / 'cache'}"])
    assert code == 0 and "multirun: 2 jobs: 2 done" in capsys.readouterr().out
    units = sorted(p.relative_to(tmp_path / "results") for p in (tmp_path / "results").rglob("metrics.json"))
    assert units == [Path("last_token/organism/shapes/metrics.json"), Path("last_token/organism/squares/metrics.json")]


@pytest.mark.slow
def test_a_multirun_on_submitit_jobs_in_other_processes_writes_two_units_and_sums_up(tmp_path):
    done = runner("-m", "experiment=last_token", "model=organism", "setting=squares,shapes", "n_pairs=2",
                  "layers=[3]", "device=cpu", f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}",
                  "hydra/launcher=submitit_local")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "multirun: 2 jobs: 2 done, 0 skipped, 0 refused, 0 failed" in done.stdout
    units = sorted(p.relative_to(tmp_path / "results") for p in (tmp_path / "results").rglob("metrics.json"))
    assert units == [Path("last_token/organism/shapes/metrics.json"), Path("last_token/organism/squares/metrics.json")]
    assert not list(REPO.glob("multirun")) and not (REPO / "outputs").exists()   # Hydra's dirs stay in the cache


def test_a_multirun_sweeping_another_key_gives_each_job_its_own_unit(tmp_path, cached_organism):
    assert runner_module.main(["-m", "experiment=last_token", "model=organism", "setting=squares", "n_pairs=1",
                               "layers=[0],[3]", "device=cpu", f"results_dir={tmp_path}",
                               f"cache_dir={tmp_path / 'cache'}"]) == 0
    units = sorted(p.parent.name for p in tmp_path.rglob("metrics.json") if "cache" not in p.parts)
    assert units == ["layers=[0]", "layers=[3]"]
    for unit in units:
        record, arrays = load_unit(tmp_path / "last_token" / "organism" / "squares" / unit)
        assert record["config"]["variant_keys"] == ["layers"]
        assert list(arrays["sites"]) == [unit.split("[")[1].rstrip("]")]


@pytest.mark.parametrize("args,needle", [
    (["experiment=no_such"], "unknown experiment 'no_such'; allowed: ablated_patching, ablation, accuracy"),
    (["model=no_such"], "unknown model 'no_such'; allowed:"),
    (["-m", "setting=squares,no_such"], "unknown setting 'no_such'; allowed:"),
    (["-m", "hydra/launcher=no_such"], "unknown launcher 'no_such'; allowed:"),
    (["sweep=no_such"], "unknown sweep 'no_such'; allowed: fig02_last_token"),
])
def test_an_unknown_choice_is_one_line_naming_what_is_allowed(tmp_path, args, needle, capsys):
    assert runner_module.main([*args, "device=cpu", f"results_dir={tmp_path / 'results'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "results").exists()


def test_a_figure_script_runs_its_sweep_and_draws(tmp_path):
    done = subprocess.run(["bash", "scripts/fig02_last_token.sh", "model=organism", "setting=squares", "n_pairs=1",
                           "layers=[2,3]", "device=cpu", f"results_dir={tmp_path / 'results'}",
                           f"figures_dir={tmp_path / 'fig'}", f"cache_dir={tmp_path / 'cache'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "results/last_token/organism/squares/metrics.json").is_file()
    assert (tmp_path / "fig/last_token.png").is_file() and (tmp_path / "fig/summary.md").is_file()


def test_the_command_line_exits_with_the_code(tmp_path, monkeypatch, capsys):
    """`python -m runner` (main() reading sys.argv) exits with the code that main(argv) returns in-process."""
    monkeypatch.setattr(sys, "argv", ["runner", "experiment=accuracy", "model=organism", "n=0", "device=cpu",
                                      f"results_dir={tmp_path}"])
    with pytest.raises(SystemExit) as done:
        runner_module.main()
    assert done.value.code == 2 and capsys.readouterr().err.strip() == "error: n=0: expected an integer >= 1"
