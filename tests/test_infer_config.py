"""Inference config: MAGI-1 example json, our yaml, hydra-style overrides, one-line errors."""
import json

import pytest

from magi_infer.config import load_infer_config
from magi_train.config import ConfigError


def test_magi1_example_json_layout():
    c = load_infer_config("configs/infer/4.5B_base.json")
    m, s = c.model, c.sampler
    assert (m.num_layers, m.hidden_size, m.num_query_groups, m.params_dtype, m.chunk_width) == (34, 3072, 8, "bfloat16", 6)
    assert (s.cfg_number, s.num_steps, s.window_size, s.noise2clean_kvrange, s.clean_chunk_kvrange, s.clean_t) == \
        (3, 64, 4, [5, 4, 3, 2], 1, 0.9999)
    assert s.prev_chunk_scales == [1.5, 1.5, 1.5, 1.0, 1.0] and s.text_scales == [7.5, 7.5, 7.5, 0.0, 0.0]
    assert s.kv_offload and c.t5_device == "cpu" and c.scale_factor == 0.18215 and (c.video_size_h, c.fps) == (720, 24)
    d = load_infer_config("configs/infer/24B_distill_quant.json")
    assert d.model.distill and d.fp8_quant and d.sampler.cfg_number == 1 and d.parallel.cp == 4
    assert d.model.half_channel_vae and d.model.x_rescale_factor == 0.1


def test_overrides_and_flat_json(tmp_path):
    c = load_infer_config("configs/infer/tiny.yaml", ["num_steps=4", "+window_size=1", "model.num_layers=1",
                                                      "noise2clean_kvrange=[]", "cp_strategy=cp_ulysses"])
    assert (c.sampler.num_steps, c.sampler.window_size, c.model.num_layers, c.sampler.noise2clean_kvrange) == (4, 1, 1, [])
    assert c.model.hidden_size == 128   # the rest of the preset stays
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"model": {"preset": "tiny", "chunk_width": 2}, "seed": 7, "num_steps": 8,
                                "sampler": {"shift": 2.0}}))
    c = load_infer_config(str(flat), {"fps": 12})
    assert (c.seed, c.sampler.num_steps, c.sampler.shift, c.fps, c.model.chunk_width) == (7, 8, 2.0, 12, 2)


@pytest.mark.parametrize("override,message", [
    ("windw_size=2", "did you mean window_size"),
    ("cfg_number=4", "cfg_number: got 4"),
    ("cfg_t_range=[0.0,0.5]", "cfg_t_range"),
    ("clean_t=0", "clean_t"),
    ("shortcut_mode=8,16", "shortcut_mode"),
    ("model.num_layerz=1", "model.num_layerz: unknown key"),
    ("noise2clean_kvrange=[5,4,3]", "noise2clean_kvrange"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_infer_config("configs/infer/tiny.yaml", [override])
