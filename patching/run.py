"""Run one patching experiment on one model and setting (SPEC 4) and save it under
results/<experiment>/<model>/<setting>/.

    python -m patching.run experiment=last_token model=qwen2vl_7b setting=squares [n_pairs=50 layers=all]
    python -m patching.run experiment=strip_patching model=tiny_qwen2vl setting=objects n_pairs=4

Experiments: last_token, object_patching, strip_patching, ablation, ablated_patching (configs/experiment/).
A unit that exists is skipped unless redo=true.
"""

from omegaconf import DictConfig

from data_gen.settings import Setting
from patching.experiments import EXPERIMENTS
from vlm.cli import check_choice, entrypoint
from vlm.models import load_model
from vlm.results import is_done, save_unit, unit_dir


def run(cfg: DictConfig) -> None:
    name = cfg.experiment.name
    check_choice("patching experiment", name, EXPERIMENTS)
    out = unit_dir(cfg, name)
    if is_done(out) and not cfg.redo:
        print(f"{name}: {out} exists, skipping (redo=true to recompute)")
        return
    setting = Setting.from_config(cfg.setting)
    vlm = load_model(cfg)
    metrics, arrays = EXPERIMENTS[name](vlm, setting, cfg)
    save_unit(out, metrics, arrays, cfg)
    print(f"{name} {vlm.name} {setting.name} -> {out}")


@entrypoint()
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
