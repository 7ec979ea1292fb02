"""Knowledge distillation: a shallower student copied from its teacher's layers
(:func:`make_student`) and the temperature-scaled KL + cross-entropy loss
(:func:`distillation_loss`). The training loop is the ``seekdeep distill`` recipe
(:mod:`seekdeep.recipes.distill`)."""

from seekdeep.distill.config import DistillConfig, parse_layers, select_layers
from seekdeep.distill.loss import DistillLoss, distillation_loss
from seekdeep.distill.student import make_student, student_config

__all__ = [
    "DistillConfig",
    "DistillLoss",
    "distillation_loss",
    "make_student",
    "parse_layers",
    "select_layers",
    "student_config",
]
