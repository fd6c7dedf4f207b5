"""The batched patching engine: one pair's counterfactual activations are captured once, each image's
visual embeddings are computed once, and the patched runs of many sites go in one forward (row r of the
batch is patched at site r). Only the last position's logits are computed.

`naive_sweep` is the reference it must equal: one full forward per site, batch 1.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from patching.interventions import VISUAL, edit_residual, edit_visual_tokens, read_sites
from vlm.hooks import Hook, hooks
from vlm.models import VLM
from vlm.scoring import AnswerScorer, candidate_probabilities


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
class PairRun:
    """One pair's sweep: (sites, candidates) probabilities of the patched clean runs, and (candidates,) of the
    unpatched clean and counterfactual runs."""

    patched: torch.Tensor
    clean: torch.Tensor
    counterfactual: torch.Tensor


class PatchingEngine:
    def __init__(self, vlm: VLM, scorer: AnswerScorer, batch_size: int = 32):
        self.vlm, self.scorer, self.batch_size = vlm, scorer, batch_size

    @torch.no_grad()
    def run_pair(self, clean, counterfactual, plan: PatchPlan, sites: list,
                 clean_visual: torch.Tensor | None = None, cf_visual: torch.Tensor | None = None) -> PairRun:
        """Patch the clean run from the counterfactual run at each site (one batch row per site).

        `clean_visual` / `cf_visual` (1, tokens, hidden), when given, replace the images' own visual embeddings
        in both runs (the ablation's inputs); otherwise each image's are computed once here."""
        vlm = self.vlm
        clean_in = vlm.encode([clean.image], [clean.prompt])
        cf_in = vlm.encode([counterfactual.image], [counterfactual.prompt])
        clean_visual = vlm.visual_tokens(clean_in) if clean_visual is None else clean_visual.to(vlm.device)
        cf_visual = vlm.visual_tokens(cf_in) if cf_visual is None else cf_visual.to(vlm.device)
        layers = [site for site in sites if site != VISUAL]
        cf_acts = {}

        @contextmanager
        def recording():            # the counterfactual's activations over its prompt (not over answer tokens)
            with read_sites(vlm, layers) as acts:
                yield
            cf_acts.update(acts)

        cf_probs = candidate_probabilities(vlm, self.scorer, cf_in, cf_visual, during=recording)[0].cpu()
        cf_acts[VISUAL] = cf_visual
        dst, src = plan.positions(vlm, clean_in["input_ids"], cf_in["input_ids"])
        results, start = [], 0
        pending = [None, *sites]      # row 0 of the first forward is the unpatched clean run
        while start < len(pending):
            chunk = pending[start:start + self.batch_size]
            try:
                results.append(self._patched_chunk(clean_in, clean_visual, cf_acts, plan, dst, src, chunk))
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)    # retry this chunk with half the rows
                continue
            start += len(chunk)
        probs = torch.cat(results)
        return PairRun(patched=probs[1:], clean=probs[0], counterfactual=cf_probs[0])

    def _patched_chunk(self, clean_in, clean_visual, cf_acts, plan, dst, src, chunk) -> torch.Tensor:
        """(len(chunk), candidates): row r patched at site chunk[r] (None: not patched)."""
        rows = len(chunk)
        batch = self.vlm.adapter.repeat_inputs(clean_in, rows)
        visual = clean_visual.expand(rows, -1, -1).clone()
        layer_rows: dict[int, list[int]] = {}
        for r, site in enumerate(chunk):
            if site is None:
                continue
            if site == VISUAL:
                if plan.dst_tokens is None:
                    raise ValueError("the last position is not a visual token: patch layers only")
                visual[r, plan.dst_tokens] = cf_acts[VISUAL][0, plan.src_tokens].to(visual.dtype)
            else:
                layer_rows.setdefault(int(site), []).append(r)
        installed = [Hook(self.vlm.decoder_layers[layer], _row_patch(r_idx, dst, cf_acts[layer][0, src]))
                     for layer, r_idx in layer_rows.items()]
        return candidate_probabilities(self.vlm, self.scorer, batch, visual, during=lambda: hooks(*installed))[0].cpu()


def _row_patch(rows: list[int], positions: torch.Tensor, values: torch.Tensor):
    """Edit: residual[rows, positions] <- values (positions x hidden), other rows untouched."""
    def edit(hidden):
        hidden = hidden.clone()
        index = torch.tensor(rows, device=hidden.device)
        hidden[index[:, None], positions.to(hidden.device)[None, :]] = values.to(hidden.dtype)
        return hidden

    return edit


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
        source = cf_acts[site]
        if site == VISUAL:
            def edit(tokens, source=source):
                tokens = tokens.clone()
                tokens[:, plan.dst_tokens] = source[:, plan.src_tokens]
                return tokens
            context = edit_visual_tokens(vlm, edit)
        else:
            def edit(hidden, source=source):
                hidden = hidden.clone()
                hidden[:, dst.to(hidden.device)] = source[:, src.to(hidden.device)]
                return hidden
            context = edit_residual(vlm, int(site), edit)
        out.append(candidate_probabilities(vlm, scorer, clean_in, during=lambda context=context: context)[0].cpu())
    return torch.cat(out)
