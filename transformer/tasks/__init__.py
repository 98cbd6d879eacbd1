"""The tasks a run can train (train.py --task): each one's data, batches, loss, evaluation and
report in one module, behind `tasks.base.Task`."""

from transformer.tasks.base import RunView, Task
from transformer.tasks.translate import TranslateConfig, TranslateTask, translation_objective

TASKS: dict[str, type[Task]] = {"translate": TranslateTask}

__all__ = ["TASKS", "RunView", "Task", "TranslateConfig", "TranslateTask", "translation_objective"]
