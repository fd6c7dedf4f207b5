"""Train the model organism: a small Qwen2VLForConditionalGeneration (a few-layer vision tower and LM, the
real 336 x 336 input and 12 x 12 visual grid, the twins' word-level tokenizer) trained from scratch on the
synthetic settings' questions, so that the experiments have a real mechanism to find on a laptop.

    python -m vlm.organism                                   # configs/organism.yaml -> vlm/organism/
    python -m vlm.organism train.steps=200 out=/tmp/organism # a short run elsewhere

Data: every ordered triple of distinct items of each setting in `train.settings`, both orientations, both
directions of each. A seeded `train.held_out` fraction of each setting's triples is never trained on: the
test split. With `train.offsets`, every training question is redrawn with the whole line of items shifted by a
random whole-token offset that still fits the grid (the test split keeps the centred layout the experiments
use), so memorising a triple's image does not answer the question. Loss: cross-entropy of the answer's first token at the last input position.
Writes the model, tokenizer, image processor and `card.json` (data, steps, seed, time, held-out accuracy per
setting and direction) into `out`, whole (a temporary directory, renamed at the end).
"""

import hashlib
import itertools
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data_gen.render import draw_scene
from data_gen.scenes import Grid, Layout, line_offsets
from data_gen.settings import DIRECTIONS_OF, Setting
from vlm.cli import CONFIG_DIR, UsageError, entrypoint
from vlm.models import resolve_device
from vlm.results import provenance
from vlm.scoring import AnswerScorer
from vlm.twins import build_parts, chat_messages, initialise_zero_weights


def question_splits(setting: Setting, grid: Grid, layout: Layout, held_out: float, seed: int):
    """(train, test) Samples: every ordered triple of distinct items x orientation x queried direction, the
    triples split at random (seeded) so that a `held_out` fraction of them appear only in the test split."""
    triples = list(itertools.permutations(setting.item_names, 3))
    order = np.random.default_rng(seed).permutation(len(triples))
    n_test = max(1, round(held_out * len(triples)))
    chosen = {"test": [triples[i] for i in order[:n_test]], "train": [triples[i] for i in order[n_test:]]}
    return tuple([draw_scene(setting, grid, layout, orientation, triple, direction,
                             id=f"{setting.name}_{'-'.join(triple)}_{orientation}_{direction}")
                  for triple in chosen[split] for orientation, directions in DIRECTIONS_OF.items()
                  for direction in directions] for split in ("train", "test"))


class CachedImageProcessor:
    """The image processor, remembering each distinct image's patches (float16): the training set has a few
    hundred images per setting, seen thousands of times."""

    def __init__(self, processor):
        self.processor, self.merge_size = processor, processor.merge_size
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images, return_tensors="pt"):
        parts = [self._one(image) for image in images]
        return {"pixel_values": torch.cat([p for p, _ in parts]).float(),
                "image_grid_thw": torch.cat([g for _, g in parts])}

    def _one(self, image):
        key = hashlib.sha1(image.tobytes()).hexdigest()
        if key not in self._cache:
            out = self.processor(images=[image], return_tensors="pt")
            self._cache[key] = (out["pixel_values"].half(), out["image_grid_thw"])
        return self._cache[key]


def evaluate(model, encode, scorers, test: dict, batch_size: int) -> dict:
    """Held-out accuracy per setting, overall and per queried direction."""
    model.eval()
    report = {}
    with torch.no_grad():
        for name, samples in test.items():
            correct = []
            for start in range(0, len(samples), batch_size):
                batch = samples[start:start + batch_size]
                logits = model(**encode(batch), logits_to_keep=1).logits[:, -1]
                predicted = scorers[name].predict(logits).tolist()
                correct += [scorers[name].candidates[p] == s.answer for p, s in zip(predicted, batch, strict=True)]
            correct = np.array(correct)
            directions = np.array([s.direction for s in samples])
            report[name] = {"n": len(samples), "accuracy": float(correct.mean()),
                            "by_direction": {d: float(correct[directions == d].mean())
                                             for d in ("left", "right", "above", "below")}}
    model.train()
    return report


def train(cfg: DictConfig) -> dict:
    mcfg, tcfg = cfg.model, cfg.train
    if mcfg.family != "qwen2vl":
        raise UsageError(f"the organism is a Qwen2-VL; model {mcfg.name!r} is family {mcfg.family!r}")
    device = resolve_device(cfg.device)
    grid, layout = Grid(**mcfg.grid), Layout(**mcfg.layout)
    adapter, tokenizer, image_processor, config = build_parts(mcfg, cfg.system_prompt)
    adapter.fit_image_processor(image_processor, grid)
    tokenizer.padding_side = "left"
    torch.manual_seed(cfg.seed)
    if tcfg.init_from:          # go on from an earlier run's checkpoint (same architecture and tokenizer)
        model = adapter.model_class.from_pretrained(tcfg.init_from, attn_implementation=mcfg.attn_implementation)
        if model.get_input_embeddings().num_embeddings != config.text_config.vocab_size:
            raise UsageError(f"train.init_from={tcfg.init_from} has another vocabulary than model {mcfg.name}")
    else:
        model = adapter.model_class._from_config(config, attn_implementation=mcfg.attn_implementation)
        initialise_zero_weights(model, config)
    model.to(device).train()

    settings = {name: Setting.from_config(OmegaConf.load(Path(CONFIG_DIR) / "setting" / f"{name}.yaml"))
                for name in tcfg.settings}
    splits = {name: question_splits(s, grid, layout, tcfg.held_out, cfg.seed) for name, s in settings.items()}
    train_set = [sample for name in settings for sample in splits[name][0]]
    test = {name: splits[name][1] for name in settings}
    scorers = {name: AnswerScorer(tokenizer, s.candidates) for name, s in settings.items()}
    target = {s.answer: tokenizer(s.answer, add_special_tokens=False)["input_ids"][0] for s in train_set}
    pixels = CachedImageProcessor(image_processor)
    n_tokens = grid.rows * grid.cols
    offsets = {o: line_offsets(grid, layout, o) for o in DIRECTIONS_OF}

    def encode(samples, processor=pixels):
        texts = [tokenizer.apply_chat_template(chat_messages(cfg.system_prompt, s.prompt), add_generation_prompt=True,
                                               tokenize=False) for s in samples]
        return adapter.encode(tokenizer, processor, [s.image for s in samples], texts, n_tokens).to(device)

    def shifted(sample):
        """`sample` redrawn with its line of items at a random offset (fresh images are not cached)."""
        d_row, d_col = offsets[sample.orientation][rng.integers(len(offsets[sample.orientation]))]
        return draw_scene(settings[sample.setting], grid, layout, sample.orientation,
                          [item.name for item in sample.items], sample.direction, offset=(d_row, d_col))

    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / tcfg.warmup_steps)
                                                 * 0.5 * (1 + math.cos(math.pi * min(step, tcfg.steps) / tcfg.steps)))
    rng = np.random.default_rng(cfg.seed)
    history, start = [], time.time()

    def checkpoint(step: int, report: dict) -> dict:
        """Save the model as it is now, with its card, so a long run that stops keeps its last evaluation."""
        card = {
            "model": mcfg.name, "class": adapter.model_class.__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "data": {name: {"train_questions": len(splits[name][0]), "test_questions": len(splits[name][1]),
                            "held_out_fraction": tcfg.held_out} for name in settings},
            "steps": step, "planned_steps": tcfg.steps, "init_from": tcfg.init_from, "offsets": tcfg.offsets, "batch_size": tcfg.batch_size, "lr": tcfg.lr,
            "seed": cfg.seed, "device": str(device), "seconds": round(time.time() - start, 1),
            "held_out": report, "history": history, "provenance": provenance(cfg),
        }
        save(model, tokenizer, image_processor, card, Path(cfg.out))
        model.to(device).train()
        return card

    card = None
    progress = tqdm(range(tcfg.steps), desc="training the organism", unit="step")
    for step in progress:
        batch = [train_set[i] for i in rng.choice(len(train_set), tcfg.batch_size, replace=False)]
        if tcfg.offsets:
            batch = [shifted(s) for s in batch]
        logits = model(**(encode(batch, image_processor) if tcfg.offsets else encode(batch)),
                       logits_to_keep=1).logits[:, -1]
        loss = F.cross_entropy(logits.float(), torch.tensor([target[s.answer] for s in batch], device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % tcfg.eval_every == 0 or step + 1 == tcfg.steps:
            report = evaluate(model, encode, scorers, test, tcfg.batch_size)
            history.append({"step": step + 1, "loss": loss.item(), "seconds": round(time.time() - start, 1),
                            "held_out_accuracy": {k: v["accuracy"] for k, v in report.items()}})
            tqdm.write(f"step {step + 1}: loss {loss.item():.3f}, held-out accuracy "
                       + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in report.items()))
            card = checkpoint(step + 1, report)
    return card


def save(model, tokenizer, image_processor, card: dict, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to("cpu").eval()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    (tmp / "card.json").write_text(json.dumps(card, indent=1))
    if out.exists():
        for path in out.glob("*.md"):          # a hand-written card beside the weights stays
            shutil.copy(path, tmp / path.name)
        shutil.rmtree(out)
    tmp.rename(out)


@entrypoint("organism")
def main(cfg: DictConfig) -> None:
    card = train(cfg)
    print(json.dumps(card["held_out"], indent=1))
    print(f"organism saved to {cfg.out}")


if __name__ == "__main__":
    main()
