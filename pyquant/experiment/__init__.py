"""The resource-efficiency study (Selvan et al. 2023, "Operating critical machine learning models in resource
constrained regimes") as a harness: ``pyquant experiment`` runs a grid of (task, model, setting, seed, scale) runs
and writes one JSON record each; ``pyquant report`` turns records into tables and radar plots.

Registries, each extended by name: models (:func:`register_model`, :func:`create_model`), settings
(:func:`register_setting`, :class:`Setting`), optimizers (:func:`register_optimizer`), tasks (:func:`register_task`).
"""

from pyquant.experiment.config import DEFAULTS, PRESETS, expand, load
from pyquant.experiment.metrics import binary_metrics, roc_auc, youden_threshold
from pyquant.experiment.models import MODELS, create_model, list_models, register_model
from pyquant.experiment.records import write_record
from pyquant.experiment.runner import run_grid
from pyquant.experiment.settings import OPTIMIZERS, SETTINGS, Setting, register_optimizer, register_setting, resolve
from pyquant.experiment.single_run import run_one
from pyquant.experiment.tasks import TASKS, TaskData, register_task

__all__ = [
    "DEFAULTS", "MODELS", "OPTIMIZERS", "PRESETS", "SETTINGS", "TASKS", "Setting", "TaskData", "binary_metrics",
    "create_model", "expand", "list_models", "load", "register_model", "register_optimizer", "register_setting",
    "register_task", "resolve", "roc_auc", "run_grid", "run_one", "write_record", "youden_threshold",
]
