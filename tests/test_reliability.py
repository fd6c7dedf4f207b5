"""Fault injection: each defect of "results you can trust" (a finished unit recognised by its path alone, a
corrupt unit taken for done, the results directory checked only when saving, a multirun stopped by one refusal,
sizes and types unchecked, bad What'sUp files, `+key` accepted silently, a folder that is not a checkpoint, one
shared temporary directory, layers checked after the weights load, exit codes that differ) as a test, plus a
process killed at random moments while it saves. Commands run in-process (`main(argv)`); the organism is loaded
once (conftest.load_twin) and the tests assert it is not loaded where bad input must stop first."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from omegaconf import OmegaConf

import runner
import runner.paper as paper
from common.cli import REPO_DIR, quiet_output, summary
from common.results import find_units, load_unit, save_unit, temporary_dir, unit_state
from data_gen.whatsup import write_stand_in
from tests.helpers import load_twin, make_cfg

MODEL = "dual_organism"


@pytest.fixture
def cached_model(monkeypatch):
    """The runner loads the organism once per test session (conftest.load_twin; loaded here, outside Hydra's
    job, which cannot compose another config)."""
    load_twin(MODEL)
    monkeypatch.setattr(runner, "load_model", lambda cfg: load_twin(cfg.model.name))


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must be refused before any model loads."""
    def refuse(cfg):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(runner, "load_model", refuse)


def run(tmp_path, *args) -> int:
    return runner.main([f"model={MODEL}", "device=cpu", f"results_dir={tmp_path / 'results'}",
                        f"cache_dir={tmp_path / 'cache'}", *args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# 1. a finished unit is recognised by its path alone ---------------------------------------------------------

def test_a_unit_asked_for_at_another_size_is_refused_then_redone(tmp_path, cached_model, capsys):
    assert run(tmp_path, "experiment=accuracy", "n=8") == 0
    unit = tmp_path / "results/accuracy" / MODEL / "squares"
    capsys.readouterr()
    assert run(tmp_path, "experiment=accuracy", "n=12") == 2
    line = one_error_line(capsys)
    assert "n=8 (asked 12)" in line and "redo=true" in line
    assert load_unit(unit)[0]["metrics"]["n"] == 8                       # untouched
    assert run(tmp_path, "experiment=accuracy", "n=8", "batch_size=3") == 0     # batch size: the same unit
    assert "skipping" in capsys.readouterr().out
    assert run(tmp_path, "experiment=accuracy", "n=12", "redo=true") == 0
    record, arrays = load_unit(unit)
    assert record["metrics"]["n"] == 12 and len(arrays["probs"]) == 12
    assert record["identity"]["n"] == 12 and "results_dir" not in record["identity"]


# 2. a corrupt unit counts as done -----------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate metrics", "truncate arrays", "drop arrays"])
def test_a_corrupt_unit_is_recomputed_and_never_drawn(tmp_path, cached_model, capsys, damage):
    assert run(tmp_path, "experiment=accuracy", "n=4") == 0
    unit = tmp_path / "results/accuracy" / MODEL / "squares"
    name = "metrics.json" if "metrics" in damage else "arrays.npz"
    if damage.startswith("drop"):
        (unit / name).unlink()
    else:
        (unit / name).write_bytes((unit / name).read_bytes()[:40])
    assert find_units(tmp_path / "results", "accuracy") == []            # the plots leave it out
    assert "not a finished unit" in capsys.readouterr().err
    assert run(tmp_path, "experiment=accuracy", "n=4") == 0
    assert "recomputing" in capsys.readouterr().out
    assert load_unit(unit)[0]["metrics"]["n"] == 4
    assert find_units(tmp_path / "results", "accuracy") == [unit]


# 3. the results directory is checked only when saving ----------------------------------------------------------

def test_a_results_dir_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, no_model, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert runner.main([f"model={MODEL}", "device=cpu", "experiment=accuracy", f"results_dir={blocker}"]) == 2
    assert "is a file, not a directory" in one_error_line(capsys)
    assert runner.main([f"model={MODEL}", "device=cpu", "experiment=accuracy", f"results_dir={blocker}/sub"]) == 2
    assert "is a file, not a directory" in one_error_line(capsys)
    assert runner.main([f"model={MODEL}", "device=cpu", "experiment=accuracy", "results_dir=/proc/results"]) == 2
    assert "cannot write into /proc" in one_error_line(capsys)


# 4. one refusal stops the rest of a multirun; a crash is "failed" ----------------------------------------------

def test_a_multirun_goes_on_past_a_refused_job_and_sums_up(tmp_path, cached_model, capsys):
    code = run(tmp_path, "-m", "experiment=accuracy", "setting=squares,whatsup,shapes", "n=4")
    captured = capsys.readouterr()
    out = captured.out
    assert code == 2, captured
    assert "multirun: 3 jobs: 2 done, 0 skipped, 1 refused, 0 failed" in out, captured.err
    assert "refused: setting=whatsup: data.whatsup_dir is not set" in out
    assert {u.name for u in find_units(tmp_path / "results", "accuracy")} == {"squares", "shapes"}
    code = run(tmp_path, "-m", "experiment=last_token", "n_pairs=1", "layers=[0],[99],[1]")
    out = capsys.readouterr().out
    assert code == 2 and "refused: layers=[99]: layer 99 is out of range" in out
    units = sorted(p.name for p in (tmp_path / "results/last_token" / MODEL / "squares").iterdir())
    assert units == ["layers=[0]", "layers=[1]"]
    assert run(tmp_path, "-m", "experiment=accuracy", "setting=squares,shapes", "n=4") == 0     # both skipped
    assert "2 skipped" in capsys.readouterr().out


def test_a_crashing_job_is_failed_and_the_rest_run(tmp_path, cached_model, capsys, monkeypatch):
    from accuracy import experiment

    real = experiment.accuracy

    def crash_on_shapes(cfg, get_vlm):
        if cfg.setting.name == "shapes":
            raise RuntimeError("injected crash")
        return real(cfg, get_vlm)
    crash_on_shapes.__module__ = experiment.__name__           # the runner finds check/summary by module
    monkeypatch.setattr(experiment, "accuracy", crash_on_shapes)
    code = run(tmp_path, "-m", "experiment=accuracy", "setting=shapes,objects", "n=4")
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" in captured.err
    assert "1 done, 0 skipped, 0 refused, 1 failed" in captured.out
    assert "failed: setting=shapes: RuntimeError: injected crash" in captured.out
    assert [u.name for u in find_units(tmp_path / "results", "accuracy")] == ["objects"]


# 5. sizes and types are not checked; 10. layers are checked after the weights load -----------------------------

@pytest.mark.parametrize("args,needle", [
    (["experiment=last_token", "n_pairs=0"], "n_pairs=0: expected an integer >= 1"),
    (["experiment=last_token", "n_pairs=-3"], "n_pairs=-3: expected an integer >= 1"),
    (["experiment=accuracy", "n=0"], "n=0: expected an integer >= 1"),
    (["experiment=accuracy", "n=abc"], "n='abc': expected an integer >= 1"),
    (["experiment=accuracy", "batch_size=0"], "batch_size=0: expected an integer >= 1"),
    (["experiment=last_token", "layers=3"], "layers=3: give all or a non-empty list"),
    (["experiment=last_token", "layers=[]"], "layers=[]: give all or a non-empty list"),
    (["experiment=last_token", "layers=[0,a]"], "'a' is not an integer layer"),
    (["experiment=strip_patching", "layers=[8]"], "layer 8 is out of range for dual_organism: allowed 0..7"),
    (["experiment=probes", "n_train=0"], "n_train=0: expected an integer >= 1 or null"),
    (["experiment=ablation", "orientations=[diagonal]"], "orientations=[diagonal]: give a non-empty list"),
    (["experiment=amplification", "alphas=[]"], "alphas is empty"),
    (["experiment=benchmark", "rounds=0"], "rounds=0: expected an integer >= 1"),
    (["experiment=accuracy", "seed=-1"], "seed=-1: expected an integer >= 0"),
    (["experiment=accuracy", "device=tpu"], "device=tpu is not a device"),
])
def test_a_bad_size_type_or_layer_is_one_line_before_the_model_loads(tmp_path, no_model, capsys, args, needle):
    whatsup = write_stand_in(tmp_path / "w", images=False) if "amplification" in args[0] else None
    extra = [f"data.whatsup_dir={whatsup}", f"data.whatsup_boxes={whatsup / 'boxes.json'}"] if whatsup else []
    assert run(tmp_path, *args, *extra) == 2
    assert needle in one_error_line(capsys)
    assert not (tmp_path / "results").exists()


def test_every_model_config_knows_its_depth_before_loading():
    from common.checks import model_depth
    from common.cli import group_choices

    for model in group_choices("model"):
        cfg = make_cfg(f"model={model}")
        assert model_depth(cfg) >= 1, model
        assert cfg.model.name == model          # a unit's schema is composed from its names


def test_the_loaded_model_is_checked_against_its_configs_depth(tmp_path, cached_model, capsys):
    code = run(tmp_path, "experiment=last_token", "n_pairs=1", "layers=[0]",
               "model.architecture.text_config.num_hidden_layers=9")
    assert code == 2 and "has 8 LM layers, but model.architecture.text_config.num_hidden_layers says 9" in \
        one_error_line(capsys)


# 6. What'sUp files that are empty, malformed or [] -----------------------------------------------------------

@pytest.mark.parametrize("content,needle", [("", "is not JSON"), ("[{", "is not JSON"), ("[]", "holds no entries"),
                                            ("{}", "holds no entries")])
def test_a_bad_whatsup_file_is_one_line_before_the_model_loads(tmp_path, no_model, capsys, content, needle):
    root = write_stand_in(tmp_path / "w", images=False)
    (root / "controlled_images_dataset.json").write_text(content)
    assert run(tmp_path, "experiment=accuracy", "setting=whatsup", f"data.whatsup_dir={root}") == 2
    assert needle in one_error_line(capsys)


def test_whatsup_photos_that_make_no_composite_are_one_line(tmp_path, no_model, capsys):
    root = write_stand_in(tmp_path / "w", combos=[("mug", "chair")], images=False)
    assert run(tmp_path, "experiment=accuracy", "setting=whatsup", f"data.whatsup_dir={root}") == 2
    assert "make no composite" in one_error_line(capsys)


# 7. +key=value accepted silently -----------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["experiment=accuracy", "+n_samples=8"], "unknown key 'n_samples': experiment accuracy has no such key"),
    (["experiment=last_token", "n_pair=3"], "did you mean n_pairs?"),
    (["experiment=last_token", "+n_pair=3"], "did you mean n_pairs?"),
    (["experiment=last_token", "++n_pair=3"], "did you mean n_pairs?"),
    (["experiment=amplification", "scalingvis.coefficient=[1]"], "did you mean scalingvis.coefficients?"),
    (["experiment=last_token", "+n_pairs=3"], "n_pairs is already a key of experiment last_token"),
    (["-m", "experiment=accuracy", "setting=squares,shapes", "+n_samples=8"], "unknown key 'n_samples'"),
])
def test_an_unknown_key_is_refused_with_the_closest_one(tmp_path, no_model, capsys, args, needle):
    assert run(tmp_path, *args) == 2
    assert needle in one_error_line(capsys)
    assert not (tmp_path / "results").exists()


# 8. a folder that is not a checkpoint -------------------------------------------------------------------------

def test_a_folder_without_config_json_is_not_a_checkpoint(tmp_path, no_model, capsys):
    (tmp_path / "weights").mkdir()
    assert run(tmp_path, "experiment=accuracy", f"model.path={tmp_path / 'weights'}") == 2
    assert "is not a checkpoint: no config.json" in one_error_line(capsys)


# 9. two runs of one unit share one temporary directory ----------------------------------------------------------

def test_temporary_directories_are_unique_and_never_units(tmp_path):
    unit = tmp_path / "accuracy" / "m" / "squares"
    first, second = temporary_dir(unit), temporary_dir(unit)
    assert first != second and first.name.startswith(".squares.tmp-") and first.parent == unit.parent
    cfg = make_cfg("results_dir=x")
    save_unit(first, {"accuracy": 1.0}, {"x": np.zeros(2)}, cfg)      # a leftover, complete but hidden
    assert find_units(tmp_path, "accuracy") == []
    save_unit(unit, {"accuracy": 0.5}, {"x": np.ones(2)}, cfg)
    assert find_units(tmp_path, "accuracy") == [unit]


def test_concurrent_saves_of_one_unit_all_succeed_and_leave_one_whole(tmp_path):
    unit, cfg, errors = tmp_path / "u" / "m" / "s", make_cfg(), []

    def save(k):
        try:
            for _ in range(5):
                save_unit(unit, {"k": k}, {"x": np.full(50_000, k)}, cfg)
        except Exception as err:            # noqa: BLE001 -- collected and asserted below
            errors.append(err)
    threads = [threading.Thread(target=save, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    record, arrays = load_unit(unit)
    assert (arrays["x"] == record["metrics"]["k"]).all()
    assert sorted(p.name for p in unit.parent.iterdir()) == ["s"]


KILLED_SAVER = """
import sys, numpy as np
from omegaconf import OmegaConf
from common.results import save_unit
unit, start = sys.argv[1], int(sys.argv[2])
cfg = OmegaConf.create({"seed": 0, "results_dir": "r", "experiment": {"name": "e"}, "model": {"name": "m"},
                        "setting": {"name": "s"}})
k = start
while True:
    save_unit(unit, {"version": k}, {"x": np.full(200_000, k, np.int64)}, cfg)
    print(k, flush=True)
    k += 1
"""


def test_a_process_killed_while_saving_leaves_the_old_unit_or_the_new_one(tmp_path):
    """SIGKILL at random moments during a loop of saves: the unit is always one whole version (its metrics and
    arrays agree) and never a directory named .tmp in view."""
    unit = tmp_path / "e" / "m" / "s"
    rng = np.random.default_rng(0)
    last = -1
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(unit), str(trial * 1000)], cwd=REPO_DIR,
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()                            # one save finished
        time.sleep(float(rng.uniform(0.0, 0.3)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        record, arrays = load_unit(unit)
        version = record["metrics"]["version"]
        assert (arrays["x"] == version).all() and version >= trial * 1000 and version != last
        last = version
        visible = [p.name for p in unit.parent.iterdir() if not p.name.startswith(".")]
        assert visible == ["s"]


# 11. exit codes: 2 for every refusal, Hydra's own included ------------------------------------------------------

@pytest.mark.parametrize("args", [["experiment=no_such"], ["n=[1"], ["+n=3"], ["hydra.launcher.partitio=1"],
                                  ["-m", "hydra/launcher=no_such"], ["layers=[0],[1]", "experiment=last_token"]])
def test_hydras_own_refusals_exit_2_in_one_line(tmp_path, no_model, capsys, args):
    assert run(tmp_path, *args) == 2
    one_error_line(capsys)


def test_every_command_refuses_with_exit_2():
    from data_gen import render
    from data_gen.whatsup.__main__ import main as whatsup_main
    from organisms import train

    assert render.main(["n=0", "out=/tmp/never"]) == 2
    assert train.main(["+no_such=1"]) == 2
    assert paper.main(["figures=table1_accuracy", "no_such_key=1"]) == 2
    assert paper.main(["figures=fig99"]) == 2
    assert whatsup_main(["stand_in"]) == 2


# what a newcomer sees ---------------------------------------------------------------------------------------

def test_a_multirun_summary_counts_and_names_each_refused_or_failed_job():
    outcomes = [{"status": "done", "reason": "", "overrides": ["n=4", "setting=squares"]},
                {"status": "refused", "reason": "no data", "overrides": ["n=4", "setting=whatsup"]},
                {"status": "failed", "reason": "RuntimeError: x", "overrides": ["n=4", "setting=shapes"]},
                {"status": "skipped", "reason": "", "overrides": ["n=4", "setting=objects"]}]
    text, code = summary(outcomes)
    assert text.splitlines() == ["multirun: 4 jobs: 1 done, 1 skipped, 1 refused, 1 failed",
                                 "  refused: setting=whatsup: no data", "  failed: setting=shapes: RuntimeError: x"]
    assert code == 1 and summary(outcomes[:2])[1] == 2 and summary(outcomes[:1])[1] == 0


def test_progress_bars_stay_out_of_logs(capsys):
    from tqdm import tqdm

    quiet_output()
    for _ in tqdm(range(3), desc="bar"):
        pass
    assert "bar" not in capsys.readouterr().err            # stderr is not a terminal here


def test_every_unit_ends_with_its_number_and_a_panel_without_one_says_why(tmp_path, cached_model, capsys):
    root = write_stand_in(tmp_path / "w")
    assert run(tmp_path, "experiment=last_token", "n_pairs=2", "layers=[0,7]") == 0
    assert run(tmp_path, "experiment=last_token", "setting=whatsup", "n_pairs=2", "layers=[0,7]",
               f"data.whatsup_dir={root}") == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("last_token")]
    assert len(out) == 2 and out[0].startswith("last_token dual_organism squares: P(ordering) peaks at")
    assert "nothing to measure: the model gives the true answers P = " in out[1] and "less than a uniform guess" in out[1]
    record, _ = load_unit(tmp_path / "results/last_token" / MODEL / "whatsup")
    assert record["metrics"]["mean_p_answer"] < record["metrics"]["p_uniform_token"] == 1 / len(load_twin(MODEL).tokenizer)
    from figures.fig02_last_token.plot import draw

    assert draw(tmp_path / "results", tmp_path / "fig") == 0
    summary_md = (tmp_path / "fig" / "summary.md").read_text()
    assert "| whatsup | nothing to measure" in summary_md and "| squares | P(b)" in summary_md


def test_a_random_model_still_measures_and_an_untrained_vocabulary_does_not():
    from common.results import measures_nothing

    assert measures_nothing({"mean_p_answer": 3e-5, "p_uniform_token": 1 / 152064}) is None      # a random twin
    assert measures_nothing({"mean_p_answer": 1e-6, "p_uniform_token": 1 / 337}).startswith("nothing to measure")
    assert measures_nothing({"mean_p_answer": 1e-6}) is None              # a unit from before: no verdict


def test_a_plot_without_results_names_its_script(tmp_path, capsys):
    from common.cli import plot_main
    from figures.fig07_strip_patching.plot import draw

    assert plot_main(draw, "", str(REPO_DIR / "figures/fig07_strip_patching/plot.py"),
                     ["--results", str(tmp_path)]) == 2
    assert "run scripts/fig07_strip_patching.sh first" in one_error_line(capsys)


def test_table_1_is_a_readable_table_image(tmp_path):
    from PIL import Image

    from figures.table1_accuracy.plot import draw_figures

    table = {("dual_organism", s): {"accuracy": 0.99, "n": 200, "by_direction": {d: 1.0 for d in
                                                                                 ("left", "right", "above", "below")}}
             for s in ("squares", "shapes", "objects")}
    table[("dual_organism", "whatsup")] = {"accuracy": 0.0, "mean_p_answer": 1e-6, "p_uniform_token": 1 / 337,
                                           "by_direction": {"left": 0.0}}
    draw_figures(table, ["dual_organism"], ["squares", "shapes", "objects", "whatsup"], tmp_path)
    for name in ("table1_accuracy.png", "table4_by_direction.png"):
        width, height = Image.open(tmp_path / name).size
        assert width / height < 6 and height >= 150 and width <= 1500, (name, width, height)   # was 2760 x 270


def test_dry_run_says_which_whatsup_figures_it_leaves_out(tmp_path, capsys):
    assert paper.main(["--dry-run", f"model={MODEL}", f"results_dir={tmp_path}",
                       "figures=table1_accuracy,fig02_last_token,fig33_whatsup_probes,table3_amplification"]) == 0
    out = capsys.readouterr().out
    assert "left out, data.whatsup_dir not given: table1_accuracy (whatsup), fig02_last_token (whatsup)" in out
    assert "fig33_whatsup_probes, table3_amplification" in out


def test_identity_leaves_out_what_cannot_change_numbers_and_keeps_the_rest():
    cfg = make_cfg(f"model={MODEL}", "experiment=last_token", "results_dir=/a", "batch_size=3", "device=cpu")
    other = make_cfg(f"model={MODEL}", "experiment=last_token", "results_dir=/b", "batch_size=7", "threads=1",
                     "data.whatsup_dir=/somewhere")
    from common.results import config_identity, identity_difference

    assert identity_difference(config_identity(cfg), config_identity(other)) == []
    changed = make_cfg(f"model={MODEL}", "experiment=last_token", "seed=1", "patch_position=prompt_end")
    assert [k for k, _, _ in identity_difference(config_identity(cfg), config_identity(changed))] == \
        ["patch_position", "seed"]
    assert config_identity(cfg)["model"]["path"] == "<repo>/organisms/dual_organism"


def test_a_corrupt_or_other_unit_is_reported_by_its_state(tmp_path):
    cfg = make_cfg(f"model={MODEL}", f"results_dir={tmp_path}")
    unit = tmp_path / "u"
    assert unit_state(unit, cfg) == ("missing", "")
    save_unit(unit, {"n": 1}, {"x": np.zeros(1)}, cfg)
    assert unit_state(unit, cfg) == ("same", "")
    record = json.loads((unit / "metrics.json").read_text())
    record["identity"]["n"] = 7
    (unit / "metrics.json").write_text(json.dumps(record))
    assert unit_state(unit, cfg) == ("different", "n=7 (asked 200)")
    (unit / "metrics.json").write_text(json.dumps({"metrics": {}}))
    assert unit_state(unit, cfg)[0] == "corrupt"
    assert OmegaConf.select(cfg, "redo") is False
