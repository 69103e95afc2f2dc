"""Checkpoint code, in one package (import the modules themselves; this file imports nothing, so that the model
and parallel packages can use them without import cycles):

  manager.py         training checkpoints on disk: DCP, written whole or not at all (magi_train.staging), keep the
                     last K, leftovers of a crash, per-rank RNG / data position entries
  training_state.py  the layout-independent format a training run saves (weights, AdamW moments, EMA as shards of
                     canonical tensors) and the reader of the earlier one-process format
  sharded.py         canonical (global) views of any layout's tensors; export to MAGI-1 safetensors from any layout
  magi_format.py     MAGI-1's release format: state-dict names, layouts, shards, the fp8 format
  release_reader.py  a MAGI-1 checkpoint read one tensor at a time (for any layout), and the weights one process
                     draws without a checkpoint
  fit_check.py       a checkpoint checked against the model and the run's config before a resume writes anything
  fallback.py        resume=auto falls back to the newest complete checkpoint that loads
  disk_space.py      writability and free space before a save; ENOSPC as one line"""
