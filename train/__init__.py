"""Training in PyTorch: backbones, the anomaly models, and the training run folder."""
