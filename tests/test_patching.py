"""The patching engine on both twins: identities that any correct patching must satisfy, and equality
with the naive one-forward-per-site loop."""

import pytest
import torch

from common.geometry import token_indices
from data_gen.pairs import last_token_pairs, mirror_pairs
from data_gen.settings import Setting
from patching.ablation import Ablator
from patching.engine import PairInput, PatchingEngine, PatchPlan, naive_patch, naive_sweep, site_name
from patching.experiments import mirror_plan, prompt_end_offset
from tests.helpers import load_twin, make_cfg
from vlm.interventions import VISUAL, Read, Set, intervene, layer_site
from vlm.replay import record
from vlm.scoring import AnswerScorer


def squares(_twin):
    return Setting.from_config(make_cfg("setting=squares").setting)


ENGINE_MODELS = ["tiny_qwen2vl", "tiny_gemma3", "organism", "tiny_qwen2_5vl", "tiny_llava", "tiny_internvl3",
                 "tiny_qwen3vl"]


@pytest.fixture(params=ENGINE_MODELS, scope="module")
def model(request):
    """Every family's twin and the organism (trained, so patching moves its answers)."""
    return load_twin(request.param)


def sweep_cases(vlm, setting):
    """(name, pair inputs, sites) of every kind of sweep the experiments run: last token at the final token and at
    the prompt's last word (every layer); object and strip patching in both orientations and ablated object
    patching (the visual embeddings and every layer)."""
    layers = list(range(vlm.n_layers))
    cases = []
    for position in ("last_token", "prompt_end"):
        pairs = last_token_pairs(setting, vlm.grid, vlm.layout, 2, 3)
        cases.append((position, [PairInput(p.clean, p.counterfactual,
                                           PatchPlan(from_end=prompt_end_offset(vlm, p, position))) for p in pairs],
                      layers))
    for region in ("items", "strips"):
        pairs = mirror_pairs(setting, vlm.grid, vlm.layout, 2, 0)      # one horizontal, one vertical
        cases.append((region, [PairInput(p.clean, p.counterfactual, mirror_plan(vlm.grid, p, region)) for p in pairs],
                      [VISUAL, *layers]))
    pair = mirror_pairs(setting, vlm.grid, vlm.layout, 1, 5)[0]
    ablator = Ablator(vlm, setting, vlm.grid, vlm.layout)
    ablated = (ablator.ablated(pair.clean)[None], ablator.ablated(pair.counterfactual)[None])
    cases.append(("ablated", [PairInput(pair.clean, pair.counterfactual, mirror_plan(vlm.grid, pair, "items"),
                                        *ablated)], layers))
    return cases


def naive_reference(vlm, scorer, case):
    """One full forward per site (ablated pairs: over their given visual embeddings, vision tower skipped)."""
    _, inputs, sites = case
    return [naive_sweep(vlm, scorer, pair.clean, pair.counterfactual, pair.plan, sites, pair.clean_visual,
                        pair.cf_visual) for pair in inputs]


def read_counterfactual(vlm, inputs, names):
    """{site: tensor} of the counterfactual run `inputs` at intervention sites `names` ("visual" included)."""
    with intervene(vlm, [Read(name) for name in names]) as acts:
        vlm.last_logits(inputs)
    return acts


def test_engine_equals_naive_loop_on_every_sweep(model, request):
    """Every site of every kind of sweep, several pairs per pass and passes split small (batch_size=2), equal to
    one full forward per site to 1e-5 in float32."""
    setting = squares(model)
    scorer = AnswerScorer(model.tokenizer, setting.candidates)
    engine = PatchingEngine(model, scorer, batch_size=2)
    moved, differs = 0.0, 0.0
    for case in sweep_cases(model, setting):
        name, inputs, sites = case
        runs = engine.run_pairs(inputs, sites)
        for run, reference in zip(runs, naive_reference(model, scorer, case), strict=True):
            assert run.patched.shape == (len(sites), len(setting.candidates))
            torch.testing.assert_close(run.patched, reference, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
            moved = max(moved, float((reference - run.clean).abs().max()))
            differs = max(differs, float((run.patched - reference).abs().max()))
    # the patches move the answers far more than engine and naive loop differ: the equality is not that of runs
    # that patching leaves alone (random twins move little, the organism a lot)
    assert moved > 100 * differs and (moved > 0.1 or model.name != "organism")


class LogitEngine(PatchingEngine):
    """An engine that keeps the logits of every batch of runs it scores."""

    def candidates(self, runs):
        self.logits.append(runs.logits.cpu())
        return super().candidates(runs)


def test_engine_logits_equal_naive_logits(model, request):
    """The same equality on the next-token logits themselves (on the twins' real vocabularies a candidate's
    probability is tiny, so logits say more): every layer, last token and strips."""
    setting = squares(model)
    scorer = AnswerScorer(model.tokenizer, setting.candidates)
    last = last_token_pairs(setting, model.grid, model.layout, 1, 3)[0]
    mirror = mirror_pairs(setting, model.grid, model.layout, 1, 0)[0]
    for pair, plan, sites in ((last, PatchPlan(), list(range(model.n_layers))),
                              (mirror, mirror_plan(model.grid, mirror, "strips"), [VISUAL, *range(model.n_layers)])):
        engine = LogitEngine(model, scorer, batch_size=2)
        engine.logits = []
        engine.run_pair(pair.clean, pair.counterfactual, plan, sites)
        patched = torch.cat(engine.logits[1:])            # [0]: the unpatched clean and counterfactual runs
        clean_in = model.encode([pair.clean.image], [pair.clean.prompt])
        cf_in = model.encode([pair.counterfactual.image], [pair.counterfactual.prompt])
        dst, src = plan.positions(model, clean_in["input_ids"], cf_in["input_ids"])
        names = [site_name(site) for site in sites]
        acts = read_counterfactual(model, cf_in, names)
        cf_logits = model.last_logits(cf_in)
        reference = [model.last_logits(clean_in, interventions=[naive_patch(plan, name, acts[name], dst, src)])
                     for name in names]
        torch.testing.assert_close(patched, torch.cat(reference), rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(engine.logits[0], torch.cat([model.last_logits(clean_in), cf_logits]),
                                   rtol=1e-5, atol=5e-5)


def test_gemma_image_block_is_never_split(model):
    """Gemma 3's image tokens attend to each other both ways, so a patched visual token changes the image tokens
    before it too: the shared prefix stops where the image starts. Qwen2-VL is causal: it stops at the token."""
    sample = last_token_pairs(squares(model), model.grid, model.layout, 1, 0)[0].clean
    inputs = model.encode([sample.image], [sample.prompt])
    rec = record(model, [inputs], [model.visual_tokens(inputs)], 1)[0]
    positions = model.visual_token_positions(inputs["input_ids"])[0]
    first, inside = int(positions[0]), int(positions[40])
    expected = first if model.adapter.name == "gemma3" else inside
    assert rec.shareable_prefix(inside) == expected
    assert rec.shareable_prefix(first) == first
    assert rec.shareable_prefix(rec.length - 1) == rec.length - 1       # text after the image is causal


class ContinuingEngine(PatchingEngine):
    """An engine that keeps every batch of runs it turns into candidate probabilities, continuing each run by
    `tokens` from its own cache (what whole-answer scoring does there)."""

    def __init__(self, vlm, scorer, tokens, **kwargs):
        super().__init__(vlm, scorer, **kwargs)
        self.keep_cache, self.tokens, self.seen = True, tokens, []

    def candidates(self, runs):
        steps = torch.zeros(runs.logits.shape[0], self.tokens.shape[1], runs.logits.shape[1])
        for indices, inputs, cache in runs.caches(self.vlm.adapter):
            steps[indices] = continue_logits(self.vlm, inputs, cache, self.tokens)
        self.seen.append((runs.logits, steps))
        return super().candidates(runs)


def continue_logits(vlm, inputs, cache, tokens):
    """(rows, steps, vocab) float32 logits of `tokens` (1, steps) fed after each row of `inputs` from `cache`."""
    rows, steps = inputs["input_ids"].shape[0], tokens.shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(rows, steps, dtype=inputs["attention_mask"].dtype)], 1)
    positions = vlm.adapter.continuation_position_ids(vlm.model, inputs, steps)
    return vlm.model(input_ids=tokens.expand(rows, -1), attention_mask=mask, position_ids=positions,
                     **{vlm.adapter.cache_argument(vlm.model): cache}).logits.float()


def test_patched_runs_continue_from_their_own_cache(twin):
    """Tokens appended to a patched run (teacher forcing an answer) score as in one full forward of the longer
    input patched at the same site: the replayed rows' keys and values are those of the patched runs."""
    setting = squares(twin)
    scorer = AnswerScorer(twin.tokenizer, setting.candidates)
    tokens = torch.tensor([[scorer.token_ids[0][0], scorer.token_ids[1][0]]])
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 0)[0]
    plan, sites = mirror_plan(twin.grid, pair, "strips"), [VISUAL, 0, twin.n_layers - 2]
    engine = ContinuingEngine(twin, scorer, tokens, batch_size=4)
    engine.run_pair(pair.clean, pair.counterfactual, plan, sites)
    (unpatched, unpatched_steps), (patched, patched_steps) = engine.seen
    clean_in = twin.encode([pair.clean.image], [pair.clean.prompt])
    cf_in = twin.encode([pair.counterfactual.image], [pair.counterfactual.prompt])
    dst, src = plan.positions(twin, clean_in["input_ids"], cf_in["input_ids"])
    longer = append_tokens(clean_in, tokens)
    steps = tokens.shape[1]
    clean_full = full_logits(twin, longer, steps)
    names = [site_name(site) for site in sites]
    with intervene(twin, [Read(name) for name in names]) as acts:
        cf_full = full_logits(twin, append_tokens(cf_in, tokens), steps)
    for run, full in ((0, clean_full), (1, cf_full)):
        torch.testing.assert_close(unpatched[run], full[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(unpatched_steps[run], full[1:], rtol=1e-4, atol=1e-4)
    for row, name in enumerate(names):
        with intervene(twin, [naive_patch(plan, name, acts[name], dst, src)]):
            full = full_logits(twin, longer, steps)
        torch.testing.assert_close(patched[row], full[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(patched_steps[row], full[1:], rtol=1e-4, atol=1e-4)


def append_tokens(inputs, tokens):
    """`inputs` (batch 1) with text `tokens` (1, steps) appended."""
    out = dict(inputs)
    steps = tokens.shape[1]
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            fill = 1 if key == "attention_mask" else 0
            out[key] = torch.cat([inputs[key], torch.full((1, steps), fill, dtype=inputs[key].dtype)], dim=1)
    return out


def full_logits(vlm, inputs, steps):
    """(steps + 1, vocab) float32 logits of one full forward at the original input's last position and the `steps`
    appended ones."""
    return vlm.adapter.forward(vlm.model, inputs).logits[0, -(steps + 1):].float()


def test_engine_equals_naive_loop_when_answers_are_scored_whole(twin):
    """Candidates that share a first token are scored by whole answers continued from each patched run's own
    cache: every sweep kind, every site, still equal to one forward per site."""
    setting = squares(twin)
    scorer = AnswerScorer(twin.tokenizer, [*setting.candidates, "water bottle", "water"])
    assert not scorer.exact and scorer.sequences
    engine = PatchingEngine(twin, scorer, batch_size=2)
    for case in sweep_cases(twin, setting):
        name, inputs, sites = case
        runs = engine.run_pairs(inputs[:1], sites)
        reference = naive_reference(twin, scorer, (name, inputs[:1], sites))[0]
        torch.testing.assert_close(runs[0].patched, reference, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert bool((runs[0].patched[:, -1] > 0).all())          # the multi-token candidate gets a real probability


def test_patching_a_run_with_itself_changes_nothing(twin):
    setting = squares(twin)
    scorer = AnswerScorer(twin.tokenizer, setting.candidates)
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 1)[0]
    clean_in = twin.encode([pair.clean.image], [pair.clean.prompt])
    reference = scorer.probabilities(twin.last_logits(clean_in))
    everything = list(range(twin.n_visual_tokens))
    engine = PatchingEngine(twin, scorer)
    run = engine.run_pair(pair.clean, pair.clean, PatchPlan(everything, everything), [VISUAL, *range(twin.n_layers)])
    torch.testing.assert_close(run.patched, reference.expand_as(run.patched), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.clean, reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.counterfactual, reference[0], rtol=1e-5, atol=1e-6)


def test_patching_every_position_of_layer0_gives_the_counterfactual(twin):
    setting = squares(twin)
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 2)[0]
    clean_in = twin.encode([pair.clean.image], [pair.clean.prompt])
    cf_in = twin.encode([pair.counterfactual.image], [pair.counterfactual.prompt])
    assert clean_in["input_ids"].shape == cf_in["input_ids"].shape
    cf_acts = read_counterfactual(twin, cf_in, [layer_site(0)])
    cf_logits = twin.last_logits(cf_in)
    patched = twin.last_logits(clean_in, interventions=[Set(layer_site(0), cf_acts[layer_site(0)])])
    torch.testing.assert_close(patched, cf_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(twin.last_logits(clean_in), cf_logits, atol=1e-4)


def test_swapping_strips_and_back_is_the_identity(twin):
    setting = squares(twin)
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 4)[0]
    clean_in = twin.encode([pair.clean.image], [pair.clean.prompt])
    visual = twin.visual_tokens(clean_in)
    left = token_indices(twin.grid, pair.clean.strips[0])
    right = token_indices(twin.grid, pair.clean.strips[2])
    swapped = visual.clone()
    swapped[:, left], swapped[:, right] = visual[:, right], visual[:, left]
    back = swapped.clone()
    back[:, left], back[:, right] = swapped[:, right], swapped[:, left]
    assert not torch.equal(swapped, visual)
    torch.testing.assert_close(twin.last_logits(clean_in, visual_tokens=back), twin.last_logits(clean_in))
    assert not torch.allclose(twin.last_logits(clean_in, visual_tokens=swapped), twin.last_logits(clean_in))
