"""Tiny stand-ins of the large encoders, written in their release layouts, for tests and offline demos.

write_tiny_t5(dir): a 2-layer T5 v1.1-style encoder with a sentencepiece vocabulary trained here, laid out as
MAGI-1 expects t5_pretrained ({dir}/t5-v1_1-xxl/ with spiece.model, config.json, model.safetensors).
write_tiny_magi_vae(dir): the MAGI-1 VAE architecture (8x spatial, 4x temporal) at a small width with random
weights, saved with the release's config.json and key names. Both load through the same code as the real ones.
"""
from __future__ import annotations

import io
import os

import torch

from .text_t5 import RELEASE_SUBDIR
from .vae_magi import MagiVAE, MagiVAEArch, save_magi_vae

_CORPUS = ["a red ball falls and bounces twice", "a blue square slides to the left",
           "two green balls collide in the middle", "the yellow ball rolls on a gradient background",
           "a purple square rises and stops", "a small orange ball bounces off the wall"]
TINY_MAGI_VAE = dict(video_size=32, video_length=8, patch_size=8, patch_length=4, z_chans=4, embed_dim=256,
                     depth=2, num_heads=4)


def write_tiny_t5(directory: str, d_model: int = 32, seed: int = 0) -> str:
    """Returns the t5_pretrained path (the parent of t5-v1_1-xxl/)."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    target = os.path.join(directory, RELEASE_SUBDIR)
    os.makedirs(target, exist_ok=True)
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS * 20), model_writer=model_bytes, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    with open(os.path.join(target, "spiece.model"), "wb") as f:
        f.write(model_bytes.getvalue())
    torch.manual_seed(seed)
    # 60 pieces + the tokenizer's 100 sentinel tokens <extra_id_*>
    config = T5Config(vocab_size=160, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    T5EncoderModel(config).save_pretrained(target)
    return directory


def write_tiny_magi_vae(directory: str, seed: int = 0, **overrides) -> MagiVAE:
    torch.manual_seed(seed)
    model = MagiVAE(MagiVAEArch(**{**TINY_MAGI_VAE, **overrides}))
    save_magi_vae(model, directory)
    return model
