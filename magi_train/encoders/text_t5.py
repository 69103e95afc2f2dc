"""T5 v1.1 encoder (MAGI-1 uses the XXL one: 4096-d, 800 tokens) loaded through transformers from a local directory."""
from __future__ import annotations

import os

import torch

from .config import TextEncoderConfig
from .text_base import TextEncoder

# MAGI-1's loader looks for this sub-directory inside t5_pretrained.
RELEASE_SUBDIR = "t5-v1_1-xxl"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


def resolve_t5_dir(path: str) -> str:
    """The directory holding config.json: `path` itself or MAGI-1's `{path}/t5-v1_1-xxl`. Raises a one-line
    FileNotFoundError naming what is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"T5 directory not found: {path} (text_encoder.path / t5_pretrained)")
    for candidate in (path, os.path.join(path, RELEASE_SUBDIR)):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            break
    else:
        raise FileNotFoundError(f"T5 config not found: {os.path.join(path, 'config.json')} "
                                f"(nor {os.path.join(path, RELEASE_SUBDIR, 'config.json')})")
    if not any(os.path.isfile(os.path.join(candidate, f)) for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"T5 weights not found in {candidate}: expected one of {', '.join(_WEIGHT_FILES)}")
    if not any(os.path.isfile(os.path.join(candidate, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"T5 tokenizer not found in {candidate}: expected {' or '.join(_TOKENIZER_FILES)}")
    return candidate


class T5TextEncoder(TextEncoder):
    """Pads every caption to max_length ("max_length" padding, truncation), returns the encoder's last hidden
    state and the tokenizer's attention mask, as MAGI-1's DiT expects them."""

    def __init__(self, cfg: TextEncoderConfig):
        from transformers import T5EncoderModel, T5Tokenizer  # heavy import, only when T5 is asked for

        directory = resolve_t5_dir(cfg.path)
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        # T5Tokenizer, not AutoTokenizer: T5 directories often ship only spiece.model.
        self.tokenizer = T5Tokenizer.from_pretrained(directory, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(directory, local_files_only=True, dtype=dtype)
        self.model.to(cfg.device).eval().requires_grad_(False)
        width = self.model.config.d_model
        if cfg.dim is not None and cfg.dim != width:
            raise ValueError(f"text_encoder.dim: {cfg.dim} does not match the T5 checkpoint's d_model={width}")
        super().__init__(width, cfg.max_length, cfg.device, cfg.batch_size, cfg.cache_size, cfg.clean_captions)
        self.directory = directory

    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(prompts, max_length=self.max_length, padding="max_length", truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.float(), mask.bool()
