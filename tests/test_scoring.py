"""Answer scoring (vlm/scoring.py) on both twins: the first-token rule where it is exact, the whole-answer rule
where first tokens are shared, equal to a hand-written teacher-forced forward of prompt + answer."""

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UsageError
from data_gen.settings import Setting
from tests.helpers import make_cfg
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


def forced(vlm, prompt: str, tokens) -> torch.Tensor:
    """(len(tokens) + 1, vocab) log-probabilities of one forward over the white image, `prompt` and `tokens`: row j
    is the distribution of the token after the prompt and tokens[:j]. The image's visual embeddings are computed
    once per prompt (VLM.visual_tokens) and passed in, so each form costs the LM only."""
    key = (vlm.name, prompt)
    if key not in _encoded:
        one = vlm.encode([white(vlm)], [prompt])
        _encoded[key] = one, vlm.visual_tokens(one)
    one, visual = _encoded[key]
    extra = torch.tensor([list(tokens)], dtype=torch.long)
    full = dict(one, input_ids=torch.cat([one["input_ids"], extra], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    for name in ("mm_token_type_ids", "token_type_ids"):
        if name in full:
            full[name] = torch.cat([one[name], torch.zeros_like(extra, dtype=one[name].dtype)], 1)
    with torch.no_grad():       # only the last len(tokens) + 1 positions are projected onto the vocabulary
        logits = vlm.adapter.forward(vlm.model, full, visual, logits_to_keep=len(tokens) + 1).logits[0]
    return logits.float().log_softmax(-1)


_encoded: dict = {}


def teacher_forced(vlm, prompt: str, form: tuple[int, ...]) -> float:
    """P(form | prompt): the product of each token's probability in one forward over prompt + form."""
    log_probs = forced(vlm, prompt, form)
    return float(sum(log_probs[j, token] for j, token in enumerate(form)).exp())


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


class WordTokenizer:
    """A stand-in tokenizer for the scorer's arithmetic: each space-separated word is one id (`words`), the first
    word's capitalised and space-prefixed forms get their own ids."""

    unk_token_id = None

    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False):
        words = text.split(" ")
        pieces = [(" " if text.startswith(" ") else "") + words[1 if text.startswith(" ") else 0]]
        pieces += [" " + w for w in words[(2 if text.startswith(" ") else 1):]]
        return {"input_ids": [self.ids.setdefault(p, len(self.ids)) for p in pieces]}


def test_a_prefix_answer_gets_the_probability_of_stopping_there():
    """`a` begins `a b` and `a c`: with P(a) = 0.5, P(b | a) = 0.3, P(c | a) = 0.2 (every surface form alike), the
    scores are 0.5 x (1 - 0.3 - 0.2) = 0.25, 0.5 x 0.3 = 0.15 and 0.1: the prefix's mass splits without being
    counted twice (0.25 + 0.15 + 0.1 = P(a)); `d`, a prefix of nothing, keeps its own probability."""
    tok = WordTokenizer()
    scorer = AnswerScorer(tok, ["a", "a b", "a c", "d"])
    assert not scorer.exact
    a_forms = scorer.forms[0]
    assert set(scorer.continuations) == set(a_forms) and all(len(rows) == 2 for rows in scorer.continuations.values())
    other = tok("elsewhere")["input_ids"][0]          # the rest of the vocabulary: 0.3
    logits = torch.full((1, len(tok.ids)), -1e9)
    logits[0, other] = np.log(0.3)
    firsts = {form[0] for forms in scorer.forms for form in forms}
    for token in firsts:                      # each of a's 4 first tokens 0.5 / 4, each of d's 0.2 / 4
        logits[0, token] = np.log(0.5 / 4 if token in {f[0] for f in a_forms} else 0.2 / 4)
    second = {tok.ids[" b"]: 0.3, tok.ids[" c"]: 0.2}
    continued = torch.zeros(1, len(scorer.sequences), max(len(s) for s in scorer.sequences) - 1)
    for row, form in enumerate(scorer.sequences):
        continued[0, row, 0] = np.log(second[form[1]])
    probs = scorer.whole_answer_probabilities(logits, continued)[0]
    torch.testing.assert_close(probs, torch.tensor([0.25, 0.15, 0.1, 0.2]))


# the forms of "bottle" on the real vocabularies and the token that continues each into "bottle of ...", by hand
BOTTLE = {"tiny_qwen2vl": ([["b", "ottle"], ["B", "ottle"], ["Ġbottle"], ["ĠBottle"]], "Ġof"),
          "tiny_gemma3": ([["bottle"], ["Bottle"], ["▁bottle"], ["▁Bottle"]], "▁of")}


def test_end_of_answer_rule_on_the_real_vocabularies(twin):
    """The dataset's `bottle`, `bottle of mustard` and `bottle of orange juice` on Qwen2's and Gemma 3's real
    tokenizers, against a hand-written computation from one forward per form: bottle = sum over its forms of
    P(form) x (1 - P(` of` | form)); each longer answer = sum of P(whole form). Stopping after a form and every
    longer form that begins with it together never exceed P(form)."""
    candidates = ["bottle", "bottle of mustard", "bottle of orange juice"]
    scorer = AnswerScorer(twin.tokenizer, candidates)
    forms, of = BOTTLE[twin.name]
    assert [twin.tokenizer.convert_ids_to_tokens(list(form)) for form in scorer.forms[0]] == forms
    of_id = twin.tokenizer.convert_tokens_to_ids(of)
    assert {form: [scorer.sequences[r][len(form)] for r in rows] for form, rows in scorer.continuations.items()} == \
        {form: [of_id] for form in scorer.forms[0]}
    prompt = PROMPTS[0]
    probs, _ = candidate_probabilities(twin, scorer, twin.encode([white(twin)], [prompt]))
    whole = {form: teacher_forced(twin, prompt, form) for forms in scorer.forms for form in forms}
    expected = [sum(whole[form] * (1 - float(forced(twin, prompt, form)[len(form), of_id].exp()))
                    for form in scorer.forms[0])]
    expected += [sum(whole[form] for form in forms) for forms in scorer.forms[1:]]
    np.testing.assert_allclose(probs[0].numpy(), expected, rtol=1e-4, atol=1e-9)
    for form in scorer.forms[0]:
        stop = whole[form] * (1 - float(forced(twin, prompt, form)[len(form), of_id].exp()))
        longer = sum(whole[g] for g in whole if len(g) > len(form) and g[:len(form)] == form)
        assert stop + longer <= whole[form] * (1 + 1e-4)
