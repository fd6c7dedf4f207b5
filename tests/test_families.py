"""The families beyond the paper's two (Qwen2.5-VL, Qwen3-VL, LLaVA-1.5, InternVL3) and every size of all six: each
family's real image processor class puts an item's pixels on exactly the visual tokens the geometry says, every
experiment runs on each new twin, every full-size model config builds the published architecture (its parameter
count), and a family config that lacks a piece, a family without an adapter, a model that does not exist or an
image size the processor would resize off the grid is refused in one line naming it, before any model loads."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from common.cli import CONFIG_DIR, group_choices
from common.errors import UsageError
from common.geometry import Grid
from data_gen.render import random_samples
from data_gen.settings import Setting
from runner import run_unit
from tests.helpers import TINY_SIZES, load_twin, make_cfg, tiny_overrides
from vlm import vocabularies
from vlm.adapters import ADAPTERS
from vlm.adapters.base import MODULE_NAMES
from vlm.models import load_model
from vlm.twins import build_parts, model_tokenizer

NEW_TWINS = ["tiny_qwen2_5vl", "tiny_qwen3vl", "tiny_llava", "tiny_internvl3"]
FAMILY_DIR = Path(CONFIG_DIR) / "family"

# every full-size config and the parameter count of its published checkpoint (Hugging Face's safetensors count,
# rounded as the model pages give it): the `architecture` blocks build exactly those models
PUBLISHED_PARAMETERS = {
    "qwen2vl_2b": 2.21e9, "qwen2vl_7b": 8.29e9, "qwen2vl_72b": 73.4e9,
    "gemma3_4b": 4.30e9, "gemma3_12b": 12.2e9, "gemma3_27b": 27.4e9,
    "qwen2_5vl_3b": 3.75e9, "qwen2_5vl_7b": 8.29e9, "qwen2_5vl_72b": 73.4e9,
    "qwen3vl_2b": 2.13e9, "qwen3vl_4b": 4.44e9, "qwen3vl_8b": 8.77e9,
    "llava15_7b": 7.06e9,
    "internvl3_1b": 0.94e9, "internvl3_2b": 2.09e9, "internvl3_8b": 7.94e9,
}


_tokenizers: dict = {}


def parameters_on_meta(name: str) -> int:
    """The parameters of model config `name` built with model.init=random on the meta device (no memory); the
    tokenizer it builds with (the word-level one) is made once per family."""
    cfg = make_cfg(f"model={name}")
    adapter = ADAPTERS[cfg.model.family](cfg.model.modules)
    if cfg.model.family not in _tokenizers:
        _tokenizers[cfg.model.family] = model_tokenizer(cfg.model, adapter, cfg.system_prompt)
    _, _, config = build_parts(adapter, cfg.model, cfg.system_prompt, _tokenizers[cfg.model.family])
    with torch.device("meta"):
        model = adapter.model_class._from_config(config, dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


# the default lane builds each new family's flagship; every other size is in the slow lane (a Hydra compose and a
# meta-device build each)
FLAGSHIPS = ("qwen2_5vl_7b", "qwen3vl_8b", "llava15_7b", "internvl3_8b")


def test_every_family_has_full_size_configs_here():
    assert set(PUBLISHED_PARAMETERS) <= set(group_choices("model"))
    families = {name: OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{name}.yaml").defaults[0]
                for name in PUBLISHED_PARAMETERS}
    assert {entry.split("/")[2].split("@")[0] for entry in families.values()} == set(ADAPTERS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FLAGSHIPS else [pytest.mark.slow])
                                  for n in PUBLISHED_PARAMETERS])
def test_a_full_size_config_has_its_published_parameter_count(name):
    assert parameters_on_meta(name) == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.006)


# --- the real processors put the items where the geometry says ------------------------------------------------

def changed_tokens(vlm, pixels: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool: the visual tokens whose processed pixels differ between image 1 and image 0 of `pixels`,
    for the two layouts processors give: the Qwen-VL processors' rows of flattened patches, each merged token's
    2 x 2 patches in a row (token order), or an image tensor (images, channels, height, width)."""
    grid = vlm.grid
    if pixels.dim() == 2:
        patches = pixels.reshape(2, grid.rows * grid.cols, -1)
        return ((patches[1] - patches[0]).abs().amax(-1) > 1e-6).reshape(grid.rows, grid.cols)
    assert tuple(pixels.shape[-2:]) == (grid.height, grid.width)          # never resized
    differs = (pixels[1] - pixels[0]).abs().amax(0) > 1e-6
    blocks = differs.reshape(grid.rows, grid.pixels_per_token, grid.cols, grid.pixels_per_token)
    return blocks.any(3).any(1)


@pytest.mark.parametrize("name", NEW_TWINS)
def test_the_real_processor_puts_each_item_on_its_tokens(name):
    """Drawn items (squares, in both orientations) through the family's own image processor class: the visual
    tokens whose pixels differ from a white image's are exactly the items' token boxes."""
    vlm = load_twin(name)
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    white = Image.new("RGB", (vlm.grid.width, vlm.grid.height), "white")
    for sample in random_samples(setting, vlm.grid, vlm.layout, 2, 0):
        pixels = vlm.encode([white, sample.image], [sample.prompt] * 2)["pixel_values"]
        expected = torch.zeros(vlm.grid.rows, vlm.grid.cols, dtype=torch.bool)
        for item in sample.items:
            r0, c0, r1, c1 = item.token_box
            expected[r0:r1, c0:c1] = True
        assert torch.equal(changed_tokens(vlm, pixels), expected), (name, sample.orientation)


# --- every experiment on every new twin -----------------------------------------------------------------------

# the runner's tiny sizes; amplification also sweeps AdaptVis' weights and the reweighting, on 12 composites
TINY = {**TINY_SIZES, "amplification": [*TINY_SIZES["amplification"], "adaptvis.weight1=[0.5]",
                                         "adaptvis.weight2=[1.5]", "image_attention_reweighting.coefficients=[2.0]",
                                         "setting.n_composites=12"]}


def test_every_experiment_has_tiny_sizes_here():
    assert set(TINY) == set(group_choices("experiment"))


def experiment_matrix():
    """Every experiment on every new twin. The default lane runs each experiment once, on the twins in turn (every
    twin gets two or three); the rest, and amplification (a minute or more of whole-answer scoring over the
    What'sUp names on a real vocabulary), are marked slow."""
    for i, experiment in enumerate(sorted(TINY)):
        for j, name in enumerate(NEW_TWINS):
            slow = experiment == "amplification" or j != i % len(NEW_TWINS)
            yield pytest.param(name, experiment, marks=[pytest.mark.slow] if slow else [], id=f"{name}-{experiment}")


@pytest.mark.parametrize("name,experiment", list(experiment_matrix()))
def test_every_experiment_runs_on_each_new_twin(name, experiment, tmp_path, stand_in):
    cfg = make_cfg(f"model={name}", f"experiment={experiment}", f"results_dir={tmp_path}",
                   f"++embeddings_dir={tmp_path / 'emb'}", *tiny_overrides(experiment, stand_in, TINY))
    out = run_unit(cfg, get_vlm=lambda: load_twin(name))        # the twin loaded once for every experiment
    assert out == tmp_path / experiment / name / cfg.setting.name and (out / "metrics.json").is_file()


# --- what a family config must hold -----------------------------------------------------------------------------

def family_config(family: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(FAMILY_DIR / f"{family}.yaml"))


@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_a_family_config_lacking_a_piece_is_refused_naming_it(family):
    """Every family config has a `family` naming its adapter, every module path its adapter needs, its real chat
    template and a complete tokenizer recipe; taking any one piece out is refused with a message naming it."""
    config = family_config(family)
    adapter_class = ADAPTERS[config["family"]]
    assert adapter_class.name == family and adapter_class(config["modules"]).chat_template()
    for name in MODULE_NAMES + adapter_class.extra_modules:
        modules = {k: v for k, v in config["modules"].items() if k != name}
        with pytest.raises(ValueError, match=rf"{family} module paths lack {name} \(configs/family/{family}.yaml"):
            adapter_class(modules)
    recipe = vocabularies.recipe_from_config(config["tokenizer"])
    assert recipe.name == family and recipe.tokenizer_class and recipe.reference_ids
    for key in ("model", "source", "kind", "base_size", "class", "size"):
        partial = {k: v for k, v in config["tokenizer"].items() if k != key}
        with pytest.raises(vocabularies.VocabularyError, match=rf"tokenizer recipe '{family}' lacks {key}$"):
            vocabularies.recipe_from_config(partial)


def test_a_family_without_an_adapter_or_a_model_that_does_not_exist_is_one_line():
    with pytest.raises(UsageError, match=r"unknown model family 'llava_next'; allowed: .*qwen3vl"):
        load_model(make_cfg("model=tiny_llava", "model.family=llava_next"))
    with pytest.raises(Exception, match=r"Could not find 'model/qwen4vl_7b'"):
        make_cfg("model=qwen4vl_7b")


@pytest.mark.parametrize("name,override,allowed", [
    ("tiny_llava", "model.grid.pixels_per_token=16", "allowed: 24 x 24 tokens of 14 px"),
    ("tiny_internvl3", "model.grid.rows=12", "allowed: 16 x 16 tokens of 28 px"),
    ("tiny_qwen3vl", "model.grid.pixels_per_token=28", "allowed: 12 x 12 tokens of 32 px (any rows and cols)"),
    ("tiny_qwen2_5vl", "model.grid.pixels_per_token=32", "allowed: 12 x 12 tokens of 28 px (any rows and cols)"),
])
def test_an_image_size_the_processor_would_resize_is_refused_before_loading(name, override, allowed, monkeypatch):
    cfg = make_cfg(f"model={name}", override, "model.path=/nonexistent")     # nothing could load from there
    monkeypatch.setattr("vlm.models.ensure_twin", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(UsageError) as err:
        load_model(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model {name}: grid ") and message.endswith(allowed)
    grid = Grid(**cfg.model.grid)
    assert f"({grid.width} x {grid.height} px) would be resized by the" in message


def test_deepstack_parts_reach_the_lm_and_change_its_answer():
    """Qwen3-VL's visual embeddings carry the DeepStack features (4 parts of the LM's width), and the forward
    given them uses every part: changing only a DeepStack part changes the logits, as the model's own forward
    on the image does (injected after layers 0-2)."""
    vlm = load_twin("tiny_qwen3vl")
    white = Image.new("RGB", (vlm.grid.width, vlm.grid.height), "white")
    inputs = vlm.encode([white], ["The object above the key is"])
    tokens = vlm.visual_tokens(inputs)
    hidden = vlm.model.config.text_config.hidden_size
    assert tokens.shape[-1] == 4 * hidden and vlm.adapter.injected_after(vlm.model) == [0, 1, 2]
    plain = vlm.last_logits(inputs)
    torch.testing.assert_close(vlm.last_logits(inputs, visual_tokens=tokens), plain, rtol=1e-5, atol=1e-5)
    for part in range(1, 4):
        edited = tokens.clone()
        edited[..., part * hidden:(part + 1) * hidden] += 1.0
        assert (vlm.last_logits(inputs, visual_tokens=edited) - plain).abs().max() > 1e-4, part
