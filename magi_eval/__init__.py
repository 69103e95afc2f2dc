"""Evaluation sweeps: checkpoints x sampler settings -> one table, plots and a grid video (python -m magi_eval,
python -m magi_eval.aggregate SWEEP_DIR). The one package that drives both magi_train (metrics, model) and
magi_infer (the sampler pipeline); magi_train itself never imports magi_infer."""
