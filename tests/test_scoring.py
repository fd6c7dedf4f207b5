"""Answer scoring (vlm/scoring.py) on both twins: the first-token rule where it is exact, the whole-answer rule
where first tokens are shared, equal to a hand-written teacher-forced forward of prompt + answer."""

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UsageError
from data_gen.settings import Setting
from tests.conftest import make_cfg
from vlm.interventions import Apply, layer_site
from vlm.scoring import AnswerScorer, candidate_probabilities

PROMPTS = ["The object above the key is", "The color of the square to the left of the green square is"]


def white(vlm):
    return Image.new("RGB", (vlm.grid.width, vlm.grid.height), "white")


@pytest.mark.parametrize("setting_name", ["squares", "shapes", "objects"])
def test_synthetic_settings_keep_the_first_token_rule(twin, setting_name):
    setting = Setting.from_config(make_cfg(f"setting={setting_name}").setting)
    scorer = AnswerScorer(twin.tokenizer, setting.candidates)
    assert scorer.exact
    inputs = twin.encode([white(twin)], PROMPTS[:1])
    logits = twin.last_logits(inputs)
    probs = torch.softmax(logits, -1)[0]
    expected = torch.stack([probs[ids].sum() for ids in scorer.token_ids])
    torch.testing.assert_close(candidate_probabilities(twin, scorer, inputs)[0][0], expected)


def teacher_forced(vlm, prompt: str, form: tuple[int, ...]) -> float:
    """P(form | prompt): one forward over prompt + form[:-1], the product of each token's probability."""
    one = vlm.encode([white(vlm)], [prompt])
    extra = torch.tensor([form[:-1]], dtype=torch.long)
    full = dict(one, input_ids=torch.cat([one["input_ids"], extra], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in full:
            full[key] = torch.cat([one[key], torch.zeros_like(extra, dtype=one[key].dtype)], 1)
    with torch.no_grad():
        log_probs = vlm.model(**full).logits[0].float().log_softmax(-1)
    start = one["input_ids"].shape[1] - 1
    return float(sum(log_probs[start + j, token] for j, token in enumerate(form)).exp())


def test_whole_answers_equal_a_teacher_forced_forward(twin):
    candidates = ["water bottle", "water", "red", "ball of yarn"]     # water / water bottle share a first token
    scorer = AnswerScorer(twin.tokenizer, candidates)
    assert not scorer.exact and scorer.sequences
    assert all(len(form) > 1 for form in scorer.forms[0]) and all(len(form) == 1 for form in scorer.forms[1])
    inputs = twin.encode([white(twin)] * 2, PROMPTS)
    probs, logits = candidate_probabilities(twin, scorer, inputs)
    expected = np.array([[sum(teacher_forced(twin, prompt, form) for form in forms) for forms in scorer.forms]
                         for prompt in PROMPTS])
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(logits, twin.last_logits(inputs))
    with pytest.raises(ValueError, match="whole answers"):
        scorer.probabilities(logits)


def test_an_intervention_on_the_prompt_reaches_every_answer_token(twin):
    """An intervention is active over the prompt only; its effect still changes later tokens' probabilities (through
    the cache), and leaving it out gives the plain scores."""
    scorer = AnswerScorer(twin.tokenizer, ["water bottle", "water"])
    inputs = twin.encode([white(twin)], PROMPTS[:1])
    plain, _ = candidate_probabilities(twin, scorer, inputs)
    calls = []

    def noisy(hidden):
        calls.append(hidden.shape[1])
        return hidden + 0.5

    patched, _ = candidate_probabilities(twin, scorer, inputs, interventions=[Apply(layer_site(0), noisy)])
    assert calls == [inputs["input_ids"].shape[1]]               # the prompt's forward only
    assert not torch.allclose(patched, plain)


def test_two_candidates_spelled_the_same_are_refused(twin):
    with pytest.raises(UsageError, match="tokenize the same way"):
        AnswerScorer(twin.tokenizer, ["red", "Red"])
