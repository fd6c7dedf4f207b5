"""Interventions over a loaded VLM, as context managers built on vlm.hooks (hooks always removed).

Sites: "visual" is the visual embeddings (the projector's output, one vector per visual token, before they
enter the LM); an int l is the residual stream after LM decoder layer l, at every sequence position.
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch

from vlm.hooks import Hook, capture, hooks
from vlm.models import VLM

VISUAL = "visual"


def site_module(vlm: VLM, site) -> torch.nn.Module:
    return vlm.visual_embedding_module if site == VISUAL else vlm.decoder_layers[int(site)]


def site_names(vlm: VLM, layers=None) -> list:
    """"visual" followed by the given LM layers (default: all), as patching sites."""
    return [VISUAL, *vlm.check_layers(layers)]


@contextmanager
def edit_visual_tokens(vlm: VLM, edit: Callable[[torch.Tensor], torch.Tensor | None]):
    """Run `edit` on the visual embeddings as (batch, tokens, hidden), tokens in row-major grid order."""

    def on_output(output):
        new = edit(vlm.adapter.visual_tokens(output, vlm.n_visual_tokens))
        return None if new is None else vlm.adapter.visual_output(new, output)

    with hooks(Hook(vlm.visual_embedding_module, on_output)):
        yield


@contextmanager
def edit_residual(vlm: VLM, layer: int, edit: Callable[[torch.Tensor], torch.Tensor | None]):
    """Run `edit` on the residual stream (batch, seq, hidden) after decoder layer `layer`."""
    with hooks(Hook(vlm.decoder_layers[layer], edit)):
        yield


@contextmanager
def read_sites(vlm: VLM, sites):
    """Record each site's output: {site: (batch, tokens, hidden) for "visual", (batch, seq, hidden) for a layer}."""
    with capture({str(site): site_module(vlm, site) for site in sites}) as cache:
        result: dict = {}
        yield result
    for site in sites:
        tensor = cache[str(site)]
        result[site] = vlm.adapter.visual_tokens(tensor, vlm.n_visual_tokens) if site == VISUAL else tensor
