"""Recorded forwards, replayed from any decoder layer over the last positions of the sequence.

A patched run of an input differs from the input's plain run only at the positions from the first patched one
on, and only after the layer where it is patched. `record` runs inputs once through the whole model and keeps,
for every decoder layer, the hidden states entering it, the keys and values its attention used, and the other
arguments the model called it with (attention mask, position embeddings: Qwen2-VL's M-RoPE, Gemma 3's two
RoPEs, its bidirectional image mask and sliding windows, all exactly as the model built them). `replay` then
runs rows, each entering at its own layer with its own hidden states at the positions from its `prefix` on,
attending to the record's keys and values for the positions before: nothing equal to the recorded run is
computed again. Rows that enter at later layers join the batch there (the batch grows layer by layer).

What is family-specific (where the position axis of each layer argument lies, how the model's cache is named
and read, the final norm and head, positions after the input) is asked of the model's adapter
(vlm/adapters/base.py); nothing here branches on the family. Attention must be `sdpa` or `eager` (masks are
passed explicitly).
"""

import functools
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlm.interventions import hidden_of, intervene, record_calls, stack_score_edits


@dataclass
class _Call:
    """One decoder layer's call during a recorded forward of several equal-length rows."""

    mask: torch.Tensor | None        # (B or 1, L, L) bool, True: attends; None: causal
    mask_dtype: torch.dtype | None   # the model's additive float mask dtype (eager attention), None for bool
    tensors: dict                    # name -> (value, batch_dim, position_dim); value a tensor or tuple of them
    fixed: dict                      # other arguments, passed as they were
    cache_name: str | None           # the argument that carried the model's cache


class Record:
    """One input's recorded forward (row `row` of a recorded batch): its layers' inputs, keys, values and calls,
    the inputs it was run on, its visual embeddings (1, tokens, width) and their sequence positions (tokens,), and
    its last position's logits."""

    def __init__(self, batch: "_RecordedBatch", row: int, inputs: dict, visual: torch.Tensor,
                 positions: torch.Tensor, injected: dict):
        self._batch, self.row, self.inputs = batch, row, inputs
        self.visual, self.positions, self._injected = visual, positions, injected
        self.length = batch.length
        self.logits = batch.logits[row]
        self._shareable = None

    def hidden(self, layer: int) -> torch.Tensor:
        """(L, hidden) entering decoder layer `layer` (0: the input embeddings; n_layers: after the last layer)."""
        return self._batch.hidden[layer][self.row]

    def injection(self, layer: int, visual: torch.Tensor | None = None) -> torch.Tensor | None:
        """(L, hidden) what the LM adds to the residual stream after decoder layer `layer` (a part of the visual
        embeddings at the visual tokens' positions: Qwen3-VL's DeepStack), from `visual` (default: the record's
        own); None after a layer that adds nothing."""
        part = self._injected.get(layer)
        if part is None:
            return None
        tokens = vlm_part(self.visual if visual is None else visual, part)
        added = torch.zeros_like(self.hidden(layer + 1))
        added[self.positions.to(added.device)] = tokens[0].to(added.device, added.dtype)
        return added

    def output(self, layer: int) -> torch.Tensor:
        """(L, hidden) decoder layer `layer`'s output, the residual stream of site "layer.<l>": what enters the next
        layer, less what the LM adds in between (`injection`)."""
        added = self.injection(layer)
        return self.hidden(layer + 1) if added is None else self.hidden(layer + 1) - added

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_heads, L, head_dim) keys and values of decoder layer `layer`, as its attention used them."""
        keys, values = self._batch.kv[layer]
        return keys[self.row], values[self.row]

    def call(self, layer: int) -> _Call:
        return self._batch.calls[layer]

    def mask(self, layer: int) -> torch.Tensor:
        """(L, L) bool attention mask of decoder layer `layer` (True: the query position attends the key)."""
        mask = self.call(layer).mask
        if mask is None:
            return torch.ones(self.length, self.length, dtype=torch.bool, device=self.logits.device).tril()
        return mask[min(self.row, mask.shape[0] - 1)]

    def shareable_prefix(self, upto: int) -> int:
        """The longest prefix [0, P), P <= upto, whose states no later position can change: no query before P
        attends a key at or after P, in any layer (causal text: P = upto; inside Gemma 3's bidirectional image
        block: the block's start)."""
        if self._shareable is None:
            masks = {id(self.call(k).mask): k for k in range(len(self._batch.calls))}
            attended = torch.zeros(self.length, self.length, dtype=torch.bool, device=self.logits.device)
            for k in masks.values():
                attended |= self.mask(k)
            length = self.length
            first_query = torch.where(attended.any(0), attended.int().argmax(0), length)   # per key
            suffix_min = torch.flip(torch.cummin(torch.flip(first_query, [0]), 0).values, [0])
            positions = torch.arange(length, device=suffix_min.device)
            self._shareable = (suffix_min >= positions).cpu().tolist() + [True]
        return max(p for p in range(min(upto, self.length) + 1) if self._shareable[p])


@dataclass
class _RecordedBatch:
    length: int
    hidden: list            # n_layers + 1 tensors (B, L, hidden)
    kv: list                # n_layers (keys, values) of (B, kv_heads, L, head_dim)
    calls: list             # n_layers _Call
    logits: torch.Tensor    # (B, vocab) float32


@torch.no_grad()
def vlm_part(visual: torch.Tensor, part: tuple) -> torch.Tensor:
    """Part `index` of visual embeddings split by `split` (the adapter's visual_parts)."""
    split, index = part
    return split(visual)[index]


def record(vlm, inputs: list, visual: list, batch_size: int) -> list[Record]:
    """Run each of `inputs` (batch-1 encodings) with its visual embeddings `visual[i]` (1, tokens, hidden) once
    through the model, `batch_size` equal-length inputs per forward; one Record per input, in order."""
    adapter, model = vlm.adapter, vlm.model
    split = functools.partial(adapter.visual_parts, model=model)
    injected = {layer: (split, k + 1) for k, layer in enumerate(adapter.injected_after(model))}
    by_length: dict[int, list[int]] = {}
    for i, encoded in enumerate(inputs):
        by_length.setdefault(int(encoded["input_ids"].shape[1]), []).append(i)
    records: list = [None] * len(inputs)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = _record_batch(vlm, vlm.adapter.stack_inputs([inputs[i] for i in chunk]),
                                  torch.cat([visual[i] for i in chunk]))
            for row, i in enumerate(chunk):
                positions = vlm.visual_token_positions(inputs[i]["input_ids"])[0]
                records[i] = Record(batch, row, inputs[i], visual[i], positions, injected)
    return records


def _record_batch(vlm, batch: dict, visual: torch.Tensor) -> _RecordedBatch:
    adapter, model, layers = vlm.adapter, vlm.model, vlm.decoder_layers
    cache = adapter.new_cache()
    with record_calls(list(layers)) as recorded:
        out = adapter.forward(model, batch, visual, logits_to_keep=1, use_cache=True,
                              **{adapter.cache_argument(model): cache})
    hidden, parsed = [], []
    for index in range(len(layers)):
        args, kwargs = recorded["calls"][index]
        state, call = _parse_call(adapter, args, kwargs)
        hidden.append(state)
        parsed.append(call)
    hidden.append(recorded["output"])
    length = int(batch["input_ids"].shape[1])
    return _RecordedBatch(length, hidden, adapter.cache_tensors(cache), parsed, out.logits[:, -1].float())


def _parse_call(adapter, args, kwargs) -> tuple[torch.Tensor, _Call]:
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    if len(args) > 1:
        raise ValueError(f"decoder layer called with {len(args)} positional arguments; the replay knows one")
    mask = kwargs.pop(adapter.mask_argument, None)
    mask_dtype = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(f"the patching engine needs a (batch, 1, query, key) attention mask, got {type(mask)}: "
                             f"use attn_implementation sdpa or eager")
        if mask.dtype != torch.bool:
            mask_dtype = mask.dtype
            mask = mask == 0
        mask = mask[:, 0]
    tensors, fixed, cache_name = {}, {}, None
    for name, value in kwargs.items():
        if adapter.is_cache(value):
            cache_name = name
        elif name in adapter.layer_tensors and value is not None:
            tensors[name] = (value, *adapter.layer_tensors[name])
        elif isinstance(value, torch.Tensor) or (isinstance(value, tuple) and any(
                isinstance(v, torch.Tensor) for v in value)):
            raise ValueError(f"decoder layers get a tensor argument {name!r} whose position axis the adapter does not "
                             f"know: add it to {type(adapter).__name__}.layer_tensors")
        else:
            fixed[name] = value
    return hidden, _Call(mask, mask_dtype, tensors, fixed, cache_name)


@dataclass
class Row:
    """A run to replay: the recorded input `record`, entering decoder layer `start` (n_layers: after the last
    one) with `hidden` (L - prefix, hidden) at positions [prefix, L); positions before `prefix` are the record's.
    `score_edits`: attention-score interventions of this run (vlm/interventions.py, ScaleScores / ShiftScores of
    batch 1, keys over the record's L positions), active in the replay (rows with them start at layer 0).
    `visual`: the run's visual embeddings (1, tokens, width) when they differ from the record's (patched at the
    visual site), for what the LM adds after later layers (the record's `injection`)."""

    record: Record
    start: int
    prefix: int
    hidden: torch.Tensor
    score_edits: list = field(default_factory=list)
    visual: torch.Tensor | None = None


@dataclass
class Replayed:
    """A replay pass's result: (rows, vocab) float32 next-token logits at each row's last position, in the
    order the rows were given, and (with `keep_cache`) every row's keys and values (`kv`)."""

    logits: torch.Tensor
    rows: list
    _order: list = field(repr=False)            # position of row i in the start-sorted batch
    _suffix_kv: dict = field(repr=False)        # layer -> (keys, values) of the sorted batch's first rows

    def kv(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row i's (kv_heads, L, head_dim) keys and values at every layer, as a run of it through the whole
        model would hold in its cache (the record's before the row's start layer and before its prefix)."""
        row, slot = self.rows[i], self._order[i]
        out = []
        for layer in range(len(row.record._batch.kv)):
            keys, values = row.record.kv(layer)
            if layer >= row.start:
                new_keys, new_values = self._suffix_kv[layer]
                keys = torch.cat([keys[:, :row.prefix], new_keys[slot]], dim=-2)
                values = torch.cat([values[:, :row.prefix], new_values[slot]], dim=-2)
            out.append((keys, values))
        return out


class _PassCache:
    """Stands in for the model's cache in a replay pass: layer k's attention gets each row's record keys and
    values of the positions before its prefix (left-padded to the pass's longest prefix, masked there), then the
    row's own."""

    def __init__(self, rows: list[Row], pmax: int, keep: bool):
        self.rows, self.pmax, self.keep = rows, pmax, keep
        self.suffix: dict[int, tuple] = {}
        self._sources = {}
        for row in rows:
            self._sources.setdefault((id(row.record), row.prefix), (row.record, row.prefix))
        self._index = list(self._sources)
        self._slot = torch.tensor([self._index.index((id(r.record), r.prefix)) for r in rows])

    def _prefix(self, layer: int, n: int, which: int) -> torch.Tensor:
        table = []
        for record, prefix in self._sources.values():
            kv = record.kv(layer)[which][:, :prefix]
            if prefix < self.pmax:
                pad = kv.new_zeros(kv.shape[0], self.pmax - prefix, kv.shape[2])
                kv = torch.cat([pad, kv], dim=-2)
            table.append(kv)
        table = torch.stack(table)
        return table[self._slot[:n].to(table.device)]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n = key_states.shape[0]
        if self.keep:
            self.suffix[layer_idx] = (key_states, value_states)
        keys = torch.cat([self._prefix(layer_idx, n, 0).to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self._prefix(layer_idx, n, 1).to(value_states.dtype), value_states], dim=-2)
        return keys, values


@torch.no_grad()
def replay(vlm, rows: list[Row], keep_cache: bool = False) -> Replayed:
    """Run every row from its start layer to the end, all rows of one suffix length in one batch that grows as
    rows join at their start layers; the logits of each row's last position."""
    n_layers, length = vlm.n_layers, {int(row.hidden.shape[0]) for row in rows}
    if len(length) != 1:
        raise ValueError(f"a replay pass takes rows of one suffix length, got {sorted(length)}")
    suffix = length.pop()
    order = sorted(range(len(rows)), key=lambda i: rows[i].start)
    ranked = [rows[i] for i in order]
    starts = [row.start for row in ranked]
    pmax = max(row.prefix for row in ranked)
    cache = _PassCache(ranked, pmax, keep_cache)
    layers, memo = vlm.decoder_layers, {}
    hidden = None
    with intervene(vlm, _pass_score_edits(ranked, pmax, suffix)):
        for layer in range(n_layers + 1):
            active = bisect_right(starts, layer)
            have = 0 if hidden is None else hidden.shape[0]
            if active > have:
                joining = torch.stack([row.hidden for row in ranked[have:active]])
                hidden = (joining.to(vlm.device) if hidden is None
                          else torch.cat([hidden, joining.to(hidden.device, hidden.dtype)]))
            if layer == n_layers or active == 0:
                continue
            kwargs = _layer_kwargs(vlm.adapter, ranked, layer, pmax, suffix, active, cache, memo)
            hidden = hidden_of(layers[layer](hidden, **kwargs))
            added = _injections(ranked[:active], layer, suffix)
            if added is not None:
                hidden = hidden + added.to(hidden.device, hidden.dtype)
    logits = vlm.adapter.final_logits(vlm.model, hidden[:, -1])
    slot = [0] * len(rows)
    for position, i in enumerate(order):
        slot[i] = position
    return Replayed(logits[torch.tensor(slot, device=logits.device)], list(rows), slot, cache.suffix)


def _injections(rows: list[Row], layer: int, suffix: int) -> torch.Tensor | None:
    """(rows, suffix, hidden) what the LM adds after `layer` at each row's replayed positions (each row's own visual
    embeddings), or None when it adds nothing there."""
    added = [row.record.injection(layer, row.visual) for row in rows]
    if added[0] is None:
        return None
    return torch.stack([a[a.shape[0] - suffix:] for a in added])


def _pass_score_edits(ranked: list[Row], pmax: int, suffix: int) -> list:
    """The rows' score edits as one edit per site over the pass's batch, keys laid out as the pass's attention sees
    them: each row's prefix keys left-padded (False) to `pmax`, then its suffix keys."""
    sites = [edit.site for edit in ranked[0].score_edits]
    if not any(row.score_edits for row in ranked):
        return []
    if any([edit.site for edit in row.score_edits] != sites for row in ranked):
        raise ValueError("every row of a replay pass with score edits needs edits at the same sites")
    if any(row.start != 0 for row in ranked):
        raise ValueError("rows with score edits are replayed from layer 0")
    merged = []
    for k in range(len(sites)):
        keys = []
        for row in ranked:
            own = row.score_edits[k].keys[0].to(row.hidden.device)          # (L,) over the record's positions
            length, prefix = row.record.length, row.prefix
            keys.append(torch.cat([own.new_zeros(pmax - prefix), own[:prefix], own[length - suffix:length]]))
        merged.append(stack_score_edits([row.score_edits[k] for row in ranked], torch.stack(keys)))
    return merged


def _layer_kwargs(adapter, ranked, layer, pmax, suffix, active, cache, memo) -> dict:
    """The arguments decoder layer `layer` is called with for the first `active` rows: each row's recorded ones
    at its suffix positions, its mask extended over the padded prefix, and the pass's cache."""
    first = ranked[0].record.call(layer)
    kwargs = dict(first.fixed)
    if first.cache_name is not None:
        kwargs[first.cache_name] = cache
    key = ("mask", tuple(id(row.record.call(layer).mask) for row in ranked))
    if key not in memo:
        memo[key] = torch.stack([_row_mask(row, layer, pmax, suffix) for row in ranked])[:, None]
    mask = memo[key][:active]
    if first.mask_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=first.mask_dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(first.mask_dtype).min)
    kwargs[adapter.mask_argument] = mask
    for name in first.tensors:
        key = (name, tuple(id(row.record.call(layer).tensors[name][0]) for row in ranked))
        if key not in memo:
            memo[key] = _stack_rows([row.record.call(layer).tensors[name] for row in ranked], ranked, suffix)
        value = memo[key]
        kwargs[name] = _first_rows(value, first.tensors[name][1], active)
    return kwargs


def _row_mask(row: Row, layer: int, pmax: int, suffix: int) -> torch.Tensor:
    """(suffix, pmax + suffix) bool: the row's recorded mask for its suffix queries over its prefix keys
    (left-padded with False to `pmax`) and its own suffix keys."""
    mask = row.record.mask(layer)
    length, prefix = row.record.length, row.prefix
    queries = mask[prefix:length]
    pad = queries.new_zeros(suffix, pmax - prefix)
    return torch.cat([pad, queries[:, :prefix], queries[:, prefix:length]], dim=1)


def _select(value, batch_dim, position_dim, row: Row, suffix: int):
    if isinstance(value, tuple):
        return tuple(_select(v, batch_dim, position_dim, row, suffix) for v in value)
    if batch_dim is not None and value.shape[batch_dim] > 1:
        value = value.narrow(batch_dim, row.record.row, 1)
    elif batch_dim is not None:
        value = value.narrow(batch_dim, 0, 1)
    start = row.record.length - suffix
    return value.narrow(position_dim, start, suffix)


def _stack_rows(entries, ranked, suffix):
    """One layer argument for all rows: each row's value at its suffix positions, concatenated on the batch axis
    (an argument without one, such as a cache position, is the first row's)."""
    _, batch_dim, position_dim = entries[0]
    parts = [_select(value, batch_dim, position_dim, row, suffix) for (value, _, _), row in zip(entries, ranked, strict=True)]
    if batch_dim is None:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[j] for p in parts], dim=batch_dim) for j in range(len(parts[0])))
    return torch.cat(parts, dim=batch_dim)


def _first_rows(value, batch_dim, n):
    if batch_dim is None:
        return value
    if isinstance(value, tuple):
        return tuple(v.narrow(batch_dim, 0, n) for v in value)
    return value.narrow(batch_dim, 0, n)


def record_kv(record: Record) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A recorded input's own keys and values at every layer."""
    return [record.kv(layer) for layer in range(len(record._batch.kv))]


def last_position_row(record: Record, score_edits: list) -> Row:
    """A row replaying `record`'s plain forward from layer 0 over its last position (from its shareable prefix on:
    the last position alone, for an input that ends in text) under `score_edits` (batch-1 score edits over the
    record's positions): the runs of attention-score interventions that change the last query row only
    (ScalingVis, AdaptVis, last-row reweighting), whose earlier positions are the plain run's."""
    prefix = record.shareable_prefix(record.length - 1)
    return Row(record, 0, prefix, record.hidden(0)[prefix:], list(score_edits))


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




def recorded_runs(records: list[Record], keep_cache: bool) -> Runs:
    """The recorded (plain) runs themselves as Runs."""
    return Runs(torch.stack([rec.logits for rec in records]), list(records),
                (lambda i: record_kv(records[i])) if keep_cache else None)


def replayed_runs(vlm, rows: list[Row], keep_cache: bool) -> Runs:
    """One replay pass over `rows` (one suffix length) as Runs."""
    replayed = replay(vlm, rows, keep_cache=keep_cache)
    return Runs(replayed.logits, [row.record for row in rows], replayed.kv if keep_cache else None)
