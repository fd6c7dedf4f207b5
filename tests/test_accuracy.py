"""The accuracy experiment end to end on a twin, its metrics, resumption, and bad input on the CLI."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

import runner
from accuracy.experiment import accuracy_metrics
from common.results import load_unit, unit_dir
from runner import run_unit
from tests.helpers import make_cfg

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_accuracy_metrics_counts_correct_predictions():
    samples = [SimpleNamespace(answer=a, direction=d, orientation=o) for a, d, o in
               [("red", "left", "horizontal"), ("blue", "right", "horizontal"),
                ("red", "above", "vertical"), ("green", "below", "vertical")]]
    candidates = ["red", "green", "blue"]
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
    metrics = accuracy_metrics(samples, probs, candidates, greedy=["red", "blue", "green", None])
    assert metrics["accuracy"] == 0.5
    assert metrics["by_direction"] == {"left": 1.0, "right": 1.0, "above": 0.0, "below": 0.0}
    assert metrics["by_orientation"] == {"horizontal": 1.0, "vertical": 0.0}
    assert metrics["greedy_agrees"] == 0.75
    assert metrics["mean_p_answer"] == pytest.approx((0.8 + 0.8 + 0.1 + 0.3) / 4)


def test_accuracy_run_writes_resumes_and_redoes(tmp_path, capsys):
    cfg = make_cfg("model=tiny_qwen2vl", "setting=squares", "n=8", "batch_size=4", f"results_dir={tmp_path}")
    run_unit(cfg)
    out = unit_dir(cfg)
    record, arrays = load_unit(out)
    metrics = record["metrics"]
    assert metrics["n"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics["by_direction"]) == {"left", "right", "above", "below"}
    assert record["config"]["model"]["name"] == "tiny_qwen2vl" and record["seed"] == 0
    assert {"torch", "transformers"} <= set(record["versions"]) and record["git_commit"]
    assert arrays["probs"].shape == (8, 6) and np.allclose(arrays["probs"].sum(-1) <= 1.0 + 1e-5, True)
    predicted = arrays["candidates"][arrays["probs"].argmax(-1)]
    assert metrics["accuracy"] == pytest.approx(float(np.mean(predicted == arrays["answer"])))
    assert not list(tmp_path.rglob("*.tmp"))

    stamp = (out / "metrics.json").stat().st_mtime_ns
    run_unit(cfg)
    assert "skipping" in capsys.readouterr().out
    assert (out / "metrics.json").stat().st_mtime_ns == stamp
    run_unit(make_cfg("model=tiny_qwen2vl", "setting=squares", "n=8", f"results_dir={tmp_path}", "redo=true"))
    assert (out / "metrics.json").stat().st_mtime_ns != stamp
    assert json.loads((out / "metrics.json").read_text())["metrics"]["n"] == 8


@pytest.mark.parametrize("args,needle", [
    (["model=no_such_model"], "no_such_model"),
    (["setting=no_such_setting"], "no_such_setting"),
    (["model=tiny_qwen2vl", "model.layout.item_tokens=5"], "item"),
    (["model=qwen2vl_7b", "model.path=/no/such/checkpoint"], "/no/such/checkpoint"),
    (["model=tiny_qwen2vl", "model.init=bogus"], "bogus"),
    (["model=tiny_qwen2vl", "device=cuda:63"], "cuda:63"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, args, needle, capsys):
    device = [] if any(a.startswith("device=") for a in args) else ["device=cpu"]
    code = runner.main([*args, *device, "n=4", f"results_dir={tmp_path / 'results'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and err.count("\n") == 1
    assert "Traceback" not in err
    assert not (tmp_path / "results").exists()
