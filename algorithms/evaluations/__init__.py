"""Evaluations of a pruned model: the registry and the built-ins.

``EVALUATIONS`` maps a grid section's name to an :class:`~algorithms.evaluations.base.Evaluation`
class (lazy ``module:Class`` entries). Other distributions add evaluations through the entry-point
group ``blockbench.evaluations``; a grid section with the plugin's name turns it on.
"""

from algorithms.evaluations.base import Column, EvalTarget, Evaluation, Params, check_evaluation
from estimators.registry import Registry

EVALUATIONS: Registry[type[Evaluation]] = Registry(
    "evaluation", entry_point_group="blockbench.evaluations", base=Evaluation, check=check_evaluation
)
EVALUATIONS.register("perplexity", "algorithms.evaluations.perplexity:Perplexity")
EVALUATIONS.register("accuracy", "algorithms.evaluations.accuracy:Accuracy")
EVALUATIONS.register("speed", "algorithms.evaluations.speed:Speed")
EVALUATIONS.register("kl", "algorithms.evaluations.kl:KLDivergence")
EVALUATIONS.register("generation", "algorithms.evaluations.generation:Generation")

__all__ = ["EVALUATIONS", "Column", "EvalTarget", "Evaluation", "Params", "check_evaluation"]
