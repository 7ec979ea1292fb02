"""Training components: precision policy and loss scaling, parameter groups, the LR schedule,
crash-safe checkpoints, run directories and the shared end of a step. Recipes own their
forward / loss code and combine these."""

from seekdeep.train.checkpoint import (RUN_FIELDS, TrainingState, latest_checkpoint, load_checkpoint, resume_checkpoint,
                                       resumed_config, save_checkpoint)
from seekdeep.train.evaluation import mean_loss
from seekdeep.train.loop import StepEnd, optimizer_step
from seekdeep.train.precision import (
    DEFAULT_FP32_PATTERNS,
    DynamicLossScaler,
    PrecisionPolicy,
    StaticLossScaler,
    cast_model_for_training,
    param_groups,
)
from seekdeep.train.rundir import RunDirectoryError, prepare_run_dir, publish_dir
from seekdeep.train.schedule import make_scheduler, warmup_cosine

__all__ = [
    "DEFAULT_FP32_PATTERNS",
    "DynamicLossScaler",
    "PrecisionPolicy",
    "RUN_FIELDS",
    "RunDirectoryError",
    "StaticLossScaler",
    "StepEnd",
    "TrainingState",
    "cast_model_for_training",
    "latest_checkpoint",
    "load_checkpoint",
    "make_scheduler",
    "mean_loss",
    "optimizer_step",
    "param_groups",
    "prepare_run_dir",
    "publish_dir",
    "resume_checkpoint",
    "resumed_config",
    "save_checkpoint",
    "warmup_cosine",
]
