"""Built-in offline tasks that carry a gold reward, so every method runs with no download."""

from alignkit.registry import Registry
from alignkit.tasks.arithmetic import ArithmeticTask
from alignkit.tasks.cipher import CipherTask
from alignkit.tasks.language import LanguageTask

TASKS = Registry("task")
TASKS.register("cipher", summary="map letters through a hidden substitution key")(CipherTask)
TASKS.register("arithmetic", summary="add two numbers; a verifier checks the sum")(ArithmeticTask)
TASKS.register("language", summary="continue a synthetic language; a hidden gold reward scores the words")(LanguageTask)

__all__ = ["TASKS", "ArithmeticTask", "CipherTask", "LanguageTask"]
