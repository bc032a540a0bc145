"""Metric definitions (DESIGN.md section 5) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from simulator import metrics as M

NAN = np.nan

# A plain 3-task run: everything decays, the max of each column is its diagonal entry.
A3 = np.array(
    [
        [0.9, NAN, NAN],
        [0.6, 0.8, NAN],
        [0.3, 0.5, 0.7],
    ]
)

# 4 tasks built to separate the definitions:
#  - task 0 peaks AFTER its own task (a[1][0] = 0.7 > a[0][0] = 0.5): forgetting must use 0.7
#  - task 1 is best in the LAST row (0.9 > 0.6, 0.5): Chaudhry's max over earlier rows gives -0.3
A4 = np.array(
    [
        [0.5, NAN, NAN, NAN],
        [0.7, 0.6, NAN, NAN],
        [0.4, 0.5, 0.8, NAN],
        [0.2, 0.9, 0.6, 0.9],
    ]
)


class TestThreeTasks:
    def test_average_accuracy_per_step(self) -> None:
        assert M.average_accuracy(A3, 0) == pytest.approx(0.9)
        assert M.average_accuracy(A3, 1) == pytest.approx(0.7)  # (0.6 + 0.8) / 2
        assert M.average_accuracy(A3, 2) == pytest.approx(0.5)  # (0.3 + 0.5 + 0.7) / 3

    def test_final_and_incremental(self) -> None:
        assert M.final_average_accuracy(A3) == pytest.approx(0.5)
        assert M.average_incremental_accuracy(A3) == pytest.approx(0.7)  # (0.9 + 0.7 + 0.5) / 3

    def test_forgetting(self) -> None:
        np.testing.assert_allclose(M.forgetting_per_task(A3), [0.6, 0.3])
        assert M.average_forgetting(A3) == pytest.approx(0.45)

    def test_bwt(self) -> None:
        assert M.backward_transfer(A3) == pytest.approx(-0.45)  # mean(0.3-0.9, 0.5-0.8)

    def test_summarize(self) -> None:
        s = M.summarize(A3)
        assert list(s) == ["final_avg_accuracy", "avg_incremental_accuracy", "avg_forgetting", "bwt"]
        assert s == pytest.approx(
            {"final_avg_accuracy": 0.5, "avg_incremental_accuracy": 0.7, "avg_forgetting": 0.45, "bwt": -0.45}
        )
        assert all(isinstance(v, float) for v in s.values())


class TestFourTasks:
    def test_average_accuracies(self) -> None:
        expected = [0.5, 0.65, 1.7 / 3, 0.65]
        for k, e in enumerate(expected):
            assert M.average_accuracy(A4, k) == pytest.approx(e)
        assert M.final_average_accuracy(A4) == pytest.approx(0.65)
        assert M.average_incremental_accuracy(A4) == pytest.approx(sum(expected) / 4)

    def test_forgetting_uses_max_over_earlier_rows(self) -> None:
        f = M.forgetting_per_task(A4)
        # f_0 = max(0.5, 0.7, 0.4) - 0.2 = 0.5, not the diagonal-based 0.5 - 0.2 = 0.3
        assert f[0] == pytest.approx(0.5)
        # f_1 = max(0.6, 0.5) - 0.9 = -0.3: the last row is NOT part of the max (else it would be 0)
        assert f[1] == pytest.approx(-0.3)
        assert f[2] == pytest.approx(0.2)  # 0.8 - 0.6
        assert f.shape == (3,)
        assert M.average_forgetting(A4) == pytest.approx(0.4 / 3)

    def test_bwt_uses_diagonal(self) -> None:
        # mean(0.2-0.5, 0.9-0.6, 0.6-0.8) = -0.2/3; differs from -average_forgetting here
        assert M.backward_transfer(A4) == pytest.approx(-0.2 / 3)
        assert M.backward_transfer(A4) != pytest.approx(-M.average_forgetting(A4))

    def test_values_above_diagonal_are_ignored(self) -> None:
        b = A4.copy()
        b[0, 3] = 0.99
        b[1, 2] = 0.0
        assert M.summarize(b) == pytest.approx(M.summarize(A4))

    def test_accepts_nested_lists(self) -> None:
        assert M.final_average_accuracy(A4.tolist()) == pytest.approx(0.65)


class TestSingleTask:
    def test_nan_where_undefined(self) -> None:
        a = np.array([[0.8]])
        assert M.final_average_accuracy(a) == pytest.approx(0.8)
        assert M.average_incremental_accuracy(a) == pytest.approx(0.8)
        assert M.forgetting_per_task(a).shape == (0,)
        assert math.isnan(M.average_forgetting(a))
        assert math.isnan(M.backward_transfer(a))
        s = M.summarize(a)
        assert math.isnan(s["avg_forgetting"]) and math.isnan(s["bwt"])
        assert s["final_avg_accuracy"] == pytest.approx(0.8)


class TestValidation:
    @pytest.mark.parametrize(
        "bad, match",
        [
            (np.zeros((2, 3)), "square"),
            (np.zeros(3), "square"),
            (np.zeros((0, 0)), "empty"),
            (np.array([[1.5, NAN], [0.5, 0.5]]), r"\[0, 1\]"),
            (np.array([[-0.1, NAN], [0.5, 0.5]]), r"\[0, 1\]"),
            (np.array([[85.0, NAN], [40.0, 90.0]]), "percentages"),
            (np.array([[0.5, NAN], [0.5, NAN]]), r"a\[1\]\[1\]"),
            (np.array([[0.5, NAN], [NAN, 0.5]]), r"a\[1\]\[0\]"),
            (np.array([[np.inf, NAN], [0.5, 0.5]]), r"\[0, 1\]"),
            ([["a", "b"], ["c", "d"]], "numeric"),
        ],
    )
    def test_rejects(self, bad, match) -> None:
        for fn in (M.final_average_accuracy, M.average_forgetting, M.backward_transfer, M.summarize):
            with pytest.raises(ValueError, match=match):
                fn(bad)

    def test_k_out_of_range(self) -> None:
        with pytest.raises(ValueError, match=r"\[0, 2\]"):
            M.average_accuracy(A3, 3)
        with pytest.raises(ValueError):
            M.average_accuracy(A3, -1)


def _long(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["task", "round", "eval_task", "accuracy"])


class TestMatrixFromLong:
    def test_uses_last_evaluated_round_of_each_task(self) -> None:
        rows = [
            (0, 1, 0, 0.40),
            (0, 2, 0, 0.90),  # last round of task 0
            (1, 1, 0, 0.10),
            (1, 1, 1, 0.10),
            (1, 3, 0, 0.60),  # last evaluated round of task 1 is 3 ...
            (1, 3, 1, 0.80),
            (1, 2, 0, 0.20),
            (1, 2, 1, 0.20),
            (1, 4, NAN, NAN),  # ... a later training-only row (no eval_task) is ignored
            (2, 2, 0, 0.30),
            (2, 2, 1, 0.50),
            (2, 2, 2, 0.70),
            (2, 1, 0, 0.99),
            (2, 1, 1, 0.99),
            (2, 1, 2, 0.99),
        ]
        df = _long(rows).sample(frac=1.0, random_state=3)  # row order must not matter
        np.testing.assert_allclose(M.matrix_from_long(df, 3), A3, equal_nan=True)

    def test_from_csv_with_float_eval_task(self, tmp_path) -> None:
        df = _long([(0, 1, NAN, NAN), (0, 1, 0, 0.5), (1, 1, NAN, NAN), (1, 1, 0, 0.25), (1, 1, 1, 0.75)])
        df["loss"] = 1.0
        df.to_csv(tmp_path / "metrics.csv", index=False)
        back = pd.read_csv(tmp_path / "metrics.csv")
        assert back["eval_task"].dtype == float
        np.testing.assert_allclose(M.matrix_from_long(back, 2), [[0.5, NAN], [0.25, 0.75]], equal_nan=True)

    def test_missing_tasks_stay_nan_and_fail_validation(self) -> None:
        m = M.matrix_from_long(_long([(0, 1, 0, 0.5)]), 2)
        assert m[0, 0] == 0.5 and np.isnan(m[1]).all()
        with pytest.raises(ValueError, match="NaN on or below"):
            M.summarize(m)

    def test_protocol_column(self) -> None:
        df = _long([(0, 1, 0, 0.5), (0, 1, 0, 0.9)])
        df["protocol"] = ["global", "local"]
        assert M.matrix_from_long(df, 1)[0, 0] == 0.5  # global by default
        assert M.matrix_from_long(df, 1, protocol="local")[0, 0] == 0.9

    def test_errors(self) -> None:
        with pytest.raises(ValueError, match="eval_task"):
            M.matrix_from_long(_long([(0, 1, 0, 0.5)]).drop(columns="eval_task"), 1)
        with pytest.raises(ValueError, match="outside"):
            M.matrix_from_long(_long([(0, 1, 0, 0.5), (1, 1, 1, 0.5)]), 1)
        with pytest.raises(ValueError, match="several rows"):
            M.matrix_from_long(_long([(0, 1, 0, 0.5), (0, 1, 0, 0.6)]), 1)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            M.matrix_from_long(_long([(0, 1, 0, 50.0)]), 1)
        with pytest.raises(ValueError, match="num_tasks"):
            M.matrix_from_long(_long([(0, 1, 0, 0.5)]), 0)
