"""Behavioural accuracy (paper Table 1 and Table 4; docs/experiments.md, "accuracy").

    python -m runner experiment=accuracy model=qwen2vl_7b setting=squares [n=200 batch_size=16]
    python -m runner experiment=accuracy model=qwen2vl_7b setting=whatsup data.whatsup_dir=DIR [split=all]

Samples come from data_gen.samples.setting_samples: `n` random images of a synthetic setting, or every
What'sUp composite of `split` in both directions. Every candidate answer is scored (vlm.scoring), the highest
is the prediction; the metrics are accuracy overall, per queried direction and per orientation.
"""

import numpy as np
from omegaconf import DictConfig

from common.checks import check_bool
from common.errors import check_choice
from data_gen.samples import setting_samples, setting_source
from data_gen.settings import DIRECTIONS, Setting
from data_gen.whatsup import split_sizes
from vlm.scoring import AnswerScorer, score_samples


def accuracy_metrics(samples, probs: np.ndarray, candidates: list[str], greedy: list) -> dict:
    predicted = [candidates[i] for i in probs.argmax(-1)]
    correct = np.array([p == s.answer for p, s in zip(predicted, samples, strict=True)])

    def mean_where(keep):
        keep = np.asarray(keep)
        return float(correct[keep].mean()) if keep.any() else None

    directions = sorted({s.direction for s in samples}, key=DIRECTIONS.index)
    return {
        "n": len(samples),
        "accuracy": float(correct.mean()),
        "by_direction": {d: mean_where([s.direction == d for s in samples]) for d in directions},
        "by_orientation": {o: mean_where([s.orientation == o for s in samples])
                           for o in sorted({s.orientation for s in samples})},
        "mean_p_answer": float(np.mean([probs[i, candidates.index(s.answer)] for i, s in enumerate(samples)])),
        "greedy_agrees": float(np.mean([g == p for g, p in zip(greedy, predicted, strict=True)])),
        "chance": 1.0 / len(candidates),
    }


def accuracy(cfg: DictConfig, get_vlm):
    """The accuracy experiment: (metrics, arrays) of `cfg.setting`'s samples on the model `get_vlm()` loads."""
    setting = Setting.from_config(cfg.setting)
    samples = setting_samples(cfg, cfg.get("split", "all"))
    vlm = get_vlm()
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    probs, greedy = score_samples(vlm, scorer, samples, cfg.batch_size, desc=f"accuracy {vlm.name} {setting.name}")
    metrics = accuracy_metrics(samples, probs, scorer.candidates, greedy)
    if not cfg.greedy_check:
        metrics.pop("greedy_agrees")
    metrics["p_uniform_token"] = 1.0 / len(vlm.tokenizer)      # common.results.measures_nothing
    arrays = {
        "probs": probs.astype(np.float32),
        "candidates": np.array(scorer.candidates),
        "answer": np.array([s.answer for s in samples]),
        "direction": np.array([s.direction for s in samples]),
        "orientation": np.array([s.orientation for s in samples]),
        "sample_id": np.array([s.id for s in samples]),
    }
    return metrics, arrays


# --- for the runner ----------------------------------------------------------------------------------------

def check(cfg: DictConfig) -> None:
    """What the runner's shared checks (common.checks) leave: `split` and `greedy_check`."""
    check_bool("greedy_check", cfg.greedy_check)
    allowed = ["all", *cfg.setting.get("splits", {})] if setting_source(cfg) == "whatsup" else ["all"]
    check_choice("split", cfg.get("split", "all"), allowed)


def passes(cfg: DictConfig) -> dict:
    """What a unit runs (runner.paper --dry-run): one full forward per sample; What'sUp: both directions of the
    split's composites (data_gen.whatsup.split_sizes of `setting.n_composites`; None when it is null: the count
    is the data's)."""
    if setting_source(cfg) != "whatsup":
        return {"lm": int(cfg.n), "vision": int(cfg.n), "patched": 0}
    n = cfg.setting.get("n_composites")
    if n is None:
        return {"lm": None, "vision": None, "patched": 0}
    split = cfg.get("split", "all")
    count = 2 * (int(n) if split == "all" else split_sizes(int(n), cfg.setting.splits)[split])
    return {"lm": count, "vision": count, "patched": 0}


def summary(metrics: dict) -> str:
    return f"accuracy {metrics['accuracy']:.3f} (chance {metrics['chance']:.3f}, n={metrics['n']})"
