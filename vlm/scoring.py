"""Candidate-answer scoring (docs/experiments.md, "Scoring").

Each candidate answer is spelled four ways (`red`, `Red`, ` red`, ` Red`: its surface forms), each form a
sequence of tokens. Two rules, chosen per setting and vocabulary:
- first token (`exact`): when every candidate's first tokens belong to it alone, a candidate's score is the
  next-token probability of its forms' distinct first tokens, summed. The synthetic settings are scored this
  way on every vocabulary here.
- whole answer: when two candidates share a first token (Qwen2's BPE starts `Banana` and `Banjo` with `Ban`), a
  candidate's score is the probability of each whole form, the product of its tokens' probabilities under teacher
  forcing, summed over its distinct forms. The continuation runs on the prompt's cache (`continue_answers`), so
  an intervention on the prompt (a patch, a scaled attention) is in every token's probability.
  End of answer: when a form's tokens are a prefix of another candidate's form (Qwen2 and Gemma 3: ` bottle`
  begins ` bottle of mustard` and ` bottle of orange juice`), the shorter form is scored by the probability of
  stopping there: P(its tokens) x (1 - the probability, at the position after its last token, of the distinct
  next tokens that continue it into a longer candidate's form), here 1 - P(` of` | ... ` bottle`). The longer
  form keeps its own whole-sequence probability, so the mass P(` bottle` ...) splits between the candidates
  without being counted twice, and a prefix no longer wins by being short. The next-token probabilities are read
  from the longer forms' own teacher-forced rows (their token after the prefix), so the rule costs no forward.
Answers are never renamed to dodge a tokenizer, and no candidate is refused unless it has no tokens at all or two
candidates tokenize to the very same sequence.
"""

import copy
from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm

from common.errors import UsageError
from vlm.interventions import forward
from vlm.replay import replayed_runs
from vlm.twins import surface_forms

MAX_CONTINUATION_ROWS = 256     # prompt rows x answer forms per continuation forward (the cache is copied per row)


class AnswerScorer:
    """Scores a fixed list of candidate answers.

    `forms[i]`: candidate i's surface forms as distinct token-id tuples; `token_ids[i]`: their distinct first
    tokens. `exact`: the first-token rule applies (no first token shared by two candidates); otherwise the
    whole-answer rule, whose multi-token forms are `sequences` (with `sequence_owner`, the candidate of each)."""

    def __init__(self, tokenizer, candidates: list[str]):
        self.candidates = list(candidates)
        unk = tokenizer.unk_token_id
        self.forms: list[list[tuple[int, ...]]] = []
        for candidate in self.candidates:
            forms = []
            for form in surface_forms(candidate):
                ids = tuple(tokenizer(form, add_special_tokens=False)["input_ids"])
                if ids and unk not in ids and ids not in forms:
                    forms.append(ids)
            if not forms:
                raise UsageError(f"answer {candidate!r} has no token in the model's vocabulary")
            self.forms.append(forms)
        self.token_ids = [list(dict.fromkeys(form[0] for form in forms)) for forms in self.forms]
        starts: dict[int, list[int]] = {}
        for i, ids in enumerate(self.token_ids):
            for token in ids:
                starts.setdefault(token, []).append(i)
        self._starts = starts
        self.exact = all(len(owners) == 1 for owners in starts.values())
        whole: dict[tuple[int, ...], int] = {}
        for i, forms in enumerate(self.forms):
            for form in forms:
                if whole.setdefault(form, i) != i:
                    raise UsageError(f"answers {self.candidates[whole[form]]!r} and {candidates[i]!r} tokenize the same "
                                     f"way: {tokenizer.convert_ids_to_tokens(list(form))}")
        # (vocab, candidates) 0/1 matrix: probs @ membership sums each candidate's first-token probabilities
        vocab = max(starts) + 1
        self._membership = torch.zeros(vocab, len(self.candidates))
        for i, ids in enumerate(self.token_ids):
            self._membership[ids, i] = 1.0
        self.sequences = [form for forms in self.forms for form in forms if len(form) > 1]
        self.sequence_owner = [i for i, forms in enumerate(self.forms) for form in forms if len(form) > 1]
        # single-token forms: (candidate, token) pairs, scored by their next-token probability alone
        self._singles = [(i, form[0]) for i, forms in enumerate(self.forms) for form in forms if len(form) == 1]
        self.continuations = self._continuations()

    def _continuations(self) -> dict[tuple[int, ...], list[int]]:
        """End of answer (module docstring): {form: rows of `sequences`} for every form that is a proper prefix
        of another candidate's form, one row per distinct next token after the prefix (the first longer form, in
        `sequences` order, that continues with it). Row r's teacher-forced log-probability at position
        len(form) - 1 (`continue_answers`) is log P(that token | prompt, form)."""
        out: dict[tuple[int, ...], list[int]] = {}
        for i, forms in enumerate(self.forms):
            for form in forms:
                rows: dict[int, int] = {}
                for row, (longer, owner) in enumerate(zip(self.sequences, self.sequence_owner, strict=True)):
                    if owner != i and len(longer) > len(form) and longer[:len(form)] == form:
                        rows.setdefault(longer[len(form)], row)
                if rows:
                    out[form] = list(rows.values())
        return out

    def index(self, answer: str) -> int:
        return self.candidates.index(answer)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """First-token rule: (batch, vocab) next-token logits -> (batch, candidates) probabilities."""
        if not self.exact:
            raise ValueError("these candidates share first tokens: score them with whole answers "
                             "(VLM.candidate_probabilities)")
        probs = torch.softmax(logits.float(), dim=-1)[:, : self._membership.shape[0]]
        return probs @ self._membership.to(probs.device)

    def continuation_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the whole-answer rule: (tokens (n, L) fed after the prompt, their mask (n, L), targets (n, L))
        for the n multi-token forms: form s feeds s[:-1] and is scored on s[1:] (L = longest form - 1; padding
        on the right, target -1)."""
        length = max(len(s) for s in self.sequences) - 1
        ids = torch.zeros(len(self.sequences), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.full_like(ids, -1)
        for row, form in enumerate(self.sequences):
            ids[row, :len(form) - 1] = torch.tensor(form[:-1])
            mask[row, :len(form) - 1] = 1
            targets[row, :len(form) - 1] = torch.tensor(form[1:])
        return ids, mask, targets

    def stop_probability(self, form: tuple[int, ...], continued: torch.Tensor) -> torch.Tensor | float:
        """(batch,) probability of ending the answer after `form` rather than going on into a longer candidate's
        form (module docstring, end of answer): 1 - the summed next-token probabilities of the distinct tokens
        that continue it, read from `continued` (batch, n, L) at position len(form) - 1; 1.0 when no candidate
        continues it."""
        rows = self.continuations.get(form)
        if not rows:
            return 1.0
        going_on = continued[:, rows, len(form) - 1].exp().sum(-1)
        return (1.0 - going_on).clamp(min=0.0)

    def whole_answer_probabilities(self, logits: torch.Tensor, continued: torch.Tensor) -> torch.Tensor:
        """Whole-answer rule: (batch, candidates) from the prompt's next-token `logits` (batch, vocab) and
        `continued` (batch, n, L), the log-probability of each multi-token form's later tokens (0 past its end),
        as `continue_answers` returns it. A form that begins a longer candidate's form is scored by the
        probability of stopping after it (end of answer, module docstring)."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        continued = continued.to(logits.device)
        scores = torch.zeros(logits.shape[0], len(self.candidates), device=logits.device)
        for i, token in self._singles:
            scores[:, i] += log_probs[:, token].exp() * self.stop_probability((token,), continued)
        for row, (form, owner) in enumerate(zip(self.sequences, self.sequence_owner, strict=True)):
            whole = (log_probs[:, form[0]] + continued[:, row].sum(-1)).exp()
            scores[:, owner] += whole * self.stop_probability(form, continued)
        return scores

    def greedy_candidate(self, logits: torch.Tensor, probs: torch.Tensor | None = None) -> list[str | None]:
        """The candidate greedy decoding's first token starts: the one candidate starting with it, or (a first
        token shared by several, with their `probs`) the best of those; None when it starts no candidate."""
        out = []
        for row, token in enumerate(logits.argmax(-1).tolist()):
            owners = self._starts.get(token, [])
            if len(owners) > 1 and probs is not None:
                owners = [max(owners, key=lambda i: float(probs[row, i]))]
            out.append(self.candidates[owners[0]] if len(owners) == 1 else None)
        return out


def continue_answers(vlm, scorer: AnswerScorer, inputs, cache) -> torch.Tensor:
    """(batch, n, L) log-probabilities of every multi-token answer form's later tokens, teacher-forced after each
    prompt of `inputs` from that prompt's `cache` (past key values of a forward over `inputs`, left untouched).

    Forms run in groups of equal length, so no position past a form's end is projected onto the vocabulary (most
    answers are two tokens: padding every form to the longest made the vocabulary projection several times
    larger), and each token's log-probability is its logit minus the log-sum-exp over the vocabulary."""
    ids, mask, targets = (t.to(vlm.device) for t in scorer.continuation_inputs())
    batch, n = inputs["input_ids"].shape[0], ids.shape[0]
    out = torch.zeros(batch, n, ids.shape[1], device=vlm.device)
    per_chunk = max(1, MAX_CONTINUATION_ROWS // batch)
    positions = vlm.adapter.continuation_position_ids(vlm.model, inputs, ids.shape[1])     # (..., batch, L)
    lengths = mask.sum(1)
    for length in sorted(set(lengths.tolist())):
        group = (lengths == length).nonzero()[:, 0]
        for start in range(0, len(group), per_chunk):
            rows = group[start:start + per_chunk]
            k = len(rows)
            expanded = copy.deepcopy(cache)
            expanded.batch_repeat_interleave(k)              # prompt b's rows are b * k ... b * k + k - 1
            attention = torch.cat([inputs["attention_mask"].repeat_interleave(k, 0),
                                   mask[rows, :length].repeat(batch, 1)], 1)
            logits = vlm.model(input_ids=ids[rows, :length].repeat(batch, 1), attention_mask=attention,
                               position_ids=positions[..., :length].repeat_interleave(k, -2), use_cache=False,
                               **{vlm.adapter.cache_argument(vlm.model): expanded}).logits.float()
            chunk_targets = targets[rows, :length].repeat(batch, 1)                         # (batch * k, length)
            gathered = logits.gather(-1, chunk_targets[..., None])[..., 0] - logits.logsumexp(-1)
            out[:, rows, :length] = gathered.reshape(batch, k, length)
    return out


def run_probabilities(vlm, scorer: AnswerScorer, logits: torch.Tensor, caches: Callable[[], Iterable] = tuple
                      ) -> torch.Tensor:
    """(rows, candidates) probabilities (on the CPU) of runs with (rows, vocab) next-token `logits` at their last
    input position: the one place where runs, plain, patched, replayed or attention-edited, become candidate
    probabilities. Under the first-token rule the logits suffice; under the whole-answer rule, `caches()` yields
    (row indices, their inputs, a cache of their keys and values) for every run, and the answers' later tokens are
    teacher-forced from those caches (`continue_answers`)."""
    if scorer.exact:
        return scorer.probabilities(logits).cpu()
    if not scorer.sequences:
        return scorer.whole_answer_probabilities(logits, torch.zeros(logits.shape[0], 0, 0)).cpu()
    out = torch.zeros(logits.shape[0], len(scorer.candidates))
    for indices, inputs, cache in caches():
        continued = continue_answers(vlm, scorer, inputs, cache)
        out[indices] = scorer.whole_answer_probabilities(logits[indices], continued).cpu()
    return out


def candidate_probabilities(vlm, scorer: AnswerScorer, inputs, visual_tokens: torch.Tensor | None = None,
                            interventions: Iterable = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate probabilities (batch, candidates) on the CPU, last-position logits (batch, vocab)) of one forward
    over `inputs` (`visual_tokens` as in VLM.last_logits) with `interventions` (vlm/interventions.py), under the
    rule `scorer` says. The interventions act on the forward over the prompt only: the answer's later tokens
    continue from its cache, as generation would."""
    with torch.no_grad():
        out = forward(vlm, inputs, interventions, visual_tokens, logits_to_keep=1, use_cache=not scorer.exact)
        logits = out.logits[:, -1].float()
        rows = list(range(logits.shape[0]))
        return run_probabilities(vlm, scorer, logits, lambda: [(rows, inputs, vlm.adapter.output_cache(out))]), logits


@torch.no_grad()
def replayed_probabilities(vlm, scorer: AnswerScorer, rows: list, batch_size: int) -> torch.Tensor:
    """(len(rows), candidates) probabilities of replay rows (vlm/replay.py: e.g. the last position of recorded
    runs under attention-score edits), rows of one suffix length `batch_size` per pass, in the order given."""
    out = torch.zeros(len(rows), len(scorer.candidates))
    by_suffix: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_suffix.setdefault(int(row.hidden.shape[0]), []).append(i)
    keep = not scorer.exact
    for indices in by_suffix.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            runs = replayed_runs(vlm, [rows[i] for i in chunk], keep)
            out[chunk] = run_probabilities(vlm, scorer, runs.logits, lambda runs=runs: runs.caches(vlm.adapter))
    return out


def score_samples(vlm, scorer: AnswerScorer, samples, batch_size: int, desc: str = "scoring"):
    """(candidate probabilities (n, candidates) as numpy, greedy candidate per sample) of `samples` on `vlm`,
    `batch_size` samples per forward."""
    probs, greedy = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch"):
        batch = samples[start:start + batch_size]
        scores, logits = candidate_probabilities(vlm, scorer, vlm.encode([s.image for s in batch],
                                                                          [s.prompt for s in batch]))
        probs.append(scores.cpu())
        greedy += scorer.greedy_candidate(logits, scores)
    return torch.cat(probs).numpy(), greedy
