"""Image-attention reweighting: this repository's earlier baseline, which is NOT ScalingVis (steering/scalingvis.py
is the authors' operation). The post-softmax attention weights on image-token keys are multiplied by c and each
row is renormalised (w'_j = c w_j / Z at image keys, w_j / Z elsewhere), in the chosen LM decoder layers (default:
all), for the last query row ("last") or every row ("all"). As an intervention (vlm/interventions.py,
`ShiftScores`): log(c) added to those rows' pre-softmax scores at the image keys, which the softmax turns into
exactly that reweighting. With `queries: last` only the last row changes, so it replays the last position of a
recorded plain forward (`reweighting_rows`), as ScalingVis does.
"""

import torch

from common.errors import check_choice
from steering.scalingvis import coefficients_of, image_keys
from vlm.interventions import QUERY_ROWS, ShiftScores, scores_site
from vlm.models import VLM
from vlm.replay import Record, Row, last_position_row

QUERIES = QUERY_ROWS        # last: the last query row; all: every row


def reweighting_edits(vlm: VLM, input_ids: torch.Tensor, coefficients, layers=None,
                      queries: str = "last") -> list[ShiftScores]:
    """One ShiftScores per LM layer of `layers` (None: all): log(c) added at image keys in the `queries` rows, c a
    number or one per example, each > 0."""
    check_choice("queries", queries, QUERIES)
    shift = coefficients_of(coefficients, input_ids.shape[0], positive=True).log().float()
    keys = image_keys(vlm, input_ids)
    return [ShiftScores(scores_site(layer), shift, keys, queries) for layer in vlm.check_layers(layers)]


@torch.no_grad()
def reweighted_logits(vlm: VLM, inputs, coefficients, layers=None, queries: str = "last",
                      visual_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, vocab) last-position logits of one full forward under the reweighting (not ScalingVis)."""
    edits = reweighting_edits(vlm, inputs["input_ids"], coefficients, layers, queries)
    return vlm.last_logits(inputs, visual_tokens, edits)


def reweighting_rows(vlm: VLM, records: list[Record], coefficients, layers=None) -> list[Row]:
    """`queries: last` only: one replay row per recorded plain forward, its last position under the reweighting
    with its coefficient (a number or one per record)."""
    factor = coefficients_of(coefficients, len(records), positive=True)
    return [last_position_row(record, reweighting_edits(vlm, record.inputs["input_ids"], c[None], layers, "last"))
            for record, c in zip(records, factor, strict=True)]
