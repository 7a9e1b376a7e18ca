"""Evaluation tasks: one file per task, each a small `Task` (see `base.py`).

    causal_lm.py   decoders: perplexity, KLD and top-1 agreement against the base, decode speed
    masked_lm.py   encoders with a masked-LM head: pseudo-perplexity and agreement over masked tokens
    embedding.py   encoders without a head: cosine of sentence vectors to the base's, neighbours

A new task is one more file: subclass `Task`, give it a name, its figures and its measuring code,
and `register_task` it; `hubquant eval` picks the first registered task that applies to a
checkpoint (the latest registered first), or the one `EvalSettings.task` names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hubquant.errors import HubquantError

from .base import MB, AgreementBudget, Figure, Label, Task, setting_text
from .causal_lm import CausalLM
from .embedding import Embedding
from .masked_lm import MaskedLM

if TYPE_CHECKING:
    from hubquant.models.checkpoint import Checkpoint

__all__ = [
    "MB",
    "AgreementBudget",
    "Figure",
    "Label",
    "Task",
    "get_task",
    "register_task",
    "registered_tasks",
    "setting_text",
    "task_for",
    "unregister_task",
]

DEFAULT_TASK = "causal-lm"  # results.json files written before the `task` key existed
_TASKS: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Make a task known to the driver and the reports (usable as a class decorator). A task
    registered later is asked first whether it applies, so a plugin can take over a checkpoint
    kind; registering a name again replaces the task of that name.

    Args:
        task: a `Task` subclass with a `name`.
    """
    if not (isinstance(task, type) and issubclass(task, Task)) or not getattr(task, "name", ""):
        raise HubquantError(
            f"{task!r} is not a Task subclass with a name; subclass hubquant.evaluate.tasks.Task"
        )
    _TASKS.pop(task.name, None)
    _TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    """Forget a registered task (a test's, a plugin's)."""
    _TASKS.pop(name, None)


def registered_tasks() -> tuple[type[Task], ...]:
    """Every registered task, in registration order."""
    return tuple(_TASKS.values())


def get_task(name: str | None) -> type[Task]:
    """The task of a name, as results.json's `task` holds it; an unknown or missing name reads as
    the causal-LM task (files written before the key existed).

    Args:
        name: the task's name.
    """
    return _TASKS.get(name or DEFAULT_TASK) or _TASKS[DEFAULT_TASK]


def task_for(checkpoint: Checkpoint, name: str | None = None) -> type[Task]:
    """The task that measures a checkpoint: the one named, or the latest registered that applies.

    Args:
        checkpoint: the resolved checkpoint.
        name: a task's name (`EvalSettings.task`); None: pick by the checkpoint.

    Raises:
        HubquantError: the named task is unknown or does not apply; no task applies.
    """
    if name is not None:
        task = _TASKS.get(name)
        if task is None:
            raise HubquantError(f"--task {name} is unknown; use any of {', '.join(_TASKS)}")
        if not task.applies(checkpoint):
            raise HubquantError(
                f"--task {name} does not apply to {checkpoint.source or checkpoint.folder} "
                f"({checkpoint.family.name}); drop --task to pick the task by the model"
            )
        return task
    for task in reversed(_TASKS.values()):
        if task.applies(checkpoint):
            return task
    raise HubquantError(
        f"no evaluation task applies to {checkpoint.source or checkpoint.folder}; check its config.json"
    )


for _task in (CausalLM, MaskedLM, Embedding):
    register_task(_task)
