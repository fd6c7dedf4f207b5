"""What every model-family adapter must give, checked for every registered family on its tiny twin: the module
paths it names resolve and hook, visual token order is row-major, encode puts one image token per visual token
and left-pads, visual embeddings round-trip, and a forward given precomputed visual embeddings (on both
transformers routes) or repeated inputs equals the plain forward."""

import pytest
import torch
from PIL import Image

from common.geometry import pixel_box
from tests.helpers import load_twin, make_cfg
from vlm.adapters import ADAPTERS
from vlm.adapters.base import MODULE_NAMES
from vlm.interventions import VISUAL, Read, intervene

FAMILY_TWIN = {"qwen2vl": "tiny_qwen2vl", "gemma3": "tiny_gemma3", "qwen2_5vl": "tiny_qwen2_5vl",
               "qwen3vl": "tiny_qwen3vl", "llava": "tiny_llava", "internvl3": "tiny_internvl3"}
PROMPTS = ["The color of the square to the left of the green square is", "The object above the key is"]


def test_every_registered_family_has_a_twin_here():
    assert set(ADAPTERS) == set(FAMILY_TWIN)
    assert {make_cfg(f"model={twin}").model.family for twin in FAMILY_TWIN.values()} == set(ADAPTERS)


@pytest.fixture(params=sorted(FAMILY_TWIN))
def vlm(request):
    return load_twin(FAMILY_TWIN[request.param])


def one_block_image(grid, row, col, color=(200, 30, 30)):
    """A white image whose only non-white pixels are visual token (row, col)'s block."""
    image = Image.new("RGB", (grid.width, grid.height), "white")
    image.paste(color, pixel_box(grid, (row, col, row + 1, col + 1)))
    return image


def white(grid):
    return Image.new("RGB", (grid.width, grid.height), "white")


def test_every_named_module_resolves_and_its_hook_fires(vlm):
    inputs = vlm.encode([white(vlm.grid)], PROMPTS[:1])
    adapter, model = vlm.adapter, vlm.model
    modules = {"visual_embeddings": adapter.visual_embedding_module(model),
               "language_model": adapter.language_model(model), "final_norm": adapter.final_norm(model)}
    modules |= {f"decoder_layers.{i}": layer for i, layer in enumerate(adapter.decoder_layers(model))}
    modules |= {f"attention.{i}": att for i, att in enumerate(adapter.attention_modules(model))}
    modules |= {f"vision_layers.{i}": layer for i, layer in enumerate(adapter.module(model, "vision_layers"))}
    modules |= {f"visual_modules.{i}": module for i, module in enumerate(adapter.visual_modules(model))}
    assert {name.split(".")[0] for name in modules} == set(MODULE_NAMES) | {"visual_modules"}
    assert len(adapter.attention_modules(model)) == vlm.n_layers >= 2
    fired = []
    handles = [module.register_forward_hook(lambda *_args, name=name: fired.append(name))
               for name, module in modules.items()]
    try:
        vlm.last_logits(inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert set(fired) == set(modules)


@pytest.fixture
def local_vision(vlm):
    """Every vision-tower block made the identity, so a visual token depends only on its own pixels."""

    def passthrough(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    blocks = vlm.adapter.module(vlm.model, "vision_layers")
    # prepend: before transformers' own output-recording hooks (LLaVA reads layer -2 from the recorded states)
    handles = [block.register_forward_hook(passthrough, with_kwargs=True, prepend=True) for block in blocks]
    try:
        yield vlm
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("row,col", [(0, 0), (2, 7), (5, 1), (-1, -1)])
def test_visual_token_k_is_row_k_div_cols_col_k_mod_cols(local_vision, row, col):
    vlm = local_vision
    row, col = row % vlm.grid.rows, col % vlm.grid.cols
    tokens = vlm.image_embeddings([white(vlm.grid), one_block_image(vlm.grid, row, col)], batch_size=2)
    changed = (tokens[1] - tokens[0]).abs().amax(-1) > 1e-5
    assert changed.nonzero().flatten().tolist() == [row * vlm.grid.cols + col]


def test_encode_puts_one_image_token_per_visual_token_and_left_pads(vlm):
    inputs = vlm.encode([white(vlm.grid)] * 2, PROMPTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ((ids == vlm.image_token_id).sum(-1) == vlm.n_visual_tokens).all()
    assert bool(mask[:, -1].all())                            # left padding: every row ends on a real token
    positions = vlm.visual_token_positions(ids)
    for row in range(2):
        assert torch.equal(positions[row], torch.arange(positions[row, 0], positions[row, 0] + vlm.n_visual_tokens))
    for row, prompt in enumerate(PROMPTS):
        real = ids[row][mask[row].bool()]
        alone = vlm.encode([white(vlm.grid)], [prompt])["input_ids"][0]
        assert torch.equal(real, alone)


def test_visual_embeddings_round_trip_through_the_modules_layout(vlm):
    """Each visual module's output, in row-major token order, round-trips through the module's own layout; the
    modules' tokens side by side are the visual embeddings (Qwen3-VL: its main and DeepStack mergers'), and
    `visual_parts` splits them back."""
    inputs = vlm.encode([white(vlm.grid), one_block_image(vlm.grid, 3, 4)], PROMPTS)
    modules = vlm.adapter.visual_modules(vlm.model)
    assert modules[0] is vlm.visual_embedding_module
    cache = {}
    raw = [module.register_forward_hook(lambda _m, _a, out, i=i: cache.__setitem__(i, out))
           for i, module in enumerate(modules)]
    try:
        with intervene(vlm, [Read(VISUAL)]) as read:
            vlm.last_logits(inputs)
    finally:
        for handle in raw:
            handle.remove()
    parts = []
    for i in range(len(modules)):
        output = cache[i]
        tokens = vlm.adapter.visual_tokens(output, vlm.n_visual_tokens)
        assert tokens.shape == (2, vlm.n_visual_tokens, output.shape[-1])
        assert torch.equal(vlm.adapter.visual_output(tokens, output), output)
        parts.append(tokens)
    # the "visual" site reads every module's tokens side by side, as the visual embeddings are
    torch.testing.assert_close(read[VISUAL], torch.cat(parts, dim=-1), rtol=0, atol=0)
    joined = vlm.visual_tokens(inputs)
    torch.testing.assert_close(torch.cat(parts, dim=-1), joined)
    for part, split in zip(parts, vlm.adapter.visual_parts(joined, vlm.model), strict=True):
        torch.testing.assert_close(split, part)
    assert len(vlm.adapter.injected_after(vlm.model)) == len(modules) - 1


@pytest.mark.parametrize("route", ["mm_encoder_outputs", "get_image_features"])
def test_forward_with_precomputed_visual_embeddings_equals_the_plain_forward(vlm, route, monkeypatch):
    inputs = vlm.encode([one_block_image(vlm.grid, 1, 2), white(vlm.grid)], PROMPTS)
    plain = vlm.last_logits(inputs)
    tokens = vlm.visual_tokens(inputs)
    if route == "get_image_features":                # older transformers 5.x, without mm_encoder_outputs
        monkeypatch.setattr(type(vlm.adapter), "accepts_encoder_outputs", lambda self, model: False)
    torch.testing.assert_close(vlm.last_logits(inputs, visual_tokens=tokens), plain, rtol=1e-5, atol=1e-5)
    assert "get_image_features" not in vlm.model.model.__dict__     # the stand-in is gone after the call


def test_repeated_inputs_give_every_row_the_single_examples_logits(vlm):
    inputs = vlm.encode([one_block_image(vlm.grid, 6, 6)], PROMPTS[:1])
    single = vlm.last_logits(inputs)
    tokens = vlm.visual_tokens(inputs)
    repeated = vlm.adapter.repeat_inputs(inputs, 3)
    assert not set(repeated) & set(vlm.adapter.image_inputs)
    logits = vlm.last_logits(repeated, visual_tokens=tokens.expand(3, -1, -1))
    for row in range(3):
        torch.testing.assert_close(logits[row], single[0], rtol=1e-5, atol=1e-5)
