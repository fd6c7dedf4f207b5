"""What differs between model families. One small subclass per family; experiments never branch on it.

Where things are (the visual embeddings, the LM, its decoder layers and attention modules) is data: module
paths in `configs/family/<family>.yaml` (`{}` for a layer index), resolved with `model.get_submodule`. What an
adapter must give is checked for every registered family by tests/test_adapters.py.
"""

import inspect
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import BatchFeature, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from common.errors import UsageError

CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "chat_templates"
MODULE_NAMES = ("visual_embeddings", "language_model", "decoder_layers", "attention", "vision_layers", "final_norm")
OPTIONAL_MODULE_NAMES = ("attention_output",)   # needed only by the sites that use them (vlm/interventions.py)


def size_fields(size, *fields: str) -> tuple[int, ...]:
    """`fields` of an image processor's `size` or `crop_size`: a dict in some transformers versions, an object with
    those attributes (SizeDict) in others."""
    return tuple(size[f] if isinstance(size, dict) else getattr(size, f) for f in fields)


class FamilyAdapter:
    """A model family's module paths, token ids, processor settings and input encoding.

    To add a family: subclass this in a new file, register it in `vlm/adapters/__init__.py`, write
    `configs/family/<name>.yaml` (its module paths and tokenizer recipe) and `configs/model/<name>.yaml` files that
    include it (docs/adding_a_model.md walks through one).
    """

    name: str
    model_class: type[PreTrainedModel]
    config_class: type[PretrainedConfig]
    special_tokens: list[str]        # the word-level tokenizer's special tokens, in id order (vlm/twins.py; the
    tokenizer_roles: dict            # organism's), and its bos/eos/pad/unk (+ extra) token strings. The twins use
                                     # the real tokenizers instead (vlm/vocabularies.py)
    image_token: str                 # the placeholder token repeated once per visual token
    image_inputs: tuple[str, ...] = ("pixel_values",)   # inputs that carry the image itself
    chat_template_file: str | None = None   # vlm/chat_templates/<this>; None: <name>.jinja

    extra_modules: tuple[str, ...] = ()   # module names this family needs besides MODULE_NAMES

    def __init__(self, modules: Mapping[str, str]):
        names = MODULE_NAMES + self.extra_modules
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(f"{self.name} module paths lack {', '.join(missing)} (configs/family/{self.name}.yaml, "
                             f"`modules:`)")
        self.modules = {name: str(modules[name]) for name in (*names, *OPTIONAL_MODULE_NAMES) if name in modules}

    # --- where things are --------------------------------------------------------------------------
    def module(self, model, name: str, index: int | None = None) -> torch.nn.Module:
        """The module `name` (one of MODULE_NAMES) of `model`; `index` fills a per-layer path's `{}`."""
        path = self.modules[name]
        return model.get_submodule(path.format(index) if "{}" in path else path)

    def visual_embedding_module(self, model) -> torch.nn.Module:
        """The module whose output is the visual embeddings handed to the LM (one row per visual token)."""
        return self.module(model, "visual_embeddings")

    def final_norm(self, model) -> torch.nn.Module:
        """The norm the LM applies to the last decoder layer's output before the head."""
        return self.module(model, "final_norm")

    def language_model(self, model) -> torch.nn.Module:
        """The LM decoder alone: input embeddings in, last hidden states out (no vision tower, no head)."""
        return self.module(model, "language_model")

    def decoder_layers(self, model) -> torch.nn.ModuleList:
        return self.module(model, "decoder_layers")

    def attention_modules(self, model) -> list[torch.nn.Module]:
        """Each LM decoder layer's self-attention module, in layer order."""
        return [self.module(model, "attention", i) for i in range(len(self.decoder_layers(model)))]

    def attention_output_module(self, model, layer: int) -> torch.nn.Module:
        """Layer `layer`'s attention output projection, whose input is every head's output side by side (the
        "heads.<l>" site)."""
        if "attention_output" not in self.modules:
            raise ValueError(f"{self.name} has no attention_output module path (configs/family/{self.name}.yaml)")
        return self.module(model, "attention_output", layer)

    # --- building the twin / random-init architecture -------------------------------------------
    def chat_template(self) -> str:
        """The real checkpoint's chat template, byte for byte (vlm/chat_templates/<name>.jinja): the twins' and the
        fallback for a loaded tokenizer without one."""
        return (CHAT_TEMPLATE_DIR / (self.chat_template_file or f"{self.name}.jinja")).read_text()

    def native_grid(self, architecture: dict) -> tuple[int | None, int | None, int]:
        """(rows, cols, pixels per token) of the visual grid this family's processor keeps an image on, from a model
        config's `architecture` block; rows / cols None where any count works (the Qwen-VL processors keep any
        multiple of a token's size)."""
        raise NotImplementedError

    def grid_error(self, grid, architecture: dict) -> str | None:
        """Why a model config's `grid` would be resized off its visual tokens by this family's processor (one line,
        naming the value and what is allowed), or None when the processor keeps it as it is. Checked before any
        model loads (vlm.models.load_model)."""
        rows, cols, pixels = self.native_grid(architecture)
        wanted = (grid.rows if rows is None else rows, grid.cols if cols is None else cols, pixels)
        if (grid.rows, grid.cols, grid.pixels_per_token) == wanted:
            return None
        return (f"grid {grid.rows} x {grid.cols} of {grid.pixels_per_token} px ({grid.width} x {grid.height} px) "
                f"would be resized by the {self.name} processor; allowed: {wanted[0]} x {wanted[1]} tokens of "
                f"{wanted[2]} px" + (" (any rows and cols)" if rows is None else ""))

    def build_image_processor(self, grid):
        """The real checkpoint's image processor settings, for an image of `grid` (twins, init=random)."""
        raise NotImplementedError

    def build_config(self, architecture: dict, tokenizer) -> PretrainedConfig:
        """The model config from a YAML `architecture` block, with token ids taken from `tokenizer`."""
        raise NotImplementedError

    # --- starting weights of a model trained from scratch (organisms/model.py) -----------------------
    def vision_position_embedding(self, model) -> torch.nn.Embedding | None:
        """The vision tower's learned absolute position embeddings (one row per patch, row-major), or None when
        the tower has none (positions by rotary embeddings only)."""
        return None

    def set_residual_branch_gain(self, model, gain: float) -> None:
        """Scale every LM layer's residual branches (what each attention and feed-forward block adds to the
        residual stream) by `gain` at their output norms; only for families whose layers normalise that output."""
        raise UsageError(f"{self.name}'s LM layers have no norm on their residual branches' output to scale")

    # --- loaded models --------------------------------------------------------------------------
    def fit_image_processor(self, image_processor, grid) -> None:
        """Make a loaded image processor keep images of `grid` pixels as they are (no resizing)."""

    def image_token_id(self, model) -> int:
        raise NotImplementedError

    def visual_grid(self, model, image_processor, grid) -> tuple[int, int, int]:
        """(rows, cols, pixels per token) of the visual grid that this model and processor produce."""
        raise NotImplementedError

    def encode(self, tokenizer, image_processor, images, texts, tokens_per_image: int) -> BatchFeature:
        """Model inputs for one image per chat-formatted text, left-padded: input_ids, attention_mask,
        pixel values and whatever else this family's forward needs."""
        raise NotImplementedError

    def image_features(self, model, inputs):
        """Run the vision tower and projector on the inputs' pixels (the LM does not run)."""
        return model.model.get_image_features(pixel_values=inputs["pixel_values"])

    def read_visual_tokens(self, model, inputs, tokens_per_image: int) -> torch.Tensor | None:
        """(batch, tokens, width) visual embeddings of the inputs' images when this family's are more than the
        visual module's output (Qwen3-VL: its DeepStack features too); None: read them from the visual module's
        output (`visual_tokens`), as vlm.models.VLM.visual_tokens does."""
        return None

    def visual_modules(self, model) -> list[torch.nn.Module]:
        """Every module whose output belongs to the visual embeddings, the visual module first; their outputs,
        each through `visual_tokens`, concatenated on the last axis in this order, are the visual embeddings."""
        return [self.visual_embedding_module(model)]

    def visual_parts(self, tokens: torch.Tensor, model) -> list[torch.Tensor]:
        """Inverse of the concatenation above: (batch, tokens, width) -> one (batch, tokens, width_i) per module of
        `visual_modules`."""
        return [tokens]

    def injected_after(self, model) -> list[int]:
        """Decoder layers after which the LM adds a part of the visual embeddings to the residual stream at the
        visual tokens' positions: part i + 1 of `visual_parts` after layer `injected_after(model)[i]` (Qwen3-VL's
        DeepStack); empty for families whose LM sees the image only at its input."""
        return []

    def image_rows(self, inputs, rows: torch.Tensor) -> dict:
        """The image inputs (for `image_features`) of rows `rows` of a batch encoding."""
        return {key: inputs[key][rows] for key in self.image_inputs}

    def split_batch(self, inputs) -> list[dict]:
        """A batch encoding as one batch-1 encoding per row (padding kept), without the images themselves (their
        visual embeddings are passed to the forward instead): what vlm.replay.record takes."""
        rows = int(inputs["input_ids"].shape[0])
        return [{key: value[i:i + 1] for key, value in inputs.items() if key not in self.image_inputs}
                for i in range(rows)]

    def repeat_inputs(self, inputs, rows: int) -> dict:
        """One example's inputs (batch 1) as `rows` identical rows, without the image itself (the image's
        visual embeddings are passed to the forward instead, see `encoder_outputs`)."""
        repeated = {}
        for key, value in inputs.items():
            if key in self.image_inputs:
                continue
            if value.shape[0] != 1:
                raise ValueError(f"repeat_inputs takes one example, got {key} with batch {value.shape[0]}")
            repeated[key] = value.expand(rows, *value.shape[1:])
        return repeated

    def continuation_position_ids(self, model, inputs, length: int) -> torch.Tensor:
        """Position ids of `length` text tokens appended after each row of `inputs` (batch, length): what a
        forward over the longer sequence would give them. Here, as the LM's default numbering does, the
        positions go on from the input's length."""
        start = inputs["input_ids"].shape[1]
        positions = torch.arange(start, start + length, device=inputs["input_ids"].device)
        return positions.expand(inputs["input_ids"].shape[0], length)

    def cache_argument(self, model) -> str:
        """The forward's keyword for past keys and values: `cache` in newer transformers 5.x, `past_key_values`
        (deprecated there) in older ones."""
        return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def output_cache(self, output):
        """The past keys and values a forward returned: its `cache` field in newer transformers 5.x,
        `past_key_values` (deprecated there) in older ones."""
        return output.cache if "cache" in getattr(type(output), "__dataclass_fields__", {}) else output.past_key_values

    def accepts_encoder_outputs(self, model) -> bool:
        """Whether this transformers' forward takes precomputed visual embeddings (`mm_encoder_outputs`, newer
        5.x releases)."""
        return "mm_encoder_outputs" in inspect.signature(type(model.model).forward).parameters

    def encoder_outputs(self, tokens: torch.Tensor):
        """Precomputed visual embeddings (batch, tokens, hidden) in the form `get_image_features` returns them
        (and the forward takes as `mm_encoder_outputs["image"]`)."""
        return BaseModelOutputWithPooling(pooler_output=tokens)

    def forward(self, model, inputs, visual_tokens: torch.Tensor | None = None, **kwargs):
        """`model(**inputs, **kwargs)`; with `visual_tokens` (batch, tokens, hidden) those are the visual
        embeddings, and the vision tower does not run (the inputs' image entries are ignored).

        Newer transformers 5.x take them as `mm_encoder_outputs`; older 5.x releases (5.17 has no such argument)
        call `get_image_features(pixel_values, ...)` inside the forward whenever pixel values are given, so
        there that method answers with `visual_tokens` for the duration of the call and a placeholder stands in
        for the pixels. Either way the result equals the plain forward on the pixels that gave `visual_tokens`
        (tests/test_adapters.py checks both routes)."""
        if visual_tokens is None:
            return model(**inputs, **kwargs)
        inputs = {k: v for k, v in inputs.items() if k not in self.image_inputs}
        encoded = self.encoder_outputs(visual_tokens.to(model.device, model.dtype))
        if self.accepts_encoder_outputs(model):
            return model(**inputs, mm_encoder_outputs={"image": encoded}, **kwargs)
        inner = model.model
        inner.get_image_features = lambda *args, **kw: encoded
        try:
            return model(**inputs, pixel_values=torch.empty(0, device=model.device), **kwargs)
        finally:
            del inner.get_image_features

    def shared_prefix_logits(self, model, inputs, visual_tokens: torch.Tensor, group_sizes: list[int],
                             upto: int | None = None, continuation=None,
                             shift: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, vocab) last-position logits of every row of `inputs` (a left-padded batch encoding), whose rows
        come in consecutive groups of `group_sizes` rows that show one image each (`visual_tokens` (groups,
        tokens, hidden), one per group) and may differ only after a shared prefix: the questions of one image.

        The columns every group's rows agree on (ids and masks), image included, run once per group; the rest
        of each row continues from that prefix's keys and values, as generation would. Equal to the plain
        forward of every row with its group's visual tokens (tests/test_organism.py checks both twins
        and both organisms); gradients flow through both parts. Falls back to the plain forward when no column before the
        last is shared or an image token lies after the shared prefix. `upto` ends the prefix there at the latest;
        `continuation(**kwargs)` (default: the model) runs the rest, e.g. the model with its parameters detached
        (torch.func.functional_call), so that gradients reach parameters only through the prefix. `shift` (one
        integer per group) moves the rest of each group's rows that many positions further from the prefix, as if
        that many hidden tokens stood between them."""
        ids = inputs["input_ids"]
        rows, length = ids.shape
        if len(group_sizes) != visual_tokens.shape[0]:
            raise ValueError(f"{len(group_sizes)} groups but visual tokens of {visual_tokens.shape[0]} images")
        firsts, owner = self._groups(group_sizes, rows, ids.device)
        shared = self.shared_prefix(model, inputs, group_sizes)
        if upto is not None:
            shared = min(shared, upto)
            if bool((ids[:, shared:] == self.image_token_id(model)).any()):
                raise ValueError(f"a prefix ending at {upto} leaves image tokens after it")
        if not shared:
            return self.forward(model, inputs, visual_tokens[owner], logits_to_keep=1).logits[:, -1]
        aligned = self._aligned(inputs)

        def select(index, columns):
            return {key: value[index][:, columns] if key in aligned else value[index]
                    for key, value in inputs.items() if key not in self.image_inputs}

        cache = self.new_cache()
        self.forward(model, select(firsts, slice(0, shared)), visual_tokens, use_cache=True, logits_to_keep=1,
                     **{self.cache_argument(model): cache})
        cache.batch_select_indices(owner)
        positions = self.continuation_position_ids(model, select(torch.arange(rows), slice(0, shared)),
                                                   length - shared)
        if shift is not None:
            positions = positions + shift.to(positions.device)[owner][:, None]
        return (continuation or model)(input_ids=ids[:, shared:], attention_mask=inputs["attention_mask"],
                                       position_ids=positions, use_cache=False, logits_to_keep=1,
                                       **{self.cache_argument(model): cache}).logits[:, -1]

    def shared_prefix(self, model, inputs, group_sizes: list[int]) -> int:
        """The columns [0, P) of a left-padded batch encoding that `shared_prefix_logits` runs once per group: every
        input aligned with the ids equal across each group's rows, no image token after them; 0 when there is
        no such prefix or it leaves no column to continue."""
        ids = inputs["input_ids"]
        rows, length = ids.shape
        firsts, owner = self._groups(group_sizes, rows, ids.device)
        same = torch.ones(length, dtype=torch.bool, device=ids.device)
        for key in self._aligned(inputs):
            value = inputs[key]
            same &= (value == value[firsts][owner]).reshape(rows, length, -1).all(-1).all(0)
        shared = int(same.int().cumprod(0).sum())
        if shared >= length or bool((ids[:, shared:] == self.image_token_id(model)).any()):
            return 0
        return shared

    @staticmethod
    def _groups(group_sizes: list[int], rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(each group's first row, each row's group) of `rows` rows in consecutive groups of `group_sizes`."""
        if sum(group_sizes) != rows or min(group_sizes, default=0) < 1:
            raise ValueError(f"group sizes {group_sizes} do not split a batch of {rows} rows")
        sizes = torch.tensor(group_sizes, device=device)
        owner = torch.repeat_interleave(torch.arange(len(group_sizes), device=device), sizes)
        return torch.cumsum(sizes, 0) - sizes, owner

    def _aligned(self, inputs) -> list[str]:
        """The inputs with one entry per token (batch, length, ...), other than the image itself."""
        shape = tuple(inputs["input_ids"].shape)
        return [key for key, value in inputs.items()
                if key not in self.image_inputs and tuple(value.shape[:2]) == shape]

    def visual_tokens(self, output: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
        """The visual module's output as (batch, tokens, hidden), tokens in row-major grid order.

        Qwen2-VL's merger returns (images * tokens, hidden), Gemma 3's projector (images, tokens, hidden);
        every image of one batch has `tokens_per_image` tokens here, so one reshape serves both."""
        return output.reshape(-1, tokens_per_image, output.shape[-1])

    def visual_output(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of `visual_tokens`: (batch, tokens, hidden) back to the module's own output layout."""
        return tokens.reshape(like.shape).to(like.dtype)

    # --- recording and replaying decoder layers (vlm/replay.py, the patching engine) --------------
    # The attention-mask argument of a decoder layer's call, and every tensor argument that has a position axis:
    # name -> (batch axis or None, position axis). Position embeddings are (cos, sin) of (batch, L, head_dim)
    # (Qwen2-VL's M-RoPE sections already merged, Gemma 3's per layer type); position ids (batch, L) or
    # (3, batch, L); a cache position (L,). A family whose layers get another such argument adds it here.
    mask_argument = "attention_mask"
    layer_tensors = {"position_embeddings": (-3, -2), "position_ids": (-2, -1), "cache_position": (None, -1)}

    def new_cache(self) -> Cache:
        """An empty cache that keeps every position of every layer (no sliding-window eviction), so a recorded
        forward's keys and values are all there whatever the layer type."""
        return DynamicCache()

    def is_cache(self, value) -> bool:
        """Whether a decoder layer's argument is the model's KV cache (replaced by the replay's own)."""
        return isinstance(value, Cache) or (hasattr(value, "update") and hasattr(value, "get_seq_length"))

    def cache_tensors(self, cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, the (batch, kv_heads, L, head_dim) keys and values a forward left in `cache`."""
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache, strict=True))

    def filled_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
        """A cache holding the given per-layer (batch, kv_heads, L, head_dim) keys and values."""
        cache = self.new_cache()
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys, values, layer)
        return cache

    def stack_images(self, inputs: list) -> dict:
        """The images of several batch-1 encodings as one batch for `image_features` (pixels already processed
        by `encode`, so nothing is processed twice)."""
        return {key: torch.cat([encoded[key] for encoded in inputs]) for key in self.image_inputs}

    def stack_inputs(self, inputs: list) -> dict:
        """Several batch-1 encodings of one length as one batch, without the images (their visual embeddings are
        passed to the forward instead)."""
        return {key: torch.cat([encoded[key] for encoded in inputs]) for key in inputs[0]
                if key not in self.image_inputs}

    def final_logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """(n, vocab) float32 logits of (n, hidden) last-layer hidden states: the final norm, then the head, as
        the model's forward does."""
        return model.get_output_embeddings()(self.final_norm(model)(hidden)).float()
