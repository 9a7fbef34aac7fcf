from __future__ import annotations

import numpy as np
import pytest

from scanner.stats import (
    MAD_CONSISTENCY,
    anomaly_index,
    null_thresholds,
    small_outliers,
    smallest_z,
)


def null_max_index_quantile(count: int, rate: float) -> float:
    return null_thresholds(count, rate).index


def null_reference_index_quantile(count: int, references: int, rate: float) -> float:
    return null_thresholds(count, rate, references).index


def test_anomaly_index_on_hand_made_numbers() -> None:
    # median 10, |x - 10| = [8, 2, 0, 1, 30], MAD = median(...) = 2, scaled MAD = 2 * 1.4826
    values = [2.0, 8.0, 10.0, 11.0, 40.0]
    expected = np.array([8.0, 2.0, 0.0, 1.0, 30.0]) / (2 * MAD_CONSISTENCY)
    np.testing.assert_allclose(anomaly_index(values), expected)
    assert small_outliers(values).tolist() == [True, False, False, False, False]  # 40 is large-side: never flagged


def test_small_outliers_threshold_is_strict() -> None:
    # x0 sits exactly at index 2: median 10, MAD 1 -> scaled 1.4826; 10 - 2 * 1.4826
    values = [10.0 - 2 * MAD_CONSISTENCY, 9.0, 10.0, 11.0, 12.0]
    np.testing.assert_allclose(anomaly_index(values)[0], 2.0)
    assert not small_outliers(values, threshold=2.0)[0]
    assert small_outliers(values, threshold=1.9)[0]


def test_anomaly_index_even_count_uses_mean_of_middle_values() -> None:
    values = [1.0, 3.0, 5.0, 7.0]  # median 4, deviations [3, 1, 1, 3] -> MAD 2
    np.testing.assert_allclose(anomaly_index(values), np.array([3.0, 1.0, 1.0, 3.0]) / (2 * MAD_CONSISTENCY))


def test_anomaly_index_zero_mad() -> None:
    index = anomaly_index([5.0, 5.0, 5.0, 1.0])
    assert index.tolist() == [0.0, 0.0, 0.0, np.inf]
    assert small_outliers([5.0, 5.0, 5.0, 1.0]).tolist() == [False, False, False, True]


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf"), 1.0]])
def test_anomaly_index_rejects_bad_input(bad: list[float]) -> None:
    with pytest.raises(ValueError, match=r"non-empty|finite"):
        anomaly_index(bad)


def test_null_quantile_matches_its_false_positive_rate() -> None:
    threshold = null_max_index_quantile(10, 0.05)
    assert 3.0 < threshold < 5.0  # well above the paper's fixed 2 for 10 classes
    rng = np.random.default_rng(123)  # fresh draws, not the ones it was calibrated on
    hits = sum(bool(small_outliers(rng.standard_normal(10), threshold).any()) for _ in range(4000))
    assert 0.03 < hits / 4000 < 0.07
    assert null_max_index_quantile(10, 0.01) > threshold


def test_heavy_tailed_null_matches_its_false_positive_rate_where_the_normal_one_does_not() -> None:
    """Student-t class sizes (the many-class null): the normal null's threshold flags far more than its 5%, the
    heavy-tailed one about 5%, with all 100 values as the scale and with 16 random references."""
    rng = np.random.default_rng(321)
    for references in (None, 16):
        normal = null_thresholds(100, 0.05, references).index
        heavy = null_thresholds(100, 0.05, references, tail_dof=4.0).index
        assert heavy > normal
        draws = rng.standard_t(4.0, (3000, 100))
        hits = {"normal": 0, "heavy": 0}
        for values in draws:
            reference = None if references is None else np.arange(100) < references
            hits["normal"] += bool(small_outliers(values, normal, reference).any())
            hits["heavy"] += bool(small_outliers(values, heavy, reference).any())
        assert hits["normal"] / 3000 > 0.15
        assert 0.03 < hits["heavy"] / 3000 < 0.075
    with pytest.raises(ValueError, match="tail_dof"):
        null_thresholds(100, 0.05, tail_dof=2.0)


def test_fixed_threshold_two_flags_a_third_of_outlier_free_samples() -> None:
    rng = np.random.default_rng(7)
    hits = sum(bool(small_outliers(rng.standard_normal(10), 2.0).any()) for _ in range(4000))
    assert 0.25 < hits / 4000 < 0.4


@pytest.mark.parametrize(("count", "rate"), [(2, 0.05), (10, 0.0), (10, 1.0)])
def test_null_quantile_rejects_bad_arguments(count: int, rate: float) -> None:
    with pytest.raises(ValueError, match=r"at least 3|false_positive_rate"):
        null_max_index_quantile(count, rate)


def test_reference_sets_the_median_and_mad() -> None:
    # the reference rows [1, 2, 3] have median 10 and MAD 1; rows 0 and 4 are judged against them
    values = [4.0, 9.0, 10.0, 11.0, 100.0, 200.0, 300.0]
    expected = np.abs(np.array(values) - 10.0) / MAD_CONSISTENCY
    np.testing.assert_allclose(anomaly_index(values, [1, 2, 3]), expected)
    mask = np.array([False, True, True, True, False, False, False])
    np.testing.assert_allclose(anomaly_index(values, mask), expected)
    assert small_outliers(values, 3.0, [1, 2, 3]).tolist() == [True] + [False] * 6
    # against all seven (median 11, MAD 7) the 4 is ordinary
    assert not small_outliers(values, 3.0)[0]
    with pytest.raises(ValueError, match="empty"):
        anomaly_index(values, np.zeros(7, dtype=bool))


def test_reference_quantile_matches_its_false_positive_rate_under_a_perfect_screen() -> None:
    """100 outlier-free classes, 16 random references, the screen keeps the 6 smallest: the smallest's index against
    the references' median and MAD exceeds the threshold about as often as promised, and less often when the screen
    ranks imperfectly (a noisy view of each class)."""
    count, references = 100, 16
    threshold = null_reference_index_quantile(count, references, 0.05)
    assert threshold > null_max_index_quantile(count, 0.05)  # a 16-value MAD is noisier than a 100-value one
    rng = np.random.default_rng(5)  # fresh draws
    perfect = noisy = 0
    for _ in range(3000):
        values = rng.standard_normal(count)
        sample = rng.choice(count, references, replace=False)
        for screen_view, counter in ((values, "perfect"), (values + rng.standard_normal(count), "noisy")):
            tested = np.zeros(count, dtype=bool)
            tested[np.argsort(screen_view)[:6]] = True
            tested[sample] = True
            reference = np.isin(np.arange(count), sample)
            hit = bool((tested & small_outliers(values, threshold, reference)).any())
            if counter == "perfect":
                perfect += hit
            else:
                noisy += hit
    assert 0.03 < perfect / 3000 < 0.07
    assert noisy <= perfect


def test_reference_quantile_with_every_value_as_reference_is_the_plain_one() -> None:
    assert null_reference_index_quantile(10, 10, 0.05) == pytest.approx(null_max_index_quantile(10, 0.05))
    assert null_reference_index_quantile(100, 12, 0.05) > null_reference_index_quantile(100, 24, 0.05)


@pytest.mark.parametrize(("count", "references", "rate"), [(10, 2, 0.05), (10, 11, 0.05), (10, 5, 0.0)])
def test_reference_quantile_rejects_bad_arguments(count: int, references: int, rate: float) -> None:
    with pytest.raises(ValueError, match=r"references|false_positive_rate"):
        null_reference_index_quantile(count, references, rate)


def test_smallest_z_on_hand_made_numbers() -> None:
    # the others [4, 5, 6] have mean 5 and sd 1: the 1 sits 4 sds below them
    row, z = smallest_z([5.0, 1.0, 4.0, 6.0])
    assert row == 1
    assert z == pytest.approx(4.0)
    # only rows 0, 2, 3 tested: the smallest of them is 4, against [5, 6] (row 1 is not in the reference)
    row, z = smallest_z([5.0, 1.0, 4.0, 6.0], reference=[0, 2, 3], tested=[0, 2, 3])
    assert row == 2
    assert z == pytest.approx((5.5 - 4.0) / np.std([5.0, 6.0], ddof=1))
    assert smallest_z([3.0, 3.0, 3.0, 1.0]) == (3, float("inf"))
    with pytest.raises(ValueError, match="two values"):
        smallest_z([1.0, 2.0])


def test_joint_thresholds_share_the_false_positive_rate() -> None:
    """Index and z together flag about the promised share of outlier-free draws (fresh ones), the index alone about
    a fifth of it; with index_share 1 there is no z test and the index threshold is the plain quantile."""
    for count, references in ((10, None), (100, 16)):
        joint = null_thresholds(count, 0.05, references, 0.2)
        assert joint.z is not None
        assert joint.index > null_thresholds(count, 0.05, references).index
        assert null_thresholds(count, 0.05, references).z is None
        rng = np.random.default_rng(17)
        either = index_only = 0
        draws = 4000
        for _ in range(draws):
            values = rng.standard_normal(count)
            sample = np.arange(count) if references is None else rng.choice(count, references, replace=False)
            reference = np.isin(np.arange(count), sample)
            tested = reference.copy()
            tested[np.argmin(values)] = True  # a perfect screen keeps the smallest
            by_index = bool((tested & small_outliers(values, joint.index, reference)).any())
            by_z = smallest_z(values, reference, tested)[1] > joint.z
            either += by_index or by_z
            index_only += by_index
        assert 0.03 < either / draws < 0.07
        assert index_only / draws < 0.025


def test_z_test_separates_a_lone_outlier_better_than_the_index_with_ten_values() -> None:
    """The reason for the z test: one value 4 sds below nine others is found more often at the same 5%."""
    joint = null_thresholds(10, 0.05, None, 0.2)
    index_only = null_thresholds(10, 0.05).index
    assert joint.z is not None
    rng = np.random.default_rng(23)
    hits_joint = hits_index = 0
    for _ in range(3000):
        values = rng.standard_normal(10)
        values[0] -= 4.0
        hits_index += bool(small_outliers(values, index_only)[0])
        row, z = smallest_z(values)
        hits_joint += bool(small_outliers(values, joint.index)[0]) or (row == 0 and z > joint.z)
    assert hits_joint > 1.1 * hits_index
