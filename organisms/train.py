"""Train an organism: a small VLM of a real class (its model config: configs/model/organism.yaml,
dual_organism.yaml), trained from scratch on the synthetic settings' questions so that the experiments have a
real mechanism to find on a laptop; its weights and card ship in organisms/<name>/.

    python -m organisms.train                                   # configs/organism.yaml -> organisms/organism/
    python -m organisms.train --config-name dual_organism       # every phase in order -> organisms/dual_organism/
    python -m organisms.train train.steps=200 out=/tmp/organism # a short run elsewhere
    python -m organisms.train evaluate=true                     # held-out accuracy of organisms/organism/ (its card's)

A training config holds `train` (data, optimiser, visual mix, starting weights) and, for a model trained in
phases, `phases`: each phase's name and the `train` keys it changes, run in order, each with a fresh optimiser and
learning-rate schedule, continuing from the previous phase's weights. `from_phase=NAME train.init_from=DIR`
starts at a later phase from a checkpoint; `checkpoints=DIR` also keeps each phase's end model in DIR/<phase>.

Data (organisms.data): the questions of every ordered item triple, both orientations and directions; a seeded
fraction of the triples held out. Loss: cross-entropy of the answer's first token at the last input position.
Each image's vision tower runs once for its questions; with `train.shared_prefix` (the adapter's
shared_prefix_logits) so does the image and prompt prefix they share. Some images' visual embeddings can be
replaced (organisms.mix.VisualMix). Evaluation scores the test split as the accuracy experiment scores. At every
evaluation the model, tokenizer, image processor and `card.json` (command, commit, versions, data, each phase's
steps, seconds and held-out accuracy; no machine path) are written into `out`.
"""

import json
import math
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from accuracy.experiment import accuracy_metrics
from common.cli import entrypoint
from common.errors import UsageError
from common.geometry import Grid, Layout, token_indices
from common.results import REPO, provenance
from organisms.data import CachedImageProcessor, Questions, question_splits, synthetic_settings
from organisms.mix import MixChoice, VisualMix
from organisms.model import build, save
from vlm.models import VLM, load_model, resolve_device
from vlm.scoring import AnswerScorer, score_samples


def phases(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """[(name, train config)] in order: each phase's keys over `cfg.train`; one phase named `train` when the
    config has no `phases`. Unknown keys and an unknown `from_phase` are refused by name."""
    listed = cfg.get("phases") or {"train": {}}
    out = []
    for name, changes in listed.items():
        changes = changes or {}
        unknown = sorted(set(changes) - set(cfg.train))
        if unknown:
            raise UsageError(f"phase {name} sets {', '.join(unknown)}, not train keys; allowed: "
                             f"{', '.join(sorted(cfg.train))}")
        out.append((str(name), OmegaConf.merge(cfg.train, changes)))
    start = cfg.get("from_phase")
    if start is not None:
        names = [name for name, _ in out]
        if start not in names:
            raise UsageError(f"from_phase={start} is not a phase of this config; allowed: {', '.join(names)}")
        out = out[names.index(start):]
    for _, tcfg in out:
        VisualMix.from_config(tcfg)                 # probabilities checked before anything loads
        if tcfg.steps < 1 or tcfg.eval_every < 1 or tcfg.batch_size < 2:
            raise UsageError(f"train.steps, train.eval_every must be >= 1 and train.batch_size >= 2, got "
                             f"{tcfg.steps}, {tcfg.eval_every}, {tcfg.batch_size}")
    return out


class Trainee:
    """The model under training with what a step needs: its adapter, the training questions, the model seen as
    the experiments see a loaded one (`vlm`, for evaluation and the mix's source embeddings), and as a step
    encodes it (`encoder`: the pixels of the fixed images cached when `train.cache_pixels`)."""

    def __init__(self, cfg: DictConfig, start: DictConfig):
        mcfg = cfg.model
        self.device = resolve_device(cfg.device)
        self.grid, self.layout = Grid(**mcfg.grid), Layout(**mcfg.layout)
        self.adapter, tokenizer, image_processor, model = build(cfg, start)
        self.model = model.to(self.device)
        self.questions = Questions(start, self.grid, self.layout, cfg.seed, tokenizer)
        self.vlm = VLM(mcfg.name, self.adapter, self.model, tokenizer, image_processor, self.grid, self.layout,
                       cfg.system_prompt)
        pixels = CachedImageProcessor(image_processor) if start.cache_pixels and not start.offsets else image_processor
        self.encoder = VLM(mcfg.name, self.adapter, self.model, tokenizer, pixels, self.grid, self.layout,
                           cfg.system_prompt)

    def image_tokens(self, inputs, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), tokens, hidden) visual embeddings of the images of rows `rows` of `inputs`, with gradient."""
        features = self.adapter.image_features(self.model, self.adapter.image_rows(inputs, rows)).pooler_output
        if isinstance(features, (tuple, list)):
            features = torch.cat(list(features))
        return self.adapter.visual_tokens(features, self.grid.n_tokens)

    @torch.no_grad()
    def plain_tokens(self, images) -> torch.Tensor:
        """(n, tokens, hidden) visual embeddings of PIL `images` as the model is now, no gradient (the sources of
        ablated and item-dropped embeddings)."""
        return self.encoder.image_embeddings(list(images), len(images))

    def logits(self, images: list[list], mix: VisualMix, choice: MixChoice, rng: np.random.Generator,
               shared_prefix: bool, image_only: bool = False, items_only: bool = False,
               jitter: int = 0) -> torch.Tensor:
        """Last-position logits of every question of `images` (lists of the questions of one image): the vision
        tower runs once per image and `mix` replaces some images' visual embeddings as `choice` says. With
        `image_only`, gradients reach the parameters only through the sequence up to the image's last token: the
        rest (the prompt, where the answer is read) runs on detached parameters. With `items_only`, every visual
        token outside the items is hidden from attention (masked as padding is). With `jitter`, the text after each
        image sits 0..jitter positions (drawn per image) further from it (as if that many hidden tokens stood
        between), so where the answer is read cannot tell the items' places from its distance to them."""
        questions = [s for group in images for s in group]
        inputs = dict(self.encoder.encode([s.image for s in questions], [s.prompt for s in questions]))
        sizes = [len(group) for group in images]
        firsts = torch.tensor(np.cumsum([0] + sizes[:-1]), device=self.device)
        tokens = self.image_tokens(inputs, firsts)
        if mix.active:
            tokens = mix.apply(tokens, [group[0] for group in images], choice, self.questions.settings, self.grid,
                               self.layout, self.plain_tokens, rng)
        if items_only:
            inputs["attention_mask"] = self.items_only_mask(inputs, images)
        if image_only or jitter:
            image_end = int((inputs["input_ids"] == self.vlm.image_token_id).nonzero()[:, 1].max()) + 1
            shift = torch.from_numpy(rng.integers(0, jitter + 1, len(images))) if jitter else None
            continuation = None
            if image_only:
                detached = {name: param.detach() for name, param in self.model.named_parameters()}
                continuation = lambda **kwargs: torch.func.functional_call(self.model, detached, (), kwargs)  # noqa: E731
            return self.adapter.shared_prefix_logits(self.model, inputs, tokens, sizes, upto=image_end, shift=shift,
                                                     continuation=continuation)
        if shared_prefix:
            return self.adapter.shared_prefix_logits(self.model, inputs, tokens, sizes)
        owner = torch.repeat_interleave(torch.arange(len(sizes), device=self.device),
                                        torch.tensor(sizes, device=self.device))
        return self.adapter.forward(self.model, inputs, tokens[owner], logits_to_keep=1).logits[:, -1]

    def items_only_mask(self, inputs, images: list[list]) -> torch.Tensor:
        """The attention mask of `inputs` with every visual token of each row but its image's items' set to 0."""
        mask = inputs["attention_mask"].clone()
        positions = self.vlm.visual_token_positions(inputs["input_ids"])
        row = 0
        for group in images:
            items = {i for item in group[0].items for i in token_indices(self.grid, item.token_box)}
            hidden = torch.tensor([k for k in range(self.grid.n_tokens) if k not in items], device=mask.device)
            for _ in group:
                mask[row, positions[row, hidden]] = 0
                row += 1
        return mask

    def step_loss(self, images: list[list], mix: VisualMix, rng: np.random.Generator, tcfg: DictConfig) -> float:
        """Accumulate the gradient of one training batch's mean loss; returns the loss. With `train.ablate_layers`
        = k, the ablated images' share of it reaches only the LM's first k decoder layers, through what they
        compute at the image's tokens (`logits(..., image_only=True)`; run first, the other parameters'
        gradients dropped before the rest of the batch adds its own): the answer is still read by the layers
        and positions trained on the other images, so these layers must write the order the LM finds from where
        the tokens sit into the tokens, as the vision tower writes it."""
        choice = mix.choose(rng, len(images))
        parts = [(np.arange(len(images)), False)]
        if tcfg.ablate_layers is not None and choice.ablated.any():
            parts = [(np.flatnonzero(choice.ablated), True), (np.flatnonzero(~choice.ablated), False)]
        total, value = sum(len(group) for group in images), 0.0
        for index, routed in parts:
            if len(index) == 0:
                continue
            part = [images[i] for i in index]
            logits = self.logits(part, mix, choice.subset(index), rng, tcfg.shared_prefix, image_only=routed,
                                 items_only=routed and tcfg.ablate_items_only,
                                 jitter=tcfg.jitter)
            answers = self.questions.answer_ids([s for group in part for s in group], self.device)
            loss = F.cross_entropy(logits.float(), answers) * (len(answers) / total)
            loss.backward()
            if routed:
                kept = self.layer_parameters(tcfg.ablate_layers)
                for param in self.model.parameters():
                    if id(param) not in kept:
                        param.grad = None
            value += loss.item()
        return value

    def vision_parameters(self) -> set[int]:
        """ids of the parameters the visual embeddings depend on and the LM does not: the vision tower and the
        projector (everything outside the LM decoder and its output head)."""
        language = {id(p) for p in self.adapter.language_model(self.model).parameters()}
        language |= {id(p) for p in self.model.get_output_embeddings().parameters()}
        return {id(p) for p in self.model.parameters() if id(p) not in language}

    def layer_parameters(self, k: int) -> set[int]:
        """ids of the parameters of the LM's first `k` decoder layers."""
        layers = self.adapter.decoder_layers(self.model)
        if not 1 <= k <= len(layers):
            raise UsageError(f"train.ablate_layers={k} must be in 1..{len(layers)} (the LM's decoder layers)")
        return {id(p) for layer in list(layers)[:k] for p in layer.parameters()}

    def held_out(self, batch_size: int) -> dict:
        return held_out_accuracy(self.vlm, self.questions.settings, self.questions.test, batch_size)


def train_phase(trainee: Trainee, name: str, tcfg: DictConfig, rng: np.random.Generator, on_eval) -> dict:
    """Train `trainee` for one phase (a fresh AdamW, linear warm-up then cosine decay to 0 at `tcfg.steps`);
    `on_eval(record)` after every evaluation. Returns the phase's record for the card."""
    model, questions = trainee.model, trainee.questions
    mix = VisualMix.from_config(tcfg)
    n_images = max(1, tcfg.batch_size // questions.questions_per_image)
    vision = trainee.vision_parameters()
    groups = [{"params": [p for p in model.parameters() if id(p) not in vision], "lr": tcfg.lr}]
    if tcfg.vision_lr > 0:
        groups.append({"params": [p for p in model.parameters() if id(p) in vision], "lr": tcfg.lr * tcfg.vision_lr})
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    for param in model.parameters():                # vision_lr 0: the vision tower and projector stay as they are
        param.requires_grad_(tcfg.vision_lr > 0 or id(param) not in vision)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / tcfg.warmup_steps)
                                                 * 0.5 * (1 + math.cos(math.pi * min(step, tcfg.steps) / tcfg.steps)))
    record = {"name": name, "steps": 0, "planned_steps": tcfg.steps, "seconds": 0.0, "cpu_seconds": 0.0,
              "visual_mix": {**mix.card(), "ramp_steps": tcfg.mix_ramp_steps},
              **{key: tcfg[key] for key in ("batch_size", "lr", "vision_lr", "weight_decay", "warmup_steps",
                                            "offsets", "ablate_layers", "shared_prefix")},
              "losses": [], "history": []}
    start, cpu_start = time.time(), time.process_time()
    model.train()
    progress = tqdm(range(tcfg.steps), desc=f"training the organism ({name})", unit="step")
    for step in progress:
        images = questions.draw(rng, n_images, tcfg.offsets)
        optimizer.zero_grad(set_to_none=True)
        loss = trainee.step_loss(images, mix.at(step, tcfg.mix_ramp_steps), rng, tcfg)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss:.3f}")
        record["losses"].append(round(loss, 6))
        if (step + 1) % tcfg.eval_every == 0 or step + 1 == tcfg.steps:
            report = trainee.held_out(tcfg.batch_size)
            record.update(steps=step + 1, seconds=round(time.time() - start, 1),
                          cpu_seconds=round(time.process_time() - cpu_start, 1), held_out=report)
            record["history"].append({"step": step + 1, "loss": loss, "seconds": record["seconds"],
                                      "held_out_accuracy": {k: v["accuracy"] for k, v in report.items()}})
            tqdm.write(f"{name} step {step + 1}: loss {loss:.3f}, held-out accuracy "
                       + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in report.items()))
            on_eval(record)
            model.train()
    return record


def train(cfg: DictConfig, command: str | None = None) -> dict:
    """Run every phase of `cfg` in order (or from `cfg.from_phase`) and return the card written into `cfg.out`."""
    plan = phases(cfg)
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    try:
        return train_phases(cfg, plan, command)
    finally:
        torch.set_num_threads(threads)


def train_phases(cfg: DictConfig, plan, command: str | None) -> dict:
    torch.manual_seed(cfg.seed)
    trainee = Trainee(cfg, plan[0][1])
    done, began = [], time.time()
    source = {**provenance(cfg), "uncommitted_changes": uncommitted_changes(cfg.out)}    # the code as it started

    def card(current: dict | None = None) -> dict:
        records = done + ([current] if current is not None else [])
        return training_card(cfg, trainee, plan, records, command, time.time() - began, source)

    def write(current: dict) -> None:
        save(trainee.model, trainee.vlm.tokenizer, trainee.vlm.image_processor, card(current), Path(cfg.out))

    for name, tcfg in plan:
        # seeded by the phase's name: a phase run alone (from_phase) draws what it draws in a full run
        rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
        done.append(train_phase(trainee, name, tcfg, rng, write))
        if cfg.get("checkpoints"):
            save(trainee.model, trainee.vlm.tokenizer, trainee.vlm.image_processor, card(),
                 Path(cfg.checkpoints) / name)
    final = card()
    save(trainee.model, trainee.vlm.tokenizer, trainee.vlm.image_processor, final, Path(cfg.out))
    return final


def training_card(cfg: DictConfig, trainee: Trainee, plan, records: list[dict], command: str | None,
                  seconds: float, source: dict) -> dict:
    """card.json: what was trained, by which command at which commit (`source`: provenance and uncommitted
    changes when training started), each phase's steps, seconds and evaluations, the last held-out accuracy;
    every path in it relative to the repository (or marked outside)."""
    model = trainee.model
    config = OmegaConf.to_container(cfg, resolve=True)
    started = plan[0][1]
    return {
        "model": cfg.model.name, "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": command,
        "git_commit": source["git_commit"], "uncommitted_changes": source["uncommitted_changes"],
        "versions": source["versions"], "threads": torch.get_num_threads(), "device": str(trainee.device),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")
        if len(records) == len(plan) and records[-1]["steps"] == plan[-1][1].steps else None,
        "seconds": round(seconds, 1),               # wall clock; cpu_seconds: summed over threads
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in records), 1),
        "seed": cfg.seed,
        "started_from": scrub(started.init_from) if started.init_from else "scratch",
        "data": trainee.questions.card(),
        "steps": sum(r["steps"] for r in records),
        "phases": records,
        "held_out": records[-1].get("held_out") if records else None,
        "config": scrub(config),
    }


def scrub(value):
    """`value` (a config as plain containers, or one string) with every absolute path made relative to the
    repository, or marked `<outside the repository>`: a card names no machine path."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else "<outside the repository>"
    return value


def uncommitted_changes(out) -> bool | None:
    """Whether tracked files other than those under `out` differ from the commit (None: not a git checkout)."""
    exclude = []
    if Path(out).resolve().is_relative_to(REPO):
        exclude = [f":(exclude){Path(out).resolve().relative_to(REPO)}"]
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *exclude],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(status.strip())


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


def evaluate(cfg: DictConfig) -> dict:
    """The held-out accuracy of the model at `cfg.model.path` (the numbers of its card), without training."""
    vlm = load_model(cfg)
    settings = synthetic_settings(cfg.train.settings)
    test = {name: question_splits(setting, vlm.grid, vlm.layout, cfg.train.held_out, cfg.seed)[1]
            for name, setting in settings.items()}
    return held_out_accuracy(vlm, settings, test, cfg.batch_size)


def command_line() -> str:
    """The command that ran, as typed (config name and overrides), for the card."""
    hydra = HydraConfig.get()
    name = hydra.job.config_name
    parts = ["python -m organisms.train"] + ([f"--config-name {name}"] if name != "organism" else [])
    overrides = [f"{key}={scrub(value)}" for key, _, value in (o.partition("=") for o in hydra.overrides.task)]
    return " ".join(parts + overrides)


@entrypoint("organism")
def main(cfg: DictConfig) -> None:
    if cfg.evaluate:
        print(json.dumps(evaluate(cfg), indent=1))
        return
    card = train(cfg, command_line())
    print(json.dumps(card["held_out"], indent=1))
    print(f"organism saved to {cfg.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
