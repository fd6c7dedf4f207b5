"""Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct): Qwen2-VL's layout (14 px patches merged 2 x 2 into one visual token,
M-RoPE) with window attention in the vision tower. Module paths in configs/family/qwen2_5vl.yaml.

The one quirk: the vision tower runs its patches in window order (windows of `window_size` px, 112 = 4 x 4 merged
tokens), and its patch merger, the module whose output is the visual embeddings, returns them in that order; the
tower puts them back in row-major order only after the merger. `visual_tokens` / `visual_output` undo and redo
that permutation, so every experiment sees visual token k at row k // W, column k % W (tests/test_adapters.py).
"""

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

from vlm.adapters.qwen2vl import Qwen2VLAdapter


class Qwen2_5VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    config_class = Qwen2_5_VLConfig
    chat_template_file = "qwen2vl.jinja"      # Qwen2.5-VL-*-Instruct's chat_template.json is Qwen2-VL's, byte for byte

    def __init__(self, modules):
        super().__init__(modules)
        self._window_order = None           # merger row i holds visual token _window_order[i] (set by visual_grid)

    def visual_grid(self, model, image_processor, grid):
        rows, cols, pixels = super().visual_grid(model, image_processor, grid)
        vision = model.config.vision_config
        merge = vision.spatial_merge_size
        order, _ = get_vision_window_index(torch.tensor([[1, rows * merge, cols * merge]]), merge,
                                           vision.window_size, vision.patch_size)
        self._window_order = order
        return rows, cols, pixels

    def visual_tokens(self, output, tokens_per_image):
        tokens = output.reshape(-1, tokens_per_image, output.shape[-1])
        return tokens[:, torch.argsort(self._order(tokens_per_image)).to(tokens.device)]

    def visual_output(self, tokens, like):
        return tokens[:, self._order(tokens.shape[1]).to(tokens.device)].reshape(like.shape).to(like.dtype)

    def _order(self, tokens_per_image: int) -> torch.Tensor:
        if self._window_order is None or len(self._window_order) != tokens_per_image:
            raise ValueError(f"{self.name}: the window order of a {tokens_per_image}-token grid is not known (the "
                             f"adapter learns it when the model loads: vlm.models.load_model)")
        return self._window_order
