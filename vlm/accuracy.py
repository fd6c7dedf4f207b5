"""Behavioural accuracy (paper Table 1 and Table 4; SPEC experiment `accuracy`).

    python -m vlm.accuracy model=qwen2vl_7b setting=squares [n=200 batch_size=16 redo=false]
    python -m vlm.accuracy model=qwen2vl_7b setting=whatsup data.whatsup_dir=DIR [split=all]

Samples come from data_gen.samples.setting_samples: `n` random images of a synthetic setting, or every
What'sUp composite of `split` in both directions.

Scores every candidate answer from the next-token distribution, predicts the highest, and writes accuracy
overall, per queried direction and per orientation to results/accuracy/<model>/<setting>/.
"""

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from data_gen.samples import setting_samples
from data_gen.settings import Setting
from vlm.cli import entrypoint
from vlm.models import VLM, load_model
from vlm.results import is_done, save_unit, unit_dir
from vlm.scoring import AnswerScorer


def score_samples(vlm: VLM, scorer: AnswerScorer, samples, batch_size: int, desc: str = "scoring"):
    """(candidate probabilities (n, candidates), greedy candidate per sample) for `samples`, batched."""
    probs, greedy = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch"):
        batch = samples[start:start + batch_size]
        logits = vlm.last_logits(vlm.encode([s.image for s in batch], [s.prompt for s in batch]))
        probs.append(scorer.probabilities(logits).cpu())
        greedy += scorer.greedy_candidate(logits)
    return torch.cat(probs).numpy(), greedy


def accuracy_metrics(samples, probs: np.ndarray, candidates: list[str], greedy: list) -> dict:
    predicted = [candidates[i] for i in probs.argmax(-1)]
    correct = np.array([p == s.answer for p, s in zip(predicted, samples, strict=True)])

    def mean_where(keep):
        keep = np.asarray(keep)
        return float(correct[keep].mean()) if keep.any() else None

    directions = sorted({s.direction for s in samples}, key=["left", "right", "above", "below"].index)
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


def run(cfg: DictConfig) -> None:
    out = unit_dir(cfg, "accuracy")
    if is_done(out) and not cfg.redo:
        print(f"accuracy: {out} exists, skipping (redo=true to recompute)")
        return
    setting = Setting.from_config(cfg.setting)
    samples = setting_samples(cfg, cfg.get("split", "all"))
    vlm = load_model(cfg)
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    probs, greedy = score_samples(vlm, scorer, samples, cfg.batch_size, desc=f"accuracy {vlm.name} {setting.name}")
    metrics = accuracy_metrics(samples, probs, scorer.candidates, greedy)
    if not cfg.greedy_check:
        metrics.pop("greedy_agrees")
    arrays = {
        "probs": probs.astype(np.float32),
        "candidates": np.array(scorer.candidates),
        "answer": np.array([s.answer for s in samples]),
        "direction": np.array([s.direction for s in samples]),
        "orientation": np.array([s.orientation for s in samples]),
        "sample_id": np.array([s.id for s in samples]),
    }
    save_unit(out, metrics, arrays, cfg)
    print(f"accuracy {vlm.name} {setting.name}: {metrics['accuracy']:.3f} "
          f"(chance {metrics['chance']:.3f}, n={metrics['n']}) -> {out}")


@entrypoint()
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
