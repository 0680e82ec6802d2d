"""structkd inside other libraries' own training loops.

:mod:`structkd.integrations.ultralytics`: ``distill_trainer(teacher, method)`` adds a structkd
method to Ultralytics' ``model.train(...)``. Nothing here imports the other library until used.
"""

from .ultralytics import distill_trainer

__all__ = ["distill_trainer"]
