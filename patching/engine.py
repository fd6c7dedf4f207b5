"""The patching engine: a patched run costs only what differs from the clean run.

Per pair, each image's visual embeddings are computed once and the clean and counterfactual inputs each run once
through the model, recorded (vlm/replay.py: every decoder layer's input, keys, values and call). A run patched at
a site differs from the clean run only after the patched layer (site "visual": from the first layer on), and only
at the positions from the first patched one on (before that, the prefix, causal attention leaves it as it was;
for Gemma 3's bidirectional image block the prefix ends where the block starts, read from the model's own masks).
So each site's run is replayed from the layer after the patched one, over the positions from the prefix on,
attending to the clean run's keys and values for the prefix:

- last-token sweep: per pair two full forwards, then one position (a few for `prompt_end`) through the layers
  after each site;
- mirror sweeps (object / strip / ablated): the positions from the first patched visual token on, through the
  layers after each site (the visual-embedding site: all layers).

Rows of several pairs share each replay pass (as many as fit `batch_size` full-length rows' memory, rows of one
suffix length), and a row joins the pass's batch at its start layer, so the batch grows with depth. Every batch of
runs, patched or not, becomes candidate probabilities in one method, `PatchingEngine.candidates`; when answers
are scored whole (the scorer is not `exact`, vlm/scoring.py) each run's own keys and values are kept and the
answers' tokens continue from them there.

`naive_sweep` is the reference it must equal: one full forward per site, batch 1 (tests/test_patching.py).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from patching.interventions import VISUAL, edit_residual, edit_visual_tokens, read_sites
from vlm.models import VLM
from vlm.replay import Record, Row, record, record_kv, replay
from vlm.scoring import AnswerScorer, candidate_probabilities, continue_answers


@dataclass
class PatchPlan:
    """Which clean positions take which counterfactual values.

    `dst_tokens` / `src_tokens`: visual token indices (row-major) of the clean and counterfactual images,
    paired in order; None means one text position in both runs, `from_end` positions before the last
    (last-token patching, layer sites only: 0 is the last input token)."""

    dst_tokens: list[int] | None = None
    src_tokens: list[int] | None = None
    from_end: int = 0

    def positions(self, vlm: VLM, clean_ids: torch.Tensor, cf_ids: torch.Tensor):
        """(clean sequence positions, counterfactual sequence positions) to patch in the residual stream."""
        if self.dst_tokens is None:
            return (torch.tensor([clean_ids.shape[1] - 1 - self.from_end]),
                    torch.tensor([cf_ids.shape[1] - 1 - self.from_end]))
        dst = vlm.visual_token_positions(clean_ids)[0, self.dst_tokens]
        src = vlm.visual_token_positions(cf_ids)[0, self.src_tokens]
        return dst.cpu(), src.cpu()


@dataclass
class PairInput:
    """One pair to sweep: clean and counterfactual samples, the plan, and optionally (1, tokens, hidden) visual
    embeddings to use instead of the images' own in both runs (the ablation's inputs)."""

    clean: object
    counterfactual: object
    plan: PatchPlan
    clean_visual: torch.Tensor | None = None
    cf_visual: torch.Tensor | None = None


@dataclass
class PairRun:
    """One pair's sweep: (sites, candidates) probabilities of the patched clean runs, and (candidates,) of the
    unpatched clean and counterfactual runs."""

    patched: torch.Tensor
    clean: torch.Tensor
    counterfactual: torch.Tensor


@dataclass
class Runs:
    """A batch of runs where they become candidate probabilities: (rows, vocab) next-token logits at each run's
    last input position, each run's input (`records[i]`) and, when the engine keeps caches, `kv(i)`: run i's
    per-layer (kv_heads, L, head_dim) keys and values, as a full forward of it would leave in its cache."""

    logits: torch.Tensor
    records: list
    kv: Callable[[int], list] | None = None

    def caches(self, adapter):
        """(run indices, their inputs, a cache of their keys and values) per recorded input, for continuing the
        runs with answer tokens."""
        groups: dict[int, list[int]] = {}
        for i, rec in enumerate(self.records):
            groups.setdefault(id(rec), []).append(i)
        for indices in groups.values():
            per_run = [self.kv(i) for i in indices]
            stacked = [(torch.stack([kv[layer][0] for kv in per_run]), torch.stack([kv[layer][1] for kv in per_run]))
                       for layer in range(len(per_run[0]))]
            yield indices, adapter.repeat_inputs(self.records[indices[0]].inputs, len(indices)), \
                adapter.filled_cache(stacked)


@dataclass
class _Job:
    pair: int
    site: int
    clean: Record
    counterfactual: Record
    start: int              # first decoder layer to run: 0 for "visual", l + 1 for layer l
    prefix: int             # the longest shareable prefix before the first patched position
    dst: torch.Tensor       # clean positions patched
    src: torch.Tensor       # counterfactual positions read

    @property
    def suffix(self) -> int:
        return self.clean.length - self.prefix


class PatchingEngine:
    def __init__(self, vlm: VLM, scorer: AnswerScorer, batch_size: int = 32):
        self.vlm, self.scorer, self.batch_size = vlm, scorer, batch_size
        self.keep_cache = not scorer.exact      # whole answers continue from each run's own cache

    def candidates(self, runs: Runs) -> torch.Tensor:
        """(rows, candidates) probabilities of a batch of runs: the one place where the engine's runs, patched or
        unpatched, become candidate probabilities (docs/experiments.md, "Scoring"): the first-token rule from
        the logits, or whole answers teacher-forced from each run's own keys and values."""
        scorer = self.scorer
        if scorer.exact:
            return scorer.probabilities(runs.logits).cpu()
        out = torch.zeros(runs.logits.shape[0], len(scorer.candidates))
        if not scorer.sequences:
            return scorer.whole_answer_probabilities(runs.logits, torch.zeros(runs.logits.shape[0], 0, 0)).cpu()
        for indices, inputs, cache in runs.caches(self.vlm.adapter):
            continued = continue_answers(self.vlm, scorer, inputs, cache)
            out[indices] = scorer.whole_answer_probabilities(runs.logits[indices], continued).cpu()
        return out

    def run_pair(self, clean, counterfactual, plan: PatchPlan, sites: list,
                 clean_visual: torch.Tensor | None = None, cf_visual: torch.Tensor | None = None) -> PairRun:
        """Patch the clean run from the counterfactual run at each site.

        `clean_visual` / `cf_visual` (1, tokens, hidden), when given, replace the images' own visual embeddings
        in both runs (the ablation's inputs); otherwise each image's are computed once here."""
        return self.run_pairs([PairInput(clean, counterfactual, plan, clean_visual, cf_visual)], sites)[0]

    @torch.no_grad()
    def run_pairs(self, pairs: list[PairInput], sites: list, progress: Callable[[int], None] | None = None
                  ) -> list[PairRun]:
        """Every pair patched at every site, `batch_size // 2` pairs recorded at a time (their rows replayed
        together); `progress(n)` is told of each n pairs done."""
        if any(site == VISUAL for site in sites) and any(p.plan.dst_tokens is None for p in pairs):
            raise ValueError("the last position is not a visual token: patch layers only")
        runs, per_group = [], max(1, self.batch_size // 2)
        for start in range(0, len(pairs), per_group):
            group = pairs[start:start + per_group]
            runs += self._run_group(group, sites)
            if progress is not None:
                progress(len(group))
        return runs

    def _run_group(self, pairs: list[PairInput], sites: list) -> list[PairRun]:
        vlm = self.vlm
        inputs, visual = [], []
        for pair in pairs:
            for sample, given in ((pair.clean, pair.clean_visual), (pair.counterfactual, pair.cf_visual)):
                inputs.append(vlm.encode([sample.image], [sample.prompt]))
                visual.append(None if given is None else given.to(vlm.device))
        missing = [i for i, v in enumerate(visual) if v is None]
        for start in range(0, len(missing), self.batch_size):      # each image through the vision tower once
            chunk = missing[start:start + self.batch_size]
            images = vlm.adapter.stack_images([inputs[i] for i in chunk])
            embedded = vlm.visual_tokens(images)
            for j, i in enumerate(chunk):
                visual[i] = embedded[j:j + 1]
        records = self._oom_retry(lambda: record(vlm, inputs, visual, self.batch_size))
        unpatched = self.candidates(self._record_runs(records))
        jobs = []
        for p, pair in enumerate(pairs):
            clean, cf = records[2 * p], records[2 * p + 1]
            dst, src = pair.plan.positions(vlm, clean.inputs["input_ids"], cf.inputs["input_ids"])
            prefix = clean.shareable_prefix(int(dst.min()))
            jobs += [_Job(p, s, clean, cf, 0 if site == VISUAL else int(site) + 1, prefix, dst, src)
                     for s, site in enumerate(sites)]
        patched = torch.zeros(len(pairs), len(sites), len(self.scorer.candidates))
        jobs.sort(key=lambda job: job.suffix)
        while jobs:
            chunk = self._next_pass(jobs)
            try:
                probs = self.candidates(self._replay(chunk))
            except torch.cuda.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)   # retry these rows in smaller passes
                continue
            for job, row in zip(chunk, probs, strict=True):
                patched[job.pair, job.site] = row
            jobs = jobs[len(chunk):]
        return [PairRun(patched[p], unpatched[2 * p], unpatched[2 * p + 1]) for p in range(len(pairs))]

    def _oom_retry(self, fn):
        while True:
            try:
                return fn()
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)

    def _record_runs(self, records: list[Record]) -> Runs:
        return Runs(torch.stack([rec.logits for rec in records]), records,
                    (lambda i: record_kv(records[i])) if self.keep_cache else None)

    # --- replay passes ---------------------------------------------------------------------------------
    def _row_cost(self, suffix: int, prefix: int) -> int:
        """Peak memory of one replayed row at a layer, in units that a full-length row costs `length` of: its
        activations (hidden and MLP), the keys and values it attends, its attention scores."""
        config = self.vlm.model.config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = 2 * config.num_key_value_heads * head_dim
        keys = prefix + suffix
        return suffix * (config.hidden_size + config.intermediate_size) + keys * kv + heads * suffix * keys

    def _next_pass(self, jobs: list[_Job]) -> list[_Job]:
        """The next pass's rows, from the front of `jobs` (sorted by suffix length): as many as fit
        `batch_size` full-length rows (at least one)."""
        length = max(job.clean.length for job in jobs)
        budget = self.batch_size * self._row_cost(length, 0)
        chunk, pmax, suffix = [], 0, 0
        for job in jobs:
            pmax, suffix = max(pmax, job.prefix), max(suffix, job.suffix)
            if chunk and (len(chunk) + 1) * self._row_cost(suffix, pmax) > budget:
                break
            chunk.append(job)
        return chunk

    def _replay(self, chunk: list[_Job]) -> Runs:
        """One pass: each row from its start layer, every row over the pass's (longest) suffix length (a row
        with a shorter one takes a shorter shareable prefix)."""
        suffix = max(job.suffix for job in chunk)
        while True:
            prefixes = [job.clean.shareable_prefix(job.clean.length - suffix) for job in chunk]
            longest = max(job.clean.length - p for job, p in zip(chunk, prefixes, strict=True))
            if longest == suffix:
                break
            suffix = longest
        rows = []
        for job, prefix in zip(chunk, prefixes, strict=True):
            hidden = job.clean.hidden(job.start)[prefix:].clone()
            hidden[job.dst.to(hidden.device) - prefix] = job.counterfactual.hidden(job.start)[
                job.src.to(hidden.device)].to(hidden.dtype)
            rows.append(Row(job.clean, job.start, prefix, hidden))
        replayed = replay(self.vlm, rows, keep_cache=self.keep_cache)
        return Runs(replayed.logits, [row.record for row in rows], replayed.kv if self.keep_cache else None)


@torch.no_grad()
def naive_sweep(vlm: VLM, scorer: AnswerScorer, clean, counterfactual, plan: PatchPlan, sites) -> torch.Tensor:
    """Reference: the counterfactual run once with every site recorded, then for each site one full forward
    of the clean input (batch 1, vision tower included) patched at that site. (sites, candidates)."""
    clean_in = vlm.encode([clean.image], [clean.prompt])
    cf_in = vlm.encode([counterfactual.image], [counterfactual.prompt])
    dst, src = plan.positions(vlm, clean_in["input_ids"], cf_in["input_ids"])
    with read_sites(vlm, list(sites)) as cf_acts:
        vlm.last_logits(cf_in)
    out = []
    for site in sites:
        out.append(candidate_probabilities(
            vlm, scorer, clean_in, during=lambda site=site: naive_patch(vlm, plan, site, cf_acts[site], dst, src))[0].cpu())
    return torch.cat(out)


def naive_patch(vlm: VLM, plan: PatchPlan, site, source: torch.Tensor, dst: torch.Tensor, src: torch.Tensor):
    """The context manager patching one full forward at `site` from the counterfactual's recorded `source`."""
    if site == VISUAL:
        def edit(tokens):
            tokens = tokens.clone()
            tokens[:, plan.dst_tokens] = source[:, plan.src_tokens]
            return tokens
        return edit_visual_tokens(vlm, edit)

    def edit_layer(hidden):
        hidden = hidden.clone()
        hidden[:, dst.to(hidden.device)] = source[:, src.to(hidden.device)]
        return hidden
    return edit_residual(vlm, int(site), edit_layer)
