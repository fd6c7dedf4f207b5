"""Results on disk (docs/experiments.md, "Results"): results/<experiment>/<model>/<setting>/ holds metrics.json
(metrics, the unit's identity, resolved config, seed, package versions, git commit) and arrays.npz.

A unit is done only when its files parse and the identity saved with it equals the one asked for (`unit_state`):
the identity is the resolved config less the keys that cannot change a unit's numbers (`RUNTIME_KEYS`). A unit
is written into a temporary directory with a unique name beside it (`.<name>.tmp-<pid>-<random>`), then swapped
into place in one step, so a run killed at any moment leaves the old unit or the new one, never a mix; names
starting with "." are never units (`find_units`). A job of a multirun that sweeps other keys than model and
setting writes into a sub-directory named for them (common.cli.variant_name), so the jobs of one sweep never
share a unit."""

import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from common.cli import variant_name

REPO = Path(__file__).resolve().parent.parent
VERSIONED = ("torch", "transformers", "numpy", "hydra-core")

# Keys of the resolved config that do not change a unit's numbers, left out of its identity: where things go
# (results_dir, cache_dir, embeddings_dir: a cache keyed by its own contents), how the run is carried out
# (device, model.device_map, model.max_memory, threads, redo), bookkeeping (variant_keys, experiment.figure, model.made_by), and
# batch_size: it only groups rows into forwards (left-padded, masked), which changes float rounding (<= 1e-5 in
# the engine's equality tests) and no result beyond it. `data` counts only on a What'sUp setting (the synthetic
# ones never read it).
RUNTIME_KEYS = ("results_dir", "cache_dir", "embeddings_dir", "device", "threads", "redo", "variant_keys",
                "batch_size", "experiment.figure", "model.made_by", "model.device_map", "model.max_memory")


def unit_dir(cfg: DictConfig) -> Path:
    """results/<experiment>/<model>/<setting>[/<variant>] of the run `cfg` describes."""
    unit = Path(cfg.results_dir) / cfg.experiment.name / cfg.model.name / cfg.setting.name
    variant = variant_name(cfg)
    return unit / variant if variant else unit


def identity(config: dict) -> dict:
    """The part of a resolved config (a plain dict) that decides a unit's numbers: all of it but RUNTIME_KEYS,
    and `data` only on a What'sUp setting; a path inside this repository (a shipped organism's weights) is
    written `<repo>/...`, so a unit keeps its identity in another clone."""
    root = str(REPO) + os.sep
    text = json.dumps(config).replace(json.dumps(root)[1:-1], "<repo>/")
    config = json.loads(text)                            # a deep copy with JSON's types (tuples -> lists)
    for key in RUNTIME_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split(".") if parent else []:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    if (config.get("setting") or {}).get("source", "synthetic") != "whatsup":
        config.pop("data", None)
    return config


def config_identity(cfg: DictConfig) -> dict:
    return identity(OmegaConf.to_container(cfg, resolve=True))


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def identity_difference(saved: dict, asked: dict) -> list[tuple[str, object, object]]:
    """[(dotted key, saved value, asked value)] where two identities differ ("absent" for a missing key)."""
    a, b = _flat(saved), _flat(asked)
    return [(key, a.get(key, "absent"), b.get(key, "absent")) for key in sorted(set(a) | set(b))
            if a.get(key, "absent") != b.get(key, "absent")]


def read_record(directory: Path) -> dict:
    """metrics.json of a unit, checked: a JSON object with metrics and config, next to an arrays.npz whose zip
    entries all read back. ValueError saying what is wrong otherwise."""
    directory = Path(directory)
    try:
        record = json.loads((directory / "metrics.json").read_text())
    except FileNotFoundError as err:
        raise ValueError("no metrics.json") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"metrics.json does not parse ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict) or \
            not isinstance(record.get("config"), dict):
        raise ValueError("metrics.json lacks its metrics or config")
    try:
        with zipfile.ZipFile(directory / "arrays.npz") as npz:
            bad = npz.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"arrays.npz does not read ({err})") from err
    if bad is not None:
        raise ValueError(f"arrays.npz: {bad} is corrupt")
    return record


def unit_state(directory: Path, cfg: DictConfig) -> tuple[str, str]:
    """(state, detail) of the unit `cfg` asks for at `directory`:
    missing; corrupt (a directory whose files do not parse: detail says which); same (finished, with the identity
    asked for); different (finished with another identity: detail names each differing key, saved -> asked)."""
    directory = Path(directory)
    if not directory.exists():
        return "missing", ""
    try:
        record = read_record(directory)
    except ValueError as err:
        return "corrupt", str(err)
    saved = record.get("identity") or identity(record["config"])
    differences = identity_difference(saved, config_identity(cfg))
    if not differences:
        return "same", ""
    shown = ", ".join(f"{key}={_short(old)} (asked {_short(new)})" for key, old, new in differences[:4])
    more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
    return "different", shown + more


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def is_done(directory: Path, cfg: DictConfig) -> bool:
    """A finished unit with the identity `cfg` asks for."""
    return unit_state(directory, cfg)[0] == "same"


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
    config = OmegaConf.to_container(cfg, resolve=True)
    return {
        "seed": cfg.seed,
        "git_commit": commit,
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in VERSIONED}},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "identity": identity(config),
        "config": config,
    }


_RENAME_EXCHANGE = 2
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _LIBC.renameat2
except (OSError, AttributeError):      # not Linux with glibc >= 2.28: two renames (see _swap)
    _renameat2 = None


def _swap(new: Path, old: Path) -> bool:
    """Exchange two existing directories in one step (Linux renameat2 RENAME_EXCHANGE); False where the system
    or the file system cannot."""
    if _renameat2 is None:
        return False
    return _renameat2(-100, os.fsencode(new), -100, os.fsencode(old), _RENAME_EXCHANGE) == 0   # -100: AT_FDCWD


def temporary_dir(directory: Path, kind: str = "tmp") -> Path:
    """A new empty directory beside `directory`, named .<name>.<kind>-<pid>-<random>: unique to this run, and
    never taken for a unit (find_units skips names starting with ".")."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{directory.name}.{kind}-{os.getpid()}-", dir=directory.parent))


def save_unit(directory: Path, metrics: dict, arrays: dict, cfg: DictConfig) -> None:
    """Write metrics.json and arrays.npz into `directory`, replacing it whole: both files go into a temporary
    directory (temporary_dir), which then takes the unit's place in one rename (a first save) or one exchange
    with the old unit (Linux; elsewhere two renames, the old unit kept under a hidden name in between)."""
    directory = Path(directory)
    tmp = temporary_dir(directory)
    try:
        np.savez_compressed(tmp / "arrays.npz", **arrays)
        record = _strict_json({"metrics": metrics, **provenance(cfg)})
        (tmp / "metrics.json").write_text(json.dumps(record, indent=1, allow_nan=False))
        try:
            tmp.rename(directory)                  # no unit there yet
            return
        except OSError:
            pass
        if _swap(tmp, directory):                  # tmp now holds the old unit
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = temporary_dir(directory, "old")
        directory.rename(old / directory.name)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def measures_nothing(metrics: dict) -> str | None:
    """Why a unit measures nothing, or None. Every experiment that scores answers records `mean_p_answer` (the
    true answer's mean probability on unmodified inputs) and `p_uniform_token` (1 / the vocabulary's size: one
    token's probability under a uniform guess). Below that, the model does not answer with the setting's words at
    all (What'sUp on the organisms, whose vocabulary holds them but whose training never used them: ~1e-6 against
    3e-3), so its accuracy, patching curves and steering can only show zeros. A random model (the tiny twins) sits
    near the uniform guess, a trained one far above it."""
    p, floor = metrics.get("mean_p_answer"), metrics.get("p_uniform_token")
    if p is None or floor is None or p >= floor:
        return None
    return (f"nothing to measure: the model gives the true answers P = {p:.1g} on average, less than a uniform "
            f"guess over its {round(1 / floor)} tokens ({floor:.1g}): it does not answer with these words")


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
    """Every unit of `experiment` whose files parse (one that does not is left out with a warning), sorted by
    model, then setting in the paper's order; a name starting with "." (a run's temporary directory) is never a
    unit."""
    units = []
    for metrics in (Path(results_dir) / experiment).glob("*/*/metrics.json"):
        unit = metrics.parent
        if unit.name.startswith(".") or unit.parent.name.startswith("."):
            continue
        try:
            read_record(unit)
        except ValueError as err:
            print(f"warning: {unit} is not a finished unit ({err}): left out", file=sys.stderr)
            continue
        units.append(unit)
    return sorted(units, key=lambda unit: (unit.parent.name, setting_rank(unit.name)))
