"""Training one model: device and precision, the model family, CUDA graphs, the loop and checkpoints.

Never imports tracking, search, analysis or cli: the loop knows nothing of MLflow or Hyperopt.
"""
