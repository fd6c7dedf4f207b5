"""The whole-paper command (runner/paper.py): its plan and pass counts, and a run of two figures on the organism."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import runner.paper as paper
from runner.paper import main, plan, unit_passes

REPO = Path(__file__).resolve().parent.parent


def test_plan_covers_every_figure_and_counts_passes_from_the_configs():
    figures = plan(["model=organism", "n_pairs=3", "device=cpu"])
    names = [figure.name for figure in figures]
    assert names[:8] == ["table1_accuracy", "fig02_last_token", "fig06_object_patching", "fig07_strip_patching",
                         "table2_ablation", "fig08_ablated_patching", "fig04_probes", "fig31_grid_probes"]
    last_token = figures[1].units[0]
    assert last_token.model.name == "organism" and len(figures[1].units) == 3       # squares, shapes, objects
    assert unit_passes(last_token) == {"lm": 6, "vision": 6, "patched": 3 * 4}       # 4 LM layers
    strip = figures[3].units[0]
    assert unit_passes(strip)["patched"] == 3 * 5                                   # + the visual embeddings
    assert all(figure.name not in ("fig33_whatsup_probes", "table3_amplification") for figure in figures)
    with_whatsup = plan(["model=organism", "data.whatsup_dir=/nowhere", "figures=table3_amplification"])
    assert [figure.name for figure in with_whatsup] == ["table3_amplification"]
    # Table 3 (steering.run.passes): protocol val_test runs every grid on val (2 x 108 samples x 72 passes: none,
    # 15 alphas, 15 x 3 random, 6 ScalingVis + 5 reweighting), each method once on test (2 x 322 x 8), none on
    # train (2 x 644); protocol=paper runs every grid on all 1074 composites
    assert unit_passes(with_whatsup[0].units[0])["lm"] == 2 * 108 * 72 + 2 * 322 * 8 + 2 * 644 == 21_992
    paper = plan(["model=organism", "data.whatsup_dir=/nowhere", "figures=table3_amplification", "protocol=paper"])
    assert unit_passes(paper[0].units[0])["lm"] == 2 * 1074 * 72


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    assert main(["--dry-run", "model=organism", f"results_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "fig07_strip_patching" in out and "patched runs" in out and "0/3 done" in out
    assert not any(tmp_path.iterdir())
    assert main(["--dry-run", "figures=fig99"]) == 2


def test_two_figures_run_resume_and_time(tmp_path):
    args = [sys.executable, "-m", "runner.paper", "model=organism", "device=cpu", f"results_dir={tmp_path / 'r'}",
            f"figures_dir={tmp_path / 'f'}", "figures=fig02_last_token,table1_accuracy", "setting=squares",
            "n=4", "n_pairs=1", "layers=[0,3]"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    timings = json.loads((tmp_path / "r" / "timings.json").read_text())
    assert timings["fig02_last_token"]["units_run"] == 1 and timings["fig02_last_token"]["patched_runs"] == 2
    assert timings["fig02_last_token"]["patched_runs_per_s"] > 0
    assert (tmp_path / "f" / "fig02_last_token").is_dir() and "total" in done.stdout
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True)       # finished units are skipped
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "r" / "timings.json").read_text())["fig02_last_token"]["units_run"] == 0


def test_timings_are_written_after_every_unit(tmp_path, monkeypatch):
    """A run stopped part-way (a time limit, a failing unit) leaves the timings of the units it finished."""
    figures = plan(["model=organism", "device=cpu", f"results_dir={tmp_path}", "figures=table1_accuracy"])
    calls = []

    def fake_run_unit(cfg, loader):
        calls.append(cfg.setting.name)
        if len(calls) == 2:
            raise RuntimeError("stopped")

    monkeypatch.setattr(paper, "run_unit", fake_run_unit)
    with pytest.raises(RuntimeError, match="stopped"):
        paper.run(figures, str(tmp_path), tmp_path / "f", tmp_path / "timings.json")
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert calls == ["squares", "shapes"] and timings["table1_accuracy"]["units_run"] == 1
