"""Built-in offline tasks that carry a gold reward, so every method runs with no download."""

from alignkit.registry import Registry
from alignkit.tasks.cipher import CipherTask

TASKS = Registry("task")
TASKS.register("cipher", summary="map letters through a hidden substitution key")(CipherTask)

__all__ = ["TASKS", "CipherTask"]
