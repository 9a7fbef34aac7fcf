"""The data-free maximum-margin test on real models trained at test time: the BadNets model's target is flagged, the
clean model is not; the Gamma null and its order-statistic p-value are checked against known distributions; a model
whose statistic cannot decide raises ``undecidable`` instead of voting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scanner.config import MaxMarginConfig
from scanner.errors import InvalidOptionError, ScanCancelled, UndecidableError
from scanner.max_margin import KEPT_INPUTS, margins, max_margin
from scanner.stats import GammaFit, gamma_fit, largest_p_value
from tests.factories import BadNetsModel

_CPU = torch.device("cpu")
#: fewer steps than the default: the statistics converge within ~150 steps on mnist_cnn (bench/max_margin.py)
_CONFIG = MaxMarginConfig(steps=150)


def test_margin_is_own_logit_minus_the_largest_other() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.5], [1.0, 1.0, -2.0]])
    assert margins(logits, torch.tensor([0, 2, 1])).tolist() == pytest.approx([1.0, -0.5, 0.0])


def test_gamma_fit_recovers_known_parameters() -> None:
    draws = np.random.default_rng(1).gamma(shape=5.0, scale=2.0, size=20_000)
    fit = gamma_fit(draws)
    assert fit.shape == pytest.approx(5.0, rel=0.05)
    assert fit.scale == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("values", [[1.0], [1.0, -2.0, 3.0], [0.0, 1.0], [2.0, 2.0, 2.0], [1.0, math.nan]])
def test_gamma_fit_refuses_what_has_no_gamma(values: list[float]) -> None:
    with pytest.raises(ValueError, match=r"Gamma fit|finite"):
        gamma_fit(values)


def test_p_value_of_the_largest_is_uniform_under_the_null() -> None:
    """With the true null, ``1 - F(max) ** K`` is uniform: about 5% of outlier-free draws fall below 0.05."""
    null = GammaFit(shape=30.0, scale=1.0)
    draws = np.random.default_rng(2).gamma(shape=30.0, scale=1.0, size=(4000, 10))
    p = np.array([largest_p_value(float(row.max()), null, 10) for row in draws])
    assert np.mean(p < 0.05) == pytest.approx(0.05, abs=0.012)
    assert np.mean(p < 0.5) == pytest.approx(0.5, abs=0.03)


def test_tiny_p_values_keep_their_precision() -> None:
    null = GammaFit(shape=30.0, scale=1.0)
    p = largest_p_value(150.0, null, 10)
    assert 0.0 < p < 1e-30
    assert largest_p_value(-1.0, null, 10) == 1.0


def test_backdoored_target_is_flagged(badnets: BadNetsModel) -> None:
    result = max_margin(badnets.model, 10, (1, 28, 28), _CONFIG, device=_CPU, seed=0)
    assert result.flagged_classes == (badnets.target,)
    assert result.largest_class == badnets.target
    assert result.p_values[badnets.target] < _CONFIG.significance
    # the optimised input of the target is a valid image that the model sends to the target with a wide margin
    assert set(result.inputs) == set(range(10))  # up to 16 classes keep their input
    image = result.inputs[badnets.target]
    assert image.shape == (1, 28, 28)
    assert float(image.min()) >= 0.0
    assert float(image.max()) <= 1.0
    with torch.no_grad():
        logits = badnets.model(image[None])
    assert int(logits.argmax()) == badnets.target
    assert float(margins(logits, torch.tensor([badnets.target]))) == pytest.approx(
        result.statistics[badnets.target], rel=1e-4
    )


def test_clean_model_is_not_flagged(clean_model: nn.Module) -> None:
    result = max_margin(clean_model, 10, (1, 28, 28), _CONFIG, device=_CPU, seed=0)
    assert result.flagged_classes == ()
    assert min(result.p_values) >= _CONFIG.significance


def test_same_seed_same_statistics(clean_model: nn.Module) -> None:
    config = MaxMarginConfig(steps=20, starts=2)
    first = max_margin(clean_model, 10, (1, 28, 28), config, device=_CPU, seed=3)
    second = max_margin(clean_model, 10, (1, 28, 28), config, device=_CPU, seed=3)
    assert first.statistics == second.statistics


def test_chunks_give_the_same_statistics_as_one_batch(clean_model: nn.Module) -> None:
    """Classes optimised in chunks (a memory budget) see the same starts as all at once."""
    config = MaxMarginConfig(steps=20, starts=2, patience=1000)
    together = max_margin(clean_model, 10, (1, 28, 28), config, device=_CPU, seed=0)
    chunked = max_margin(
        clean_model, 10, (1, 28, 28), MaxMarginConfig(steps=20, starts=2, patience=1000, max_images_per_forward=6),
        device=_CPU, seed=0,
    )  # fmt: skip
    assert chunked.statistics == pytest.approx(together.statistics, rel=1e-4)
    assert chunked.images_total == together.images_total == 10 * 2 * 20


class _Constant(nn.Module):
    """Logits that do not depend on the input: no class can be made the top class by any image."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :1] * self.weight + torch.full((len(images), 10), self.value)


@pytest.mark.parametrize("value", [0.0, math.nan, math.inf])
def test_a_model_that_gives_no_statistic_is_undecidable(value: float) -> None:
    with pytest.raises(UndecidableError):
        max_margin(_Constant(value), 10, (1, 8, 8), MaxMarginConfig(steps=5, starts=2), device=_CPU)


class _Quantised(nn.Module):
    """A hostile wrapper: the input rounded to 0/1 first, so the logits are piecewise constant (zero gradients)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(torch.round(images))
        return logits


def test_masked_gradients_are_undecidable_not_clean(badnets: BadNetsModel) -> None:
    """Optimising cannot move a model without gradients: its statistics would be those of random images."""
    with pytest.raises(UndecidableError, match="did not respond"):
        max_margin(_Quantised(badnets.model), 10, (1, 28, 28), MaxMarginConfig(steps=40), device=_CPU)


def test_progress_can_cancel(clean_model: nn.Module) -> None:
    def cancel(fraction: float, message: str) -> None:
        raise ScanCancelled("stop")

    with pytest.raises(ScanCancelled):
        max_margin(clean_model, 10, (1, 28, 28), MaxMarginConfig(steps=50), device=_CPU, progress=cancel)
    assert not clean_model.training


@pytest.mark.parametrize(
    "field", [{"starts": 0}, {"steps": 0}, {"lr": 0.0}, {"significance": 1.0}, {"significance": 0.0}, {"patience": 0}]
)
def test_bad_options_are_refused(field: dict[str, float]) -> None:
    with pytest.raises(InvalidOptionError):
        MaxMarginConfig(**field)  # type: ignore[arg-type]


def test_too_few_classes_is_a_value_error(clean_model: nn.Module) -> None:
    with pytest.raises(ValueError, match="at least 5 classes"):
        max_margin(clean_model, 3, (1, 28, 28), _CONFIG, device=_CPU)


def test_many_classes_keep_only_the_largest_classes_inputs() -> None:
    """The report keeps the optimised inputs of the 16 largest margins, not K of them (unbounded memory)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 40)).eval()
    config = MaxMarginConfig(steps=10, starts=2, max_images_per_forward=8)  # 4 classes per chunk: 10 chunks
    result = max_margin(model, 40, (1, 4, 4), config, device=_CPU)
    assert len(result.statistics) == 40
    largest = sorted(range(40), key=lambda k: result.statistics[k], reverse=True)[:KEPT_INPUTS]
    assert sorted(result.inputs) == sorted(largest)
    assert result.largest_class in result.inputs
