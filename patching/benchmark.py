"""How fast the patching engine is. On the model it is given, times a last-token sweep (every LM layer, `n_pairs` pairs) three ways in one run:

- naive: one full forward per pair per layer, batch 1 (vision tower included), the counterfactual run
  recorded once per pair;
- engine: `PatchingEngine` (visual embeddings once per image, one batch row per layer, last-position logits);
- floor: a plain batched forward of the LM alone over the same sequence length, no hooks, last-position
  logits: what the engine's forward passes cost without any patching.

    python -m runner experiment=benchmark model=qwen2vl_7b model.init=random     # full size, random weights, GPU
    python -m runner experiment=benchmark model=organism n_pairs=4 device=cpu    # CPU smoke run

Prints ms per patched run for each, the engine's speed-up over naive and its ratio to the floor, and peak
GPU memory; writes the same figures to results/benchmark/<model>/<setting>/.
"""

import time

import torch
from omegaconf import DictConfig

from data_gen.pairs import last_token_pairs
from data_gen.settings import Setting
from patching.engine import PatchingEngine, PatchPlan, naive_sweep
from vlm.models import VLM
from vlm.scoring import AnswerScorer


def _sync(vlm: VLM) -> None:
    if vlm.device.type == "cuda":
        torch.cuda.synchronize(vlm.device)


def timed(vlm: VLM, fn) -> tuple[float, float | None]:
    """(seconds, peak GPU memory in GiB or None on CPU) of `fn()`."""
    cuda = vlm.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(vlm.device)
    _sync(vlm)
    start = time.perf_counter()
    fn()
    _sync(vlm)
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated(vlm.device) / 2**30 if cuda else None)


@torch.no_grad()
def floor_forward(vlm: VLM, rows: int, seq_len: int, batch_size: int) -> None:
    """`rows` sequences of `seq_len` random embeddings through the LM decoder alone, `batch_size` at a time,
    projecting only the last position to the vocabulary."""
    lm, head = vlm.adapter.language_model(vlm.model), vlm.model.get_output_embeddings()
    hidden = lm.config.hidden_size
    for start in range(0, rows, batch_size):
        n = min(batch_size, rows - start)
        embeds = torch.randn(n, seq_len, hidden, device=vlm.device, dtype=vlm.model.dtype)
        out = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state
        head(out[:, -1:])


def benchmark(cfg: DictConfig, get_vlm):
    """The benchmark as an experiment: (its figures, no arrays), the report printed."""
    figures = measure(cfg, get_vlm())
    print(report(figures))
    return figures, {}


def measure(cfg: DictConfig, vlm: VLM) -> dict:
    """Naive, engine and floor timings of a last-token sweep of `cfg.n_pairs` pairs over `cfg.layers` on `vlm`."""
    setting = Setting.from_config(cfg.setting)
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    layers = vlm.check_layers(cfg.layers)
    pairs = last_token_pairs(setting, vlm.grid, vlm.layout, cfg.n_pairs + 1, cfg.seed)
    warmup, pairs = pairs[0], pairs[1:]
    engine = PatchingEngine(vlm, scorer, cfg.batch_size)
    seq_len = vlm.encode([warmup.clean.image], [warmup.clean.prompt])["input_ids"].shape[1]
    runs = len(pairs) * len(layers)

    # one untimed pass of each first: CUDA kernels, allocator and caches warmed the same way for all three
    naive_sweep(vlm, scorer, warmup.clean, warmup.counterfactual, PatchPlan(), layers[:2])
    engine.run_pair(warmup.clean, warmup.counterfactual, PatchPlan(), layers)
    floor_forward(vlm, len(layers), seq_len, cfg.batch_size)

    naive_s, naive_mem = timed(vlm, lambda: [naive_sweep(vlm, scorer, p.clean, p.counterfactual, PatchPlan(), layers)
                                             for p in pairs])
    engine_s, engine_mem = timed(vlm, lambda: [engine.run_pair(p.clean, p.counterfactual, PatchPlan(), layers)
                                               for p in pairs])
    floor_s, floor_mem = timed(vlm, lambda: floor_forward(vlm, runs, seq_len, engine.batch_size))
    ms = {name: 1000 * s / runs for name, s in (("naive", naive_s), ("engine", engine_s), ("floor", floor_s))}
    figures = {
        "model": vlm.name, "init": cfg.model.init, "device": str(vlm.device), "dtype": str(vlm.model.dtype),
        "pairs": len(pairs), "layers": len(layers), "patched_runs": runs, "sequence_length": seq_len,
        "batch_size": engine.batch_size, "ms_per_patched_run": ms,
        "speedup_over_naive": ms["naive"] / ms["engine"], "ratio_to_floor": ms["engine"] / ms["floor"],
        "peak_gpu_memory_gib": {"naive": naive_mem, "engine": engine_mem, "floor": floor_mem},
    }
    return figures


def report(figures: dict) -> str:
    ms, mem = figures["ms_per_patched_run"], figures["peak_gpu_memory_gib"]
    head = (f"last-token sweep on {figures['model']} ({figures['init']} weights, {figures['device']}, "
            f"{figures['dtype']}): {figures['pairs']} pairs x {figures['layers']} layers = "
            f"{figures['patched_runs']} patched runs, sequence length {figures['sequence_length']}, "
            f"batch {figures['batch_size']}")
    rows = [f"{'method':8} {'ms/run':>9} {'peak GiB':>9}"]
    for name in ("naive", "engine", "floor"):
        peak = "-" if mem[name] is None else f"{mem[name]:.2f}"
        rows.append(f"{name:8} {ms[name]:9.2f} {peak:>9}")
    tail = (f"engine speed-up over naive: {figures['speedup_over_naive']:.1f}x; "
            f"engine / floor: {figures['ratio_to_floor']:.2f}x")
    return "\n".join([head, *rows, tail])
