"""The MAGI-1 DiT and its parts. Build with build_dit(ModelConfig); see dit.MagiDiT.forward for inputs."""
from .attention import caption_cross_attention, chunk_causal_attention
from .chunk_layout import ChunkLayout
from .dit import MagiDiT, build_dit, count_parameters
from .kv_cache import KVCache
from .spec import LayerSpec, LocalSpec
