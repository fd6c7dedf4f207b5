"""The model layer on both tiny twins: token order, visual token positions, hooks, scoring, padding."""

import numpy as np
import pytest
import torch
from PIL import Image

from common.geometry import pixel_box
from data_gen.render import random_samples
from data_gen.settings import DIRECTIONS, Setting
from tests.helpers import make_cfg
from vlm.interventions import VISUAL, Apply, Read, intervene, layer_site
from vlm.scoring import AnswerScorer


def one_block_image(grid, row, col, color=(200, 30, 30)):
    """A white image whose only non-white pixels are visual token (row, col)'s block."""
    image = Image.new("RGB", (grid.width, grid.height), "white")
    x0, y0, x1, y1 = pixel_box(grid, (row, col, row + 1, col + 1))
    image.paste(color, (x0, y0, x1, y1))
    return image


@pytest.mark.parametrize("row,col", [(0, 0), (2, 7), (5, 1), (11, 11)])
def test_processed_pixels_keep_the_block_where_the_token_order_says(twin, row, col):
    """No resizing, and token (row, col)'s block lands in that token's patches (the embeddings' order is checked
    for every family in tests/test_adapters.py)."""
    white = Image.new("RGB", (twin.grid.width, twin.grid.height), "white")
    pixels = twin.encode([white, one_block_image(twin.grid, row, col)], ["The object above the key is"] * 2)["pixel_values"]
    expected = row * twin.grid.cols + col
    if twin.adapter.name == "qwen2vl":
        patches = pixels.reshape(2, -1, pixels.shape[-1])          # (image, patch, values)
        differs = (patches[1] - patches[0]).abs().amax(-1) > 1e-6
        per_token = differs.reshape(twin.n_visual_tokens, 4).all(-1)  # 2 x 2 patches per merged token
        assert per_token.nonzero().flatten().tolist() == [expected]
        assert int(differs.sum()) == 4
    else:
        assert tuple(pixels.shape[-2:]) == (twin.grid.height, twin.grid.width)
        differs = (pixels[1] - pixels[0]).abs().amax(0) > 1e-6
        ys, xs = differs.nonzero(as_tuple=True)
        x0, y0, x1, y1 = pixel_box(twin.grid, (row, col, row + 1, col + 1))
        assert (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) == (x0, y0, x1, y1)


def test_hook_captures_equal_hidden_states(twin):
    sample = random_samples(Setting.from_config(make_cfg("setting=squares").setting), twin.grid, twin.layout, 2, 0)
    inputs = twin.encode([s.image for s in sample], [s.prompt for s in sample])
    sites = [VISUAL, *(layer_site(i) for i in range(twin.n_layers))]
    with intervene(twin, [Read(site) for site in sites]) as cache, torch.no_grad():
        out = twin.model(**inputs, output_hidden_states=True)
    # hidden_states[0] is the embedding output; [i + 1] the output of layer i (the last one after the norm)
    for i in range(twin.n_layers - 1):
        torch.testing.assert_close(cache[layer_site(i)], out.hidden_states[i + 1], rtol=0, atol=0)
    final_norm = twin.adapter.language_model(twin.model).norm
    torch.testing.assert_close(final_norm(cache[layer_site(twin.n_layers - 1)]), out.hidden_states[-1])
    # the visual module's output is what get_image_features hands the LM
    with torch.no_grad():
        kwargs = {"image_grid_thw": inputs["image_grid_thw"]} if "image_grid_thw" in inputs else {}
        features = twin.model.model.get_image_features(pixel_values=inputs["pixel_values"], **kwargs)
    features = getattr(features, "pooler_output", features)
    features = torch.cat(list(features)) if isinstance(features, (tuple, list)) else features
    torch.testing.assert_close(cache[VISUAL].reshape(-1, cache[VISUAL].shape[-1]),
                               features.reshape(-1, features.shape[-1]))


def test_hooks_are_removed_on_error(twin):
    layer = twin.decoder_layers[0]

    def boom(_tensor):
        raise RuntimeError("boom")

    white = Image.new("RGB", (twin.grid.width, twin.grid.height), "white")
    inputs = twin.encode([white], ["The object above the key is"])
    before = dict(layer._forward_hooks)     # transformers keeps an output-capturing hook of its own here
    with pytest.raises(RuntimeError, match="boom"), intervene(twin, [Apply(layer_site(0), boom)]):
        assert len(layer._forward_hooks) == len(before) + 1
        twin.last_logits(inputs)
    assert dict(layer._forward_hooks) == before
    twin.last_logits(inputs)


def test_left_padding_keeps_each_rows_logits(twin):
    setting = Setting.from_config(make_cfg("setting=shapes").setting)
    samples = random_samples(setting, twin.grid, twin.layout, 3, 1)
    prompts = [samples[0].prompt, "The object to the right of the key is", samples[2].prompt]
    images = [s.image for s in samples]
    batched = twin.last_logits(twin.encode(images, prompts))
    for i in range(3):
        single = twin.last_logits(twin.encode([images[i]], [prompts[i]]))
        torch.testing.assert_close(batched[i], single[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting_name", ["squares", "shapes", "objects"])
def test_every_prompt_tokenizes_on_the_twins(twin, setting_name):
    setting = Setting.from_config(make_cfg(f"setting={setting_name}").setting)
    for item in setting.items:
        for direction in DIRECTIONS:
            text = twin.chat_text(setting.prompt(direction, item))
            ids = twin.tokenizer(text, add_special_tokens=False)["input_ids"]
            assert twin.tokenizer.unk_token_id not in ids
            assert twin.tokenizer.decode(ids) == text
    # every candidate answer has its own first tokens
    scorer = AnswerScorer(twin.tokenizer, setting.candidates)
    assert all(len(ids) >= 2 for ids in scorer.token_ids)


def test_chat_format_ends_with_generation_prompt(twin):
    text = twin.chat_text("The object above the key is")
    assert text.startswith(("<|im_start|>system\nYou are a helpful assistant. You respond in one token.",
                            "<bos><start_of_turn>user\nYou are a helpful assistant. You respond in one token."))
    assert text.endswith(("<|im_start|>assistant\n", "<start_of_turn>model\n"))


def test_scoring_picks_forced_candidate(twin):
    candidates = ["red", "green", "blue"]
    scorer = AnswerScorer(twin.tokenizer, candidates)
    white = Image.new("RGB", (twin.grid.width, twin.grid.height), "white")
    inputs = twin.encode([white], ["The object above the key is"])
    vocab = twin.model.lm_head.out_features
    forced = torch.full((vocab,), -30.0)
    # "green" gets 0.4 on one form; "blue" gets 0.3 on each of two forms and so must win (0.6 > 0.4)
    forced[scorer.token_ids[1][0]] = np.log(0.4)
    forced[scorer.token_ids[2][0]] = np.log(0.3)
    forced[scorer.token_ids[2][1]] = np.log(0.3)

    def force(logits):
        return forced.to(logits.dtype).expand_as(logits).clone()

    handle = twin.model.lm_head.register_forward_hook(lambda _m, _a, output: force(output))
    try:
        logits = twin.last_logits(inputs)
    finally:
        handle.remove()
    probs = scorer.probabilities(logits)
    assert probs.argmax(-1).tolist() == [2]
    torch.testing.assert_close(probs[0], torch.tensor([0.0, 0.4, 0.6]), atol=1e-4, rtol=0)
    assert scorer.greedy_candidate(logits) == ["green"]     # greedy takes the single most likely token


def test_prompt_end_offset_points_at_the_prompts_last_token(twin):
    for prompt in ("The object above the key is", "The color of the shape to the left of the green is"):
        ids = twin.tokenizer(twin.chat_text(prompt), add_special_tokens=False)["input_ids"]
        offset = twin.prompt_end_offset(prompt)
        assert offset > 0
        assert twin.tokenizer.decode(ids[:len(ids) - offset]).endswith(prompt)
        assert not twin.tokenizer.decode(ids[:len(ids) - offset - 1]).endswith(prompt)
