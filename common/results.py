"""Results on disk (docs/experiments.md, "Results"): results/<experiment>/<model>/<setting>/ holds metrics.json
(metrics, resolved config, seed, package versions, git commit) and arrays.npz. A unit is written to a temporary
directory and renamed into place, so a run never leaves a half-written unit. A job of a multirun that sweeps
other keys than model and setting writes into a sub-directory named for them (common.cli.variant_name), so
the jobs of one sweep never share a unit."""

import json
import platform
import shutil
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from common.cli import variant_name

REPO = Path(__file__).resolve().parent.parent
VERSIONED = ("torch", "transformers", "numpy", "hydra-core")


def unit_dir(cfg: DictConfig) -> Path:
    """results/<experiment>/<model>/<setting>[/<variant>] of the run `cfg` describes."""
    unit = Path(cfg.results_dir) / cfg.experiment.name / cfg.model.name / cfg.setting.name
    variant = variant_name(cfg)
    return unit / variant if variant else unit


def is_done(directory: Path) -> bool:
    return (directory / "metrics.json").exists()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def provenance(cfg: DictConfig) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "seed": cfg.seed,
        "git_commit": commit,
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in VERSIONED}},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def save_unit(directory: Path, metrics: dict, arrays: dict, cfg: DictConfig) -> None:
    """Write metrics.json and arrays.npz into `directory`, replacing it whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.savez_compressed(tmp / "arrays.npz", **arrays)
    record = _strict_json({"metrics": metrics, **provenance(cfg)})
    (tmp / "metrics.json").write_text(json.dumps(record, indent=1, allow_nan=False))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def _strict_json(value):
    """`value` with every float NaN / infinity (an undefined metric, e.g. "broken" when nothing was right) as
    None, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def fmt_metric(value, digits: int = 3) -> str:
    """A metric for a table or a title; None (undefined, e.g. strip agreement with no non-item token) as "–"."""
    return "–" if value is None else f"{value:.{digits}f}"


def load_unit(directory: Path) -> tuple[dict, dict]:
    """(metrics.json as a dict, arrays.npz as a dict of arrays)."""
    directory = Path(directory)
    record = json.loads((directory / "metrics.json").read_text())
    with np.load(directory / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return record, arrays


SETTING_ORDER = ["squares", "shapes", "objects", "whatsup"]     # the paper's order, for tables and figures


def setting_rank(setting: str) -> tuple[int, str]:
    """Sort key of a setting name: the paper's settings in SETTING_ORDER, any other after them by name."""
    return (SETTING_ORDER.index(setting) if setting in SETTING_ORDER else len(SETTING_ORDER), setting)


def find_units(results_dir: Path, experiment: str) -> list[Path]:
    """Every finished unit of `experiment`, sorted by model, then setting in the paper's order."""
    units = (p.parent for p in (Path(results_dir) / experiment).glob("*/*/metrics.json"))
    return sorted(units, key=lambda unit: (unit.parent.name, setting_rank(unit.name)))
