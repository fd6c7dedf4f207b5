"""The patching engine on both twins: identities that any correct patching must satisfy, and equality
with the naive one-forward-per-site loop."""

import torch

from common.geometry import token_indices
from data_gen.pairs import last_token_pairs, mirror_pairs
from data_gen.settings import Setting
from patching.engine import PatchingEngine, PatchPlan, naive_sweep
from patching.interventions import edit_residual, read_sites, site_names
from tests.conftest import make_cfg
from vlm.scoring import AnswerScorer


def squares(_twin):
    return Setting.from_config(make_cfg("setting=squares").setting)


def object_plan(grid, pair):
    """Clean left item's tokens <- counterfactual right item's, and clean right <- counterfactual left."""
    left, right = pair.clean.items[0].token_box, pair.clean.items[2].token_box
    return PatchPlan(token_indices(grid, left) + token_indices(grid, right),
                     token_indices(grid, right) + token_indices(grid, left))


def test_engine_equals_naive_loop(twin):
    setting = squares(twin)
    scorer = AnswerScorer(twin.tokenizer, setting.candidates)
    sites = site_names(twin)
    engine = PatchingEngine(twin, scorer, batch_size=3)         # chunks of 3: exercises the chunking too
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 0)[0]
    plan = object_plan(twin.grid, pair)
    torch.testing.assert_close(engine.run_pair(pair.clean, pair.counterfactual, plan, sites).patched,
                               naive_sweep(twin, scorer, pair.clean, pair.counterfactual, plan, sites),
                               rtol=1e-4, atol=1e-5)
    lt = last_token_pairs(setting, twin.grid, twin.layout, 1, 3)[0]
    layers = sites[1:]
    torch.testing.assert_close(engine.run_pair(lt.clean, lt.counterfactual, PatchPlan(), layers).patched,
                               naive_sweep(twin, scorer, lt.clean, lt.counterfactual, PatchPlan(), layers),
                               rtol=1e-4, atol=1e-5)


def test_engine_equals_naive_loop_when_answers_are_scored_whole(twin):
    """Candidates that share a first token are scored by whole answers continued from the patched run's cache:
    the engine's batched rows must still equal one forward per site."""
    setting = squares(twin)
    scorer = AnswerScorer(twin.tokenizer, [*setting.candidates, "water bottle", "water"])
    assert not scorer.exact and scorer.sequences
    engine = PatchingEngine(twin, scorer, batch_size=3)
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 5)[0]
    plan, sites = object_plan(twin.grid, pair), site_names(twin, [0, twin.n_layers - 1])
    run = engine.run_pair(pair.clean, pair.counterfactual, plan, sites)
    torch.testing.assert_close(run.patched, naive_sweep(twin, scorer, pair.clean, pair.counterfactual, plan, sites),
                               rtol=1e-4, atol=1e-6)
    assert bool((run.patched[:, -1] > 0).all())          # the multi-token candidate gets a real probability


def test_patching_a_run_with_itself_changes_nothing(twin):
    setting = squares(twin)
    scorer = AnswerScorer(twin.tokenizer, setting.candidates)
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 1)[0]
    clean_in = twin.encode([pair.clean.image], [pair.clean.prompt])
    reference = scorer.probabilities(twin.last_logits(clean_in))
    everything = list(range(twin.n_visual_tokens))
    engine = PatchingEngine(twin, scorer)
    run = engine.run_pair(pair.clean, pair.clean, PatchPlan(everything, everything), site_names(twin))
    torch.testing.assert_close(run.patched, reference.expand_as(run.patched), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.clean, reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.counterfactual, reference[0], rtol=1e-5, atol=1e-6)


def test_patching_every_position_of_layer0_gives_the_counterfactual(twin):
    setting = squares(twin)
    pair = mirror_pairs(setting, twin.grid, twin.layout, 1, 2)[0]
    clean_in = twin.encode([pair.clean.image], [pair.clean.prompt])
    cf_in = twin.encode([pair.counterfactual.image], [pair.counterfactual.prompt])
    assert clean_in["input_ids"].shape == cf_in["input_ids"].shape
    with read_sites(twin, [0]) as cf_acts:
        cf_logits = twin.last_logits(cf_in)
    with edit_residual(twin, 0, lambda hidden: cf_acts[0].clone()):
        patched = twin.last_logits(clean_in)
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
