"""The whole paper in one command: every figure and table, for the given models, at the paper's sizes.

    bash scripts/paper.sh                          # qwen2vl_7b and gemma3_4b (on the GPU)
    bash scripts/paper.sh --dry-run                # the plan: units and forward passes per figure; runs nothing
    bash scripts/paper.sh model=gemma3_4b          # one model
    bash scripts/paper.sh data.whatsup_dir=/data/whatsup data.whatsup_boxes=/data/whatsup/boxes.json   # + What'sUp
    bash scripts/paper.sh model=organism device=cpu n=16 n_pairs=4 n_train=12 n_test=6   # a small run
    bash scripts/paper.sh figures=fig02_last_token,fig07_strip_patching   # only these figures

Each figure is its sweep's grid (configs/sweep/<figure>.yaml: models x settings; `model=` / `setting=` on the
command line replace the grid's, any other key=value goes to every unit that has the key: n_pairs to the
patching figures, n to the accuracy and ablation tables, ...), run unit by unit in this process
(`runner.run_unit`; a finished unit is skipped, so a stopped run resumes), each model loaded once for all its
units, then the figure is drawn (figures/<figure>/plot.py). The What'sUp figures (Table 1's What'sUp column,
the patching figures' What'sUp panels, Fig 33-35, Table 3) run when `data.whatsup_dir` is given (with
`data.whatsup_boxes` for those that need boxes).

Figures are drawn into figures/<figure>/out, or <figures_dir>/<figure>/ with `figures_dir=DIR`. Afterwards, per
figure: wall time, patched runs per second (patching figures) and peak GPU memory, in
<results_dir>/timings.json and as a table in the log. `--dry-run` prints, per figure, its units (and how many
are done) and the forward passes they make, computed from each unit's config (`unit_passes`): full forwards
(image and prompt through the vision tower and the LM), vision-only passes (embeddings) and patched runs.
"""

import gc
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from common.cli import CONFIG_DIR, REPO_DIR, split_override, sweep_values
from common.errors import UsageError
from common.results import is_done, unit_dir
from data_gen.whatsup import split_sizes
from runner import run_unit
from steering.run import passes as amplification_passes
from vlm.models import load_model

# (figure, extra overrides, needs What'sUp data), in the order they run
FIGURES = [
    ("table1_accuracy", [], False),
    ("fig02_last_token", [], False),
    ("fig06_object_patching", [], False),
    ("fig07_strip_patching", [], False),
    ("table2_ablation", [], False),
    ("fig08_ablated_patching", [], False),
    ("fig04_probes", [], False),
    ("fig31_grid_probes", [], False),
    ("table1_accuracy", ["setting=whatsup"], True),
    ("fig02_last_token", ["setting=whatsup"], True),
    ("fig07_strip_patching", ["setting=whatsup"], True),
    ("fig06_object_patching", ["setting=whatsup"], True),
    ("fig33_whatsup_probes", [], True),
    ("table3_amplification", [], True),
]
GRID_KEYS = ("model", "setting")
PATCHING = ("last_token", "object_patching", "strip_patching", "ablated_patching")


def compose_cfg(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_node)


@dataclass
class Figure:
    name: str
    units: list[DictConfig] = field(default_factory=list)
    label: str = ""


def plan(args: list[str]) -> list[Figure]:
    """Every figure to run, with its units' configs, for the command line's overrides."""
    given = {}
    for arg in args:
        split = split_override(arg)
        if split is None:
            raise UsageError(f"unexpected argument {arg!r}: give key=value overrides (and --dry-run)")
        given[split[0]] = arg
    grid_given = {key: sweep_values(given[key].partition("=")[2]) or [given[key].partition("=")[2]]
                  for key in GRID_KEYS if key in given}
    rest = [arg for key, arg in given.items() if key not in (*GRID_KEYS, "figures_dir", "figures")]
    chosen = given["figures"].partition("=")[2].split(",") if "figures" in given else None
    names = {name for name, _, _ in FIGURES}
    for name in chosen or []:
        if name not in names:
            raise UsageError(f"figures={name}: no such figure; allowed: {', '.join(sorted(names))}")
    whatsup = given.get("data.whatsup_dir", "data.whatsup_dir=null").partition("=")[2] not in ("", "null", "None")
    overrides = {key: OmegaConf.select(OmegaConf.from_dotlist([arg]), key)
                 for key, arg in ((a.partition("=")[0], a) for a in rest)}
    used: set[str] = set()
    figures = []
    for name, extra, needs_whatsup in FIGURES:
        if (needs_whatsup and not whatsup) or (chosen and name not in chosen):
            continue
        swept = compose_cfg([f"sweep={name}", *extra], hydra_node=True)
        grid = {key: str(value).split(",") for key, value in swept.hydra.sweeper.params.items()}
        for key, value in grid_given.items():
            grid[key] = value
        for arg in extra:
            key, value = arg.split("=", 1)
            grid[key] = [value]
        figure = Figure(name, label=name + (" (What'sUp)" if extra else ""))
        for model in grid["model"]:
            for setting in grid["setting"]:
                cfg = compose_cfg([f"sweep={name}", f"model={model}", f"setting={setting}"])
                for key, value in overrides.items():       # each key where the unit has it (n_pairs, n, ...)
                    if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
                        OmegaConf.update(cfg, key, value, merge=False)
                        used.add(key)
                figure.units.append(cfg)
        figures.append(figure)
    unused = sorted(set(overrides) - used)
    if unused and figures:
        raise UsageError(f"{', '.join(unused)}: no unit of these figures has such a key")
    return figures


_ABSENT = object()


def whatsup_split_sizes(cfg: DictConfig) -> dict[str, int] | None:
    """Composites per split, as data_gen.whatsup.split_composites cuts `n_composites` (None when it is null)."""
    n = cfg.setting.get("n_composites")
    return None if n is None else split_sizes(int(n), cfg.setting.splits)


def unit_passes(cfg: DictConfig) -> dict:
    """What a unit runs: `lm` (full-length sequences, image and prompt, through the LM), `vision` (images
    through the vision tower; an LM forward on an image's precomputed embeddings does not count one),
    `patched` (patched runs; the engine replays each from the layer after its site instead of an LM forward).
    From the unit's config, as its experiment's code does it; None where it depends on data the config does not
    describe (What'sUp with n_composites null)."""
    exp = cfg.experiment.name
    layers = int(cfg.model.architecture.text_config.num_hidden_layers)
    if cfg.get("layers") not in (None, "all"):
        layers = len(cfg.layers)
    sizes = whatsup_split_sizes(cfg) if cfg.setting.get("source") == "whatsup" else None
    unknown = {"lm": None, "vision": None, "patched": 0, "replayed": 0}
    if exp == "accuracy":
        if cfg.setting.get("source") == "whatsup":
            if sizes is None:
                return unknown
            count = 2 * (sum(sizes.values()) if cfg.split == "all" else sizes[cfg.split])   # both directions
            return {"lm": count, "vision": count, "patched": 0}
        return {"lm": int(cfg.n), "vision": int(cfg.n), "patched": 0}
    isolated = len(cfg.setting["items"]) * len(cfg.get("orientations") or []) + 1   # each item alone, + empty
    if exp in PATCHING:
        sites = layers + (1 if cfg.get("patch_visual") else 0)
        vision = isolated if cfg.get("ablate") else 2 * int(cfg.n_pairs)       # ablated: the pairs' are given
        return {"lm": 2 * int(cfg.n_pairs), "vision": vision, "patched": int(cfg.n_pairs) * sites}
    if exp == "ablation":
        return {"lm": 2 * int(cfg.n), "vision": int(cfg.n) + isolated, "patched": 0}   # original and ablated
    if exp in ("probes", "grid_probes"):
        probes = len(cfg.orientations) if exp == "probes" else len(cfg.grid_sizes)
        return {"lm": 0, "vision": probes * (int(cfg.n_train) + int(cfg.n_test)), "patched": 0}
    if exp == "whatsup_probes":
        if sizes is None:
            return unknown
        train = sizes["train"] if cfg.n_train is None else min(int(cfg.n_train), sizes["train"])
        test = sizes["test"] if cfg.n_test is None else min(int(cfg.n_test), sizes["test"])
        return {"lm": 0, "vision": train + test, "patched": 0}
    if exp == "amplification":
        return amplification_passes(cfg)
    raise UsageError(f"no pass count for experiment {exp!r} (runner/paper.py, unit_passes)")


def total(units: list[DictConfig]) -> dict:
    out = {"lm": 0, "vision": 0, "patched": 0, "replayed": 0}
    for cfg in units:
        for key, value in {"replayed": 0, **unit_passes(cfg)}.items():
            out[key] = None if value is None or out[key] is None else out[key] + value
    return out


def fmt(value) -> str:
    return "?" if value is None else f"{value:,}"


def dry_run(figures: list[Figure]) -> str:
    rows = [f"{'figure':34} {'units':>9} {'LM forwards':>12} {'vision passes':>14} {'patched runs':>13} "
            f"{'naive LM forwards':>18} {'replayed rows':>14}"]
    grand = {"lm": 0, "vision": 0, "patched": 0, "replayed": 0}
    for figure in figures:
        done = sum(is_done(unit_dir(cfg)) for cfg in figure.units)
        counts = total(figure.units)
        for key in grand:
            grand[key] = None if counts[key] is None or grand[key] is None else grand[key] + counts[key]
        naive = counts["lm"]
        if counts["patched"] and naive is not None:
            naive = naive // 2 + counts["patched"]
        rows.append(f"{figure.label:34} {f'{done}/{len(figure.units)} done':>9} {fmt(counts['lm']):>12} "
                    f"{fmt(counts['vision']):>14} {fmt(counts['patched']):>13} {fmt(naive):>18} "
                    f"{fmt(counts['replayed']):>14}")
        models = sorted({cfg.model.name for cfg in figure.units})
        settings = sorted({cfg.setting.name for cfg in figure.units})
        rows.append(f"  {' x '.join([','.join(models), ','.join(settings)])}")
    rows.append(f"{'total':34} {'':>9} {fmt(grand['lm']):>12} {fmt(grand['vision']):>14} "
                f"{fmt(grand['patched']):>13} {'':>18} {fmt(grand['replayed']):>14}")
    rows.append("LM forwards: full-length sequences (image and prompt) through the LM (patching: the clean and "
                "counterfactual runs, once per pair); vision passes: images through the vision tower (cached "
                "probe embeddings are not recomputed); patched runs: one per pair and site, each replayed by the "
                "engine from the layer after its site over the positions from the first patched one "
                "(docs/performance.md); naive LM forwards: what one full forward per patched run would make "
                "(the counterfactual once per pair, then every site); replayed rows: Table 3's attention-method "
                "evaluations replayed at the last query row from a recorded forward (steering/run.py, "
                "ATTENTION_PASS; counted as LM forwards while they are full forwards)")
    return "\n".join(rows)


class _Loader:
    """`get_vlm` for every unit of one model: loads it on the first call, records how long that took."""

    def __init__(self, cfg: DictConfig, load_times: dict):
        self.cfg, self.load_times, self.loaded = cfg, load_times, []

    def __call__(self):
        if not self.loaded:
            start = time.perf_counter()
            self.loaded.append(load_model(self.cfg))
            self.load_times[self.cfg.model.name] = time.perf_counter() - start
        return self.loaded[0]


def run(figures: list[Figure], results_dir: str, figures_dir: Path, timings_path: Path | None = None) -> dict:
    """Run every unit (each model loaded once), draw every figure into figures_dir/<figure>/, and return the
    timings, also written to `timings_path` after every unit (a run stopped part-way leaves what it measured)."""
    timings = {}

    def save():
        if timings_path is not None:
            timings_path.parent.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps(timings, indent=1))
    cuda = torch.cuda.is_available()
    by_model: dict[str, list[tuple[Figure, DictConfig]]] = {}
    for figure in figures:
        for cfg in figure.units:
            by_model.setdefault(cfg.model.name, []).append((figure, cfg))
    for model, units in by_model.items():
        pending = [(figure, cfg) for figure, cfg in units if not is_done(unit_dir(cfg))]
        loader = _Loader(units[0][1], timings.setdefault("_load_s", {}))
        for figure, cfg in pending:
            entry = timings.setdefault(figure.label, {"wall_s": 0.0, "patched_runs": 0, "units_run": 0,
                                                      "peak_gpu_gib": None, "by_model": {}})
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run_unit(cfg, loader)
            seconds = time.perf_counter() - start
            passes = unit_passes(cfg)
            entry["wall_s"] += seconds
            entry["patched_runs"] += passes["patched"] or 0
            entry["units_run"] += 1
            per_model = entry["by_model"].setdefault(model, {"wall_s": 0.0, "peak_gpu_gib": None})
            per_model["wall_s"] += seconds
            if cuda:
                peak = torch.cuda.max_memory_allocated() / 2**30
                entry["peak_gpu_gib"] = max(peak, entry["peak_gpu_gib"] or 0.0)
                per_model["peak_gpu_gib"] = max(peak, per_model["peak_gpu_gib"] or 0.0)
            save()
        loader.loaded.clear()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    for figure in figures:
        entry = timings.setdefault(figure.label, {"wall_s": 0.0, "patched_runs": 0, "units_run": 0,
                                                  "peak_gpu_gib": None, "by_model": {}})
        entry["units"] = len(figure.units)
        entry["patched_runs_per_s"] = entry["patched_runs"] / entry["wall_s"] if entry["patched_runs"] else None
        start = time.perf_counter()
        plot = REPO_DIR / "figures" / figure.name / "plot.py"
        out = figures_dir / figure.name if figures_dir else REPO_DIR / "figures" / figure.name / "out"
        done = subprocess.run([sys.executable, str(plot), "--results", results_dir, "--out", str(out)])
        entry["plot_s"] = time.perf_counter() - start
        save()
        if done.returncode != 0:
            raise UsageError(f"figures/{figure.name}/plot.py failed (exit {done.returncode})")
    return timings


def timing_table(timings: dict) -> str:
    rows = [f"{'figure':34} {'units run':>9} {'wall s':>9} {'patched runs/s':>15} {'peak GPU GiB':>13}"]
    wall = 0.0
    for label, entry in timings.items():
        if label.startswith("_"):
            continue
        wall += entry["wall_s"] + entry.get("plot_s", 0.0)
        rate = "-" if entry.get("patched_runs_per_s") is None else f"{entry['patched_runs_per_s']:.1f}"
        peak = "-" if entry["peak_gpu_gib"] is None else f"{entry['peak_gpu_gib']:.1f}"
        rows.append(f"{label:34} {entry['units_run']:>4}/{entry.get('units', 0):<4} {entry['wall_s']:9.1f} "
                    f"{rate:>15} {peak:>13}")
    loads = sum(timings.get("_load_s", {}).values())
    rows.append(f"{'model loading':34} {'':9} {loads:9.1f}")
    rows.append(f"{'total (with plots)':34} {'':9} {wall + loads:9.1f}")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    args = [arg for arg in argv if arg != "--dry-run"]
    try:
        figures = plan(args)
        if dry:
            print(dry_run(figures))
            return 0
        results_dir = str(figures[0].units[0].results_dir) if figures else "results"
        started = time.perf_counter()
        figures_dir = next((Path(a.partition("=")[2]) for a in args if a.startswith("figures_dir=")), None)
        path = Path(results_dir) / "timings.json"
        timings = run(figures, results_dir, figures_dir, path)
        timings["_total_s"] = time.perf_counter() - started
        timings["_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        timings["_args"] = args
        path.write_text(json.dumps(timings, indent=1))
        print(timing_table(timings))
        print(f"timings -> {path}")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
