"""Qwen2-VL (Qwen/Qwen2-VL-7B-Instruct): the vision tower's patch merger outputs one vector per 2 x 2 group of
14 px patches; module paths in configs/family/qwen2vl.yaml."""

import torch
from PIL import Image
from transformers import (
    BatchFeature,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlm.adapters.base import FamilyAdapter


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL, and the base of the Qwen-VL families after it (vlm/adapters/qwen2_5vl.py, qwen3vl.py): an image
    processor that cuts patches and groups them 2 x 2, one <|image_pad|> per merged token, M-RoPE positions."""

    name = "qwen2vl"
    model_class = Qwen2VLForConditionalGeneration
    config_class = Qwen2VLConfig
    patch_size = 14                     # the vision tower's patches (px); a visual token is merge_size of them a side
    image_mean: list | None = None      # None: the image processor's default (OpenAI CLIP's)
    image_std: list | None = None
    special_tokens = [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|image_pad|>", "<|video_pad|>", "<unk>",
    ]
    tokenizer_roles = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    image_token = "<|image_pad|>"
    # pixel_values holds every image's patches flattened (patches, features); image_grid_thw stays: the forward
    # needs it for the M-RoPE positions even when the visual embeddings are passed in
    image_inputs = ("pixel_values",)

    def build_image_processor(self, grid):
        pixels = grid.height * grid.width
        norm = {"image_mean": self.image_mean, "image_std": self.image_std} if self.image_mean else {}
        return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=self.patch_size,
                                        merge_size=2, temporal_patch_size=2, **norm)

    def build_config(self, architecture: dict, tokenizer) -> Qwen2VLConfig:
        text = dict(architecture["text_config"])
        text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>")}
        text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
        rest = {k: v for k, v in architecture.items() if k not in ("text_config", "vision_config")}
        return self.config_class(
            text_config=text, vision_config=dict(architecture["vision_config"]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **rest,
        )

    def native_grid(self, architecture):
        vision = architecture["vision_config"]
        return None, None, vision.get("patch_size", self.patch_size) * vision.get("spatial_merge_size", 2)

    def fit_image_processor(self, image_processor, grid) -> None:
        # min_pixels = max_pixels = the image's own size: the processor never resizes (docs/experiments.md,
        # "Images and the visual grid")
        pixels = grid.height * grid.width
        image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
        for attr in ("min_pixels", "max_pixels"):
            if hasattr(image_processor, attr):
                setattr(image_processor, attr, pixels)

    def image_token_id(self, model) -> int:
        return model.config.image_token_id

    def visual_grid(self, model, image_processor, grid):
        thw = image_processor(images=[Image.new("RGB", (grid.width, grid.height), "white")],
                              return_tensors="pt")["image_grid_thw"][0]
        merge = model.config.vision_config.spatial_merge_size
        patch = model.config.vision_config.patch_size
        return int(thw[1]) // merge, int(thw[2]) // merge, patch * merge

    def encode(self, tokenizer, image_processor, images, texts, tokens_per_image) -> BatchFeature:
        # What Qwen2VLProcessor does, without its video processor (which needs torchvision, absent on
        # CPU-only torch): one <|image_pad|> per merged visual token, and mm_token_type_ids marking them.
        vision = image_processor(images=list(images), return_tensors="pt")
        merge = image_processor.merge_size
        counts = (vision["image_grid_thw"].prod(-1) // merge**2).tolist()
        if any(count != tokens_per_image for count in counts):
            raise ValueError(f"images give {counts} visual tokens, the grid says {tokens_per_image}")
        expanded = []
        for text, count in zip(texts, counts, strict=True):
            if text.count(self.image_token) != 1:
                raise ValueError(f"expected one {self.image_token} in the chat text, got {text.count(self.image_token)}")
            expanded.append(text.replace(self.image_token, self.image_token * count))
        enc = tokenizer(expanded, padding=True, return_tensors="pt", add_special_tokens=False)
        image_id = tokenizer.convert_tokens_to_ids(self.image_token)
        return BatchFeature({
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
            "mm_token_type_ids": (enc["input_ids"] == image_id).to(torch.long),
        })

    def image_features(self, model, inputs):
        return model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                              image_grid_thw=inputs["image_grid_thw"])

    def image_rows(self, inputs, rows):
        # every row's image patches are rows of pixel_values (one image per row, all of one grid)
        pixels = inputs["pixel_values"]
        per_row = pixels.reshape(len(inputs["image_grid_thw"]), -1, pixels.shape[-1])
        return {"pixel_values": per_row[rows].flatten(0, 1), "image_grid_thw": inputs["image_grid_thw"][rows]}

    def continuation_position_ids(self, model, inputs, length):
        # M-RoPE: (3, batch, length); text after the image goes on from the prompt's last (temporal, height,
        # width) position, equal in all three
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"])
        return positions[..., -1:] + 1 + torch.arange(length, device=positions.device)

    def stack_images(self, inputs: list) -> dict:
        # each image's patches are rows of pixel_values; its grid (image_grid_thw) says how many
        return {key: torch.cat([encoded[key] for encoded in inputs]) for key in ("pixel_values", "image_grid_thw")}

    def encoder_outputs(self, tokens):
        # Qwen2-VL's get_image_features gives a tuple of per-image (tokens, hidden) tensors
        return BaseModelOutputWithPooling(pooler_output=tuple(tokens))
