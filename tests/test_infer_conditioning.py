"""Chunk-wise prompts, caption length fitting and MAGI-1 special tokens (from a user-supplied .npz)."""
import numpy as np
import pytest
import torch

from magi_infer.conditioning import chunk_captions, fit_caption_length, prompt_of_chunk, special_tokens_from_env

D = 8


def token_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "special_tokens.npz"
    np.savez(path, caption_token=rng.standard_normal((1, D)), logo_token=rng.standard_normal((1, D)),
             other_tokens=rng.standard_normal((20, D)))
    return path, np.load(path)["other_tokens"]


def test_prompt_of_chunk():
    assert prompt_of_chunk([0, 2], 5) == [0, 0, 1, 1, 1]
    assert prompt_of_chunk([0], 3) == [0, 0, 0]
    for bad in ([1], [0, 0], [0, 5]):
        with pytest.raises(ValueError, match="prompt_start_chunks"):
            prompt_of_chunk(bad, 5)


def test_fit_caption_length():
    emb, mask = torch.ones(2, 3, D), torch.ones(2, 3, dtype=torch.bool)
    e, m = fit_caption_length(emb, mask, 5)
    assert e.shape == (2, 5, D) and m.tolist() == [[True] * 3 + [False] * 2] * 2 and e[:, 3:].abs().sum() == 0
    e, m = fit_caption_length(emb, mask, 2)
    assert e.shape == (2, 2, D) and m.shape == (2, 2)


def test_chunk_captions_without_token_file_add_nothing():
    emb = torch.randn(2, 6, D)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :3] = True
    cap, m = chunk_captions(emb, mask, [0, 1], 3, 6, None, ["HQ_TOKEN", "DURATION_TOKEN"])
    assert cap.shape == (1, 3, 6, D)
    assert torch.equal(cap[0, 0], emb[0]) and torch.equal(cap[0, 1], emb[1]) and torch.equal(cap[0, 2], emb[1])


def test_special_tokens_are_prepended_per_chunk(tmp_path):
    path, other = token_file(tmp_path)
    emb = torch.randn(1, 6, D)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[:, :3] = True
    n = 10
    cap, m = chunk_captions(emb, mask, [0], n, 6, str(path), ["HQ_TOKEN", "DURATION_TOKEN"])
    f16 = lambda a: torch.tensor(a, dtype=torch.float32).to(torch.float16).float()  # noqa: E731
    for i in range(n):
        remaining = min(n - i, 8)   # MAGI-1: DURATION_TOKEN_k with k = min(chunks left, 8)
        torch.testing.assert_close(cap[0, i, 0], f16(other[6 + remaining]))   # the last token added comes first
        torch.testing.assert_close(cap[0, i, 1], f16(other[1]))               # HQ_TOKEN
        torch.testing.assert_close(cap[0, i, 2:], emb[0, :4])
        assert m[0, i].tolist() == [True] * 5 + [False]
    with pytest.raises(ValueError, match="special_tokens"):
        chunk_captions(emb, mask, [0], 2, 6, str(path), ["NO_SUCH_TOKEN"])


def test_special_tokens_from_env(monkeypatch):
    for var in ("PAD_HQ", "PAD_DURATION", "PAD_STATIC"):
        monkeypatch.delenv(var, raising=False)
    assert special_tokens_from_env() == []
    monkeypatch.setenv("PAD_HQ", "1")
    monkeypatch.setenv("PAD_DURATION", "1")
    assert special_tokens_from_env() == ["HQ_TOKEN", "DURATION_TOKEN"]
