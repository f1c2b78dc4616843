"""Training one model: device and precision, batches, the model family, CUDA graphs, the loop and its hooks,
checkpoints (and their repair from the run's copy), and whether a model fits in memory.

Never imports tracking, search, analysis or cli: the loop knows nothing of MLflow or Hyperopt.
"""
