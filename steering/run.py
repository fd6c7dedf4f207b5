"""Probe amplification against its baselines on What'sUp composites (paper Table 3; docs/experiments.md,
"amplification" and "Baselines: ScalingVis and AdaptVis"), saved under results/amplification/<model>/whatsup/.

    python -m runner experiment=amplification model=qwen2vl_7b data.whatsup_dir=DIR [alphas=[1,5,10]]

1. A horizontal position probe: fit on the item tokens of the train split's visual embeddings (cached as in
   experiment=whatsup_probes), or read from `probes_from`.
2. On the val and test splits (both queried directions of every composite), each batch is encoded and its
   visual embeddings computed once; then the last-position logits are taken for: no intervention; every
   alpha with the probe directions (`directions: probe`, the paper's scale, or `unit`); every alpha with random
   directions of the same norms (per seed); ScalingVis at every coefficient (steering/scalingvis.py: the authors' operation); AdaptVis at every
   (weight1, weight2, threshold), each example taking the ScalingVis run at its own coefficient
   (`adaptvis_rows`; weights outside the ScalingVis grid get their own run); the image-attention
   reweighting (not ScalingVis) at every coefficient.
3. Per split and method: accuracy, % of the unmodified run's wrong answers corrected, % of its right answers
   broken. The unmodified run's accuracy over all composites (train, val and test) is reported too: the
   paper's "None" row equals its Table 1 What'sUp column. Each method's setting (alpha; coefficient; weight1, weight2, threshold) is the best on val
   (earliest on ties, in grid order); the table reports test at that setting, next to the full curves on both
   splits.
"""

import math

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from common.errors import UsageError, check_choice
from data_gen.samples import setting_samples, setting_source
from data_gen.settings import Setting
from data_gen.whatsup import load_splits, require_boxes, split_sizes, whatsup_root
from probing.extract import load_or_extract
from probing.probes import Probe, fit_item_probe, load_probe
from steering.amplify import (
    DIRECTION_SCALES,
    amplify,
    choose,
    class_directions,
    outcome_metrics,
    random_directions,
    token_classes,
)
from steering.reweighting import reweighting_edits
from steering.scalingvis import adaptvis_confidence, adaptvis_rows, scalingvis_edits
from vlm.scoring import AnswerScorer, candidate_probabilities, score_samples

EXPERIMENT = "amplification"
ATTENTION_METHODS = ("scalingvis", "adaptvis", "image_attention_reweighting")
REWEIGHTING_QUERIES = ("last", "all")   # steering.reweighting.QUERIES
DEFINITIONS = {
    "corrected": "fraction of the samples the unmodified run answered wrong that the method answers right",
    "broken": "fraction of the samples the unmodified run answered right that the method answers wrong",
    "probe": "each visual token gets alpha times the direction of the class the probe predicts for it: the "
             "probe's weight row over the standardisation scale, as it is (directions=probe, the paper's "
             "equation 3) or of norm 1 (directions=unit)",
    "random": "the same assignment with Gaussian directions rescaled to the probe directions' norms; "
              "metrics averaged over seeds",
    "none_all_composites": "the unmodified run's accuracy over every composite (train, val, test), both "
                           "directions: the paper's None row, equal to its Table 1 What'sUp column",
    "scalingvis": "the last query row's pre-softmax scores at image keys times the coefficient, every LM layer "
                  "(Chen et al. 2025, github.com/shiqichen17/AdaptVis)",
    "adaptvis": "ScalingVis with weight1 where the unmodified run's largest vocabulary probability, rounded to 2 "
                "decimals, is < threshold, else weight2",
    "image_attention_reweighting": "not ScalingVis: post-softmax image-key attention weights times the "
                                   "coefficient, rows renormalised",
    "chosen": "each method's setting (alpha; coefficient; weight1, weight2, threshold) with the best val accuracy "
              "(earliest on ties, in grid order); table = test metrics at that setting",
}



def _listed(values):
    """A config value that may be one number or a list of them, as a list."""
    return [values] if isinstance(values, (int, float)) and not isinstance(values, bool) else values


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
    check_choice("directions", cfg.directions, DIRECTION_SCALES)
    if [s for s in cfg.random_seeds if isinstance(s, bool) or not isinstance(s, int)] or not list(cfg.random_seeds):
        raise UsageError(f"random_seeds must be a non-empty list of integers, got {list(cfg.random_seeds or [])}")
    for name in ("scalingvis.coefficients", "adaptvis.weight1", "adaptvis.weight2"):
        if [v for v in _numbers(name, _listed(OmegaConf.select(cfg, name))) if v < 0]:
            raise UsageError(f"{name} holds a negative coefficient; expected numbers >= 0")
    _numbers("adaptvis.thresholds", _listed(cfg.adaptvis.thresholds))
    _numbers("image_attention_reweighting.coefficients", _listed(cfg.image_attention_reweighting.coefficients),
             positive=True)
    check_choice("image_attention_reweighting.queries", cfg.image_attention_reweighting.queries,
                 REWEIGHTING_QUERIES)
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
def predictions(vlm, scorer, samples, probe: Probe, directions: dict,
                cfg: DictConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Predicted candidate index of every sample under every method: none (n,), probe (A, n), random
    (seeds, A, n), and over their grids (`grid_of`) scalingvis, adaptvis and image_attention_reweighting
    (settings, n); and AdaptVis's rounded confidence of every sample (n,).

    `directions`: "probe" (k, hidden) and "random" (seeds, k, hidden) tensors."""
    parts: dict[str, list] = {}
    confidences = []
    for start in tqdm(range(0, len(samples), cfg.batch_size), desc=f"amplification {vlm.name}", unit="batch"):
        batch = samples[start:start + cfg.batch_size]
        found, confidence = batch_predictions(vlm, scorer, vlm.encode([s.image for s in batch],
                                                                      [s.prompt for s in batch]), probe, directions, cfg)
        for name, values in found.items():
            parts.setdefault(name, []).append(values)
        confidences.append(confidence)
    return {name: np.concatenate(values, axis=-1) for name, values in parts.items()}, np.concatenate(confidences)


def batch_predictions(vlm, scorer, inputs, probe: Probe, directions: dict, cfg: DictConfig):
    """`predictions` of one encoded batch: the image's visual embeddings are computed once and reused by every
    method; each method's forward scores the candidates (vlm.scoring: the first token, or whole answers
    continued from the prompt's cache, where the intervention is active over the prompt only)."""
    alphas = [float(a) for a in cfg.alphas]
    sv, av, rw = cfg.scalingvis, cfg.adaptvis, cfg.image_attention_reweighting
    tokens = vlm.visual_tokens(inputs)
    classes = token_classes(probe, tokens)

    def predict(visual, interventions=()) -> torch.Tensor:
        """(batch, candidates) probabilities with these visual embeddings and `interventions` on the prompt's
        forward."""
        return candidate_probabilities(vlm, scorer, inputs, visual, interventions)[0]

    def best(probs) -> np.ndarray:
        return probs.argmax(-1).cpu().numpy()

    base, base_logits = candidate_probabilities(vlm, scorer, inputs, tokens)
    out = {"none": best(base),
           "probe": np.stack([best(predict(amplify(tokens, directions["probe"], a, classes))) for a in alphas]),
           "random": np.stack([np.stack([best(predict(amplify(tokens, d, a, classes))) for a in alphas])
                               for d in directions["random"]])}
    coefficients = sorted({*grid_values(sv.coefficients), *grid_values(av.weight1), *grid_values(av.weight2)})
    ids = inputs["input_ids"]
    scaled = {c: predict(tokens, scalingvis_edits(vlm, ids, c, sv.layers)) for c in coefficients}
    out["scalingvis"] = np.stack([best(scaled[s["coefficient"]]) for s in grid_of(cfg, "scalingvis")])
    confidence = adaptvis_confidence(base_logits)                          # of the unmodified run
    out["adaptvis"] = np.stack([best(adaptvis_rows(confidence, s["threshold"], scaled[s["weight1"]],
                                                   scaled[s["weight2"]])) for s in grid_of(cfg, "adaptvis")])
    out["image_attention_reweighting"] = np.stack([
        best(predict(tokens, reweighting_edits(vlm, ids, s["coefficient"], rw.layers, rw.queries)))
        for s in grid_of(cfg, "image_attention_reweighting")])
    return out, confidence.numpy()


def split_metrics(pred: dict[str, np.ndarray], answer: np.ndarray) -> dict:
    """Per method, metrics over its grid (a list, one per alpha / coefficient / threshold); random: the mean
    over seeds, with `per_seed` lists."""
    before = pred["none"] == answer
    metrics = {"none": outcome_metrics(before, before)}
    for name, values in pred.items():
        if name == "none":
            continue
        if name == "random":
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


def grid_values(values) -> list[float]:
    return [float(v) for v in _listed(values)]


def grid_of(cfg: DictConfig, method: str) -> list[dict[str, float]]:
    """A method's settings, in the order its predictions are stacked and ties are broken: {"alpha": a} for
    probe / random, {"coefficient": c} for scalingvis and image_attention_reweighting, {"weight1", "weight2",
    "threshold"} for adaptvis (weight1 outermost, threshold innermost)."""
    if method in ("scalingvis", "image_attention_reweighting"):
        return [{"coefficient": c} for c in grid_values(cfg[method].coefficients)]
    if method == "adaptvis":
        av = cfg.adaptvis
        return [{"weight1": w1, "weight2": w2, "threshold": t} for w1 in grid_values(av.weight1)
                for w2 in grid_values(av.weight2) for t in grid_values(av.thresholds)]
    return [{"alpha": a} for a in grid_values(cfg.alphas)]


def setting_text(setting: dict[str, float]) -> str:
    """'alpha 5', 'coefficient 0.8', 'weight1 0.5, weight2 1.5, threshold 0.4'."""
    return ", ".join(f"{name} {value:g}" for name, value in setting.items())


def amplification(cfg: DictConfig, get_vlm):
    """The amplification experiment (Table 3): (metrics, arrays) of every method on the val and test splits."""
    check_inputs(cfg)
    setting = Setting.from_config(cfg.setting)
    split_samples = {name: setting_samples(cfg, name) for name in ("train", "val", "test")}
    for name, samples in split_samples.items():
        if not samples and name != "train":
            raise UsageError(f"the What'sUp {name} split is empty: raise setting.n_composites or "
                             f"setting.splits.{name}")
    probe, probe_info = get_probe(cfg, setting, get_vlm)
    vlm = get_vlm()
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    probe_dirs = class_directions(probe, cfg.directions)
    norms = np.linalg.norm(probe_dirs, axis=-1)
    random_dirs = np.stack([random_directions(norms, probe_dirs.shape[1], seed) for seed in cfg.random_seeds])
    directions = {"probe": torch.from_numpy(probe_dirs), "random": torch.from_numpy(random_dirs)}
    metrics = {"directions": cfg.directions, "alphas": grid_values(cfg.alphas),
               "grids": {kind: grid_of(cfg, kind) for kind in ("probe", "random", *ATTENTION_METHODS)},
               "random_seeds": list(cfg.random_seeds), "probe": {**probe_info, "direction_norms": norms.tolist()},
               "splits": {}, "definitions": DEFINITIONS}
    arrays = {**probe.to_arrays("horizontal"), "candidates": np.array(scorer.candidates),
              "random_directions": random_dirs, "alphas": np.array(metrics["alphas"])}
    correct_none = []          # the unmodified run on every composite: the paper's None row (Table 1's column)
    metrics["mean_p_answer"] = None      # P(true answer), unmodified, on train (common.results.measures_nothing)
    metrics["p_uniform_token"] = 1.0 / len(vlm.tokenizer)
    if split_samples["train"]:
        train_probs, _ = score_samples(vlm, scorer, split_samples["train"], cfg.batch_size, desc="none on train")
        answers = [scorer.index(s.answer) for s in split_samples["train"]]
        correct_none += list(train_probs.argmax(-1) == answers)
        metrics["mean_p_answer"] = float(train_probs[np.arange(len(answers)), answers].mean())
    for name in ("val", "test"):
        samples = split_samples[name]
        pred, confidence = predictions(vlm, scorer, samples, probe, directions, cfg)
        answer = np.array([scorer.candidates.index(s.answer) for s in samples])
        metrics["splits"][name] = split_metrics(pred, answer)
        arrays |= {f"{name}.pred.{method}": values for method, values in pred.items()}
        arrays[f"{name}.adaptvis_confidence"] = confidence
        arrays |= {f"{name}.answer": answer, f"{name}.sample_id": np.array([s.id for s in samples])}
        correct_none += list(pred["none"] == answer)
    metrics["none_all_composites"] = {"accuracy": float(np.mean(correct_none)), "n": len(correct_none)}
    metrics["chosen"], metrics["table"] = {}, {"none": metrics["splits"]["test"]["none"]}
    for method in metrics["splits"]["val"]:
        if method == "none":
            continue
        k = choose([m["accuracy"] for m in metrics["splits"]["val"][method]["curve"]])
        chosen = metrics["grids"][method.split(".")[0]][k]
        metrics["chosen"][method] = chosen
        metrics["table"][method] = {"chosen": chosen, **metrics["splits"]["test"][method]["curve"][k]}
    return metrics, arrays


# --- for the runner ----------------------------------------------------------------------------------------

def check(cfg: DictConfig) -> None:
    """Every UsageError of check_inputs, before a model loads."""
    check_inputs(cfg)


def passes(cfg: DictConfig) -> dict:
    """What a unit runs (runner.paper --dry-run), from the config: on val and test (both directions of every
    composite) one forward per method and value (none, probe and random per alpha and seed, the attention
    methods per coefficient), on train the unmodified run and the probe's embeddings; split sizes are
    data_gen.whatsup.split_sizes of `setting.n_composites` (None when it is null: they are the data's)."""
    n = cfg.setting.get("n_composites")
    if n is None:
        return {"lm": None, "vision": None, "patched": 0}
    sizes = split_sizes(int(n), cfg.setting.splits)
    alphas, seeds = len(list(cfg.alphas)), len(list(cfg.random_seeds))
    coefficients = {*grid_values(cfg.scalingvis.coefficients), *grid_values(cfg.adaptvis.weight1),
                    *grid_values(cfg.adaptvis.weight2)}
    reweighting = len(grid_values(cfg.image_attention_reweighting.coefficients))
    per_sample = 1 + alphas * (1 + seeds) + len(coefficients) + reweighting   # none, probe, random, attention
    evaluated = 2 * (sizes["val"] + sizes["test"])                              # both directions
    probe = 0 if cfg.probes_from not in (None, "") else (
        sizes["train"] if cfg.n_train is None else min(int(cfg.n_train), sizes["train"]))
    return {"lm": evaluated * per_sample + 2 * sizes["train"],     # + the unmodified run on train
            "vision": evaluated + 2 * sizes["train"] + probe, "patched": 0}


def summary(metrics: dict) -> str:
    """Test accuracy with no intervention and with probe amplification at the alpha chosen on val."""
    table = metrics["table"]
    probe = next((m for method, m in table.items() if method.startswith("probe")), None)
    amplified = f", probe amplification {probe['accuracy']:.3f} at {setting_text(probe['chosen'])}" if probe else ""
    return f"test accuracy: none {table['none']['accuracy']:.3f}{amplified}"
