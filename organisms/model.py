"""An organism's model: built from its model config (from scratch, with the starting weights its training config
asks for, or from a checkpoint), and saved whole with its card."""

import json
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig

from common.errors import UsageError, check_choice
from common.geometry import Grid
from vlm.adapters import ADAPTERS
from vlm.twins import build_parts, initialise_zero_weights


def build(cfg: DictConfig, start: DictConfig):
    """(adapter, tokenizer, image processor, model in training mode on no device yet) for `cfg.model`: read from
    `start.init_from` (a checkpoint of the same architecture and tokenizer), or built from its config with the
    starting weights of `start` (vision_position_init, residual_init). The caller seeds torch first."""
    mcfg = cfg.model
    check_choice("organism family", mcfg.family, sorted(ADAPTERS))
    adapter = ADAPTERS[mcfg.family](mcfg.modules)
    tokenizer, image_processor, config = build_parts(adapter, mcfg, cfg.system_prompt)
    adapter.fit_image_processor(image_processor, Grid(**mcfg.grid))
    tokenizer.padding_side = "left"
    if start.init_from:
        path = Path(start.init_from)
        if not (path / "config.json").exists():
            raise UsageError(f"train.init_from={start.init_from} holds no checkpoint (no config.json there)")
        model = adapter.model_class.from_pretrained(path, attn_implementation=mcfg.attn_implementation)
        if model.get_input_embeddings().num_embeddings != config.text_config.vocab_size:
            raise UsageError(f"train.init_from={start.init_from} has another vocabulary than model {mcfg.name}")
    else:
        model = adapter.model_class._from_config(config, attn_implementation=mcfg.attn_implementation)
        initialise_zero_weights(model, config)
        if start.vision_position_init:
            init_vision_positions(model, adapter, start.vision_position_init)
        if start.residual_init is not None:
            init_residual_branches(model, adapter, float(start.residual_init))
    return adapter, tokenizer, image_processor, model.train()


def init_vision_positions(model, adapter, how: str) -> None:
    """Start a vision tower's learned absolute position embeddings (one row per patch, row-major) from a 2-D sine
    / cosine table (`how` = sincos): half the channels for the patch's row, half for its column, each as sin and
    cos at geometric frequencies 1 .. 1/100. The default random rows are ~10x smaller than a patch's content
    embedding, so order starts as a faint signal; these are as large as the content and smooth across the grid.
    Still trained from there."""
    check_choice("train.vision_position_init", how, ("sincos",))
    embedding = adapter.vision_position_embedding(model)
    if embedding is None:
        raise UsageError(f"train.vision_position_init needs a vision tower with learned absolute position "
                         f"embeddings; {adapter.name}'s has none")
    weight = embedding.weight
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
    """Start every LM layer's residual branches at `scale` x their normalised output. In a family that adds
    unit-RMS branch outputs (normalised after each block) to a residual stream that starts at the embeddings' scale,
    at gain 1 the first layers' mostly shared updates drown what tells one visual token from another."""
    if not 0.0 < scale <= 1.0:
        raise UsageError(f"train.residual_init must be in (0, 1], got {scale}")
    adapter.set_residual_branch_gain(model, scale)


def save(model, tokenizer, image_processor, card: dict, out: Path) -> None:
    """Write the model, tokenizer, image processor and `card.json` into `out`, whole (a temporary directory,
    renamed); a hand-written `*.md` card already there is kept."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    device = next(model.parameters()).device
    was_training = model.training
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
    model.to(device).train(was_training)
