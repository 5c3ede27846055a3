"""Tasks: model families with their data, loss and evaluation (see :mod:`.base`)."""

from alwayssparse.tasks.base import TASKS, Task, register_task
from alwayssparse.tasks.lm import ByteLMTask, LMConfig

__all__ = ["TASKS", "ByteLMTask", "LMConfig", "Task", "register_task"]
