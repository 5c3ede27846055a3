"""Tasks: model families with their data, loss, evaluation and presets (see :mod:`.base`)."""

from alwayssparse.tasks.base import TASKS, Task, register_task

# Registration order is the order of the run config's sections: lm, xl, bert, image.
from alwayssparse.tasks.lm import ByteLMTask, LMConfig  # isort: skip
from alwayssparse.tasks.xl import TransformerXLTask, XLConfig  # isort: skip
from alwayssparse.tasks.bert import BertTask, BertTaskConfig  # isort: skip
from alwayssparse.tasks.image import ImageTask, ImageTaskConfig  # isort: skip

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
