"""Built-in cosine-family metrics: ShortGPT's Block Influence and Gromov et al.'s angular distance."""

from __future__ import annotations

from typing import Literal

from estimators import functional as F
from estimators.base import Metric, Tensor
from estimators.checks import check_choice


class _TokenMetric(Metric):
    """Shared option: average over every token (``tokens="all"``) or only each sample's last token."""

    def __init__(self, tokens: Literal["all", "last"] = "all") -> None:
        super().__init__(tokens=check_choice("tokens", tokens, ("all", "last")))
        self.tokens = tokens

    def select_tokens(self, states: Tensor) -> Tensor:
        return states[:, :, -1:, :] if self.tokens == "last" else states

    def stream_kind(self) -> str:
        return "tokens"


class BlockInfluence(_TokenMetric):
    """Block Influence (ShortGPT): 1 - mean cosine of a block's input and output; high = important."""

    name = "bi"
    higher_is_important = True

    def pair(self, x: Tensor, y: Tensor) -> Tensor:
        return F.block_influence(x, y)

    def token_values(self, x: Tensor, y: Tensor) -> Tensor:
        return 1.0 - F.token_cosine(x, y).double()


class AngularDistance(_TokenMetric):
    """Angular distance (Gromov et al.): arccos(cos(x_l, x_l+n)) / pi; high = important."""

    name = "angular"
    higher_is_important = True

    def pair(self, x: Tensor, y: Tensor) -> Tensor:
        return F.angular_distance(x, y)

    def token_values(self, x: Tensor, y: Tensor) -> Tensor:
        return F.token_angles(x, y)
