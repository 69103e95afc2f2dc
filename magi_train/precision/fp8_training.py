"""fp8 training (train.fp8), applied from outside the model on the block linears. MAGI-1's fp32 islands (the
embedders, the final linear, RoPE, the q/k/post norms, the per-chunk gating) stay as they are.

  torchao  torchao.float8: the blocks' nn.Linear become Float8Linear (recipe tensorwise or rowwise scaling;
           tensorwise can all-gather its weights in fp8 under FSDP2). PyTorch-native, needs a GPU with fp8
           GEMMs (Hopper/Ada) to run; fast under train.compile=true, where its casts fuse.
  te       Transformer Engine: the blocks are built with TE's Linear (model.layer_spec te, or auto, which
           train.fp8=te turns into te) and the forward runs under te.fp8_autocast with the chosen recipe:
           delayed (amax history), current (per-tensor current scaling) or block (1x128 / 128x128 blocks).

ModelTransforms (magi_train/parallel/transforms.py) applies convert_to_fp8 per shell; the forward context
(TE's fp8_autocast) is entered by magi_train/grad_accumulation.py around every microbatch's forward."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ContextManager

from torch import nn

from magi_train.config.train_config import FP8_MODES, FP8_RECIPES
from magi_train.errors import ConfigError

TORCHAO_RECIPES = FP8_RECIPES["torchao"][1:]    # after "auto": the first is what auto means
TE_RECIPES = FP8_RECIPES["te"][1:]


@dataclass(frozen=True)
class Fp8Settings:
    mode: str = "none"          # train.fp8
    recipe: str = "auto"        # train.fp8_recipe; auto: tensorwise (torchao), delayed (te)
    all_gather: bool = False    # train.fp8_all_gather (torchao tensorwise under FSDP2)

    def __post_init__(self):
        if self.mode not in FP8_MODES:
            raise ValueError(f"train.fp8: got {self.mode!r}, accepted values are {', '.join(FP8_MODES)}")

    @property
    def resolved_recipe(self) -> str | None:
        if self.mode == "none":
            return None
        if self.recipe != "auto":
            return self.recipe
        return TORCHAO_RECIPES[0] if self.mode == "torchao" else TE_RECIPES[0]


def resolve_layer_spec(fp8: str, layer_spec: str) -> str:
    """model.layer_spec under train.fp8: te needs TE's linears (auto becomes te); torchao converts nn.Linear and
    megatron-core's parallel linears are not, nor are TE's. One line naming both keys where they conflict."""
    if fp8 == "te":
        if layer_spec not in ("auto", "te"):
            raise ConfigError(f"model.layer_spec: train.fp8='te' runs Transformer Engine linears; set "
                              f"model.layer_spec to 'te' or 'auto', got {layer_spec!r}")
        return "te"
    if fp8 == "torchao" and layer_spec in ("te", "megatron"):
        raise ConfigError(f"model.layer_spec: train.fp8='torchao' converts plain nn.Linear layers (one process "
                          f"or FSDP/DDP, tp=1); got {layer_spec!r} (with Transformer Engine use train.fp8='te')")
    return layer_spec


def _block_linear_filter(module: nn.Module, fqn: str) -> bool:
    # the blocks' big GEMMs only: the gating (ada_modulate_layer, fp32 island) and the caption K/V (a few hundred
    # caption tokens, where fp8 casts cost more than they save) stay; fp8 GEMMs want dims multiple of 16
    if not isinstance(module, nn.Linear) or not fqn.startswith("videodit_blocks.layers."):
        return False
    if "ada_modulate_layer" in fqn or fqn.endswith("linear_kv_xattn"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def torchao_config(s: Fp8Settings):
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(s.resolved_recipe)
    if s.all_gather:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def apply_torchao_float8(model: nn.Module, s: Fp8Settings | None = None) -> int:
    """Convert the block linears to torchao Float8Linear in place; returns how many were converted."""
    s = s or Fp8Settings(mode="torchao")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise RuntimeError("train.fp8='torchao' needs torchao (pip install 'magi[fp8]'); without it set "
                           "train.fp8 to 'none' (or 'te' with Transformer Engine)") from e
    before = sum(type(m) is nn.Linear for m in model.modules())
    convert_to_float8_training(model, config=torchao_config(s), module_filter_fn=_block_linear_filter)
    return before - sum(type(m) is nn.Linear for m in model.modules())


def convert_to_fp8(shell: nn.Module, s: Fp8Settings) -> int:
    """The model-converter step of ModelTransforms: torchao swaps the linears; te's linears come from the layer
    spec, so there is nothing to convert, only a check that they are there."""
    if s.mode == "torchao":
        n = apply_torchao_float8(shell, s)
        if n == 0:
            raise ConfigError("train.fp8: 'torchao' found no plain nn.Linear block linear to convert "
                              "(model.layer_spec must be 'local' or 'auto' at tp=1)")
        return n
    if s.mode == "te":
        from .te_spec import is_te_linear

        n = sum(is_te_linear(m) for m in shell.modules())
        if n == 0 and any(True for _ in shell.parameters()):
            raise ConfigError("train.fp8: 'te' needs the blocks built with model.layer_spec='te' (or 'auto')")
        return n
    return 0


def te_recipe(name: str):
    """TE's recipe object for train.fp8_recipe (TE's public transformer_engine.common.recipe API)."""
    from transformer_engine.common import recipe

    if name == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    if name == "current":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    if name == "block":
        return recipe.Float8BlockScaling()   # e4m3, 1x128 activations and 128x128 weights
    raise ValueError(f"train.fp8_recipe: got {name!r} for train.fp8='te', accepted values are "
                     f"{', '.join(TE_RECIPES)}")


def forward_context(s: Fp8Settings, group=None) -> Callable[[], ContextManager] | None:
    """What each forward runs under: TE's fp8_autocast for te (amaxes reduced over `group`), nothing otherwise
    (torchao's Float8Linear scales inside the module)."""
    if s.mode != "te":
        return None
    from .te_spec import _te

    te = _te()
    fp8_recipe = te_recipe(s.resolved_recipe)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe, fp8_group=group)


__all__ = ["FP8_MODES", "Fp8Settings", "resolve_layer_spec", "apply_torchao_float8", "convert_to_fp8",
           "forward_context", "te_recipe", "torchao_config"]
