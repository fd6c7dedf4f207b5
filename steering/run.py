"""Probe amplification against its baselines on What'sUp composites (paper Table 3; docs/experiments.md,
"amplification" and "Baselines: ScalingVis and AdaptVis"), saved under results/amplification/<model>/whatsup/.

    python -m runner experiment=amplification model=qwen2vl_7b data.whatsup_dir=DIR [alphas=[1,5,10]]

1. A horizontal position probe: fit on the item tokens of the train split's visual embeddings (cached as in
   experiment=whatsup_probes), or read from `probes_from`.
2. On the val and test splits (both queried directions of every composite), each batch is encoded and its
   visual embeddings computed once; then the last-position logits are taken for: no intervention; every
   alpha with the probe directions (per variant); every alpha with random directions of the same norms (per
   seed); ScalingVis at every coefficient; AdaptVis at every threshold.
3. Per split and method: accuracy, % of the unmodified run's wrong answers corrected, % of its right answers
   broken. Each method's alpha / coefficient / threshold is the best on val (earliest on ties); the table
   reports test at that value, next to the full curves on both splits.
"""

import math

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from common.errors import UsageError, check_choice
from common.results import fmt_metric
from data_gen.samples import setting_samples, setting_source
from data_gen.settings import Setting
from data_gen.whatsup import load_splits, require_boxes, whatsup_root
from probing.extract import load_or_extract
from probing.probes import Probe, fit_item_probe, load_probe
from steering.amplify import VARIANTS, amplify, choose, outcome_metrics, random_directions, token_classes
from steering.attention import adaptvis_coefficients, scaled_logits
from vlm.scoring import AnswerScorer

EXPERIMENT = "amplification"
CONFIDENCES = ("vocab", "candidates")
DEFINITIONS = {
    "corrected": "fraction of the samples the unmodified run answered wrong that the method answers right",
    "broken": "fraction of the samples the unmodified run answered right that the method answers wrong",
    "predicted": "each visual token gets alpha times the direction of the class the probe predicts for it",
    "every_class": "each visual token gets alpha times the sum of every class direction",
    "random": "the same assignment with Gaussian directions rescaled to the probe directions' norms; "
              "metrics averaged over seeds",
    "chosen": "each method's alpha, coefficient or threshold with the best val accuracy (earliest on ties); "
              "table = test metrics at that value",
}



def _numbers(name: str, values, positive: bool = False) -> list[float]:
    values = list(values) if values is not None else []
    if not values:
        raise UsageError(f"{name} is empty; give a list, e.g. {name}=[1,2,3]")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise UsageError(f"{name} holds {v!r}; expected {'positive ' if positive else ''}numbers")
    return [float(v) for v in values]


def check_inputs(cfg: DictConfig) -> None:
    """Every UsageError the run could hit, before a model is loaded or anything written."""
    check_choice("experiment", cfg.experiment.name, [EXPERIMENT])
    if setting_source(cfg) != "whatsup":
        raise UsageError(f"amplification runs on What'sUp composites: setting=whatsup, got {cfg.setting.name}")
    whatsup_root(cfg.data.whatsup_dir, str(cfg.setting.subset))
    _numbers("alphas", cfg.alphas)
    if not list(cfg.variants):
        raise UsageError("variants is empty; allowed: " + ", ".join(VARIANTS))
    for v in cfg.variants:
        check_choice("amplification variant", v, VARIANTS)
    if [s for s in cfg.random_seeds if isinstance(s, bool) or not isinstance(s, int)] or not list(cfg.random_seeds):
        raise UsageError(f"random_seeds must be a non-empty list of integers, got {list(cfg.random_seeds or [])}")
    _numbers("scalingvis.coefficients", cfg.scalingvis.coefficients, positive=True)
    _numbers("adaptvis.thresholds", cfg.adaptvis.thresholds)
    _numbers("adaptvis weights", [cfg.adaptvis.weight1, cfg.adaptvis.weight2], positive=True)
    check_choice("adaptvis.confidence", cfg.adaptvis.confidence, CONFIDENCES)
    if not float(cfg.probe.C) > 0:
        raise UsageError(f"probe.C={cfg.probe.C} must be positive")
    if cfg.probes_from in (None, ""):    # the probe is fit here, on the train split's item tokens
        require_boxes(cfg, "amplification (probes_from=null)")


def get_probe(cfg: DictConfig, setting: Setting, get_vlm) -> tuple[Probe, dict]:
    """The horizontal probe and how it was made (fit on the train split, or read from `probes_from`)."""
    if cfg.probes_from not in (None, ""):
        return load_probe(cfg.probes_from, "horizontal"), {"from": str(cfg.probes_from)}
    size = len(load_splits(cfg)["train"])
    stop = min(cfg.n_train or size, size)
    train, path = load_or_extract(cfg, setting, "horizontal", 0, stop, get_vlm, split="train")
    probe, fitted = fit_item_probe(cfg.probe, cfg.seed, train.tokens, train.item_tokens, train.item_position[..., 0])
    return probe, {"from": "train split", **fitted, "embeddings": str(path)}


@torch.no_grad()
def predictions(vlm, scorer, samples, probe: Probe, directions: dict, cfg: DictConfig) -> dict[str, np.ndarray]:
    """Predicted candidate index of every sample under every method: none (n,), `probe.<variant>` (A, n),
    `random.<variant>` (seeds, A, n), scalingvis (coefficients, n), adaptvis (thresholds, n).

    `directions`: "probe" (k, hidden) and "random" (seeds, k, hidden) tensors."""
    alphas, variants = [float(a) for a in cfg.alphas], list(cfg.variants)
    out = {"none": [], "scalingvis": [], "adaptvis": []}
    out |= {f"probe.{v}": [] for v in variants} | {f"random.{v}": [] for v in variants}
    for start in tqdm(range(0, len(samples), cfg.batch_size), desc=f"amplification {vlm.name}", unit="batch"):
        batch = samples[start:start + cfg.batch_size]
        inputs = vlm.encode([s.image for s in batch], [s.prompt for s in batch])
        tokens = vlm.visual_tokens(inputs)                                 # once per image, reused below
        classes = token_classes(probe, tokens)

        def predict(logits):
            return scorer.probabilities(logits).argmax(-1).cpu().numpy()

        base = vlm.last_logits(inputs, visual_tokens=tokens)
        out["none"].append(predict(base))
        for v in variants:
            out[f"probe.{v}"].append(np.stack([
                predict(vlm.last_logits(inputs, amplify(tokens, directions["probe"], a, v, classes))) for a in alphas]))
            out[f"random.{v}"].append(np.stack([np.stack([
                predict(vlm.last_logits(inputs, amplify(tokens, d, a, v, classes))) for a in alphas])
                for d in directions["random"]]))
        sv = cfg.scalingvis
        out["scalingvis"].append(np.stack([
            predict(scaled_logits(vlm, inputs, c, sv.layers, sv.queries, visual_tokens=tokens))
            for c in sv.coefficients]))
        av = cfg.adaptvis
        judge = scorer if av.confidence == "candidates" else None
        out["adaptvis"].append(np.stack([
            predict(scaled_logits(vlm, inputs, adaptvis_coefficients(vlm, inputs, t, av.weight1, av.weight2, judge, base),
                                  sv.layers, sv.queries, visual_tokens=tokens))
            for t in av.thresholds]))
    return {name: np.concatenate(parts, axis=-1) for name, parts in out.items()}


def split_metrics(pred: dict[str, np.ndarray], answer: np.ndarray) -> dict:
    """Per method, metrics over its grid (a list, one per alpha / coefficient / threshold); random: the mean
    over seeds, with `per_seed` lists."""
    before = pred["none"] == answer
    metrics = {"none": outcome_metrics(before, before)}
    for name, values in pred.items():
        if name == "none":
            continue
        if name.startswith("random."):
            per_seed = [[outcome_metrics(before, row == answer) for row in seed] for seed in values]
            mean = [{**per_seed[0][i], **{key: float(np.mean([s[i][key] for s in per_seed]))
                                          for key in ("accuracy", "corrected", "broken")}}
                    for i in range(len(per_seed[0]))]
            for i, m in enumerate(mean):
                m["accuracy_sd"] = float(np.std([s[i]["accuracy"] for s in per_seed]))
            metrics[name] = {"curve": mean, "per_seed": per_seed}
        else:
            metrics[name] = {"curve": [outcome_metrics(before, row == answer) for row in values]}
    return metrics


def grid_of(cfg: DictConfig, method: str) -> list[float]:
    if method == "scalingvis":
        return [float(c) for c in cfg.scalingvis.coefficients]
    if method == "adaptvis":
        return [float(t) for t in cfg.adaptvis.thresholds]
    return [float(a) for a in cfg.alphas]


def amplification(cfg: DictConfig, get_vlm):
    """The amplification experiment (Table 3): (metrics, arrays) of every method on the val and test splits."""
    check_inputs(cfg)
    setting = Setting.from_config(cfg.setting)
    split_samples = {name: setting_samples(cfg, name) for name in ("val", "test")}
    for name, samples in split_samples.items():
        if not samples:
            raise UsageError(f"the What'sUp {name} split is empty: raise setting.n_composites or "
                             f"setting.splits.{name}")
    probe, probe_info = get_probe(cfg, setting, get_vlm)
    vlm = get_vlm()
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    probe_dirs = probe.directions(unit=bool(cfg.unit_directions)).astype(np.float32)
    norms = np.linalg.norm(probe_dirs, axis=-1)
    random_dirs = np.stack([random_directions(norms, probe_dirs.shape[1], seed) for seed in cfg.random_seeds])
    directions = {"probe": torch.from_numpy(probe_dirs), "random": torch.from_numpy(random_dirs)}
    metrics = {"variants": list(cfg.variants), "alphas": grid_of(cfg, "probe"),
               "scalingvis_coefficients": grid_of(cfg, "scalingvis"), "adaptvis_thresholds": grid_of(cfg, "adaptvis"),
               "random_seeds": list(cfg.random_seeds), "probe": {**probe_info, "direction_norms": norms.tolist()},
               "splits": {}, "definitions": DEFINITIONS}
    arrays = {**probe.to_arrays("horizontal"), "candidates": np.array(scorer.candidates),
              "random_directions": random_dirs, "alphas": np.array(metrics["alphas"])}
    for name, samples in split_samples.items():
        pred = predictions(vlm, scorer, samples, probe, directions, cfg)
        answer = np.array([scorer.candidates.index(s.answer) for s in samples])
        metrics["splits"][name] = split_metrics(pred, answer)
        arrays |= {f"{name}.pred.{method}": values for method, values in pred.items()}
        arrays |= {f"{name}.answer": answer, f"{name}.sample_id": np.array([s.id for s in samples])}
    metrics["chosen"], metrics["table"] = {}, {"none": metrics["splits"]["test"]["none"]}
    for method in metrics["splits"]["val"]:
        if method == "none":
            continue
        k = choose([m["accuracy"] for m in metrics["splits"]["val"][method]["curve"]])
        grid = grid_of(cfg, method.split(".")[0])
        metrics["chosen"][method] = grid[k]
        metrics["table"][method] = {"value": grid[k], **metrics["splits"]["test"][method]["curve"][k]}
    for method, m in metrics["table"].items():
        value = f" at {m['value']:g}" if "value" in m else ""
        print(f"{EXPERIMENT} {vlm.name} test {method}{value}: accuracy {m['accuracy']:.3f}, corrected "
              f"{fmt_metric(m['corrected'])}, broken {fmt_metric(m['broken'])}")
    return metrics, arrays
