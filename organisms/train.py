"""Train the model organism: a small Qwen2VLForConditionalGeneration (a few-layer vision tower and LM, the
real 336 x 336 input and 12 x 12 visual grid, the word-level tokenizer of vlm/twins.py) trained from scratch on the
synthetic settings' questions, so that the experiments have a real mechanism to find on a laptop.

    python -m organisms.train                                   # configs/organism.yaml -> organisms/organism/
    python -m organisms.train train.steps=200 out=/tmp/organism # a short run elsewhere
    python -m organisms.train evaluate=true                     # held-out accuracy of organisms/organism/ (its card's)

Data: every ordered triple of distinct items of each setting in `train.settings`, both orientations, both
directions of each. A seeded `train.held_out` fraction of each setting's triples is never trained on: the
test split. A step takes `train.batch_size / 2` images with both queried directions of each; the vision tower
runs once per image. With `train.offsets`, each training image is redrawn with its line of items shifted by a
random whole-token offset that still fits the grid (the test split keeps the centred layout the experiments
use). Loss: cross-entropy of the answer's first token at the last input position. Evaluation scores the test
split as the accuracy experiment scores. Writes the model, tokenizer, image processor and `card.json` (data,
steps, seed, time, held-out accuracy per setting, direction and orientation) into `out` at every evaluation,
whole (a temporary directory, renamed); a hand-written `*.md` card already there is kept.
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

from accuracy.experiment import accuracy_metrics
from common.cli import CONFIG_DIR, entrypoint
from common.errors import UsageError, check_choice
from common.geometry import Grid, Layout, line_boxes, line_offsets, strip_box, token_indices
from common.results import provenance
from data_gen.pairs import empty_image, isolated_middle_image
from data_gen.render import draw_scene
from data_gen.settings import DIRECTIONS_OF, Setting
from vlm.adapters import ADAPTERS
from vlm.models import VLM, load_model, resolve_device
from vlm.scoring import AnswerScorer, score_samples
from vlm.twins import build_parts, initialise_zero_weights


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


def init_vision_positions(model, how: str) -> None:
    """Start a SigLIP tower's learned absolute position embeddings (one row per patch, row-major) from a 2-D sine
    / cosine table (`how` = sincos): half the channels for the patch's row, half for its column, each as sin and
    cos at geometric frequencies 1 .. 1/100. The default random rows are ~10x smaller than a patch's content
    embedding, so order starts as a faint signal; these are as large as the content and smooth across the grid.
    Still trained from there."""
    check_choice("train.vision_position_init", how, ("sincos",))
    embeddings = getattr(getattr(model.model, "vision_tower", None), "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "position_embedding"):
        raise UsageError("train.vision_position_init needs a vision tower with learned absolute position embeddings "
                         "(Gemma 3's SigLIP)")
    weight = embeddings.position_embedding.weight
    side, dim = round(weight.shape[0] ** 0.5), weight.shape[1]
    quarter = dim // 4
    freq = 100.0 ** (-torch.arange(quarter, dtype=torch.float32) / max(1, quarter - 1))
    one_axis = torch.arange(side, dtype=torch.float32)[:, None] * freq                  # (side, quarter)
    one_axis = torch.cat([one_axis.sin(), one_axis.cos()], 1)                            # (side, 2 * quarter)
    table = torch.zeros(side, side, dim)
    table[..., :4 * quarter] = torch.cat([one_axis[:, None].expand(side, side, -1),
                                          one_axis[None, :].expand(side, side, -1)], -1)
    with torch.no_grad():
        weight.copy_(table.reshape(side * side, dim))


def init_residual_branches(model, adapter, scale: float) -> None:
    """Start every LM layer's residual branches at `scale` x their normalised output (Gemma 3's post-attention and
    post-feed-forward RMSNorms, whose gain is 1 + weight). Gemma 3 adds unit-RMS branch outputs to a residual
    stream that starts at the embeddings' scale; at gain 1 the first layers' mostly shared updates drown what
    tells one visual token from another."""
    if not 0.0 < scale <= 1.0:
        raise UsageError(f"train.residual_init must be in (0, 1], got {scale}")
    with torch.no_grad():
        for layer in adapter.decoder_layers(model):
            for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
                norm = getattr(layer, name, None)
                if norm is None:
                    raise UsageError(f"train.residual_init needs Gemma 3's post-norms; {type(layer).__name__} "
                                     f"has no {name}")
                norm.weight.fill_(scale - 1.0)


class VisualMix:
    """What the LM is shown in place of some training images' own visual embeddings (train.shuffle, train.ablate,
    train.drop_items; configs/dual_organism.yaml says why). Per training image, one of:
    - ablated (probability `ablate`): every item's tokens <- the same item's tokens from an image where it sits
      alone in the middle, every other token <- the empty image's (the ablation experiment's operation, with
      the model as it is at that step): the visual embeddings carry no order, only where tokens sit;
    - shuffled (probability `shuffle`): the visual tokens permuted at random among the image slots, so where a
      token sits says nothing and only what the vision tower wrote into it carries order;
    - strips permuted (probability `permute_strips`): the three items' strips (strip patching's regions) change
      places, each strip's tokens kept in their order, the answer still the drawn image's: where the tokens sit
      tells a coherent but wrong order, and the LM learns to follow what the tokens carry (strip patching at
      the visual embeddings then moves the answer, Fig 7);
    - as drawn (otherwise).
    Images not ablated have each item's own tokens replaced by the empty image's with probability `drop_items`
    per item (before any shuffle), so the answer has to come from the tokens around the item."""

    # the five orders of three strips other than their own (strip at place p <- strip order[p])
    PERMUTATIONS = ((1, 0, 2), (0, 2, 1), (2, 1, 0), (1, 2, 0), (2, 0, 1))

    def __init__(self, shuffle: float = 0.0, ablate: float = 0.0, drop_items: float = 0.0,
                 permute_strips: float = 0.0):
        for name, value in (("shuffle", shuffle), ("ablate", ablate), ("drop_items", drop_items),
                            ("permute_strips", permute_strips)):
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"train.{name} must be a probability in [0, 1], got {value}")
        if shuffle + ablate + permute_strips > 1.0:
            raise UsageError(f"train.shuffle + train.ablate + train.permute_strips must be at most 1, got "
                             f"{shuffle} + {ablate} + {permute_strips}")
        self.shuffle, self.ablate, self.drop_items, self.permute_strips = shuffle, ablate, drop_items, permute_strips

    @classmethod
    def from_config(cls, tcfg: DictConfig) -> "VisualMix":
        return cls(tcfg.shuffle, tcfg.ablate, tcfg.drop_items, tcfg.permute_strips)

    def at(self, step: int, ramp_steps: int) -> "VisualMix":
        """The mix at training step `step`: every probability grows linearly from 0 to its own over the first
        `ramp_steps` steps (0: from the start)."""
        scale = min(1.0, step / ramp_steps) if ramp_steps else 1.0
        return VisualMix(self.shuffle * scale, self.ablate * scale, self.drop_items * scale,
                         self.permute_strips * scale)

    @property
    def active(self) -> bool:
        return self.shuffle > 0 or self.ablate > 0 or self.drop_items > 0 or self.permute_strips > 0

    def card(self) -> dict:
        return {"shuffle": self.shuffle, "ablate": self.ablate, "drop_items": self.drop_items,
                "permute_strips": self.permute_strips}

    def apply(self, tokens: torch.Tensor, samples: list, settings: dict, grid: Grid, layout: Layout, embed,
              rng: np.random.Generator) -> torch.Tensor:
        """`tokens` (images, tokens, hidden) of `samples` (one per image) after the mix; `embed(images)` gives
        plain visual embeddings (no gradient) of source images."""
        modes = rng.choice(4, size=len(samples), p=[self.ablate, self.shuffle, self.permute_strips,
                                                     1.0 - self.ablate - self.shuffle - self.permute_strips])
        dropped = rng.random((len(samples), 3)) < self.drop_items
        dropped[modes == 0] = False
        needs = sorted({s.setting for s, mode, drop in zip(samples, modes, dropped, strict=True)
                        if mode == 0 or drop.any()})
        empty = dict(zip(needs, embed([empty_image(grid, settings[name].background) for name in needs]),
                         strict=True)) if needs else {}
        keys = sorted({(s.setting, s.orientation, item.name) for s, mode in zip(samples, modes, strict=True)
                       if mode == 0 for item in s.items})
        isolated = {}
        if keys:
            images = [isolated_middle_image(settings[name], grid, layout, orientation, item).image
                      for name, orientation, item in keys]
            isolated = dict(zip(keys, embed(images), strict=True))
        out = []
        for k, (sample, mode) in enumerate(zip(samples, modes, strict=True)):
            own = tokens[k]
            if mode == 0:
                own = empty[sample.setting].clone()
                middle = token_indices(grid, line_boxes(grid, layout, sample.orientation)[1])
                for item in sample.items:
                    source = isolated[(sample.setting, sample.orientation, item.name)]
                    own[token_indices(grid, item.token_box)] = source[middle]
            elif dropped[k].any():
                keep = torch.ones(own.shape[0], 1, device=own.device)
                for item, drop in zip(sample.items, dropped[k], strict=True):
                    if drop:
                        keep[token_indices(grid, item.token_box)] = 0.0
                own = own * keep + empty[sample.setting] * (1.0 - keep)
            if mode == 1:
                own = own[torch.from_numpy(rng.permutation(own.shape[0])).to(own.device)]
            elif mode == 2:
                strips = [token_indices(grid, strip_box(grid, layout, item.token_box, sample.orientation))
                          for item in sample.items]
                order = self.PERMUTATIONS[rng.integers(len(self.PERMUTATIONS))]
                index = torch.arange(own.shape[0], device=own.device)
                for place, source in enumerate(order):
                    index[strips[place]] = torch.tensor(strips[source], device=own.device)
                own = own[index]
            out.append(own)
        return torch.stack(out)


def held_out_accuracy(vlm: VLM, settings: dict, test: dict, batch_size: int) -> dict:
    """Accuracy on each setting's test split (`test`: setting name -> Samples), overall, per queried direction and
    per orientation, scored as the accuracy experiment scores (vlm.scoring, accuracy.experiment)."""
    was_training = vlm.model.training
    vlm.model.eval()
    report = {}
    with torch.no_grad():
        for name, samples in test.items():
            scorer = AnswerScorer(vlm.tokenizer, settings[name].candidates)
            probs, greedy = score_samples(vlm, scorer, samples, batch_size, desc=f"held-out {name}")
            metrics = accuracy_metrics(samples, probs, scorer.candidates, greedy)
            report[name] = {key: metrics[key] for key in ("n", "accuracy", "by_direction", "by_orientation", "chance")}
    vlm.model.train(was_training)
    return report


def question_sets(cfg: DictConfig, grid: Grid, layout: Layout) -> tuple[dict, dict]:
    """(setting name -> Setting, setting name -> (train, test) questions) for the settings in `cfg.train.settings`."""
    configs = {path.stem: OmegaConf.load(path) for path in sorted((Path(CONFIG_DIR) / "setting").glob("*.yaml"))}
    synthetic = [name for name, config in configs.items() if config.get("source", "synthetic") == "synthetic"]
    for name in cfg.train.settings:
        check_choice("train.settings entry", name, synthetic)
    settings = {name: Setting.from_config(configs[name]) for name in cfg.train.settings}
    return settings, {name: question_splits(setting, grid, layout, cfg.train.held_out, cfg.seed)
                      for name, setting in settings.items()}


def evaluate(cfg: DictConfig) -> dict:
    """The held-out accuracy of the model at `cfg.model.path` (the numbers of its card), without training."""
    vlm = load_model(cfg)
    settings, splits = question_sets(cfg, vlm.grid, vlm.layout)
    return held_out_accuracy(vlm, settings, {name: test for name, (_, test) in splits.items()}, cfg.batch_size)


def train(cfg: DictConfig) -> dict:
    mcfg, tcfg = cfg.model, cfg.train
    check_choice("organism family", mcfg.family, ("qwen2vl", "gemma3"))
    mix = VisualMix.from_config(tcfg)
    device = resolve_device(cfg.device)
    grid, layout = Grid(**mcfg.grid), Layout(**mcfg.layout)
    adapter = ADAPTERS[mcfg.family](mcfg.modules)
    tokenizer, image_processor, config = build_parts(adapter, mcfg, cfg.system_prompt)
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
        if tcfg.vision_position_init:
            init_vision_positions(model, tcfg.vision_position_init)
        if tcfg.residual_init is not None:
            init_residual_branches(model, adapter, float(tcfg.residual_init))
    model.to(device).train()

    settings, splits = question_sets(cfg, grid, layout)
    train_set = [sample for train_split, _ in splits.values() for sample in train_split]
    test = {name: test_split for name, (_, test_split) in splits.items()}
    by_image: dict[str, list] = {}          # an image's questions (both queried directions of its orientation)
    for sample in train_set:
        by_image.setdefault(sample.id.rsplit("_", 1)[0], []).append(sample)
    train_images = list(by_image.values())
    n_images = max(1, tcfg.batch_size // len(train_images[0]))
    target = {s.answer: tokenizer(s.answer, add_special_tokens=False)["input_ids"][0] for s in train_set}
    # the model under training, seen as the experiments see a loaded one (`vlm`, which evaluation uses), and
    # with the fixed images' pixels cached for the training steps (`trained`)
    # (Qwen2-VL's processor only: Gemma 3's is cheap on the organism's small images and its processor class
    # checks the image processor's type)
    pixels = CachedImageProcessor(image_processor) if not tcfg.offsets and mcfg.family == "qwen2vl" else image_processor
    vlm = VLM(mcfg.name, adapter, model, tokenizer, image_processor, grid, layout, cfg.system_prompt)
    trained = VLM(mcfg.name, adapter, model, tokenizer, pixels, grid, layout, cfg.system_prompt)
    offsets = {o: line_offsets(grid, layout, o) for o in DIRECTIONS_OF}

    def shifted(group):
        """The questions of one image, redrawn with its line of items at one random offset."""
        first = group[0]
        d_row, d_col = offsets[first.orientation][rng.integers(len(offsets[first.orientation]))]
        return [draw_scene(settings[s.setting], grid, layout, s.orientation, [item.name for item in s.items],
                           s.direction, offset=(d_row, d_col)) for s in group]

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
            "data": {name: {"train_questions": len(train_split), "test_questions": len(test_split),
                            "held_out_fraction": tcfg.held_out} for name, (train_split, test_split) in splits.items()},
            "steps": step, "planned_steps": tcfg.steps, "init_from": tcfg.init_from, "offsets": tcfg.offsets,
            "visual_mix": {**mix.card(), "ramp_steps": tcfg.mix_ramp_steps}, "batch_size": tcfg.batch_size, "lr": tcfg.lr,
            "seed": cfg.seed, "device": str(device), "seconds": round(time.time() - start, 1),
            "held_out": report, "history": history, "provenance": provenance(cfg),
        }
        save(model, tokenizer, image_processor, card, Path(cfg.out))
        model.to(device).train()
        return card

    n_tokens = grid.rows * grid.cols

    def visual_tokens_of(inputs, rows) -> torch.Tensor:
        """(len(rows), tokens, hidden) visual embeddings of the images of rows `rows` of `inputs`, with gradient."""
        features = adapter.image_features(model, adapter.image_rows(inputs, rows)).pooler_output
        if isinstance(features, (tuple, list)):
            features = torch.cat(list(features))
        return adapter.visual_tokens(features, n_tokens)

    @torch.no_grad()
    def plain_tokens(images) -> torch.Tensor:
        """(n, tokens, hidden) visual embeddings of PIL `images` as the model is now, no gradient (the sources
        of ablated and item-dropped embeddings)."""
        return trained.image_embeddings(list(images), len(images))

    def logits_of(images: list[list], step: int) -> torch.Tensor:
        """Last-position logits of every question of `images` (lists of questions on one image each): the
        vision tower runs once per image, its output shared by that image's questions, after the visual mix at
        this step (shuffled, ablated or item-dropped visual embeddings for some images)."""
        questions = [s for group in images for s in group]
        inputs = dict(trained.encode([s.image for s in questions], [s.prompt for s in questions]))
        firsts = torch.tensor(np.cumsum([0] + [len(group) for group in images[:-1]]), device=device)
        tokens = visual_tokens_of(inputs, firsts)
        now = mix.at(step, tcfg.mix_ramp_steps)
        if now.active:
            tokens = now.apply(tokens, [group[0] for group in images], settings, grid, layout, plain_tokens, rng)
        shared = torch.cat([tokens[i:i + 1].expand(len(group), -1, -1) for i, group in enumerate(images)])
        return adapter.forward(model, inputs, shared, logits_to_keep=1).logits[:, -1]

    card = None
    progress = tqdm(range(tcfg.steps), desc="training the organism", unit="step")
    for step in progress:
        images = [train_images[i] for i in rng.choice(len(train_images), n_images, replace=False)]
        if tcfg.offsets:            # true: every image shifted; a number in (0, 1): that fraction of them
            share = 1.0 if tcfg.offsets is True else float(tcfg.offsets)
            images = [shifted(group) if rng.random() < share else group for group in images]
        batch = [s for group in images for s in group]
        logits = logits_of(images, step)
        loss = F.cross_entropy(logits.float(), torch.tensor([target[s.answer] for s in batch], device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % tcfg.eval_every == 0 or step + 1 == tcfg.steps:
            report = held_out_accuracy(vlm, settings, test, tcfg.batch_size)
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
    if cfg.evaluate:
        print(json.dumps(evaluate(cfg), indent=1))
        return
    card = train(cfg)
    print(json.dumps(card["held_out"], indent=1))
    print(f"organism saved to {cfg.out}")


if __name__ == "__main__":
    main()
