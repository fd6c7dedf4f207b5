"""What differs between model families. One small subclass per family; experiments never branch on it."""

from pathlib import Path

import torch
from transformers import BatchFeature, PretrainedConfig, PreTrainedModel

CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "chat_templates"


class FamilyAdapter:
    """A model family's module paths, token ids, processor settings and input encoding.

    To add a family (LLaVA, Qwen2.5-VL, InternVL): subclass this in a new file, register it in
    `vlm/adapters/__init__.py`, and add a `configs/model/<name>.yaml`.
    """

    name: str
    model_class: type[PreTrainedModel]
    config_class: type[PretrainedConfig]
    special_tokens: list[str]        # the word-level tokenizer's special tokens, in id order (vlm/twins.py; the
    tokenizer_roles: dict            # organism's), and its bos/eos/pad/unk (+ extra) token strings. The twins use
                                     # the real tokenizers instead (vlm/vocabularies.py)
    image_token: str                 # the placeholder token repeated once per visual token

    # --- building the twin / random-init architecture -------------------------------------------
    def chat_template(self) -> str:
        """The real checkpoint's chat template, byte for byte (vlm/chat_templates/<name>.jinja): the twins' and the
        fallback for a loaded tokenizer without one."""
        return (CHAT_TEMPLATE_DIR / f"{self.name}.jinja").read_text()

    def build_image_processor(self, grid):
        """The real checkpoint's image processor settings, for an image of `grid` (twins, init=random)."""
        raise NotImplementedError

    def build_config(self, architecture: dict, tokenizer) -> PretrainedConfig:
        """The model config from a YAML `architecture` block, with token ids taken from `tokenizer`."""
        raise NotImplementedError

    # --- loaded models --------------------------------------------------------------------------
    def fit_image_processor(self, image_processor, grid) -> None:
        """Make a loaded image processor keep images of `grid` pixels as they are (no resizing)."""

    def visual_embedding_module(self, model) -> torch.nn.Module:
        """The module whose output is the visual embeddings handed to the LM (one row per visual token)."""
        raise NotImplementedError

    def language_model(self, model) -> torch.nn.Module:
        """The LM decoder alone: input embeddings in, last hidden states out (no vision tower, no head)."""
        raise NotImplementedError

    def decoder_layers(self, model) -> torch.nn.ModuleList:
        return self.language_model(model).layers

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

    def encoder_outputs(self, tokens: torch.Tensor):
        """Precomputed visual embeddings (batch, tokens, hidden) in the form the model's forward takes as
        `mm_encoder_outputs["image"]`."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=tokens)

    def visual_embeddings_to_tokens(self, output: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The visual module's output as (batch, tokens, hidden), tokens in row-major grid order.

        Qwen2-VL's merger returns (images * tokens, hidden), Gemma 3's projector (images, tokens, hidden);
        all images of one batch have the same size here, so one reshape serves both."""
        return output.reshape(batch_size, -1, output.shape[-1])

    def visual_embeddings_from_tokens(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of `visual_embeddings_to_tokens`: back to the module's own output layout."""
        return tokens.reshape(like.shape).to(like.dtype)
