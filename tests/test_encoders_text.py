"""Text encoders: T5 through transformers from a local directory built here, the offline hash encoder, the null
caption and special tokens, configs."""
import numpy as np
import pytest
import torch

from magi_train.errors import ConfigError
from magi_train.encoders import (TextEncoderConfig, VAEConfig, build_text_encoder, clean_caption,
                                 configs_from_runtime_keys, is_null_caption, load_special_tokens, null_caption_mask,
                                 prepend_token, substitute_null_caption)
from magi_train.encoders.text_hash import hashed_vector
from magi_train.encoders.tiny_models import write_tiny_t5

CAPTIONS = ["a red ball falls and bounces twice", "a blue square slides to the left",
            "two green balls collide in the middle", "the yellow ball rolls on a gradient background",
            "a purple square rises and stops", "a red square falls and bounces once"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny T5 v1.1-style encoder with a sentencepiece vocabulary trained here, in MAGI-1's layout
    ({t5_pretrained}/t5-v1_1-xxl/ with spiece.model, config.json, weights)."""
    from pathlib import Path
    return Path(write_tiny_t5(str(tmp_path_factory.mktemp("t5_pretrained"))))


@pytest.fixture(scope="module")
def t5(t5_dir):
    return build_text_encoder(TextEncoderConfig(kind="t5", path=str(t5_dir), max_length=40, batch_size=2))


def test_t5_shapes_mask_and_values(t5, t5_dir):
    from transformers import T5EncoderModel, T5Tokenizer

    emb, mask = t5.encode(CAPTIONS[:3])
    assert emb.shape == (3, 40, 32) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert (t5.dim, t5.max_length) == (32, 40)
    directory = str(t5_dir / "t5-v1_1-xxl")
    tokenizer = T5Tokenizer.from_pretrained(directory)
    ids = [tokenizer(c)["input_ids"] for c in CAPTIONS[:3]]
    assert all(i[-1] == 1 for i in ids)  # </s> closes every caption
    assert mask.sum(1).tolist() == [len(i) for i in ids]
    assert all(mask[b, : len(i)].all() and not mask[b, len(i):].any() for b, i in enumerate(ids))
    model = T5EncoderModel.from_pretrained(directory)
    padded = torch.tensor([i + [0] * (40 - len(i)) for i in ids])
    with torch.no_grad():
        expected = model(input_ids=padded, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)


def test_t5_cache_batching_truncation(t5):
    prompts = CAPTIONS + [CAPTIONS[0], "A  RED ball falls and bounces twice"]  # the last two repeat the first
    before = t5.cache_hits
    emb, mask = t5.encode(prompts)  # batch_size 2: four forward passes over the distinct prompts
    assert t5.cache_hits - before >= 2
    torch.testing.assert_close(emb[0], emb[-1])
    torch.testing.assert_close(emb[0], emb[-2])
    one, _ = t5.encode([CAPTIONS[4]])
    torch.testing.assert_close(one[0], emb[4])
    long_emb, long_mask = t5.encode([" ".join(CAPTIONS)])
    assert long_mask.all() and long_emb.shape == (1, 40, 32)


def test_t5_bf16_close_to_fp32(t5, t5_dir):
    bf16 = build_text_encoder(TextEncoderConfig(kind="t5", path=str(t5_dir), max_length=40, dtype="bf16"))
    assert bf16.model.dtype == torch.bfloat16
    a, mask = t5.encode(CAPTIONS[:2])
    b, mask_b = bf16.encode(CAPTIONS[:2])
    assert b.dtype == torch.float32 and torch.equal(mask, mask_b)
    assert (a - b)[mask].abs().max() < 0.1 * a[mask].abs().max()


def test_t5_missing_paths_named(t5_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^T5 directory not found: /nowhere/t5 "):
        build_text_encoder(TextEncoderConfig(kind="t5", path="/nowhere/t5"))
    with pytest.raises(FileNotFoundError, match=r"T5 config not found: .*config.json"):
        build_text_encoder(TextEncoderConfig(kind="t5", path=str(tmp_path)))
    (tmp_path / "config.json").write_text((t5_dir / "t5-v1_1-xxl" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="T5 weights not found in .*model.safetensors"):
        build_text_encoder(TextEncoderConfig(kind="t5", path=str(tmp_path)))
    (tmp_path / "model.safetensors").write_bytes((t5_dir / "t5-v1_1-xxl" / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="T5 tokenizer not found in .*spiece.model"):
        build_text_encoder(TextEncoderConfig(kind="t5", path=str(tmp_path)))
    with pytest.raises(ValueError, match="text_encoder.dim: 64 does not match the T5 checkpoint's d_model=32"):
        build_text_encoder(TextEncoderConfig(kind="t5", path=str(t5_dir), dim=64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_t5_on_another_device(t5_dir):
    gpu = build_text_encoder(TextEncoderConfig(kind="t5", path=str(t5_dir), max_length=16, device="cuda"))
    emb, mask = gpu.encode(CAPTIONS[:2], device="cpu")
    assert emb.device.type == "cpu" and next(gpu.model.parameters()).device.type == "cuda"


def test_hash_encoder_is_fixed_and_discriminative():
    enc = build_text_encoder(TextEncoderConfig(kind="hash"))
    assert (enc.dim, enc.max_length) == (64, 32)
    # Same numbers on every machine and library version: the vectors come from blake2b, not an RNG.
    np.testing.assert_allclose(hashed_vector(0, 4, "w:ball"), [-0.9189, -1.0113, -1.1739, -1.0643], atol=1e-4)
    emb, mask = enc.encode(CAPTIONS)
    again, _ = build_text_encoder(TextEncoderConfig(kind="hash")).encode(CAPTIONS)
    assert torch.equal(emb, again)
    assert mask.sum(1).tolist() == [len(c.split()) + 1 for c in CAPTIONS]  # words + end token
    assert not emb[~mask].any()
    # "red ball ... twice" vs "red square ... once": the differing words are nearly orthogonal
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[5], dim=-1)
    assert cos[2] < 0.5 and cos[6] < 0.5 and cos[0] > 0.99
    pooled = torch.nn.functional.normalize(emb.sum(1), dim=-1)
    similarity = pooled @ pooled.T
    assert similarity[~torch.eye(len(CAPTIONS), dtype=torch.bool)].max() < 0.9
    other_seed, _ = build_text_encoder(TextEncoderConfig(kind="hash", seed=1)).encode(CAPTIONS[:1])
    assert not torch.allclose(other_seed, emb[:1])
    short, short_mask = build_text_encoder(TextEncoderConfig(kind="hash", max_length=4)).encode(CAPTIONS[:1])
    assert short.shape == (1, 4, 64) and short_mask.all()


def test_caption_cleaning():
    # the release's cleaning (T5Embedder.clean_caption, twice): html parsed, '&' dropped as bad punctuation
    assert clean_caption("  A &amp; B\u2014\u201cRed\u201d\n BALL ") == 'a b-"red" ball'
    assert clean_caption("Visit https://example.com/x now!! <b>bold</b> @user #12 photo.jpg") == "visit now!! bold"
    assert clean_caption("this-is-my-cute-cat_on_a-mat") == "this is my cute cat on a mat"
    assert clean_caption("\u4e2d\u6587 A cat, sitting.On the mat:  ok") == "a cat, sitting. on the mat: ok"


def test_null_caption_follows_the_dit():
    emb = torch.randn(3, 60, 8)
    mask = torch.zeros(3, 60, dtype=torch.bool)
    mask[:, :5] = True
    null = torch.randn(60, 8, requires_grad=True)
    out, out_mask = substitute_null_caption(emb, mask, torch.tensor([False, True, False]), null)
    assert torch.equal(out[0], emb[0]) and torch.equal(out[1], null.detach())
    assert out_mask[1, :50].all() and not out_mask[1, 50:].any() and torch.equal(out_mask[2], mask[2])
    out.sum().backward()
    assert null.grad.abs().sum() > 0  # the null caption is learned
    assert null_caption_mask(2, 800).sum().item() == 100
    assert is_null_caption(torch.zeros(2, 7, dtype=torch.bool)).all()
    with pytest.raises(ValueError, match="caption_max_length/caption_channels"):
        substitute_null_caption(emb, mask, torch.tensor([True, False, False]), torch.zeros(59, 8))


def test_special_tokens(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "special_tokens.npz"
    np.savez(path, caption_token=rng.normal(size=(1, 8)), logo_token=rng.normal(size=(1, 8)),
             other_tokens=rng.normal(size=(100, 8)))
    tokens = load_special_tokens(str(path))
    np.testing.assert_allclose(tokens["DURATION_TOKEN_1"].numpy(), np.load(path)["other_tokens"][7:8], rtol=1e-6)
    emb, mask = torch.randn(2, 3, 5, 8), torch.tensor([[1, 1, 0, 0, 0]] * 3).bool().expand(2, 3, 5)
    out, out_mask = prepend_token(emb, mask, tokens["HQ_TOKEN"])
    assert out.shape == emb.shape and torch.equal(out[..., 1:, :], emb[..., :-1, :])
    assert out_mask[0, 0].tolist() == [True, True, True, False, False]


def test_configs_validate_in_one_line():
    with pytest.raises(ConfigError, match=r"^text_encoder.kind: got 'bert', accepted values are 't5', 'hash'$"):
        TextEncoderConfig(kind="bert")
    with pytest.raises(ConfigError, match="text_encoder.path: kind='t5' needs"):
        TextEncoderConfig(kind="t5")
    with pytest.raises(ConfigError, match="vae.temporal_downsample_factor: must be a power of two, got 3"):
        VAEConfig(temporal_downsample_factor=3)
    with pytest.raises(ConfigError, match=r"vae.spatial_overlap: must be in \[0, 1\)"):
        VAEConfig(spatial_overlap=1.0)
    assert TextEncoderConfig(kind="t5", path="x").max_length == 800
    assert VAEConfig(dtype="torch.bfloat16").dtype == "bfloat16"
    text, vae = configs_from_runtime_keys({"t5_pretrained": "/w/t5", "t5_device": "cpu", "vae_pretrained": "/w/vae",
                                           "scale_factor": 0.18215, "temporal_downsample_factor": 4, "fps": 24})
    assert (text.kind, text.path, text.max_length, vae.kind, vae.tile_frames) == ("t5", "/w/t5", 800, "magi", 12)
