"""Candidate-answer scoring (docs/experiments.md, "Scoring"): a candidate's score is the next-token probability
of its first token, summed over its surface forms (`red`, `Red`, ` red`, ` Red`) that start with distinct
tokens."""

import torch
from tqdm import tqdm

from common.errors import UsageError
from vlm.twins import surface_forms


class AnswerScorer:
    """Scores a fixed list of candidate answers from next-token logits.

    `token_ids[i]` are the distinct first-token ids of candidate i's surface forms. A first token shared by
    two candidates would make their scores ambiguous, so it is refused at construction.
    """

    def __init__(self, tokenizer, candidates: list[str]):
        self.candidates = list(candidates)
        unk = tokenizer.unk_token_id
        self.token_ids: list[list[int]] = []
        owner: dict[int, str] = {}
        for candidate in self.candidates:
            ids = []
            for form in surface_forms(candidate):
                encoded = tokenizer(form, add_special_tokens=False)["input_ids"]
                if encoded and encoded[0] != unk and encoded[0] not in ids:
                    ids.append(encoded[0])
            if not ids:
                raise UsageError(f"answer {candidate!r} has no token in the model's vocabulary")
            for token in ids:
                if token in owner:
                    raise UsageError(f"answers {owner[token]!r} and {candidate!r} start with the same token "
                                     f"{tokenizer.convert_ids_to_tokens(token)!r}")
                owner[token] = candidate
            self.token_ids.append(ids)
        self._owner = owner
        vocab = max(owner) + 1
        # (vocab, candidates) 0/1 matrix: probs @ membership sums each candidate's token probabilities
        self._membership = torch.zeros(vocab, len(self.candidates))
        for i, ids in enumerate(self.token_ids):
            self._membership[ids, i] = 1.0

    def index(self, answer: str) -> int:
        return self.candidates.index(answer)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch, vocab) logits -> (batch, candidates) probabilities."""
        probs = torch.softmax(logits.float(), dim=-1)[:, : self._membership.shape[0]]
        return probs @ self._membership.to(probs.device)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch,) index of the highest-scoring candidate."""
        return self.probabilities(logits).argmax(-1)

    def greedy_candidate(self, logits: torch.Tensor) -> list[str | None]:
        """The candidate whose token greedy decoding would emit, or None when it emits no candidate's token."""
        return [self._owner.get(int(t)) for t in logits.argmax(-1)]


def score_samples(vlm, scorer: AnswerScorer, samples, batch_size: int, desc: str = "scoring"):
    """(candidate probabilities (n, candidates) as numpy, greedy candidate per sample) of `samples` on `vlm`,
    `batch_size` samples per forward."""
    probs, greedy = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch"):
        batch = samples[start:start + batch_size]
        logits = vlm.last_logits(vlm.encode([s.image for s in batch], [s.prompt for s in batch]))
        probs.append(scorer.probabilities(logits).cpu())
        greedy += scorer.greedy_candidate(logits)
    return torch.cat(probs).numpy(), greedy
