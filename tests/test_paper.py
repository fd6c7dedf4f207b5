"""The whole-paper command (runner/paper.py): its plan (the figure list of configs/sweep/paper.yaml, overrides
where a unit has the key, figure-scoped ones) and pass counts (each experiment module's `passes`), bad input
refused before anything runs, and a run of two figures on the organism that resumes, times, draws and goes on
past a failing unit."""

import json
from pathlib import Path

import pytest

import runner
import runner.paper as paper
from data_gen.whatsup import split_composites, split_sizes
from runner.paper import main, plan, unit_passes
from tests.helpers import load_twin

REPO = Path(__file__).resolve().parent.parent


def test_plan_covers_every_figure_and_counts_passes_from_the_configs():
    figures = plan(["model=organism", "n_pairs=3", "device=cpu"]).figures
    names = [figure.name for figure in figures]
    assert names[:8] == ["table1_accuracy", "fig02_last_token", "fig06_object_patching", "fig07_strip_patching",
                         "table2_ablation", "fig08_ablated_patching", "fig04_probes", "fig31_grid_probes"]
    last_token = figures[1].units[0]
    assert last_token.model.name == "organism" and len(figures[1].units) == 3       # squares, shapes, objects
    assert unit_passes(last_token) == {"lm": 6, "vision": 6, "patched": 3 * 4}       # 4 LM layers
    strip = figures[3].units[0]
    assert unit_passes(strip)["patched"] == 3 * 5                                   # + the visual embeddings
    ablated = figures[5].units[0]
    assert unit_passes(ablated)["vision"] == len(ablated.setting["items"]) * 2 + 1   # each item alone per orientation, + empty
    assert all(figure.name not in ("fig33_whatsup_probes", "table3_amplification") for figure in figures)
    with_whatsup = plan(["model=organism", "data.whatsup_dir=/nowhere", "data.whatsup_boxes=/nowhere/b.json",
                         "figures=table3_amplification"]).figures
    assert [figure.name for figure in with_whatsup] == ["table3_amplification"]
    # Table 3 (steering.run.passes): protocol val_test runs every grid on val (2 x 108 samples x 61 full forwards:
    # the recorded plain one, 15 alphas, 15 x 3 random; and 11 last positions replayed: 6 ScalingVis coefficients,
    # which AdaptVis' grid reads, + 5 reweighting), each method once on test (2 x 322 x (5 full + 3 replayed)),
    # none on train (2 x 644); protocol=paper runs every grid on all 1074 composites
    table3 = unit_passes(with_whatsup[0].units[0])
    assert table3["lm"] == 2 * 108 * 61 + 2 * 322 * 5 + 2 * 644 == 17_684
    assert table3["replayed"] == 2 * 108 * 11 + 2 * 322 * 3
    paper = plan(["model=organism", "data.whatsup_dir=/nowhere", "data.whatsup_boxes=/nowhere/b.json",
                  "figures=table3_amplification", "protocol=paper"]).figures
    assert unit_passes(paper[0].units[0])["lm"] == 2 * 1074 * 61
    assert unit_passes(paper[0].units[0])["replayed"] == 2 * 1074 * 11


def test_whatsup_pass_counts_use_the_splitters_own_sizes():
    """1074 composites split 0.6 / 0.1 / 0.3 by the splitter's rounding: the plan counts the same."""
    sizes = split_sizes(1074, {"train": 0.6, "val": 0.1, "test": 0.3})
    assert sizes == {name: len(part) for name, part in split_composites(list(range(1074)), {
        "train": 0.6, "val": 0.1, "test": 0.3}, seed=0).items()} and sum(sizes.values()) == 1074
    cfg = plan(["model=organism", "data.whatsup_dir=/nowhere", "figures=table1_accuracy", "setting=whatsup",
                "split=test"]).figures[0].units[0]
    assert unit_passes(cfg) == {"lm": 2 * sizes["test"], "vision": 2 * sizes["test"], "patched": 0}


def test_overrides_go_where_the_key_is_and_figure_scoped_ones_to_that_figure_only():
    figures = {f.name: f for f in plan(["model=organism", "n=16", "table2_ablation:n=96",
                                        "figures=table1_accuracy,table2_ablation"]).figures}
    assert {cfg.n for cfg in figures["table1_accuracy"].units} == {16}
    assert {cfg.n for cfg in figures["table2_ablation"].units} == {96}
    with pytest.raises(Exception, match="n_pair: no unit of the figures run has such a key; did you mean n_pairs"):
        plan(["model=organism", "figures=fig02_last_token", "n_pair=3"])
    with pytest.raises(Exception, match="no figure 'fig99'"):
        plan(["fig99:n=3"])


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    assert main(["--dry-run", "model=organism", f"results_dir={tmp_path}",
                 "figures=fig07_strip_patching,table1_accuracy"]) == 0
    out = capsys.readouterr().out
    assert "fig07_strip_patching" in out and "patched runs" in out and "0/3 done" in out
    assert not any(tmp_path.iterdir())
    assert main(["--dry-run", "figures=fig99"]) == 2


def test_bad_input_stops_the_run_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(paper, "load_model", lambda cfg: pytest.fail("a model loaded"))
    code = main(["model=organism", "device=cpu", f"results_dir={tmp_path}", "figures=fig02_last_token",
                 "layers=[0,9]"])
    assert code == 2 and "layer 9 is out of range for organism" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_two_figures_run_resume_time_and_draw(tmp_path, capsys, monkeypatch):
    load_twin("organism")
    monkeypatch.setattr(paper, "load_model", lambda cfg: load_twin(cfg.model.name))
    args = ["model=organism", "device=cpu", f"results_dir={tmp_path / 'r'}", f"figures_dir={tmp_path / 'f'}",
            "figures=fig02_last_token,table1_accuracy", "setting=squares", "n=4", "n_pairs=1", "layers=[0,3]"]
    assert main(args) == 0
    out = capsys.readouterr().out
    timings = json.loads((tmp_path / "r" / "timings.json").read_text())
    assert timings["fig02_last_token"]["units_run"] == 1 and timings["fig02_last_token"]["patched_runs"] == 2
    assert timings["fig02_last_token"]["patched_runs_per_s"] > 0
    assert (tmp_path / "f" / "fig02_last_token" / "last_token.png").is_file() and "total" in out
    assert "drew 2 figures" in out and "\x1b[" not in out and "Loading weights" not in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith(("accuracy", "last_token"))] == \
        ["accuracy organism squares", "last_token organism squares"]
    assert main(args) == 0                                               # finished units are skipped
    assert json.loads((tmp_path / "r" / "timings.json").read_text())["fig02_last_token"]["units_run"] == 0


def test_a_failing_unit_is_reported_and_the_others_run(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_execute(cfg, loader):
        calls.append(cfg.setting.name)
        if cfg.setting.name == "shapes":
            raise RuntimeError("injected")
        return "done"
    monkeypatch.setattr(paper, "execute", fake_execute)
    monkeypatch.setattr(paper, "draw", lambda *a: (True, ""))
    the_plan = plan(["model=organism", "device=cpu", f"results_dir={tmp_path}", "figures=table1_accuracy"])
    timings, problems = paper.run(the_plan.figures, str(tmp_path), tmp_path / "f", tmp_path / "timings.json")
    assert calls == ["squares", "shapes", "objects"] and timings["table1_accuracy"]["units_run"] == 2
    assert problems == ["failed: table1_accuracy shapes: RuntimeError: injected"]


def test_timings_are_written_after_every_unit(tmp_path, monkeypatch):
    """A run stopped part-way (a time limit, an interrupt) leaves the timings of the units it finished."""
    figures = plan(["model=organism", "device=cpu", f"results_dir={tmp_path}", "figures=table1_accuracy"]).figures
    calls = []

    def fake_execute(cfg, loader):
        calls.append(cfg.setting.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return "done"

    monkeypatch.setattr(paper, "execute", fake_execute)
    with pytest.raises(KeyboardInterrupt):
        paper.run(figures, str(tmp_path), tmp_path / "f", tmp_path / "timings.json")
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert calls == ["squares", "shapes"] and timings["table1_accuracy"]["units_run"] == 1


def test_the_runner_and_the_paper_share_one_skeleton():
    assert paper.execute is runner.execute and paper.prepare is runner.prepare
