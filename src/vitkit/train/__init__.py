"""Training ViTs from scratch: ``train(TrainConfig(...))``, ``resume(run_dir)``, ``load_config(...)``."""

from vitkit.train.config import OptimConfig, TrainConfig, bundled_configs, load_config
from vitkit.train.loop import TrainingDiverged, TrainingInterrupted, resume, train

__all__ = ["OptimConfig", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "bundled_configs",
           "load_config", "resume", "train"]
