"""Command line -> MagiConfig: hydra composes configs/ (groups model/, train/, data/, parallel/, experiment/) and
the overrides; the strict builder (config.root_config) types and checks the result.

`key=value` overrides of keys that no yaml file mentions are legal (every dataclass field can be set): they are
passed to hydra as `++key=value`, and the builder rejects unknown keys with one line naming them. A bare
`group=option` (model=debug, experiment=overfit) selects a config group option as usual."""
from __future__ import annotations

import os
import re
from pathlib import Path

from magi_train.config import ConfigError, MagiConfig, build_config

CONFIG_DIR_ENV = "MAGI_CONFIG_DIR"


def default_config_dir() -> Path:
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).resolve()
    return Path(__file__).resolve().parents[2] / "configs"


def config_groups(config_dir: Path) -> set[str]:
    return {p.name for p in config_dir.iterdir() if p.is_dir()}


def normalise_overrides(overrides: list[str], groups: set[str]) -> list[str]:
    out = []
    for o in overrides:
        if "=" not in o or o.startswith(("+", "~")):
            out.append(o)
            continue
        key = o.split("=", 1)[0]
        out.append(o if key in groups or key.startswith("hydra.") else "++" + o)
    return out


_MISSING_OPTION = re.compile(r"Could not find '([^/']+)/([^']+)'")


def _one_line(e: Exception) -> str:
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    m = _MISSING_OPTION.search(text)
    if m:   # a group option that does not exist: list the ones that do
        group, option = m.groups()
        i = next((i for i, ln in enumerate(lines) if ln.startswith("Available options")), None)
        options = []
        for ln in lines[i + 1:] if i is not None else []:
            if ln.startswith("Config search path"):
                break
            options.append(ln)
        return f"{group}: no config named {option!r} in configs/{group}/; available: {', '.join(options)}"
    return lines[0] if lines else type(e).__name__


def compose_dict(overrides: list[str], config_dir: Path | None = None, config_name: str = "config") -> dict:
    """Hydra composition as a plain dict (interpolations resolved, ??? kept for the builder to name)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    config_dir = config_dir or default_config_dir()
    if not (config_dir / f"{config_name}.yaml").is_file():
        raise ConfigError(f"config: {config_dir}/{config_name}.yaml not found (set {CONFIG_DIR_ENV})")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=config_name, overrides=normalise_overrides(overrides, config_groups(config_dir)))
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except ConfigError:
        raise
    except Exception as e:   # hydra / omegaconf composition and parse errors
        raise ConfigError(_one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()


def load_config(overrides: list[str], config_dir: Path | None = None) -> MagiConfig:
    """Compose and build; raises ConfigError with one line naming the key."""
    return build_config(compose_dict(overrides, config_dir))


__all__ = ["load_config", "compose_dict", "normalise_overrides", "default_config_dir", "CONFIG_DIR_ENV"]
