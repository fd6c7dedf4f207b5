"""InternVL3 (OpenGVLab/InternVL3-8B-hf, transformers-native InternVLForConditionalGeneration): InternViT-300M on one
448 px tile (14 px patches, 32 x 32), pixel shuffle 0.5 to 16 x 16 = 256 tokens of 28 px, then an MLP projector
(layer norm, two linear maps) into a Qwen2.5 LM. One tile, no dynamic tiling (the synthetic images are drawn at
448 x 448, so the processor's tiling would give one tile anyway; it is switched off so nothing else can happen).
Module paths in configs/family/internvl3.yaml.
"""

from transformers import (
    BatchFeature,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
)

from vlm.adapters.base import FamilyAdapter, size_fields

IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]       # InternVL3-*-hf's preprocessor_config.json
IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]


class InternVL3Adapter(FamilyAdapter):
    name = "internvl3"
    model_class = InternVLForConditionalGeneration
    config_class = InternVLConfig
    special_tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<unk>"]
    tokenizer_roles = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    image_token = "<IMG_CONTEXT>"
    start_token, end_token = "<img>", "</img>"

    def build_image_processor(self, grid):
        return GotOcr2ImageProcessorPil(size={"height": grid.height, "width": grid.width}, crop_to_patches=False,
                                        resample=3, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)

    def build_config(self, architecture, tokenizer):
        text = dict(architecture["text_config"])
        text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
        text.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        rest = {k: v for k, v in architecture.items() if k not in ("text_config", "vision_config")}
        return InternVLConfig(text_config=text, vision_config=dict(architecture["vision_config"]),
                              image_token_id=tokenizer.convert_tokens_to_ids(self.image_token), **rest)

    def native_grid(self, architecture):
        vision = architecture["vision_config"]
        image, patch = _side(vision["image_size"]), _side(vision["patch_size"])
        per_side = int(image // patch * architecture.get("downsample_ratio", 0.5))
        return per_side, per_side, image // per_side

    def fit_image_processor(self, image_processor, grid):
        height, width = size_fields(image_processor.size, "height", "width")
        if (height, width) != (grid.height, grid.width):
            raise ValueError(f"the InternVL image processor resizes to {width} x {height}, but the model config's "
                             f"grid needs {grid.width} x {grid.height}")
        image_processor.crop_to_patches = False          # one tile: no dynamic tiling, no thumbnail

    def image_token_id(self, model):
        return model.config.image_token_id

    def visual_grid(self, model, image_processor, grid):
        height, = size_fields(image_processor.size, "height")
        patch = _side(model.config.vision_config.patch_size)
        per_side = int(height // patch * model.config.downsample_ratio)
        return per_side, per_side, height // per_side

    def encode(self, tokenizer, image_processor, images, texts, tokens_per_image):
        # What InternVLProcessor does (without its video processor, which needs torchvision): each image's
        # <IMG_CONTEXT> becomes <img>, one <IMG_CONTEXT> per visual token of each tile, </img>
        vision = image_processor(images=list(images), return_tensors="pt")
        tiles = vision.get("num_patches")
        tiles = [1] * len(images) if tiles is None else [int(t) for t in tiles]
        if any(t != 1 for t in tiles):
            raise ValueError(f"images were cut into {tiles} tiles; the grid is one tile")
        expanded = []
        for text in texts:
            if text.count(self.image_token) != 1:
                raise ValueError(f"expected one {self.image_token} in the chat text, got {text.count(self.image_token)}")
            expanded.append(text.replace(self.image_token,
                                         self.start_token + self.image_token * tokens_per_image + self.end_token))
        enc = tokenizer(expanded, padding=True, return_tensors="pt", add_special_tokens=False)
        return BatchFeature({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "pixel_values": vision["pixel_values"]})


def _side(value) -> int:
    """An image or patch size given as an int or as (height, width) of a square."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)
