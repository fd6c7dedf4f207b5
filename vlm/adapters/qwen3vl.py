"""Qwen3-VL (Qwen/Qwen3-VL-8B-Instruct): 16 px patches merged 2 x 2 into one visual token (32 px), interleaved
M-RoPE, and DeepStack: the vision tower's states after three of its blocks (`deepstack_visual_indexes`) go through
their own patch mergers and are added to the LM's residual stream at the visual tokens' positions after decoder
layers 0, 1 and 2. Module paths in configs/family/qwen3vl.yaml.

The visual embeddings of a Qwen3-VL image are everything the vision side hands the LM for each visual token: the
main merger's output (`model.visual.merger`, the vectors placed at the <|image_pad|> positions of the input
sequence) followed by the three DeepStack mergers' outputs (`model.visual.deepstack_merger_list.{0,1,2}`),
concatenated on the last axis: (batch, tokens, 4 x hidden). Probes read all four, patching and ablating the
visual embeddings replace all four at the same tokens from the same source, and a forward given visual
embeddings hands the first part to the input and the other three to the DeepStack layers
(docs/experiments.md, "Where the model is read and written").
"""

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from vlm.adapters.qwen2vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3vl"
    model_class = Qwen3VLForConditionalGeneration
    config_class = Qwen3VLConfig
    patch_size = 16
    image_mean = [0.5, 0.5, 0.5]            # Qwen3-VL-*-Instruct's preprocessor_config.json
    image_std = [0.5, 0.5, 0.5]
    extra_modules = ("deepstack_mergers",)

    def visual_modules(self, model):
        return [self.visual_embedding_module(model), *self.module(model, "deepstack_mergers")]

    def visual_parts(self, tokens, model):
        return list(tokens.chunk(1 + len(self.injected_after(model)), dim=-1))

    def injected_after(self, model):
        return list(range(len(model.config.vision_config.deepstack_visual_indexes)))

    def read_visual_tokens(self, model, inputs, tokens_per_image):
        out = self.image_features(model, inputs)
        parts = [torch.stack(list(out.pooler_output))]
        parts += [torch.stack(list(feature)) for feature in out.deepstack_features]
        return torch.cat(parts, dim=-1).reshape(-1, tokens_per_image, sum(p.shape[-1] for p in parts))

    def encoder_outputs(self, tokens):
        # the forward takes the main merger's per-image tokens as pooler_output and each DeepStack layer's as a
        # tuple of per-image tokens in deepstack_features
        parts = tokens.chunk(1 + self._deepstack, dim=-1)
        return BaseModelOutputWithDeepstackFeatures(pooler_output=tuple(parts[0]),
                                                    deepstack_features=[tuple(part) for part in parts[1:]])

    def visual_grid(self, model, image_processor, grid):
        self._deepstack = len(self.injected_after(model))
        return super().visual_grid(model, image_processor, grid)
