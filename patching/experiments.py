"""The paper's patching experiments (docs/experiments.md, "Experiments"), each a function `(cfg, get_vlm) ->
(metrics, arrays)` that the runner (`python -m runner experiment=<name>`) calls and saves; each experiment's YAML
names its function (`experiment.run`).

- last_token: the last position's residual stream after each LM layer <- the counterfactual's (Fig 2);
- object_patching, strip_patching, ablated_patching: the side items' tokens (or strips) <- the mirror image's
  tokens at the other side, at the visual embeddings and after each LM layer (Fig 6, 7, 8), one mirror sweep
  (`mirror_sweep`) over a region, on the images' own or ablated visual embeddings;
- ablation: accuracy when ordering is removed from the visual embeddings (Table 2).

For the runner: `check(cfg)` (bad input, before a model loads), `passes(cfg)` (what `runner.paper --dry-run`
counts) and `summary(metrics)` (a unit's main number in one line).
"""

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from accuracy.experiment import accuracy_metrics
from common.checks import check_bool, check_layers, model_depth
from common.errors import UsageError, check_choice
from common.geometry import Grid, token_indices
from data_gen.pairs import COUNTERFACTUALS
from data_gen.render import random_samples
from data_gen.samples import setting_last_token_pairs, setting_mirror_pairs, setting_source
from data_gen.settings import Setting
from data_gen.whatsup import MIRRORS, require_boxes
from patching.ablation import Ablator
from patching.engine import PairInput, PatchingEngine, PatchPlan
from vlm.interventions import VISUAL
from vlm.models import VLM
from vlm.scoring import AnswerScorer, candidate_probabilities

REGIONS = ("items", "strips")
PATCH_POSITIONS = ("last_token", "prompt_end")   # the final input token (default), or the prompt's last word


def sweep_sites(vlm: VLM, cfg: DictConfig) -> list:
    """The experiment's sites: "visual" (when `patch_visual`) then the configured LM layers."""
    layers = vlm.check_layers(cfg.layers)
    return ([VISUAL] if cfg.patch_visual else []) + layers


def mirror_plan(grid: Grid, pair, region: str) -> PatchPlan:
    """Clean left <- mirror's right and clean right <- mirror's left, over the side items' own tokens or their
    strips, token for token in row-major order: a synthetic mirror keeps both boxes in place, a What'sUp mirror
    image has the mirrored boxes, which have the same shapes."""
    check_choice("patching region", region, REGIONS)
    clean, mirror = pair.regions(region)
    first, last = token_indices(grid, clean[0]), token_indices(grid, clean[2])
    return PatchPlan(first + last, token_indices(grid, mirror[2]) + token_indices(grid, mirror[0]))


def summarize(sites: list, per_pair: dict[str, np.ndarray], clean: dict, counterfactual: dict) -> dict:
    """Per outcome: mean and standard deviation across pairs at each site, and the unpatched runs' means; and
    `mean_p_answer`, the clean answer's probability on the unpatched clean runs (common.results.measures_nothing)."""
    return {
        "sites": [str(s) for s in sites],
        "n_pairs": int(next(iter(per_pair.values())).shape[0]),
        "mean_p_answer": float(clean["clean"].mean()),       # P(clean answer), unpatched: what there is to move
        "outcomes": {
            name: {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                   "unpatched_clean": float(clean[name].mean()),
                   "unpatched_counterfactual": float(counterfactual[name].mean())}
            for name, values in per_pair.items()
        },
    }


def sweep(vlm: VLM, scorer: AnswerScorer, pairs, plans, sites, cfg, visuals=None, desc="patching"):
    """Run the engine over `pairs`; returns (metrics, arrays) with one probability per pair, site and outcome.

    `plans[i]` is pair i's PatchPlan; `visuals[i]` optional (clean, counterfactual) visual embeddings."""
    engine = PatchingEngine(vlm, scorer, cfg.batch_size)
    outcomes = list(pairs[0].targets)
    patched = {o: np.zeros((len(pairs), len(sites)), np.float32) for o in outcomes}
    clean = {o: np.zeros(len(pairs), np.float32) for o in outcomes}
    counterfactual = {o: np.zeros(len(pairs), np.float32) for o in outcomes}
    inputs = [PairInput(pair.clean, pair.counterfactual, plans[i], *(visuals[i] if visuals else (None, None)))
              for i, pair in enumerate(pairs)]
    with tqdm(total=len(pairs), desc=desc, unit="pair") as bar:
        runs = engine.run_pairs(inputs, sites, progress=bar.update)
    for i, (pair, run) in enumerate(zip(pairs, runs, strict=True)):
        for outcome, answer in pair.targets.items():
            k = scorer.index(answer)
            patched[outcome][i] = run.patched[:, k].numpy()
            clean[outcome][i], counterfactual[outcome][i] = run.clean[k].item(), run.counterfactual[k].item()
    arrays = {f"p_{o}": patched[o] for o in outcomes}
    arrays |= {f"p_{o}_unpatched_clean": clean[o] for o in outcomes}
    arrays |= {f"p_{o}_unpatched_counterfactual": counterfactual[o] for o in outcomes}
    arrays |= {
        "sites": np.array([str(s) for s in sites]),
        "orientation": np.array([p.clean.orientation for p in pairs]),
        "direction": np.array([p.clean.direction for p in pairs]),
        "pair_id": np.array([p.clean.id for p in pairs]),
    }
    metrics = summarize(sites, patched, clean, counterfactual)
    metrics["p_uniform_token"] = 1.0 / len(vlm.tokenizer)      # common.results.measures_nothing
    return metrics, arrays


def last_token(cfg: DictConfig, get_vlm):
    """Last-token patching (Fig 2): the residual stream at `patch_position` (the last input token, or the
    prompt's last word) after each layer <- the counterfactual's at the same position."""
    check(cfg)
    pairs = setting_last_token_pairs(cfg)              # bad data is refused before the model loads
    setting, vlm = Setting.from_config(cfg.setting), get_vlm()
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    plans = [PatchPlan(from_end=prompt_end_offset(vlm, pair, cfg.patch_position)) for pair in pairs]
    metrics, arrays = sweep(vlm, scorer, pairs, plans, sweep_sites(vlm, cfg), cfg, desc=f"last_token {setting.name}")
    metrics["counterfactual"], metrics["patch_position"] = cfg.counterfactual, cfg.patch_position
    arrays["from_end"] = np.array([plan.from_end for plan in plans])
    return metrics, arrays


def prompt_end_offset(vlm: VLM, pair, patch_position: str) -> int:
    """Positions between the patched one and the last input token: 0 for `last_token`; for `prompt_end`, the
    tokens of the chat template after the prompt's last word (the same in both runs, which share the template)."""
    if patch_position == "last_token":
        return 0
    offsets = {vlm.prompt_end_offset(sample.prompt) for sample in (pair.clean, pair.counterfactual)}
    if len(offsets) != 1:
        raise ValueError(f"the clean and counterfactual prompts end {sorted(offsets)} tokens before the last one")
    return offsets.pop()


def mirror_sweep(cfg: DictConfig, get_vlm, region: str, ablate: bool):
    """The mirror sweep of object, strip and ablated patching: `region`'s tokens (the side items' own, or their
    strips) <- the mirror's other side, at the visual embeddings (when `patch_visual`) and after each layer; with
    `ablate`, on both images' ablated visual embeddings."""
    check_choice("patching region", region, REGIONS)
    if setting_source(cfg) == "whatsup" and region == "items":
        require_boxes(cfg, "object patching on What'sUp composites (region=items)")
    pairs, whatsup_pairs = setting_mirror_pairs(cfg, boxes=region == "items")   # bad data: refused before loading
    setting, vlm = Setting.from_config(cfg.setting), get_vlm()
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    plans = [mirror_plan(vlm.grid, pair, region) for pair in pairs]
    visuals = None
    if ablate:
        ablator = Ablator(vlm, setting, vlm.grid, vlm.layout, cfg.batch_size)
        ablator.prepare([s for p in pairs for s in (p.clean, p.counterfactual)])
        visuals = [(ablator.ablated(p.clean)[None], ablator.ablated(p.counterfactual)[None]) for p in pairs]
    metrics, arrays = sweep(vlm, scorer, pairs, plans, sweep_sites(vlm, cfg), cfg, visuals,
                            desc=f"{cfg.experiment.name} {setting.name}")
    metrics["region"], metrics["ablated"] = region, ablate
    if whatsup_pairs is not None:       # What'sUp: the mirror used and the composites left out of the pairs
        metrics["whatsup_pairs"] = whatsup_pairs
    return metrics, arrays


def object_patching(cfg: DictConfig, get_vlm):
    """Object patching (Fig 6): the side items' own tokens <- the mirror's other side."""
    return mirror_sweep(cfg, get_vlm, region="items", ablate=False)


def strip_patching(cfg: DictConfig, get_vlm):
    """Strip patching (Fig 7): the side items' whole strips <- the mirror's other side."""
    return mirror_sweep(cfg, get_vlm, region="strips", ablate=False)


def ablated_patching(cfg: DictConfig, get_vlm):
    """Object patching after ablation (Fig 8): object patching on both images' ablated visual embeddings."""
    return mirror_sweep(cfg, get_vlm, region="items", ablate=True)


def mirror_patching(cfg: DictConfig, get_vlm):
    """Whichever of object_patching, strip_patching and ablated_patching `cfg` is the config of (for a caller
    holding a config, e.g. a test)."""
    sweeps = {"object_patching": object_patching, "strip_patching": strip_patching,
              "ablated_patching": ablated_patching}
    check_choice("mirror patching experiment", cfg.experiment.name, sweeps)
    return sweeps[cfg.experiment.name](cfg, get_vlm)


@torch.no_grad()
def ablation(cfg: DictConfig, get_vlm):
    """Accuracy on the same images with their own and with ablated visual embeddings (Table 2)."""
    setting, vlm = Setting.from_config(cfg.setting), get_vlm()
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    samples = random_samples(setting, vlm.grid, vlm.layout, cfg.n, cfg.seed, tuple(cfg.orientations))
    ablator = Ablator(vlm, setting, vlm.grid, vlm.layout, cfg.batch_size)
    ablator.prepare(samples)
    probs = {"original": [], "ablated": []}
    greedy = {"original": [], "ablated": []}
    for start in tqdm(range(0, len(samples), cfg.batch_size), desc=f"ablation {setting.name}", unit="batch"):
        batch = samples[start:start + cfg.batch_size]
        inputs = vlm.encode([s.image for s in batch], [s.prompt for s in batch])
        for name, visual in (("original", None), ("ablated", ablator.ablated_batch(batch))):
            scores, logits = candidate_probabilities(vlm, scorer, inputs, visual)
            probs[name].append(scores.cpu())
            greedy[name] += scorer.greedy_candidate(logits, scores)
    probs = {k: torch.cat(v).numpy() for k, v in probs.items()}
    metrics = {name: accuracy_metrics(samples, probs[name], scorer.candidates, greedy[name]) for name in probs}
    # the paper's chance (section 5.3.1: 33.3%, one of the image's three items) and one of the candidates
    metrics["chance"] = {"items": float(np.mean([1 / len(s.items) for s in samples])),
                         "candidates": 1 / len(scorer.candidates)}
    arrays = {f"probs_{k}": v.astype(np.float32) for k, v in probs.items()}
    arrays |= {"candidates": np.array(scorer.candidates), "answer": np.array([s.answer for s in samples]),
               "direction": np.array([s.direction for s in samples]),
               "orientation": np.array([s.orientation for s in samples]),
               "sample_id": np.array([s.id for s in samples])}
    return metrics, arrays



# --- for the runner ----------------------------------------------------------------------------------------

SWEEPS = ("last_token", "object_patching", "strip_patching", "ablated_patching")


def _function(cfg: DictConfig) -> str:
    return str(cfg.experiment.run).rpartition(".")[2]


def check(cfg: DictConfig) -> None:
    """Every UsageError these experiments raise on their config, before a model loads (the runner has checked
    the shared sizes, orientations and layers: common.checks)."""
    function = _function(cfg)
    if function in SWEEPS:
        check_bool("patch_visual", cfg.patch_visual)
    if function == "last_token":
        if cfg.patch_visual:
            raise UsageError("last_token patches the last position, which is not a visual token: set patch_visual=false")
        check_choice("patch_position", cfg.patch_position, PATCH_POSITIONS)
        check_choice("counterfactual", cfg.counterfactual, COUNTERFACTUALS)
        if setting_source(cfg) == "whatsup" and cfg.counterfactual != "shared_reference":
            raise UsageError(f"What'sUp last-token pairs share the reference; counterfactual={cfg.counterfactual} "
                             f"is for synthetic settings")
    if function == "object_patching" and setting_source(cfg) == "whatsup":
        require_boxes(cfg, "object patching on What'sUp composites (region=items)")
    if function in ("object_patching", "strip_patching") and setting_source(cfg) == "whatsup":
        check_choice("setting.mirror", cfg.setting.get("mirror", "data"), MIRRORS)


def passes(cfg: DictConfig) -> dict:
    """What a unit runs (runner.paper --dry-run): `lm` full-length forwards (image and prompt through the LM),
    `vision` images through the vision tower, `patched` patched runs (each replayed by the engine from the layer
    after its site). From the config, as the code above does it."""
    function = _function(cfg)
    isolated = len(cfg.setting["items"]) * len(cfg.get("orientations") or []) + 1   # each item alone, + empty
    if function == "ablation":
        return {"lm": 2 * int(cfg.n), "vision": int(cfg.n) + isolated, "patched": 0}   # original and ablated
    layers = len(check_layers(cfg.layers, model_depth(cfg), cfg.model.name))
    sites = layers + (1 if cfg.patch_visual else 0)
    pairs = int(cfg.n_pairs)
    vision = isolated if function == "ablated_patching" else 2 * pairs    # ablated: the pairs' tokens are given
    return {"lm": 2 * pairs, "vision": vision, "patched": pairs * sites}


def summary(metrics: dict) -> str:
    """A unit's main number: ablation's accuracy before and after; a sweep's peak of each outcome but the clean
    answer (where it peaks)."""
    if "original" in metrics:
        chance = metrics.get("chance", {"items": 1 / 3, "candidates": metrics["ablated"]["chance"]})
        return (f"accuracy {metrics['original']['accuracy']:.3f} -> ablated {metrics['ablated']['accuracy']:.3f} "
                f"(chance {chance['items']:.3f}: one of 3 items, as the paper; {chance['candidates']:.3f}: one of "
                f"the candidates; n={metrics['ablated']['n']})")
    parts = []
    for name, stats in metrics["outcomes"].items():
        if name == "clean":
            continue
        peak = max(range(len(stats["mean"])), key=stats["mean"].__getitem__)
        parts.append(f"P({name}) peaks at {stats['mean'][peak]:.3f} ({metrics['sites'][peak]})")
    return ", ".join(parts) + f", {metrics['n_pairs']} pairs"
