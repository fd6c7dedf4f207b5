"""LLaVA-1.5 (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336 px, its second-to-last layer's 24 x 24 = 576 patch
states (the class token dropped) through a two-layer MLP projector, one visual token per 14 px patch, no merging;
a Vicuna (Llama) LM with plain causal attention and 1-D positions. The model AdaptVis was built on. Module paths in
configs/family/llava.yaml.
"""

from transformers import (
    BatchFeature,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlm.adapters.base import FamilyAdapter, size_fields


class LlavaAdapter(FamilyAdapter):
    name = "llava"
    model_class = LlavaForConditionalGeneration
    config_class = LlavaConfig
    special_tokens = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]   # the word-level tokenizer's: LLaMA's ids 0-2
    tokenizer_roles = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                       "extra_special_tokens": {"image_token": "<image>"}}
    image_token = "<image>"

    def build_image_processor(self, grid):
        # llava-1.5-7b-hf's preprocessor_config.json: resize the short side to 336 (bicubic), centre-crop 336 x 336,
        # OpenAI CLIP's mean and std
        return CLIPImageProcessorPil(size={"shortest_edge": grid.height}, crop_size={"height": grid.height,
                                     "width": grid.width}, resample=3, do_center_crop=True,
                                     image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)

    def build_config(self, architecture, tokenizer):
        text = dict(architecture["text_config"])
        text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
        text.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
        rest = {k: v for k, v in architecture.items() if k not in ("text_config", "vision_config")}
        return LlavaConfig(text_config=text, vision_config=dict(architecture["vision_config"]),
                           image_token_id=tokenizer.convert_tokens_to_ids(self.image_token), **rest)

    def native_grid(self, architecture):
        vision = architecture["vision_config"]
        per_side = vision["image_size"] // vision["patch_size"]
        return per_side, per_side, vision["patch_size"]

    def fit_image_processor(self, image_processor, grid):
        # an image of the grid's size is kept as it is only when both the resize and the crop are that size
        short, = size_fields(image_processor.size, "shortest_edge")
        crop = size_fields(image_processor.crop_size, "height", "width")
        if grid.height != grid.width or short != grid.height or crop != (grid.height, grid.width):
            raise ValueError(f"the LLaVA image processor resizes to {short} and crops {crop[1]} x {crop[0]}, but the "
                             f"model config's grid needs {grid.width} x {grid.height}")

    def image_token_id(self, model):
        return model.config.image_token_id

    def visual_grid(self, model, image_processor, grid):
        vision = model.config.vision_config
        height, = size_fields(image_processor.crop_size, "height")
        if height != vision.image_size:
            return height // vision.patch_size, height // vision.patch_size, vision.patch_size
        per_side = vision.image_size // vision.patch_size
        return per_side, per_side, vision.patch_size

    def encode(self, tokenizer, image_processor, images, texts, tokens_per_image):
        # LlavaProcessor: the one <image> of the chat text becomes one <image> per patch (576); the tokenizer adds
        # LLaMA's <s> first, as the processor does by default and LLaVA was trained with
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=self.patch(
            image_processor, tokens_per_image), vision_feature_select_strategy="default", num_additional_image_tokens=1)
        enc = processor(images=list(images), text=list(texts), padding=True, return_tensors="pt")
        return BatchFeature({k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")})

    @staticmethod
    def patch(image_processor, tokens_per_image):
        height, = size_fields(image_processor.crop_size, "height")
        return height // round(tokens_per_image ** 0.5)

    def encoder_outputs(self, tokens):
        # LlavaModel.forward concatenates pooler_output's per-image (tokens, hidden) tensors
        return BaseModelOutputWithPooling(pooler_output=tuple(tokens))
