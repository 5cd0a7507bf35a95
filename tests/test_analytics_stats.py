"""The statistics against known values and against statsmodels' implementations."""

from __future__ import annotations

import math

import pytest
from scipy.stats import chi2_contingency, fisher_exact

from dashboards import stats

statsmodels = pytest.importorskip("statsmodels")
from statsmodels.stats.multitest import multipletests  # noqa: E402
from statsmodels.stats.proportion import proportion_confint, proportions_ztest  # noqa: E402


def test_wilson_interval_of_20_of_40() -> None:
    lo, hi = stats.wilson_interval(20, 40)
    assert lo == pytest.approx(0.352, abs=5e-4) and hi == pytest.approx(0.648, abs=5e-4)


@pytest.mark.parametrize("x,n", [(0, 10), (1, 10), (10, 10), (3, 7), (17, 250), (999, 1000),
                                 (0, 1), (1, 1), (123, 4567)])
def test_wilson_matches_statsmodels(x: int, n: int) -> None:
    expected = proportion_confint(x, n, alpha=0.05, method="wilson")
    assert stats.wilson_interval(x, n) == pytest.approx(expected, abs=1e-12)


def test_wilson_edges() -> None:
    assert stats.wilson_interval(0, 0) is None
    assert stats.wilson_interval(0, 10)[0] == 0.0 and stats.wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_two_proportions_20_of_40_against_6_of_40() -> None:
    result = stats.two_proportion_test(20, 40, 6, 40)
    assert result.test == "z" and result.p_value < 0.01
    assert result.p_value == pytest.approx(0.000832, rel=1e-3)  # z = 3.34


@pytest.mark.parametrize("x1,n1,x2,n2", [(20, 40, 6, 40), (120, 1000, 95, 1000),
                                         (50, 200, 50, 200), (400, 900, 300, 1100)])
def test_z_test_matches_statsmodels_and_chi_square(x1: int, n1: int, x2: int, n2: int) -> None:
    result = stats.two_proportion_test(x1, n1, x2, n2)
    _, expected = proportions_ztest([x1, x2], [n1, n2])
    chi2 = chi2_contingency([[x1, n1 - x1], [x2, n2 - x2]], correction=False)
    assert result.test == "z"
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert result.p_value == pytest.approx(chi2.pvalue, rel=1e-9)


@pytest.mark.parametrize("x1,n1,x2,n2", [(3, 10, 23, 40), (1, 50, 6, 40), (0, 30, 4, 30)])
def test_small_expected_counts_use_fisher(x1: int, n1: int, x2: int, n2: int) -> None:
    result = stats.two_proportion_test(x1, n1, x2, n2)
    assert result.test == "fisher"
    assert result.p_value == pytest.approx(fisher_exact([[x1, n1 - x1], [x2, n2 - x2]])[1])


def test_no_difference_and_no_data() -> None:
    assert stats.two_proportion_test(0, 100, 0, 100).p_value == 1.0  # both zero: Fisher, p = 1
    assert stats.two_proportion_test(5, 0, 3, 10) is None


def test_holm_known_values() -> None:
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, None, 0.001]) == [pytest.approx(0.5), None, pytest.approx(0.002)]
    assert stats.holm([]) == [] and stats.holm([None]) == [None]


@pytest.mark.parametrize("p_values", [
    [0.01, 0.04, 0.03, 0.005], [0.2, 0.2, 0.2], [1e-6, 0.049, 0.051, 0.5, 0.9],
    [0.03], [0.6, 0.01, 0.02, 0.03, 0.04, 0.05],
])
def test_holm_matches_statsmodels(p_values: list[float]) -> None:
    reject, adjusted, _, _ = multipletests(p_values, alpha=0.05, method="holm")
    assert stats.holm(p_values) == pytest.approx(list(adjusted))
    assert [p < 0.05 for p in stats.holm(p_values)] == list(reject)


def test_small_sample_rule() -> None:
    assert "29 sends" in stats.small_sample_warning(10, 29)
    assert "4 of 200" in stats.small_sample_warning(4, 200, "replied")
    assert stats.small_sample_warning(196, 200) is not None  # 4 failures
    assert stats.small_sample_warning(5, 30) is None
    assert stats.rate(1, 4) == 0.25 and stats.rate(0, 0) is None
    assert math.isclose(stats.wilson_interval(5, 30)[0], proportion_confint(5, 30,
                                                                            method="wilson")[0])
