"""How fast the patching engine is. On the model it is given, times two sweeps over `n_pairs` pairs, every site:

- last_token: the last position after each LM layer (the Fig 2 sweep);
- strip: both side strips at the visual embeddings and after each LM layer (the Fig 7 sweep; object and ablated
  patching are the same computation on fewer tokens);

each three ways, side by side in one run (so their ratios hold whatever else the machine is doing):

- naive: one full forward per pair per site, batch 1 (vision tower included), the counterfactual run recorded
  once per pair (`naive_sweep`, the engine's reference);
- engine: `PatchingEngine.run_pairs` (records, then replays each site from the layer after it);
- floor: the LM alone, batched, over random embeddings of the same sequence length, no hooks, one full sequence
  per patched run, last-position logits: what batching full-length patched runs can cost at best.

    python -m runner experiment=benchmark model=bench_qwen2vl      # CPU, real depth and sequence length
    python -m runner experiment=benchmark model=qwen2vl_7b model.init=random   # full size, random weights, GPU

Each method's time is the minimum over `rounds` rounds (every round times all of them). Prints ms per patched
run, the engine's speed-up over naive, its ratio to the floor and peak memory (GPU: allocated by torch; CPU: the
process's resident memory above its level when the method started), and how far each is from the device's limit:
patched-run tokens per second (patched runs x sequence length / s: the full-sequence tokens its results stand for)
and the FLOPs it executed per second (counted in one more, untimed run, vlm/flops.py), over the device's dense
bf16 peak on a GPU (the model-FLOPs utilisation); writes the same figures to results/benchmark/<model>/<setting>/.
"""

import os
import threading
import time

import torch
from omegaconf import DictConfig

from data_gen.pairs import last_token_pairs, mirror_pairs
from data_gen.settings import Setting
from patching.engine import PairInput, PatchingEngine, PatchPlan, naive_sweep
from patching.experiments import mirror_plan
from vlm.flops import count_flops, peak_flops, utilisation
from vlm.interventions import VISUAL
from vlm.models import VLM
from vlm.scoring import AnswerScorer

METHODS = ("naive", "engine", "floor")
SWEEPS = ("last_token", "strip")
TARGETS = {"last_token": (10.0, 0.3), "strip": (5.0, 1.5)}   # (speed-up over naive at least, ratio to floor at most)
REAL_DEPTH = 24     # the targets are checked on models this deep or deeper (Qwen2-VL-7B: 28, Gemma-3-4b: 34)


def _sync(vlm: VLM) -> None:
    if vlm.device.type == "cuda":
        torch.cuda.synchronize(vlm.device)


class _PeakRSS:
    """Peak resident memory of this process above its level at start, sampled every 5 ms (Linux; else None)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        if self.base is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        if self.base is not None:
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    @property
    def gib(self) -> float | None:
        return None if self.base is None else (self.peak - self.base) / 2**30


def timed(vlm: VLM, fn) -> tuple[float, float | None]:
    """(seconds, peak memory in GiB: allocated by torch on a GPU, resident above the start level on CPU) of `fn()`."""
    cuda = vlm.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(vlm.device)
    _sync(vlm)
    with _PeakRSS() as rss:
        start = time.perf_counter()
        fn()
        _sync(vlm)
        seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated(vlm.device) / 2**30 if cuda else rss.gib)


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
    """The benchmark as an experiment: (its figures, no arrays), the report printed; with `profile` (a sweep name),
    also torch.profiler's table of where one engine run of that sweep spends its time."""
    vlm = get_vlm()
    figures = measure(cfg, vlm)
    print(report(figures))
    if cfg.get("profile"):
        print(profile_table(cfg, vlm, str(cfg.profile)))
    return figures, {}


def profile_table(cfg: DictConfig, vlm: VLM, sweep: str, rows: int = 25) -> str:
    """torch.profiler's operators of one engine run of `sweep` over `cfg.n_pairs` pairs (after a warm-up run),
    sorted by their own time on the device (GPU) or CPU, the top `rows`."""
    from torch.profiler import ProfilerActivity, profile

    setting = Setting.from_config(cfg.setting)
    engine = PatchingEngine(vlm, AnswerScorer(vlm.tokenizer, setting.candidates), cfg.batch_size)
    inputs, sites = sweep_inputs(cfg, vlm, setting, sweep, cfg.n_pairs)
    engine.run_pairs(inputs, sites)
    cuda = vlm.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, record_shapes=False) as prof:
        engine.run_pairs(inputs, sites)
        _sync(vlm)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return f"profile of one engine {sweep} sweep ({cfg.n_pairs} pairs):\n" + prof.key_averages().table(
        sort_by=key, row_limit=rows)


def sweep_inputs(cfg: DictConfig, vlm: VLM, setting: Setting, sweep: str, n: int) -> tuple[list[PairInput], list]:
    """`n` pairs of `sweep` and its sites."""
    layers = vlm.check_layers(cfg.layers)
    if sweep == "last_token":
        pairs = last_token_pairs(setting, vlm.grid, vlm.layout, n, cfg.seed)
        return [PairInput(p.clean, p.counterfactual, PatchPlan()) for p in pairs], layers
    pairs = mirror_pairs(setting, vlm.grid, vlm.layout, n, cfg.seed)
    return [PairInput(p.clean, p.counterfactual, mirror_plan(vlm.grid, p, "strips")) for p in pairs], [VISUAL, *layers]


def measure(cfg: DictConfig, vlm: VLM) -> dict:
    """Naive, engine and floor timings of the last-token and strip sweeps of `cfg.n_pairs` pairs on `vlm`."""
    setting = Setting.from_config(cfg.setting)
    scorer = AnswerScorer(vlm.tokenizer, setting.candidates)
    engine = PatchingEngine(vlm, scorer, cfg.batch_size)
    work = {}
    for sweep in SWEEPS:
        inputs, sites = sweep_inputs(cfg, vlm, setting, sweep, cfg.n_pairs + 1)
        warmup, inputs = inputs[0], inputs[1:]
        seq_len = int(vlm.encode([warmup.clean.image], [warmup.clean.prompt])["input_ids"].shape[1])
        work[sweep] = (inputs, sites, seq_len)
        # one untimed pass of each first: kernels, allocator and caches warmed the same way for all three
        naive_sweep(vlm, scorer, warmup.clean, warmup.counterfactual, warmup.plan, sites[:2])
        engine.run_pairs([warmup], sites)
        floor_forward(vlm, min(len(sites), cfg.batch_size), seq_len, cfg.batch_size)

    def method(sweep: str, name: str):
        inputs, sites, seq_len = work[sweep]
        if name == "naive":
            return lambda: [naive_sweep(vlm, scorer, p.clean, p.counterfactual, p.plan, sites) for p in inputs]
        if name == "engine":
            return lambda: engine.run_pairs(inputs, sites)
        return lambda: floor_forward(vlm, len(inputs) * len(sites), seq_len, engine.batch_size)

    best = {sweep: {name: (float("inf"), None) for name in METHODS} for sweep in SWEEPS}
    for _ in range(cfg.rounds):
        for sweep in SWEEPS:
            for name in METHODS:
                seconds, peak = timed(vlm, method(sweep, name))
                if seconds < best[sweep][name][0]:
                    best[sweep][name] = (seconds, peak)
    executed = {sweep: {name: count_flops(method(sweep, name))[1] for name in METHODS} for sweep in SWEEPS}
    peak_flops_per_s = peak_flops(vlm.device)
    figures = {
        "model": vlm.name, "init": cfg.model.init, "device": _device_name(vlm), "dtype": str(vlm.model.dtype),
        "torch": torch.__version__, "transformers": _transformers_version(), "threads": torch.get_num_threads(),
        "layers": vlm.n_layers, "pairs": cfg.n_pairs, "rounds": cfg.rounds, "batch_size": engine.batch_size,
        "peak_bf16_flops_per_s": peak_flops_per_s, "sweeps": {},
    }
    for sweep in SWEEPS:
        inputs, sites, seq_len = work[sweep]
        runs = len(inputs) * len(sites)
        ms = {name: 1000 * best[sweep][name][0] / runs for name in METHODS}
        minimum_speedup, maximum_ratio = TARGETS[sweep]
        figures["sweeps"][sweep] = {
            "sites": len(sites), "patched_runs": runs, "sequence_length": seq_len, "ms_per_patched_run": ms,
            "speedup_over_naive": ms["naive"] / ms["engine"], "ratio_to_floor": ms["engine"] / ms["floor"],
            "peak_memory_gib": {name: best[sweep][name][1] for name in METHODS},
            "tokens_per_s": {name: runs * seq_len / best[sweep][name][0] for name in METHODS},
            "flops": executed[sweep],
            "flops_per_s": {name: executed[sweep][name] / best[sweep][name][0] for name in METHODS},
            "fraction_of_peak": {name: utilisation(executed[sweep][name], best[sweep][name][0], peak_flops_per_s)
                                 for name in METHODS},
            "targets": {"speedup_over_naive_at_least": minimum_speedup, "ratio_to_floor_at_most": maximum_ratio},
        }
    return figures


def _device_name(vlm: VLM) -> str:
    if vlm.device.type == "cuda":
        return f"{vlm.device} ({torch.cuda.get_device_name(vlm.device)})"
    return f"cpu ({os.cpu_count()} cores)"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def report(figures: dict) -> str:
    lines = [f"patching benchmark on {figures['model']} ({figures['init']} weights, {figures['layers']} LM layers, "
             f"{figures['device']}, {figures['dtype']}, torch {figures['torch']}, transformers "
             f"{figures['transformers']}, {figures['threads']} threads): {figures['pairs']} pairs per sweep, "
             f"best of {figures['rounds']} round(s), batch {figures['batch_size']}"]
    memory = "peak GiB (GPU)" if figures["device"].startswith("cuda") else "peak GiB (RSS)"
    for sweep, row in figures["sweeps"].items():
        ms, mem = row["ms_per_patched_run"], row["peak_memory_gib"]
        lines.append(f"{sweep} sweep: {row['sites']} sites x {figures['pairs']} pairs = {row['patched_runs']} "
                     f"patched runs, sequence length {row['sequence_length']}")
        lines.append(f"  {'method':8} {'ms/run':>9} {memory:>15} {'tokens/s':>10} {'TFLOP/s':>9} {'of peak':>8}")
        for name in METHODS:
            peak = "-" if mem[name] is None else f"{mem[name]:.2f}"
            share = row["fraction_of_peak"][name]
            lines.append(f"  {name:8} {ms[name]:9.2f} {peak:>15} {row['tokens_per_s'][name]:10.0f} "
                         f"{row['flops_per_s'][name] / 1e12:9.3f} {'-' if share is None else f'{share:.1%}':>8}")
        target = row["targets"]
        speed_ok = row["speedup_over_naive"] >= target["speedup_over_naive_at_least"]
        floor_ok = row["ratio_to_floor"] <= target["ratio_to_floor_at_most"]
        verdict = figures["layers"] >= REAL_DEPTH
        lines.append(f"  engine speed-up over naive: {row['speedup_over_naive']:.1f}x"
                     + (f" (target >= {target['speedup_over_naive_at_least']:g}x: {'met' if speed_ok else 'NOT met'})"
                        if verdict else "")
                     + f"; engine / floor: {row['ratio_to_floor']:.2f}x"
                     + (f" (target <= {target['ratio_to_floor_at_most']:g}x: {'met' if floor_ok else 'NOT met'})"
                        if verdict else ""))
    if figures["layers"] < REAL_DEPTH:
        lines.append(f"  (targets are set for real LM depths, {REAL_DEPTH}+ layers: with {figures['layers']}, a pair's two "
                     f"full forwards weigh as much as its few patched runs)")
    return "\n".join(lines)
