"""The tasks a run can train (train.py --task): each one's data, batches, loss, evaluation and
report in one module, behind `tasks.base.Task`."""

from transformer.tasks.base import RunView, Task
from transformer.tasks.classify import ClassifyConfig, ClassifyTask
from transformer.tasks.lm import LMConfig, LMTask
from transformer.tasks.mlm import MLMConfig, MLMTask
from transformer.tasks.translate import TranslateConfig, TranslateTask, translation_objective

TASKS: dict[str, type[Task]] = {"translate": TranslateTask, "lm": LMTask, "mlm": MLMTask, "classify": ClassifyTask}

__all__ = ["TASKS", "ClassifyConfig", "ClassifyTask", "LMConfig", "LMTask", "MLMConfig", "MLMTask", "RunView", "Task",
           "TranslateConfig", "TranslateTask", "translation_objective"]
