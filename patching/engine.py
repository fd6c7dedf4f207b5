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

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlm.interventions import VISUAL, Read, Replace, intervene, layer_site
from vlm.models import VLM
from vlm.replay import Record, Row, Runs, record, recorded_runs, replayed_runs
from vlm.scoring import AnswerScorer, candidate_probabilities, run_probabilities


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
class _Job:
    pair: int
    site: int
    clean: Record
    counterfactual: Record
    start: int              # first decoder layer to run: 0 for "visual", l + 1 for layer l
    prefix: int             # the longest shareable prefix before the first patched position
    dst: torch.Tensor       # clean positions patched
    src: torch.Tensor       # counterfactual positions read
    plan: PatchPlan

    @property
    def suffix(self) -> int:
        return self.clean.length - self.prefix

    def row(self, prefix: int) -> Row:
        """The patched run as a replay row over the positions from `prefix` on. Site "visual" (start 0): the
        visual embeddings' positions of the input embeddings <- the counterfactual's, and the run's visual
        embeddings (for what the LM adds after later layers) <- the counterfactual's at the plan's tokens. Site
        layer l: decoder layer l's output at `dst` <- the counterfactual's at `src` (the same Replace the naive
        reference hooks), then what the LM adds after layer l (nothing, or Qwen3-VL's DeepStack part)."""
        if self.start == 0:
            patch = Replace(VISUAL, self.dst, self.counterfactual.hidden(0)[None], self.src)
            hidden = patch.edit(self.clean.hidden(0)[None, prefix:], offset=prefix)[0]
            visual = Replace(VISUAL, self.plan.dst_tokens, self.counterfactual.visual,
                             self.plan.src_tokens).edit(self.clean.visual)
            return Row(self.clean, 0, prefix, hidden, visual=visual)
        layer = self.start - 1
        patch = Replace(layer_site(layer), self.dst, self.counterfactual.output(layer)[None], self.src)
        hidden = patch.edit(self.clean.output(layer)[None, prefix:], offset=prefix)[0]
        added = self.clean.injection(layer)
        return Row(self.clean, self.start, prefix, hidden if added is None else hidden + added[prefix:])


class PatchingEngine:
    def __init__(self, vlm: VLM, scorer: AnswerScorer, batch_size: int = 32):
        self.vlm, self.scorer, self.batch_size = vlm, scorer, batch_size
        self.keep_cache = not scorer.exact      # whole answers continue from each run's own cache

    def candidates(self, runs: Runs) -> torch.Tensor:
        """(rows, candidates) probabilities of a batch of runs, patched or unpatched (vlm.scoring.run_probabilities:
        the first-token rule from the logits, or whole answers teacher-forced from each run's own keys and
        values)."""
        return run_probabilities(self.vlm, self.scorer, runs.logits, lambda: runs.caches(self.vlm.adapter))

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
        unpatched = self.candidates(recorded_runs(records, self.keep_cache))
        jobs = []
        for p, pair in enumerate(pairs):
            clean, cf = records[2 * p], records[2 * p + 1]
            dst, src = pair.plan.positions(vlm, clean.inputs["input_ids"], cf.inputs["input_ids"])
            prefix = clean.shareable_prefix(int(dst.min()))
            jobs += [_Job(p, s, clean, cf, 0 if site == VISUAL else int(site) + 1, prefix, dst, src, pair.plan)
                     for s, site in enumerate(sites)]
        patched = torch.zeros(len(pairs), len(sites), len(self.scorer.candidates))
        jobs.sort(key=lambda job: job.suffix)
        while jobs:
            chunk, probs = self._oom_retry(functools.partial(self._next_pass, jobs),
                                           lambda chunk: self.candidates(self._replay(chunk)))
            for job, row in zip(chunk, probs, strict=True):
                patched[job.pair, job.site] = row
            jobs = jobs[len(chunk):]
        return [PairRun(patched[p], unpatched[2 * p], unpatched[2 * p + 1]) for p in range(len(pairs))]

    def _oom_retry(self, make, run=None):
        """`make()` (then `run(made)`, returning both) retried with `batch_size` halved after each CUDA
        out-of-memory error, until it fits or a batch of one does not."""
        while True:
            try:
                made = make()
                return made if run is None else (made, run(made))
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)

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
        rows = [job.row(prefix) for job, prefix in zip(chunk, prefixes, strict=True)]
        return replayed_runs(self.vlm, rows, self.keep_cache)


@torch.no_grad()
def naive_sweep(vlm: VLM, scorer: AnswerScorer, clean, counterfactual, plan: PatchPlan, sites,
                clean_visual: torch.Tensor | None = None, cf_visual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the counterfactual run once with every site read, then for each site one full forward of the
    clean input (batch 1, vision tower included unless `clean_visual` / `cf_visual` give the visual embeddings)
    patched at that site. (sites, candidates)."""
    clean_in = vlm.encode([clean.image], [clean.prompt])
    cf_in = vlm.encode([counterfactual.image], [counterfactual.prompt])
    dst, src = plan.positions(vlm, clean_in["input_ids"], cf_in["input_ids"])
    names = [site_name(site) for site in sites]
    with intervene(vlm, [Read(name) for name in names if name != VISUAL]) as cf_acts:
        cf_visual = vlm.visual_tokens(cf_in) if cf_visual is None else cf_visual
        vlm.last_logits(cf_in, cf_visual)
    cf_acts[VISUAL] = cf_visual
    out = []
    for name in names:
        patch = naive_patch(plan, name, cf_acts[name], dst, src)
        out.append(candidate_probabilities(vlm, scorer, clean_in, clean_visual, [patch])[0])
    return torch.cat(out)


def site_name(site) -> str:
    """The intervention site (vlm/interventions.py) of a sweep's site: "visual", or layer l -> "layer.<l>"."""
    return VISUAL if site == VISUAL else layer_site(int(site))


def naive_patch(plan: PatchPlan, name: str, source: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> Replace:
    """The patch of one full forward at site `name` from the counterfactual's `source` (its tensor at that site):
    visual token indices at "visual", sequence positions `dst` <- `src` at a layer."""
    if name == VISUAL:
        return Replace(VISUAL, plan.dst_tokens, source, plan.src_tokens)
    return Replace(name, dst, source, src)
