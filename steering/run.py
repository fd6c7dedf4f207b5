"""Probe amplification against its baselines on What'sUp composites (paper Table 3; docs/experiments.md,
"amplification" and "Baselines: ScalingVis and AdaptVis"), saved under results/amplification/<model>/whatsup/.

    python -m runner experiment=amplification model=qwen2vl_7b data.whatsup_dir=DIR data.whatsup_boxes=FILE
        [alphas=[1,5,10]] [protocol=paper] [directions_per_token=all]

1. A horizontal position probe: fit on the item tokens of the first `n_train` (90) composites with boxes of the
   train split (cached as in experiment=whatsup_probes) and tested on the first `n_test` (30) of the test split,
   or read from `probes_from`.
2. Each batch of samples (both queried directions of a composite) is encoded and its visual embeddings computed
   once; then candidate probabilities are taken for: no intervention; each alpha with the probe directions
   (`directions: probe`, the paper's scale, or `unit`; `directions_per_token: predicted` or `all`); each alpha
   with random directions of the same norms (per seed); ScalingVis at each coefficient (steering/scalingvis.py:
   the authors' operation); AdaptVis at each (weight1, weight2, threshold); the image-attention reweighting (not
   ScalingVis) at each coefficient. Every attention-method evaluation goes through one function,
   `attention_method_probabilities`.
3. Protocols (`protocol`):
   - val_test (the default): every grid (alphas, seeds, coefficients, AdaptVis triples, reweighting) runs on the
     val split only; each method's value is the best on val (earliest on ties, in grid order) and the test split
     runs each method once, at its chosen value (the random baseline at its chosen alpha, every seed). The
     unmodified run also covers train, so the None row over every composite can be reported.
   - paper: the paper's reading of "improves accuracy by up to 5%": every grid runs on all composites (train,
     val and test) and each method is reported at its best value there.
   Per method: accuracy, % of the unmodified run's wrong answers corrected, % of its right answers broken. The
   unmodified run's accuracy over all composites is the paper's "None" row, equal to its Table 1 What'sUp column
   (the same composites: data_gen.whatsup draws them from the seed alone).
"""

import math

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from common.errors import UsageError, check_choice
from data_gen.samples import setting_samples, setting_source
from data_gen.settings import Setting
from data_gen.whatsup import load_splits, require_boxes, require_splits, split_sizes, whatsup_root
from probing.extract import load_or_extract, whatsup_probe_composites
from probing.probes import Probe, fit_item_probe, item_examples, load_probe
from steering.amplify import (
    DIRECTION_SCALES,
    DIRECTIONS_PER_TOKEN,
    amplify,
    choose,
    class_directions,
    outcome_metrics,
    random_directions,
    token_classes,
)
from steering.reweighting import reweighting_edits, reweighting_rows
from steering.scalingvis import adaptvis_confidence, adaptvis_rows, choose_coefficients, scalingvis_rows
from vlm.replay import record, recorded_runs
from vlm.scoring import (
    AnswerScorer,
    candidate_probabilities,
    replayed_probabilities,
    run_probabilities,
    score_samples,
)

EXPERIMENT = "amplification"
PROTOCOLS = ("val_test", "paper")
METHODS = ("probe", "random", "scalingvis", "adaptvis", "image_attention_reweighting")
ATTENTION_METHODS = ("scalingvis", "adaptvis", "image_attention_reweighting")
REWEIGHTING_QUERIES = ("last", "all")   # steering.reweighting.QUERIES
# What one attention-method evaluation costs in the dry run's counts: the last position replayed from the sample's
# recorded plain forward (attention_method_probabilities), counted apart from full forwards; the reweighting of
# every query row (`image_attention_reweighting.queries: all`) changes every position: a full forward each.
ATTENTION_PASS = "replayed"
DEFINITIONS = {
    "corrected": "fraction of the samples the unmodified run answered wrong that the method answers right",
    "broken": "fraction of the samples the unmodified run answered right that the method answers wrong",
    "probe": "alpha times probe directions added to the visual tokens: the probe's weight row over the "
             "standardisation scale, as it is (directions=probe, the paper's equation 3) or of norm 1 "
             "(directions=unit); directions_per_token=predicted: each token gets the row of the class the probe "
             "predicts for it; all: every token gets the sum of every class's row (one-vs-rest rows)",
    "random": "the same assignment with Gaussian directions rescaled to the probe directions' norms; "
              "metrics averaged over seeds",
    "none_all_composites": "the unmodified run's accuracy over every composite (train, val, test), both "
                           "directions: the paper's None row, equal to its Table 1 What'sUp column",
    "mean_p_answer": "the true answer's mean probability in the unmodified run over every composite",
    "scalingvis": "the last query row's pre-softmax scores at image keys times the coefficient, every LM layer "
                  "(Chen et al. 2025, github.com/shiqichen17/AdaptVis)",
    "adaptvis": "ScalingVis with weight1 where the unmodified run's largest vocabulary probability, rounded to 2 "
                "decimals, is < threshold, else weight2",
    "image_attention_reweighting": "not ScalingVis: post-softmax image-key attention weights times the "
                                   "coefficient, rows renormalised",
    "protocol": "val_test: every grid on val, each method's best value on val reported once on test; paper: every "
                "grid on all composites, each method reported at its best value there (the paper's 'up to')",
    "chosen": "each method's setting (alpha; coefficient; weight1, weight2, threshold) with the best accuracy on "
              "the grid split (val, or all under the paper protocol), earliest on ties in grid order; table = the "
              "report split's metrics at that setting",
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


def split_plan(cfg: DictConfig) -> tuple[str, str]:
    """(the split every grid runs on, the split the table reports): (val, test) or (all, all)."""
    return ("val", "test") if cfg.protocol == "val_test" else ("all", "all")


def check_config(cfg: DictConfig) -> None:
    """Every UsageError the config alone can cause (no data read)."""
    check_choice("experiment", cfg.experiment.name, [EXPERIMENT])
    if setting_source(cfg) != "whatsup":
        raise UsageError(f"amplification runs on What'sUp composites: setting=whatsup, got {cfg.setting.name}")
    check_choice("protocol", cfg.protocol, PROTOCOLS)
    check_choice("directions_per_token", cfg.directions_per_token, DIRECTIONS_PER_TOKEN)
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
    for key in ("n_train", "n_test"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{key}={value!r}: give a positive number of composites (or null: all of the split)")
    if not float(cfg.probe.C) > 0:
        raise UsageError(f"probe.C={cfg.probe.C} must be positive")
    if cfg.probes_from not in (None, "") and cfg.directions_per_token == "all":
        raise UsageError("directions_per_token=all adds every class row to every token, which needs one-vs-rest "
                         "rows fit here (a saved probe's multinomial rows sum to about zero): set probes_from=null")


def check_inputs(cfg: DictConfig) -> None:
    """Every UsageError the run could hit, before a model is loaded or anything written: the config, the data
    (photos, boxes), and splits that leave what the protocol needs empty."""
    check_config(cfg)
    whatsup_root(cfg.data.whatsup_dir, str(cfg.setting.subset))
    if cfg.probes_from in (None, ""):    # the probe is fit here, on the train split's item tokens
        require_boxes(cfg, "amplification (probes_from=null)")
    sizes = {name: len(composites) for name, composites in load_splits(cfg).items()}
    require_splits(sizes, ("val", "test") if cfg.protocol == "val_test" else (), f"protocol={cfg.protocol}",
                   cfg.setting.splits)
    if sum(sizes.values()) == 0:
        raise UsageError(f"no What'sUp composites in data.whatsup_dir={cfg.data.whatsup_dir}")
    if cfg.probes_from in (None, ""):
        whatsup_probe_composites(cfg)


def get_probe(cfg: DictConfig, setting: Setting, get_vlm) -> tuple[Probe, dict]:
    """The horizontal probe and how it was made: fit on the first n_train composites with boxes of the train split
    (multinomial, or one-vs-rest rows for directions_per_token=all) and tested on the first n_test of the test
    split, or read from `probes_from`."""
    if cfg.probes_from not in (None, ""):
        return load_probe(cfg.probes_from, "horizontal"), {"from": str(cfg.probes_from), "rows": "multinomial"}
    records = whatsup_probe_composites(cfg)
    (train, train_path), (test, test_path) = (
        load_or_extract(cfg, setting, "horizontal", 0, records[split]["used"], get_vlm, split=split)
        for split in ("train", "test"))
    rows = "one_vs_rest" if cfg.directions_per_token == "all" else "multinomial"
    probe, fitted = fit_item_probe(cfg.probe, cfg.seed, train.tokens, train.item_tokens, train.item_position[..., 0],
                                   rows)
    x, y = item_examples(test.tokens, test.item_tokens, test.item_position[..., 0])
    return probe, {"from": "train split", "rows": rows, **fitted, "test_accuracy": float((probe.predict(x) == y).mean()),
                   "n_test_images": len(test.tokens), "n_test_tokens": len(y), "composites": records,
                   "embeddings": {"train": str(train_path), "test": str(test_path)}}


def grid_values(values) -> list[float]:
    return [float(v) for v in _listed(values)]


def grid_of(cfg: DictConfig, method: str) -> list[dict[str, float]]:
    """A method's full grid, in the order its predictions are stacked and ties are broken: {"alpha": a} for
    probe / random, {"coefficient": c} for scalingvis and image_attention_reweighting, {"weight1", "weight2",
    "threshold"} for adaptvis (weight1 outermost, threshold innermost)."""
    if method in ("scalingvis", "image_attention_reweighting"):
        return [{"coefficient": c} for c in grid_values(cfg[method].coefficients)]
    if method == "adaptvis":
        av = cfg.adaptvis
        return [{"weight1": w1, "weight2": w2, "threshold": t} for w1 in grid_values(av.weight1)
                for w2 in grid_values(av.weight2) for t in grid_values(av.thresholds)]
    return [{"alpha": a} for a in grid_values(cfg.alphas)]


def full_grids(cfg: DictConfig) -> dict[str, list[dict[str, float]]]:
    return {method: grid_of(cfg, method) for method in METHODS}


def scalingvis_runs(grids: dict) -> tuple[list[float], bool]:
    """How a batch evaluates ScalingVis and AdaptVis over `grids`: (the ScalingVis coefficients run on every sample,
    whether AdaptVis runs one forward of its own). One AdaptVis triple (a chosen value): its own forward, each
    sample at its own coefficient. Several (a grid): no forward of its own, each triple takes every sample's row
    from the ScalingVis run at that sample's coefficient (`adaptvis_rows`), so the weights join the coefficients
    run."""
    coefficients = list(dict.fromkeys(s["coefficient"] for s in grids["scalingvis"]))
    if len(grids["adaptvis"]) == 1:
        return coefficients, True
    weights = dict.fromkeys(w for s in grids["adaptvis"] for w in (s["weight1"], s["weight2"]))
    return coefficients + [w for w in weights if w not in coefficients], False


def per_sample_passes(grids: dict, seeds: int, reweight_every_row: bool = False) -> dict[str, int]:
    """LM passes one sample costs under `grids`: `full` forwards (the recorded plain one, then one per probe alpha
    and per random alpha and seed) and `attention` evaluations replayed at the last position (ScalingVis runs,
    AdaptVis' own run, each reweighting coefficient; full forwards when the reweighting changes every row)."""
    coefficients, own = scalingvis_runs(grids)
    reweighting = len(grids["image_attention_reweighting"])
    return {"full": 1 + len(grids["probe"]) + seeds * len(grids["random"]) + reweighting * reweight_every_row,
            "attention": len(coefficients) + int(own) + reweighting * (not reweight_every_row)}


def attention_method_probabilities(vlm, scorer: AnswerScorer, records: list, inputs, visual: torch.Tensor,
                                   method: str, coefficients, layers, queries: str = "last",
                                   batch_size: int = 8) -> torch.Tensor:
    """(batch, candidates) probabilities of one encoded batch under an attention method, the one place every
    ScalingVis, AdaptVis and reweighting evaluation goes through: `method` scalingvis or adaptvis (the last query
    row's pre-softmax image-key scores times `coefficients`: a number, or one per sample for AdaptVis) or
    image_attention_reweighting (`queries` rows reweighted), in the LM decoder `layers`. The edits change the
    last query row only (all but `queries: all`), so each sample's last position is replayed from its recorded
    plain forward (`records`, vlm/replay.py; equal to the full forward, tests/test_attention_scaling.py); `queries:
    all` runs full forwards over `inputs` with the batch's `visual` embeddings. The answer's later tokens continue
    unmodified from each run's own keys and values (vlm.scoring)."""
    check_choice("attention method", method, ATTENTION_METHODS)
    if method == "image_attention_reweighting" and queries == "all":
        edits = reweighting_edits(vlm, inputs["input_ids"], coefficients, layers, queries)
        return candidate_probabilities(vlm, scorer, inputs, visual, edits)[0]
    if method == "image_attention_reweighting":
        rows = reweighting_rows(vlm, records, coefficients, layers)
    else:
        rows = scalingvis_rows(vlm, records, coefficients, layers)
    return replayed_probabilities(vlm, scorer, rows, batch_size)


def batch_predictions(vlm, scorer, inputs, probe: Probe, directions: dict, grids: dict, cfg: DictConfig):
    """Predicted candidate index of one encoded batch (b samples) under every method over `grids`: none (b,),
    probe (len grid, b), random (seeds, len grid, b), scalingvis / adaptvis / image_attention_reweighting
    (len grid, b); and AdaptVis' rounded confidence (b,). The visual embeddings are computed once and reused by
    every method."""
    sv, rw = cfg.scalingvis, cfg.image_attention_reweighting
    tokens = vlm.visual_tokens(inputs)
    classes = token_classes(probe, tokens) if cfg.directions_per_token == "predicted" else None
    # each sample's plain forward, recorded once: the unmodified run, and what the attention methods replay
    records = record(vlm, vlm.adapter.split_batch(inputs), list(tokens[:, None]), cfg.batch_size)

    def best(probs) -> np.ndarray:
        return probs.argmax(-1).cpu().numpy()

    def amplified(direction_rows, settings) -> np.ndarray:
        return np.stack([best(candidate_probabilities(vlm, scorer, inputs, amplify(tokens, direction_rows,
                                                                                   s["alpha"], classes))[0])
                         for s in settings])

    base = run_probabilities(vlm, scorer, torch.stack([rec.logits for rec in records]),
                             lambda: recorded_runs(records, True).caches(vlm.adapter))
    base_logits = torch.stack([rec.logits for rec in records])
    out = {"none": best(base), "probe": amplified(directions["probe"], grids["probe"]),
           "random": np.stack([amplified(d, grids["random"]) for d in directions["random"]])}
    confidence = adaptvis_confidence(base_logits)                          # of the unmodified run
    coefficients, own = scalingvis_runs(grids)
    def attention(method, coefficient, layers, queries="last"):
        return attention_method_probabilities(vlm, scorer, records, inputs, tokens, method, coefficient, layers,
                                              queries, cfg.batch_size)

    scaled = {c: attention("scalingvis", c, sv.layers) for c in coefficients}
    out["scalingvis"] = np.stack([best(scaled[s["coefficient"]]) for s in grids["scalingvis"]])
    if own:
        (s,) = grids["adaptvis"]
        chosen = choose_coefficients(confidence, s["threshold"], s["weight1"], s["weight2"])
        out["adaptvis"] = best(attention("adaptvis", chosen, sv.layers))[None]
    else:
        out["adaptvis"] = np.stack([best(adaptvis_rows(confidence, s["threshold"], scaled[s["weight1"]],
                                                       scaled[s["weight2"]])) for s in grids["adaptvis"]])
    out["image_attention_reweighting"] = np.stack([
        best(attention("image_attention_reweighting", s["coefficient"], rw.layers, rw.queries))
        for s in grids["image_attention_reweighting"]])
    return out, confidence.numpy(), base.cpu().numpy()


@torch.no_grad()
def predictions(vlm, scorer, samples, probe: Probe, directions: dict, grids: dict, cfg: DictConfig,
                desc: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """`batch_predictions` over every sample, `cfg.batch_size` per forward: {method: (..., n)}, AdaptVis'
    confidence (n,) and the unmodified run's candidate probabilities (n, candidates). `directions`: "probe"
    (k, hidden) and "random" (seeds, k, hidden) tensors."""
    parts: dict[str, list] = {}
    confidences, plain = [], []
    for start in tqdm(range(0, len(samples), cfg.batch_size), desc=desc, unit="batch"):
        batch = samples[start:start + cfg.batch_size]
        inputs = vlm.encode([s.image for s in batch], [s.prompt for s in batch])
        found, confidence, probs = batch_predictions(vlm, scorer, inputs, probe, directions, grids, cfg)
        for name, values in found.items():
            parts.setdefault(name, []).append(values)
        confidences.append(confidence)
        plain.append(probs)
    return ({name: np.concatenate(values, axis=-1) for name, values in parts.items()}, np.concatenate(confidences),
            np.concatenate(plain))


def split_metrics(pred: dict[str, np.ndarray], answer: np.ndarray) -> dict:
    """Per method, metrics over its grid (a list, one per alpha / coefficient / triple); random: the mean over
    seeds, with `per_seed` lists."""
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


def setting_text(setting: dict[str, float]) -> str:
    """'alpha 5', 'coefficient 0.8', 'weight1 0.5, weight2 1.5, threshold 0.4'."""
    return ", ".join(f"{name} {value:g}" for name, value in setting.items())


def passes(cfg: DictConfig) -> dict:
    """What the unit runs, for the dry run (runner.paper): `lm` full LM forwards (image and prompt), `replayed`
    attention-method rows replayed from a recorded forward (ATTENTION_PASS), `vision` images through the vision
    tower, `patched` 0. None where it depends on data the config does not describe (n_composites null)."""
    check_config(cfg)
    n = cfg.setting.get("n_composites")
    if n is None:
        return {"lm": None, "vision": None, "patched": 0, "replayed": None}
    sizes = split_sizes(int(n), cfg.setting.splits)
    total = sum(sizes.values())
    seeds = len(list(cfg.random_seeds))
    grids = full_grids(cfg)
    every_row = cfg.image_attention_reweighting.queries == "all"
    if cfg.protocol == "val_test":
        chosen = {method: settings[:1] for method, settings in grids.items()}    # one value each, on test
        runs = [(2 * sizes["val"], per_sample_passes(grids, seeds, every_row)),
                (2 * sizes["test"], per_sample_passes(chosen, seeds, every_row)),
                (2 * (total - sizes["val"] - sizes["test"]), {"full": 1, "attention": 0})]   # none on the rest
    else:
        runs = [(2 * total, per_sample_passes(grids, seeds, every_row))]
    counts = {"lm": 0, "replayed": 0}
    for samples, per_sample in runs:
        counts["lm"] += samples * per_sample["full"]
        counts[ATTENTION_PASS] += samples * per_sample["attention"]
    probe = 0
    if cfg.probes_from in (None, ""):
        probe = sum(sizes[split] if cfg.get(key) is None else min(int(cfg.get(key)), sizes[split])
                    for split, key in (("train", "n_train"), ("test", "n_test")))
    return {**counts, "vision": 2 * total + probe, "patched": 0}


def amplification(cfg: DictConfig, get_vlm):
    """The amplification experiment (Table 3): (metrics, arrays) of every method under `cfg.protocol`."""
    check_inputs(cfg)
    setting = Setting.from_config(cfg.setting)
    grid_split, report_split = split_plan(cfg)
    names = ("train", "val", "test") if cfg.protocol == "val_test" else ("all",)
    samples = {name: setting_samples(cfg, name) for name in names}
    probe, probe_info = get_probe(cfg, setting, get_vlm)
    vlm = get_vlm()
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    probe_dirs = class_directions(probe, cfg.directions)
    norms = np.linalg.norm(probe_dirs, axis=-1)
    random_dirs = np.stack([random_directions(norms, probe_dirs.shape[1], seed) for seed in cfg.random_seeds])
    directions = {"probe": torch.from_numpy(probe_dirs), "random": torch.from_numpy(random_dirs)}
    grids = full_grids(cfg)
    metrics = {"protocol": cfg.protocol, "grid_split": grid_split, "report_split": report_split,
               "directions": cfg.directions, "directions_per_token": cfg.directions_per_token,
               "alphas": grid_values(cfg.alphas), "grids": grids, "random_seeds": list(cfg.random_seeds),
               "probe": {**probe_info, "direction_norms": norms.tolist()},
               "composites": {name: len(c) for name, c in load_splits(cfg).items()},
               "splits": {}, "chosen": {}, "definitions": DEFINITIONS}
    arrays = {**probe.to_arrays("horizontal"), "candidates": np.array(scorer.candidates),
              "random_directions": random_dirs, "alphas": np.array(metrics["alphas"])}

    p_answer = []         # P(true answer), unmodified, on every composite (common.results.measures_nothing)

    def evaluate(name: str, settings: dict) -> np.ndarray:
        """Run `settings` on split `name`: its metrics and arrays recorded; returns whether `none` was right."""
        pred, confidence, plain = predictions(vlm, scorer, samples[name], probe, directions, settings, cfg,
                                              desc=f"amplification {vlm.name} {name}")
        answer = np.array([scorer.index(s.answer) for s in samples[name]])
        p_answer.extend(plain[np.arange(len(answer)), answer].tolist())
        metrics["splits"][name] = split_metrics(pred, answer)
        arrays.update({f"{name}.pred.{method}": values for method, values in pred.items()})
        arrays.update({f"{name}.adaptvis_confidence": confidence, f"{name}.answer": answer,
                       f"{name}.sample_id": np.array([s.id for s in samples[name]])})
        return pred["none"] == answer

    correct_none = evaluate(grid_split, grids)
    for method in METHODS:
        k = choose([m["accuracy"] for m in metrics["splits"][grid_split][method]["curve"]])
        metrics["chosen"][method] = grids[method][k]
    if cfg.protocol == "val_test":
        chosen = {method: [metrics["chosen"][method]] for method in METHODS}
        correct_none = np.concatenate([correct_none, evaluate(report_split, chosen)])
        probs, _ = score_samples(vlm, scorer, samples["train"], cfg.batch_size, desc="none on train")
        train_answer = np.array([scorer.index(s.answer) for s in samples["train"]])
        arrays.update({"train.pred.none": probs.argmax(-1), "train.answer": train_answer})
        correct_none = np.concatenate([correct_none, probs.argmax(-1) == train_answer])
        p_answer.extend(probs[np.arange(len(train_answer)), train_answer].tolist())
    report = metrics["splits"][report_split]
    metrics["none_all_composites"] = {"accuracy": float(np.mean(correct_none)), "n": len(correct_none)}
    metrics["mean_p_answer"] = float(np.mean(p_answer))
    metrics["p_uniform_token"] = 1.0 / len(vlm.tokenizer)
    metrics["table"] = {"none": report["none"]}
    for method in METHODS:
        k = 0 if cfg.protocol == "val_test" else grids[method].index(metrics["chosen"][method])
        metrics["table"][method] = {"chosen": metrics["chosen"][method], **report[method]["curve"][k]}
        if method == "random":
            metrics["table"][method]["per_seed"] = [seed[k] for seed in report[method]["per_seed"]]
    return metrics, arrays


# --- for the runner ----------------------------------------------------------------------------------------

def check(cfg: DictConfig) -> None:
    """Every UsageError of check_inputs, before a model loads."""
    check_inputs(cfg)


def summary(metrics: dict) -> str:
    """Accuracy on the report split with no intervention and with probe amplification at its chosen alpha, and
    the protocol."""
    table = metrics["table"]
    probe = table.get("probe")
    amplified = f", probe amplification {probe['accuracy']:.3f} at {setting_text(probe['chosen'])}" if probe else ""
    return (f"{metrics.get('report_split', 'test')} accuracy ({metrics.get('protocol', 'val_test')}): none "
            f"{table['none']['accuracy']:.3f}{amplified}")

