"""Training data: webdataset shards (raw video or precomputed latents) -> batches of one shape, resumable.

Names load on first use, so that `magi_train.data.video_codec` or `.config` can be imported without torch
(the synthetic world's generator processes only need the codec)."""
from importlib import import_module

_EXPORTS = {
    "DataConfig": "config",
    "ShardLoader": "loader", "build_loader": "loader", "build_validation_loader": "loader",
    "load_index": "shard_format", "read_members": "shard_format", "write_shard": "shard_format",
    "CorruptVideoError": "video_codec", "probe_video": "video_codec", "read_video": "video_codec",
    "write_video": "video_codec",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
