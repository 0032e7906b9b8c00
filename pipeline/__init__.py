"""Training pipeline for generative image models on Ray Train + DeepSpeed, tracked in MLflow."""

__version__ = "0.1.0"
