"""Tasks: model families with their data, loss and evaluation (see :mod:`.base`)."""

from alwayssparse.tasks.base import TASKS, Task, register_task
from alwayssparse.tasks.bert import BertTask, BertTaskConfig
from alwayssparse.tasks.image import ImageTask, ImageTaskConfig
from alwayssparse.tasks.lm import ByteLMTask, LMConfig
from alwayssparse.tasks.xl import TransformerXLTask, XLConfig

__all__ = [
    "TASKS",
    "BertTask",
    "BertTaskConfig",
    "ByteLMTask",
    "ImageTask",
    "ImageTaskConfig",
    "LMConfig",
    "Task",
    "TransformerXLTask",
    "XLConfig",
    "register_task",
]
