"""Models split across devices (`model.device_map` with `model.max_memory`): accelerate places the first decoder
layers in CPU memory and the rest on disk (offloaded, loaded by its hooks at every call), as it places a model too
large for one GPU over GPUs, CPU memory and disk. Every kind of run gives the numbers of the same model on one
device: the patching engine on every sweep kind, the naive reference, ablated inputs, visual embeddings (probes),
ScalingVis in a full forward and replayed, and amplification."""

import pytest
import torch
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes

from common.errors import UsageError
from data_gen.settings import Setting
from patching.engine import PatchingEngine
from steering.scalingvis import scaled_logits, scalingvis_rows
from tests.helpers import load_twin, make_cfg
from tests.test_patching import naive_reference, sweep_cases
from vlm.interventions import VISUAL, Add
from vlm.models import load_model
from vlm.replay import record
from vlm.scoring import AnswerScorer, replayed_probabilities

_split = {}
SPLIT_MODELS = ["organism", "dual_organism"]       # one of each family (Qwen2-VL, Gemma 3), small vocabularies: fast


def split_twin(name: str):
    """The twin loaded with device_map=auto and a CPU budget that holds the vision tower, the embeddings and two
    decoder layers (plus accelerate's reserve for the largest module): the other layers go to disk. With a GPU, the
    same budget on GPU 0 and the rest offloaded to CPU memory (accelerate streams those layers' weights to the GPU
    at every call), against the model whole on the GPU."""
    if name not in _split:
        whole = load_twin(name)                  # sizes of the model's parts (the same on every device)
        sizes = compute_module_sizes(whole.model)
        lm = whole.adapter.modules["language_model"]
        layer = sizes[whole.adapter.modules["decoder_layers"] + ".0"]
        outside = sum(v for k, v in sizes.items() if k.count(".") == 1 and k.startswith("model.")
                      and not k.startswith(lm))
        layers = whole.adapter.modules["decoder_layers"]
        for reserve in (0, sizes[f"{lm}.embed_tokens"]):     # accelerate keeps room for the largest module
            budget = int(outside + sizes[f"{lm}.embed_tokens"] + 2.5 * layer + reserve)
            planned = infer_auto_device_map(whole.model, max_memory={"cpu": budget},
                                            no_split_module_classes=whole.model._no_split_modules)
            if planned.get(f"{layers}.0") == "cpu" and planned.get(f"{layers}.{whole.n_layers - 1}") == "disk":
                break
        memory = f"{{0: {budget}, cpu: 10GiB}}" if GPU else f"{{cpu: {budget}}}"
        _split[name] = load_model(make_cfg(f"model={name}", "model.device_map=auto", f"model.max_memory={memory}",
                                           *(["device=cuda"] if GPU else [])))
    return _split[name]


GPU = torch.cuda.is_available()


def load_whole(name: str):
    """The model on one device: the CPU, or the GPU when there is one (the split model's counterpart)."""
    return load_model(make_cfg(f"model={name}", "device=cuda")) if GPU else load_twin(name)


@pytest.fixture(params=SPLIT_MODELS, scope="module")
def pair_of_models(request):
    return load_whole(request.param), split_twin(request.param)


def test_the_split_really_offloads_layers(pair_of_models):
    _, split = pair_of_models
    placed = {key: value for key, value in split.model.hf_device_map.items()}
    layers = split.adapter.modules["decoder_layers"]
    first, rest = (0, "cpu") if GPU else ("cpu", "disk")
    assert placed.get(f"{layers}.0") == first and placed.get(f"{layers}.{split.n_layers - 1}") == rest, placed
    assert split.decoder_layers[split.n_layers - 1].mlp.down_proj.weight.device.type == "meta"   # offloaded
    assert split.device.type == ("cuda" if GPU else "cpu")


def test_every_sweep_kind_gives_the_unsplit_numbers(pair_of_models):
    whole, split = pair_of_models
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    scorer = AnswerScorer(whole.tokenizer, setting.candidates)
    for (name, inputs, sites), (_, split_inputs, _) in zip(sweep_cases(whole, setting), sweep_cases(split, setting),
                                                           strict=True):
        expected = PatchingEngine(whole, scorer, batch_size=2).run_pairs(inputs[:1], sites)[0]
        got = PatchingEngine(split, scorer, batch_size=2).run_pairs(split_inputs[:1], sites)[0]
        for field in ("patched", "clean", "counterfactual"):
            torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=0, atol=1e-5,
                                       msg=lambda m, n=name, f=field: f"{n} {f}: {m}")
        if name == "strips":            # the naive reference (hooked full forwards) on the split model too
            naive = naive_reference(split, scorer, (name, split_inputs[:1], [VISUAL, split.n_layers - 1]))[0]
            torch.testing.assert_close(naive, expected.patched[[0, -1]], rtol=0, atol=1e-5)


def test_embeddings_steering_and_replay_give_the_unsplit_numbers(pair_of_models):
    whole, split = pair_of_models
    setting = Setting.from_config(make_cfg("setting=squares").setting)
    from data_gen.render import random_samples

    samples = random_samples(setting, whole.grid, whole.layout, 2, seed=1)
    for vlm in (whole, split):
        vlm._inputs = [vlm.encode([s.image], [s.prompt]) for s in samples]
    tokens = {id(v): [v.visual_tokens(i) for i in v._inputs] for v in (whole, split)}
    for a, b in zip(tokens[id(whole)], tokens[id(split)], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)                 # probes' embeddings
    delta = torch.randn(tokens[id(whole)][0].shape, generator=torch.Generator().manual_seed(0))
    for coefficient in (0.0, 2.0):
        expected = scaled_logits(whole, whole._inputs[0], coefficient, visual_tokens=tokens[id(whole)][0])
        got = scaled_logits(split, split._inputs[0], coefficient, visual_tokens=tokens[id(split)][0])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    amplified = [v.last_logits(v._inputs[0], tokens[id(v)][0], [Add(VISUAL, delta)]) for v in (whole, split)]
    torch.testing.assert_close(amplified[1], amplified[0], rtol=0, atol=1e-5)
    scorer = AnswerScorer(whole.tokenizer, setting.candidates)
    replayed = []
    for vlm in (whole, split):
        records = record(vlm, vlm._inputs, tokens[id(vlm)], batch_size=2)
        replayed.append(replayed_probabilities(vlm, scorer, scalingvis_rows(vlm, records, [0.5, 2.0]), 2))
    torch.testing.assert_close(replayed[1], replayed[0], rtol=0, atol=1e-6)


def test_a_device_map_that_places_no_layer_is_refused():
    cfg = make_cfg("model=dual_organism", "model.device_map={model.vision_tower: cpu}", "model.max_memory={cpu: 1GiB}")
    with pytest.raises(UsageError, match="places none of dual_organism's decoder layers"):
        load_model(cfg)
    with pytest.raises(UsageError, match="allowed: auto, balanced"):
        load_model(make_cfg("model=dual_organism", "model.device_map=everywhere"))
