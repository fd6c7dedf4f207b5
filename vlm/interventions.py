"""The one intervention layer: named sites of a loaded VLM, and interventions on them, applied to a forward by one
context manager (`intervene`) or one call (`forward`). Every forward hook of the repository is installed here and
removed on exit, error or not (TransformerLens' hook points and `hooks()`; pyvene's interventions as data).

Sites are strings, so where to intervene is plain data (a config value, a results label):

    "visual"      the visual embeddings: the projector's output, one vector per visual token before they enter the
                  LM, as (batch, tokens, hidden), tokens in row-major grid order
    "layer.<l>"   the residual stream after LM decoder layer l, (batch, seq, hidden)
    "heads.<l>"   each head's attention output in layer l, before the output projection, (batch, seq, heads, head_dim)
    "scores.<l>"  layer l's pre-softmax attention scores (batch, heads, queries, keys): after the model's own scaling
                  (and soft-capping, if any), before the mask and the softmax

An intervention is a small dataclass naming its site, with one method `edit` that returns the new tensor:

    Replace(site, positions, source, source_positions)   tensor[:, positions] <- source[:, source_positions]
    Add(site, delta, positions=None)                      tensor[:, positions] += delta
    Set(site, value)                                      the whole tensor <- value
    Apply(site, fn)                                       tensor <- fn(tensor), any other edit
    ScaleScores(site, factor, keys, queries="last")       scores[queries, keys] *= factor  (ScalingVis, AdaptVis)
    ShiftScores(site, shift, keys, queries="last")        scores[queries, keys] += shift    (attention reweighting)
    Read(site)                                            records the tensor (what `intervene` yields)

Interventions at one site apply in the order given. `forward(vlm, inputs, interventions, visual=...)` runs one
forward: with `visual` (or a `Set("visual", ...)` first in the list) the vision tower is skipped and the "visual"
edits apply to those embeddings directly, so an image's embeddings are computed once and edited many times.
The patching engine's replay (vlm/replay.py) applies the same `Replace.edit` to recorded states instead of
hooking a forward.

Score sites work through transformers' attention interface: inside `intervene`, the LM's text config switches
to an attention function registered here on first use (`intervened_sdpa` / `intervened_eager`, wrapping the
implementation the model had, with the same mask builder). It runs the model's own attention, then recomputes
the query rows an edit selects explicitly, as eager attention does (q k^T times the scale, the softcap, the
edit, the mask, the softmax in float32, times v), and puts them in place for the examples the edit changes;
every other row, layer and example is the model's own computation, bit for bit. The edits reach the function as
a keyword argument of the attention module's call (a forward pre-hook adds it), so nothing is global.
"""

import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

VISUAL = "visual"
KINDS = ("visual", "layer", "heads", "scores")
QUERY_ROWS = ("last", "all")
ATTENTION_BASES = ("sdpa", "eager")         # attention implementations a score edit wraps
ATTENTION_PREFIX = "intervened_"            # registered as intervened_sdpa, intervened_eager


class SiteError(ValueError):
    """A site name that does not parse, or is out of range for the model."""


def layer_site(layer: int) -> str:
    return f"layer.{int(layer)}"


def scores_site(layer: int) -> str:
    return f"scores.{int(layer)}"


def heads_site(layer: int) -> str:
    return f"heads.{int(layer)}"


def parse_site(site: str) -> tuple[str, int | None]:
    """("visual", None) or (kind, layer) of a site name; SiteError when it is not one."""
    if site == VISUAL:
        return VISUAL, None
    kind, _, index = str(site).partition(".")
    if kind not in KINDS[1:] or not index.lstrip("-").isdigit():
        raise SiteError(f"unknown site {site!r}; sites are {VISUAL!r}, 'layer.<l>', 'heads.<l>', 'scores.<l>'")
    return kind, int(index)


def _check_layer(vlm, site: str, layer: int) -> int:
    if not 0 <= layer < vlm.n_layers:
        raise SiteError(f"site {site!r}: layer {layer} is out of range for {vlm.name}: allowed 0..{vlm.n_layers - 1}")
    return layer


def hidden_of(output) -> torch.Tensor:
    """The tensor a module produced: the output itself, or the first element of a tuple output (decoder layers)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """`output` with its tensor replaced by `hidden`, keeping the tuple structure when there is one."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


# --- interventions ----------------------------------------------------------------------------------------

def _index(positions, device) -> torch.Tensor:
    return torch.as_tensor(positions, dtype=torch.long).to(device)


@dataclass
class Replace:
    """tensor[:, positions] <- source[:, source_positions]: positions along the site's token axis (visual token
    indices at "visual", sequence positions elsewhere), paired in order. `source` (batch or 1, ...) is the
    tensor the values come from (another run's recorded activation)."""

    site: str
    positions: Sequence[int] | torch.Tensor
    source: torch.Tensor
    source_positions: Sequence[int] | torch.Tensor

    def edit(self, tensor: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """`tensor` (batch, positions from `offset` on, ...) with the replacement made (a new tensor)."""
        out = tensor.clone()
        values = self.source[:, _index(self.source_positions, self.source.device)]
        out[:, _index(self.positions, out.device) - offset] = values.to(out.device, out.dtype)
        return out


@dataclass
class Add:
    """tensor[:, positions] += delta (every position when `positions` is None), computed in float32; `delta`
    broadcasts against tensor[:, positions] (e.g. (batch, tokens, hidden) or (hidden,))."""

    site: str
    delta: torch.Tensor
    positions: Sequence[int] | torch.Tensor | None = None

    def edit(self, tensor: torch.Tensor, offset: int = 0) -> torch.Tensor:
        delta = self.delta.to(tensor.device, torch.float32)
        if self.positions is None:
            return (tensor.float() + delta).to(tensor.dtype)
        out = tensor.clone()
        index = _index(self.positions, out.device) - offset
        out[:, index] = (out[:, index].float() + delta).to(out.dtype)
        return out


@dataclass
class Set:
    """The whole tensor <- `value` (same shape). At "visual", `forward` then skips the vision tower."""

    site: str
    value: torch.Tensor

    def edit(self, tensor: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if tuple(self.value.shape) != tuple(tensor.shape):
            raise ValueError(f"Set at {self.site}: value of shape {tuple(self.value.shape)} for a tensor of shape "
                             f"{tuple(tensor.shape)}")
        return self.value.to(tensor.device, tensor.dtype)


@dataclass
class Apply:
    """tensor <- fn(tensor) for any other edit: `fn` returns the new tensor, or None to leave it as it is."""

    site: str
    fn: Callable[[torch.Tensor], torch.Tensor | None]

    def edit(self, tensor: torch.Tensor, offset: int = 0) -> torch.Tensor:
        new = self.fn(tensor)
        return tensor if new is None else new


@dataclass
class Read:
    """Record the site's tensor (detached, after the edits listed before this one) into the dict `intervene`
    yields, under the site's name."""

    site: str


def _score_keys(keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return keys[:, None, None, :].to(scores.device)


@dataclass
class ScaleScores:
    """scores <- factor * scores at the key columns `keys` (batch, keys) bool, in the query rows `queries` selects
    ("last": the last query row; "all": every row); `factor` (batch,), one per example, multiplied in float32 and
    cast back to the scores' dtype. The operation of ScalingVis and AdaptVis (steering/scalingvis.py)."""

    site: str
    factor: torch.Tensor
    keys: torch.Tensor
    queries: str = "last"

    def changed(self) -> torch.Tensor:
        """(batch,) bool: the examples this edit changes (the others keep the model's own rows, bit for bit)."""
        return self.factor != 1

    def edit(self, scores: torch.Tensor) -> torch.Tensor:
        """(batch, heads, queries, keys) scores -> the edited scores, same dtype."""
        factor = self.factor.to(scores.device, torch.float32)[:, None, None, None]
        return torch.where(_score_keys(self.keys, scores), scores.float() * factor, scores.float()).to(scores.dtype)

    def values(self) -> torch.Tensor:
        return self.factor


@dataclass
class ShiftScores:
    """scores <- scores + shift at the key columns `keys` (batch, keys) bool, in the query rows `queries` selects;
    `shift` (batch,), one per example. After the softmax: those keys' weights times exp(shift), each row
    renormalised (the attention reweighting of steering/reweighting.py)."""

    site: str
    shift: torch.Tensor
    keys: torch.Tensor
    queries: str = "last"

    def changed(self) -> torch.Tensor:
        return self.shift != 0

    def edit(self, scores: torch.Tensor) -> torch.Tensor:
        shift = self.shift.to(scores.device, torch.float32)[:, None, None, None]
        return torch.where(_score_keys(self.keys, scores), scores.float() + shift, scores.float()).to(scores.dtype)

    def values(self) -> torch.Tensor:
        return self.shift


ScoreEdit = ScaleScores | ShiftScores


def stack_score_edits(edits: Sequence[ScoreEdit], keys: torch.Tensor) -> ScoreEdit:
    """One edit over the examples of `edits` (each of one kind, site and query selection; their per-example values
    concatenated in order) with key columns `keys` (examples, keys): the same edits in another batch layout (the
    replay's, vlm/replay.py)."""
    first = edits[0]
    if any(type(e) is not type(first) or e.site != first.site or e.queries != first.queries for e in edits):
        raise ValueError(f"score edits of one site must be of one kind and query selection: {edits}")
    return type(first)(first.site, torch.cat([e.values() for e in edits]), keys, first.queries)


Intervention = Replace | Add | Set | Apply | Read | ScaleScores | ShiftScores


# --- the attention function for score sites -----------------------------------------------------------------

def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * groups, seq, dim), as transformers' repeat_kv."""
    if groups == 1:
        return states
    batch, heads, seq, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, seq, dim).reshape(batch, heads * groups, seq, dim)


def _additive_rows(attention_mask, rows: slice, q_len: int, k_len: int, dtype, device) -> torch.Tensor | float:
    """The mask's query rows `rows` as an additive float mask: None (sdpa's causal shortcut) -> the causal mask;
    boolean (sdpa, True = attend) -> 0 / dtype min; float (eager) as it is."""
    if attention_mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None, rows]
    else:
        allowed = attention_mask[..., rows, :k_len]
        if allowed.dtype != torch.bool:
            return allowed
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device),
                       torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))


def attention_rows(query, key, value, attention_mask, scaling: float, edits: Sequence[ScoreEdit], groups: int = 1,
                   softcap: float | None = None, dropout: float = 0.0, training: bool = False, rows: slice = slice(None)):
    """Query rows `rows` of one attention call written out as eager attention computes them, with `edits` applied
    to the pre-softmax scores: q k^T * scaling, then the softcap (if any), then each edit, then + mask, the softmax
    in float32, times v. query (batch, heads, q, dim), key / value (batch, kv_heads, k, dim) after RoPE; the mask
    as the layer received it. Returns the rows' output (batch, rows, heads, dim) and weights (batch, heads, rows, k)."""
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query[:, :, rows], key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    for edit in edits:
        scores = edit.edit(scores)
    scores = scores + _additive_rows(attention_mask, rows, query.shape[2], key.shape[2], scores.dtype, scores.device)
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value).transpose(1, 2), weights


def _model_eager(module):
    """The eager attention function of the module's own modeling file (Gemma 3's takes a softcap)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise SiteError(f"{type(module).__name__}'s modeling file has no eager_attention_forward")
    return function


def _intervened_attention(base: str, module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, score_edits: Sequence[ScoreEdit] = (), **kwargs):
    """The registered attention function: the model's own `base` attention; then, for the score edits of this
    call (added by `intervene`), their query rows recomputed by `attention_rows` and put in place for the examples
    an edit changes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    function = sdpa_attention_forward if base == "sdpa" else _model_eager(module)
    output, weights = function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if not score_edits:
        return output, weights
    batch, k_len = query.shape[0], key.shape[2]
    for edit in score_edits:
        if tuple(edit.keys.shape) != (batch, k_len):
            raise ValueError(f"{edit.site}: the edit was made for inputs of shape {tuple(edit.keys.shape)}, the "
                             f"forward has batch {batch} and {k_len} keys")
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    rows = slice(-1, None) if score_edits[0].queries == "last" else slice(None)
    new, new_weights = attention_rows(query, key, value, attention_mask, scaling, score_edits,
                                      module.num_key_value_groups, kwargs.get("softcap"), dropout, module.training,
                                      rows)
    changed = torch.stack([edit.changed() for edit in score_edits]).any(0).to(output.device)[:, None, None, None]
    start = output.shape[1] - new.shape[1]
    output = torch.cat([output[:, :start], torch.where(changed, new.to(output.dtype), output[:, start:])], 1)
    if weights is not None:
        weights = torch.cat([weights[:, :, :start], torch.where(changed, new_weights.to(weights.dtype),
                                                               weights[:, :, start:])], 2)
    return output, weights


@functools.cache
def _register_attention_functions() -> None:
    """Register intervened_sdpa / intervened_eager with transformers (once, on first use), each with the mask
    builder of the implementation it wraps, so the masks the LM builds are those it had."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for base, mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(ATTENTION_PREFIX + base, functools.partial(_intervened_attention, base))
        AttentionMaskInterface.register(ATTENTION_PREFIX + base, mask)


def _text_config(vlm, modules):
    """The config object the LM's attention modules read `_attn_implementation` from; SiteError when the
    modules do not share one, or a module outside the LM (the vision tower) reads the same object."""
    config = modules[0].config
    if any(m.config is not config for m in vlm.attention_modules):
        raise SiteError(f"{vlm.name}'s LM attention modules do not share one config")
    language_model = set(vlm.adapter.language_model(vlm.model).modules())
    outside = [name for name, m in vlm.model.named_modules()
               if getattr(m, "config", None) is config and m not in language_model]
    if outside:
        raise SiteError(f"{vlm.name}: modules outside the LM share the text config ({outside[:3]}); editing the "
                        "LM's attention scores would reach them")
    return config


# --- installing them ------------------------------------------------------------------------------------------

def site_module(vlm, site: str) -> torch.nn.Module:
    """The module whose output (input, for "heads") a site is."""
    kind, layer = parse_site(site)
    if kind == VISUAL:
        return vlm.visual_embedding_module
    _check_layer(vlm, site, layer)
    if kind == "layer":
        return vlm.decoder_layers[layer]
    if kind == "heads":
        return vlm.adapter.attention_output_module(vlm.model, layer)
    return vlm.attention_modules[layer]


def _site_hook(vlm, site: str, group: list, reads: dict):
    """The hook function applying one site's interventions in order (recording its Reads)."""
    kind, layer = parse_site(site)

    def apply(tensor):
        for intervention in group:
            if isinstance(intervention, Read):
                reads[site] = tensor.detach()
            else:
                tensor = intervention.edit(tensor)
        return tensor

    if kind == VISUAL:
        def visual_hook(_module, _args, output):
            tokens = vlm.adapter.visual_tokens(output, vlm.n_visual_tokens)
            return vlm.adapter.visual_output(apply(tokens), output)
        return visual_hook
    if kind == "heads":
        attention = vlm.attention_modules[layer]

        def heads_hook(_module, args):
            merged = args[0]                                   # (batch, seq, heads * head_dim)
            split = merged.reshape(*merged.shape[:-1], -1, attention.head_dim)
            return (apply(split).reshape(merged.shape), *args[1:])
        return heads_hook

    def layer_hook(_module, _args, output):
        return with_hidden(output, apply(hidden_of(output)))
    return layer_hook


def _multi_module_reads(vlm, group: list, reads: dict) -> list:
    """Reads of the visual embeddings of a family whose are several modules' outputs side by side (Qwen3-VL's main
    and DeepStack mergers): each module's tokens kept as it runs, joined once all have. An edit there cannot be
    hooked module by module: it goes through `forward`, which computes the embeddings first."""
    if any(not isinstance(i, Read) for i in group):
        raise SiteError(f"{vlm.name}'s visual embeddings come from several modules: edit them through "
                        "vlm.interventions.forward (or VLM.last_logits / candidate_probabilities), not intervene")
    modules = vlm.adapter.visual_modules(vlm.model)
    parts: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(_module, _args, output):
            parts[index] = vlm.adapter.visual_tokens(hidden_of(output), vlm.n_visual_tokens).detach()
            if len(parts) == len(modules):
                reads[VISUAL] = torch.cat([parts[i] for i in range(len(modules))], dim=-1)
                parts.clear()
        return hook
    return [module.register_forward_hook(keep(i)) for i, module in enumerate(modules)]


@contextmanager
def intervene(vlm, interventions: Iterable = ()):
    """Apply `interventions` to every forward of `vlm.model` run inside the block; yields a dict that fills with
    the Read sites' tensors ({site: tensor}). Hooks and the attention switch are undone on exit, error or not."""
    interventions = list(interventions)
    by_site: dict[str, list] = {}
    for intervention in interventions:
        by_site.setdefault(intervention.site, []).append(intervention)
    reads: dict[str, torch.Tensor] = {}
    handles, restore = [], None
    try:
        scored: dict[torch.nn.Module, list] = {}
        for site, group in by_site.items():
            kind, _ = parse_site(site)
            module = site_module(vlm, site)
            if kind == "scores":
                if any(isinstance(i, Read) for i in group):
                    raise SiteError(f"{site}: attention scores can be edited, not read")
                queries = {edit.queries for edit in group}
                if len(queries) != 1 or not queries <= set(QUERY_ROWS):
                    raise SiteError(f"{site}: score edits select queries {sorted(queries)}; one of "
                                    f"{', '.join(QUERY_ROWS)} per site")
                scored[module] = group
            elif kind == "heads":
                handles.append(module.register_forward_pre_hook(_site_hook(vlm, site, group, reads)))
            elif kind == VISUAL and len(vlm.adapter.visual_modules(vlm.model)) > 1:
                handles += _multi_module_reads(vlm, group, reads)
            else:
                handles.append(module.register_forward_hook(_site_hook(vlm, site, group, reads)))
        if scored:
            restore = _switch_attention(vlm, list(scored))
            for module, group in scored.items():
                def add_edits(_module, args, kwargs, group=group):
                    return args, {**kwargs, "score_edits": group}
                handles.append(module.register_forward_pre_hook(add_edits, with_kwargs=True))
        yield reads
    finally:
        for handle in handles:
            handle.remove()
        if restore is not None:
            restore()


def _switch_attention(vlm, modules):
    """Point the LM's attention at the intervened function wrapping the implementation it had; returns the undo."""
    config = _text_config(vlm, modules)
    base = config._attn_implementation
    if str(base).startswith(ATTENTION_PREFIX):
        raise RuntimeError("attention scores are already being edited on this model (nested intervene)")
    if base not in ATTENTION_BASES:
        raise SiteError(f"editing attention scores needs attn_implementation sdpa or eager, got {base}")
    _register_attention_functions()
    config._attn_implementation = ATTENTION_PREFIX + base

    def restore():
        config._attn_implementation = base
    return restore


def forward(vlm, inputs, interventions: Iterable = (), visual: torch.Tensor | None = None, **kwargs):
    """One forward of `vlm.model` on `inputs` with `interventions` (the model's output; kwargs go to the forward,
    e.g. logits_to_keep=1, use_cache=True).

    `visual` (batch, tokens, hidden): the visual embeddings to use instead of running the vision tower on the
    inputs' pixels; a `Set("visual", value)` first among the interventions does the same. Then the other "visual"
    interventions edit those embeddings directly (a Read there records them), and the rest are hooked."""
    interventions = list(interventions)
    at_visual = [i for i in interventions if i.site == VISUAL]
    if visual is None and at_visual and isinstance(at_visual[0], Set):
        visual, at_visual = at_visual[0].value, at_visual[1:]
    if visual is None and at_visual and len(vlm.adapter.visual_modules(vlm.model)) > 1:
        # visual embeddings made by several modules (Qwen3-VL's main and DeepStack mergers): computed first, so the
        # edits reach every part together (the adapter's visual_parts)
        visual = vlm.visual_tokens(inputs)
    if visual is None:
        with intervene(vlm, interventions):
            return vlm.adapter.forward(vlm.model, inputs, None, **kwargs)
    reads = {}
    for intervention in at_visual:
        if isinstance(intervention, Read):
            reads[VISUAL] = visual.detach()
        else:
            visual = intervention.edit(visual)
    with intervene(vlm, [i for i in interventions if i.site != VISUAL]):
        return vlm.adapter.forward(vlm.model, inputs, visual, **kwargs)


@contextmanager
def record_calls(modules: Sequence[torch.nn.Module]):
    """Record each module's call (positional args, keyword args) and the last module's output while the block
    runs: yields {"calls": {index: (args, kwargs)}, "output": the last module's output tensor}. The patching
    engine's record (vlm/replay.py) reads every decoder layer's inputs this way."""
    recorded: dict = {"calls": {}, "output": None}
    handles = []

    def pre_hook(index):
        def hook(_module, args, kwargs):
            recorded["calls"][index] = (args, kwargs)
        return hook

    def keep_output(_module, _args, output):
        recorded["output"] = hidden_of(output)

    try:
        for index, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(modules[-1].register_forward_hook(keep_output))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Work:
    """What ran through the model: positions times decoder layers (every layer call, whatever the route: full
    forwards, recorded forwards, replayed rows, answer continuations) and images through the visual module."""

    token_layers: int = 0
    images: int = 0


@contextmanager
def count_work(vlm):
    """Count the model's work (`Work`) while the block runs: a forward pre-hook on every decoder layer adds its
    input's positions, a hook on the visual module its images."""
    work = Work()

    def layer_call(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        work.token_layers += int(hidden.shape[0]) * int(hidden.shape[1])

    def visual_call(_module, _args, output):
        work.images += int(vlm.adapter.visual_tokens(hidden_of(output), vlm.n_visual_tokens).shape[0])

    handles = []
    try:
        for layer in vlm.decoder_layers:
            handles.append(layer.register_forward_pre_hook(layer_call, with_kwargs=True))
        handles.append(vlm.visual_embedding_module.register_forward_hook(visual_call))
        yield work
    finally:
        for handle in handles:
            handle.remove()
