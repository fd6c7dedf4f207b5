"""The whole paper in one command: every figure and table, for the given models, at the paper's sizes.

    bash scripts/paper.sh                          # qwen2vl_7b and gemma3_4b (on the GPU)
    bash scripts/paper.sh --dry-run                # the plan: units and forward passes per figure; runs nothing
    bash scripts/paper.sh model=gemma3_4b          # one model
    bash scripts/paper.sh data.whatsup_dir=/data/whatsup data.whatsup_boxes=/data/whatsup/boxes.json   # + What'sUp
    bash scripts/paper.sh model=organism device=cpu n=16 n_pairs=4 n_train=12 n_test=6   # a small run
    bash scripts/paper.sh figures=fig02_last_token,fig07_strip_patching   # only these figures
    bash scripts/paper.sh n_pairs=24 table2_ablation:n=96                 # n=96 for Table 2's units only

The figures and their order are configs/sweep/paper.yaml: each entry a figure's sweep (configs/sweep/<figure>.yaml:
models x settings; `model=` / `setting=` on the command line replace the grid's), some only when What'sUp data
is given (`needs:`; the run says which it leaves out). Any other key=value goes to every unit that has the key
(n_pairs to the patching figures, n to the accuracy and ablation tables, ...); `<figure>:key=value` to that
figure's units only. Every unit is checked first (runner.prepare: sizes, layers, data, an existing unit with
other values), so bad input stops the run before any model loads. Then the units run in this process
(runner.execute; a finished unit is skipped, so a stopped run resumes), each model loaded once for all its units;
a unit that fails is reported and the others go on. Then each figure is drawn (figures/<figure>/plot.py, whose
`experiment.figure` names it).

Figures are drawn into figures/<figure>/out, or <figures_dir>/<figure>/ with `figures_dir=DIR`. Afterwards, per
figure: wall time, patched runs per second (patching figures) and peak GPU memory, in
<results_dir>/timings.json and as a table in the log. `--dry-run` prints, per figure, its units (and how many
are done) and the forward passes they make, from each unit's config by its experiment's `passes(cfg)`: full
forwards (image and prompt through the vision tower and the LM), vision-only passes (embeddings) and patched runs.
Exit code: 0; 2 for bad input (nothing runs) or a unit refused while running; 1 when a unit failed.
"""

import contextlib
import copy
import difflib
import functools
import gc
import importlib.util
import io
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from common.cli import CONFIG_DIR, REPO_DIR, command, compose_config, split_override, sweep_values, usage_line
from common.errors import UsageError
from common.results import unit_dir, unit_state
from runner import execute, experiment_module, prepare
from vlm.flops import layer_flops_per_token, peak_flops, vision_flops_per_image, work_flops
from vlm.interventions import count_work
from vlm.models import load_model

GRID_KEYS = ("model", "setting")
NOT_OVERRIDES = (*GRID_KEYS, "figures_dir", "figures")


def figure_list() -> list[dict]:
    """configs/sweep/paper.yaml's entries: {sweep, setting (or None), needs (a list)}."""
    entries = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "sweep" / "paper.yaml").figures)
    return [{"sweep": e["sweep"], "setting": e.get("setting"), "needs": list(e.get("needs") or [])}
            for e in (e if isinstance(e, dict) else {"sweep": e} for e in entries)]


@dataclass
class Figure:
    name: str
    units: list[DictConfig] = field(default_factory=list)
    label: str = ""


@dataclass
class Plan:
    figures: list[Figure]
    left_out: dict[str, list[str]]          # missing key(s) -> labels of the entries left out for it


def _given(arg: str) -> tuple[str | None, str, str]:
    """(figure or None, key, `key=value`) of a `[figure:]key=value` argument."""
    scope, _, rest = arg.rpartition(":") if ":" in arg.partition("=")[0] else ("", "", arg)
    split = split_override(rest)
    if split is None:
        raise UsageError(f"unexpected argument {arg!r}: give key=value or <figure>:key=value overrides (and --dry-run)")
    return scope or None, split[0], rest


def plan(args: list[str]) -> Plan:
    """Every figure to run, with its units' configs, for the command line's overrides."""
    entries = figure_list()
    names = list(dict.fromkeys(e["sweep"] for e in entries))
    given, scoped = {}, []
    for arg in args:
        scope, key, override = _given(arg)
        if scope is not None:
            if scope not in names:
                raise UsageError(f"{arg}: no figure {scope!r}; allowed: {', '.join(names)}")
            scoped.append((scope, key, override))
        else:
            given[key] = override
    grid_given = {key: sweep_values(given[key].partition("=")[2]) or [given[key].partition("=")[2]]
                  for key in GRID_KEYS if key in given}
    chosen = given["figures"].partition("=")[2].split(",") if "figures" in given else None
    for name in chosen or []:
        if name not in names:
            raise UsageError(f"figures={name}: no such figure; allowed: {', '.join(names)}")
    overrides = [(None, key, arg) for key, arg in given.items() if key not in NOT_OVERRIDES] + scoped
    present = {key for key, arg in given.items()
               if arg.partition("=")[2] not in ("", "null", "None")}
    used: set[tuple] = set()
    figures, left_out, known = [], {}, set()
    for entry in entries:
        name = entry["sweep"]
        if chosen and name not in chosen:
            continue
        label = name + (f" ({entry['setting']})" if entry["setting"] else "")
        missing = [key for key in entry["needs"] if key not in present]
        if missing:
            left_out.setdefault(", ".join(missing), []).append(label)
            continue
        swept = compose_config("config", [f"sweep={name}"], hydra_node=True)
        grid = {key: str(value).split(",") for key, value in swept.hydra.sweeper.params.items()}
        grid.update(grid_given)
        if entry["setting"]:
            grid["setting"] = [entry["setting"]]
        figure = Figure(name, label=label)
        for model in grid["model"]:
            for setting in grid["setting"]:
                cfg = unit_config(name, model, setting)
                known.update(_keys(cfg))
                for scope, key, arg in overrides:         # each key where the unit has it (n_pairs, n, ...)
                    if scope not in (None, name) or OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
                        continue
                    OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([arg]), key), merge=False)
                    used.add((scope, key))
                figure.units.append(cfg)
        figures.append(figure)
    unused = [(scope, key) for scope, key, _ in overrides if (scope, key) not in used]
    if unused and figures:
        scope, key = unused[0]
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        where = f"figure {scope}" if scope else "the figures run"
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"{key}: no unit of {where} has such a key{hint}")
    return Plan(figures, left_out)


_ABSENT = object()


@functools.cache
def _composed(sweep: str, model: str, setting: str) -> DictConfig:
    return compose_config("config", [f"sweep={sweep}", f"model={model}", f"setting={setting}"])


def unit_config(sweep: str, model: str, setting: str) -> DictConfig:
    """A unit's config as `python -m runner sweep=<sweep> model=<model> setting=<setting>` composes it (a copy of
    one composed once per process)."""
    return copy.deepcopy(_composed(sweep, model, setting))


def _keys(cfg, prefix: str = "") -> list[str]:
    out = []
    for key in cfg:
        out.append(prefix + str(key))
        if OmegaConf.is_dict(cfg[key]):
            out += _keys(cfg[key], f"{prefix}{key}.")
    return out


def left_out_lines(left_out: dict[str, list[str]]) -> list[str]:
    return [f"left out, {key} not given: {', '.join(labels)}" for key, labels in left_out.items()]


def unit_passes(cfg: DictConfig) -> dict:
    """What a unit runs, by its experiment module's `passes(cfg)`: `lm` (full-length sequences, image and prompt,
    through the LM), `vision` (images through the vision tower), `patched` (patched runs, each replayed by the
    engine from the layer after its site); None where the config does not say (What'sUp with n_composites null)."""
    module = experiment_module(cfg)
    if not hasattr(module, "passes"):
        return {"lm": None, "vision": None, "patched": None}
    return module.passes(cfg)


def total(units: list[DictConfig]) -> dict:
    out = {"lm": 0, "vision": 0, "patched": 0, "replayed": 0}
    for cfg in units:
        for key, value in {"replayed": 0, **unit_passes(cfg)}.items():     # replayed: Table 3 only
            out[key] = None if value is None or out[key] is None else out[key] + value
    return out


def fmt(value) -> str:
    return "?" if value is None else f"{value:,}"


def dry_run(the_plan: Plan) -> str:
    rows = [f"{'figure':34} {'units':>9} {'LM forwards':>12} {'vision passes':>14} {'patched runs':>13} "
            f"{'naive LM forwards':>18} {'replayed rows':>14}"]
    grand = {"lm": 0, "vision": 0, "patched": 0, "replayed": 0}
    for figure in the_plan.figures:
        states = [unit_state(unit_dir(cfg), cfg)[0] for cfg in figure.units]
        counts = total(figure.units)
        for key in grand:
            grand[key] = None if counts[key] is None or grand[key] is None else grand[key] + counts[key]
        naive = counts["lm"]
        if counts["patched"] and naive is not None:
            naive = naive // 2 + counts["patched"]
        done = f"{states.count('same')}/{len(states)} done"
        rows.append(f"{figure.label:34} {done:>9} {fmt(counts['lm']):>12} "
                    f"{fmt(counts['vision']):>14} {fmt(counts['patched']):>13} {fmt(naive):>18} "
                    f"{fmt(counts['replayed']):>14}")
        models = sorted({cfg.model.name for cfg in figure.units})
        settings = sorted({cfg.setting.name for cfg in figure.units})
        differ = states.count("different")
        rows.append(f"  {' x '.join([','.join(models), ','.join(settings)])}"
                    + (f"  ({differ} finished with other values: redo=true to overwrite)" if differ else ""))
    rows.append(f"{'total':34} {'':>9} {fmt(grand['lm']):>12} {fmt(grand['vision']):>14} "
                f"{fmt(grand['patched']):>13} {'':>18} {fmt(grand['replayed']):>14}")
    rows += left_out_lines(the_plan.left_out)
    rows.append("LM forwards: full-length sequences (image and prompt) through the LM (patching: the clean and "
                "counterfactual runs, once per pair); vision passes: images through the vision tower (cached "
                "probe embeddings are not recomputed); patched runs: one per pair and site, each replayed by the "
                "engine from the layer after its site over the positions from the first patched one "
                "(docs/performance.md); naive LM forwards: what one full forward per patched run would make "
                "(the counterfactual once per pair, then every site); replayed rows: Table 3's attention-method "
                "evaluations (ScalingVis, AdaptVis, reweighting), each the last position replayed through the "
                "LM from the sample's recorded forward (steering/run.py)")
    return "\n".join(rows)


class _Loader:
    """`get_vlm` for every unit of one model: loads it on the first call (one line), records how long it took, and
    counts the model's work from then on (vlm.interventions.count_work: positions through decoder layers, images
    through the vision tower) with what one of each costs in FLOPs (vlm.flops), for the timing table."""

    def __init__(self, cfg: DictConfig, load_times: dict):
        self.cfg, self.load_times, self.loaded = cfg, load_times, []
        self.counting = contextlib.ExitStack()
        self.work, self.flops_per = None, (0.0, 0.0)

    def __call__(self):
        if not self.loaded:
            start = time.perf_counter()
            vlm = load_model(self.cfg)
            self.loaded.append(vlm)
            self.load_times[self.cfg.model.name] = time.perf_counter() - start
            self.flops_per = (layer_flops_per_token(vlm), vision_flops_per_image(vlm))
            self.work = self.counting.enter_context(count_work(vlm))
            print(f"loaded {self.cfg.model.name} ({self.load_times[self.cfg.model.name]:.1f} s)", flush=True)
        return self.loaded[0]

    def counted(self) -> tuple[int, float]:
        """(positions x layers so far over the model's depth: full-depth LM tokens, model FLOPs so far)."""
        if self.work is None:
            return 0, 0.0
        return self.work.token_layers // self.loaded[0].n_layers, work_flops(self.work, *self.flops_per)

    def release(self):
        self.counting.close()
        self.loaded.clear()


def draw(figure: str, results_dir: str, out: Path) -> tuple[bool, str]:
    """Run figures/<figure>/plot.py's `draw(results, out)` in this process; (it worked, its output)."""
    path = REPO_DIR / "figures" / figure / "plot.py"
    captured = io.StringIO()
    try:
        spec = importlib.util.spec_from_file_location(f"figure_{figure}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with contextlib.redirect_stdout(captured):
            code = module.draw(Path(results_dir), out)
    except UsageError as err:
        return False, f"error: {err}"
    except Exception:
        return False, captured.getvalue() + traceback.format_exc()
    return code in (None, 0), captured.getvalue()


def run(figures: list[Figure], results_dir: str, figures_dir: Path | None, timings_path: Path | None = None
        ) -> tuple[dict, list[str]]:
    """Run every unit (each model loaded once), draw every figure into figures_dir/<figure>/ (default
    figures/<figure>/out), and return (the timings, a line per unit refused or failed while running). The
    timings are also written to `timings_path` after every unit (a run stopped part-way leaves what it
    measured)."""
    timings, problems = {}, []

    def save():
        if timings_path is not None:
            timings_path.parent.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps(timings, indent=1))

    def entry_of(label):
        return timings.setdefault(label, {"wall_s": 0.0, "patched_runs": 0, "units_run": 0, "peak_gpu_gib": None,
                                          "lm_tokens": 0, "model_flops": 0.0, "peak_flops": 0.0, "by_model": {}})
    cuda = torch.cuda.is_available()
    by_model: dict[str, list[tuple[Figure, DictConfig]]] = {}
    for figure in figures:
        for cfg in figure.units:
            by_model.setdefault(cfg.model.name, []).append((figure, cfg))
    for model, units in by_model.items():
        loader = _Loader(units[0][1], timings.setdefault("_load_s", {}))
        for figure, cfg in units:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            tokens_before, flops_before = loader.counted()
            try:
                status = execute(cfg, loader)
            except UsageError as err:
                status = "refused"
                problems.append(f"refused: {figure.label} {cfg.setting.name}: {err}")
                print(f"error: {err}", flush=True)
            except Exception as err:
                status = "failed"
                traceback.print_exc()
                problems.append(f"failed: {figure.label} {cfg.setting.name}: {usage_line(f'{type(err).__name__}: {err}')}")
            if status != "done":
                continue
            seconds = time.perf_counter() - start
            tokens, flops = loader.counted()
            entry = entry_of(figure.label)
            entry["wall_s"] += seconds
            entry["lm_tokens"] += tokens - tokens_before
            entry["model_flops"] += flops - flops_before
            peak = peak_flops(loader.loaded[0].device) if loader.loaded else None
            entry["peak_flops"] += (peak or 0.0) * seconds           # the peak's FLOPs over this unit's time
            entry["patched_runs"] += unit_passes(cfg)["patched"] or 0
            entry["units_run"] += 1
            per_model = entry["by_model"].setdefault(model, {"wall_s": 0.0, "peak_gpu_gib": None})
            per_model["wall_s"] += seconds
            if cuda:
                peak = torch.cuda.max_memory_allocated() / 2**30
                entry["peak_gpu_gib"] = max(peak, entry["peak_gpu_gib"] or 0.0)
                per_model["peak_gpu_gib"] = max(peak, per_model["peak_gpu_gib"] or 0.0)
            save()
        loader.release()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    for figure in figures:
        entry = entry_of(figure.label)
        entry["units"] = len(figure.units)
        entry["patched_runs_per_s"] = entry["patched_runs"] / entry["wall_s"] if entry["patched_runs"] else None
        entry["lm_tokens_per_s"] = entry["lm_tokens"] / entry["wall_s"] if entry["wall_s"] else None
        entry["fraction_of_peak"] = entry["model_flops"] / entry["peak_flops"] if entry["peak_flops"] else None
    drawn, start = [], time.perf_counter()
    for name in dict.fromkeys(cfg.experiment.figure for figure in figures for cfg in figure.units):
        if name is None:
            continue
        out = figures_dir / name if figures_dir else REPO_DIR / "figures" / name / "out"
        ok, output = draw(name, results_dir, out)
        if ok:
            drawn.append(name)
        else:
            print(output.rstrip(), flush=True)
            problems.append(f"failed: figures/{name}/plot.py: {output.strip().splitlines()[-1] if output.strip() else ''}")
    timings["_plot_s"] = time.perf_counter() - start
    if drawn:
        where = figures_dir if figures_dir else "figures/<figure>/out"
        print(f"drew {len(drawn)} figures into {where}: {', '.join(drawn)}", flush=True)
    save()
    return timings, problems


def timing_table(timings: dict) -> str:
    """Per figure: units run, wall seconds, patched runs per second, peak GPU memory, LM tokens per second
    (positions through every decoder layer, over the depth: full-depth tokens) and the fraction of the GPU's dense
    bf16 peak that the model FLOPs (decoder-layer and vision-tower matrix products, vlm/flops.py) reached."""
    rows = [f"{'figure':34} {'units run':>9} {'wall s':>9} {'patched runs/s':>15} {'peak GPU GiB':>13} "
            f"{'LM tokens/s':>12} {'of peak':>8}"]
    wall = timings.get("_plot_s", 0.0)
    for label, entry in timings.items():
        if label.startswith("_"):
            continue
        wall += entry["wall_s"]
        rate = "-" if entry.get("patched_runs_per_s") is None else f"{entry['patched_runs_per_s']:.1f}"
        peak = "-" if entry["peak_gpu_gib"] is None else f"{entry['peak_gpu_gib']:.1f}"
        tokens = "-" if entry.get("lm_tokens_per_s") is None else f"{entry['lm_tokens_per_s']:.0f}"
        share = "-" if entry.get("fraction_of_peak") is None else f"{entry['fraction_of_peak']:.1%}"
        rows.append(f"{label:34} {entry['units_run']:>4}/{entry.get('units', 0):<4} {entry['wall_s']:9.1f} "
                    f"{rate:>15} {peak:>13} {tokens:>12} {share:>8}")
    loads = sum(timings.get("_load_s", {}).values())
    rows.append(f"{'model loading; plots':34} {'':9} {loads:9.1f} {timings.get('_plot_s', 0.0):15.1f}")
    rows.append(f"{'total':34} {'':9} {wall + loads:9.1f}")
    return "\n".join(rows)


@command
def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    args = [arg for arg in argv if arg != "--dry-run"]
    the_plan = plan(args)
    if dry:
        print(dry_run(the_plan))
        return 0
    for line in left_out_lines(the_plan.left_out):
        print(line)
    for figure in the_plan.figures:             # bad input stops the run here, before any model loads
        for cfg in figure.units:
            prepare(cfg)
    figures = the_plan.figures
    results_dir = str(figures[0].units[0].results_dir) if figures else "results"
    started = time.perf_counter()
    figures_dir = next((Path(a.partition("=")[2]) for a in args if a.startswith("figures_dir=")), None)
    path = Path(results_dir) / "timings.json"
    timings, problems = run(figures, results_dir, figures_dir, path)
    timings["_total_s"] = time.perf_counter() - started
    timings["_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    timings["_args"] = args
    path.write_text(json.dumps(timings, indent=1))
    print(timing_table(timings))
    print(f"timings -> {path}")
    for line in problems:
        print(line)
    return 1 if any(p.startswith("failed") for p in problems) else 2 if problems else 0


if __name__ == "__main__":
    main()
