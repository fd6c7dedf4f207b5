"""Gemma 3 (google/gemma-3-4b-it): the SigLIP vision tower, then the multi-modal projector (4 x 4 average
pooling to 16 x 16 tokens and a linear map into the LM); module paths in configs/family/gemma3.yaml."""

import torch
from transformers import (
    BatchFeature,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
)

from vlm.adapters.base import FamilyAdapter, size_fields


class Gemma3Adapter(FamilyAdapter):
    name = "gemma3"
    model_class = Gemma3ForConditionalGeneration
    config_class = Gemma3Config
    # pad, eos, bos, unk keep the real tokenizer's ids 0-3
    special_tokens = [
        "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
        "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    ]
    tokenizer_roles = {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_special_tokens": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                 "eoi_token": "<end_of_image>"},
    }
    image_token = "<image_soft_token>"

    def build_image_processor(self, grid):
        # gemma-3-4b-it's preprocessor_config.json: 896 px, bilinear, mean = std = 0.5, no pan-and-scan
        return Gemma3ImageProcessorPil(size={"height": grid.height, "width": grid.width}, resample=2,
                                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                       do_pan_and_scan=False)

    def build_config(self, architecture: dict, tokenizer) -> Gemma3Config:
        text = dict(architecture["text_config"])
        text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self.special_tokens}
        text.update(pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"])
        return Gemma3Config(
            text_config=text, vision_config=dict(architecture["vision_config"]),
            mm_tokens_per_image=architecture["mm_tokens_per_image"],
            boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
        )

    def native_grid(self, architecture):
        # SigLIP at its image_size, pooled to mm_tokens_per_image tokens (a square)
        per_side = round(architecture["mm_tokens_per_image"] ** 0.5)
        return per_side, per_side, architecture["vision_config"]["image_size"] // per_side

    def fit_image_processor(self, image_processor, grid) -> None:
        height, width = size_fields(image_processor.size, "height", "width")
        if (height, width) != (grid.height, grid.width):
            raise ValueError(f"Gemma 3 image processor resizes to {width} x {height}, but the model config's grid "
                             f"needs {grid.width} x {grid.height}")
        image_processor.do_pan_and_scan = False

    def image_token_id(self, model) -> int:
        return model.config.image_token_index

    def visual_grid(self, model, image_processor, grid):
        per_side = int(round(model.config.mm_tokens_per_image ** 0.5))
        height, = size_fields(image_processor.size, "height")
        return per_side, per_side, height // per_side

    def encode(self, tokenizer, image_processor, images, texts, tokens_per_image) -> BatchFeature:
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                    image_seq_length=tokens_per_image)
        enc = processor(images=[[image] for image in images], text=list(texts), padding=True,
                        return_tensors="pt", add_special_tokens=False)
        # token_type_ids (1 at image tokens) makes image tokens attend to each other both ways (docs/experiments.md, "Where the model is read and written")
        return BatchFeature({k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")})

    def vision_position_embedding(self, model):
        return model.model.vision_tower.embeddings.position_embedding      # SigLIP: learned, one row per patch

    def set_residual_branch_gain(self, model, gain):
        # Gemma 3 normalises each branch's output (post_attention_layernorm, post_feedforward_layernorm) with an
        # RMSNorm of gain 1 + weight
        with torch.no_grad():
            for layer in self.decoder_layers(model):
                for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                    norm.weight.fill_(gain - 1.0)
