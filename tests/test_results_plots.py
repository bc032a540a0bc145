"""Run directory writing/reading (atomic) and the run plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import yaml

import simulator
from simulator import results
from simulator.report import plots
from simulator.metrics import summarize
from simulator.results import (
    RUN_FILES,
    SUMMARY_KEYS,
    RunWriter,
    is_run_dir,
    read_matrix,
    read_run,
)

NAN = np.nan

MATRIX = np.array(
    [
        [0.9123456789, NAN, NAN],
        [0.6, 0.8, NAN],
        [0.3, 0.5, 0.7],
    ]
)


def _metrics(num_tasks: int = 3, rounds: int = 2) -> pd.DataFrame:
    """Per-round long metrics whose last round of each task reproduces MATRIX (rounded)."""
    rows = []
    for k in range(num_tasks):
        for r in range(1, rounds + 1):
            rows.append({"task": k, "round": r, "eval_task": NAN, "accuracy": NAN, "bytes_up": 1000 * r})
            for j in range(k + 1):
                acc = MATRIX[k, j] if r == rounds else MATRIX[k, j] / 2
                rows.append({"task": k, "round": r, "eval_task": j, "accuracy": acc, "bytes_up": NAN})
    return pd.DataFrame(rows)


def _summary(matrix: np.ndarray = MATRIX, **extra) -> dict:
    s = {
        "scenario": "quickstart",
        "strategy": "proto_avg",
        "seed": np.int64(0),
        "engine": "inline",
        "num_tasks": 3,
        "num_clients": 4,
        **summarize(matrix),
        "bytes_up": 12345,
        "bytes_down": 67890,
        "wall_seconds": 1.5,
        "completed": True,
    }
    s.update(extra)
    return s


def _write_run(run_dir: Path, metrics: pd.DataFrame | None = None) -> None:
    w = RunWriter(run_dir)
    w.write_config({"name": "quickstart", "seed": 0, "strategy": {"name": "proto_avg", "params": {"lam": 1.0}}})
    w.write_metrics(_metrics() if metrics is None else metrics)
    w.write_matrix(MATRIX)
    w.write_summary(_summary())


def _all_files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- results
class TestRunWriter:
    def test_directory_created_lazily(self, tmp_path: Path) -> None:
        run_dir = tmp_path / "a" / "b" / "seed-0"
        w = RunWriter(run_dir)
        assert not run_dir.exists()
        w.write_matrix(MATRIX)
        assert (run_dir / "accuracy_matrix.csv").is_file()

    def test_round_trip(self, tmp_path: Path) -> None:
        run_dir = tmp_path / "run"
        metrics = _metrics()
        _write_run(run_dir, metrics)
        assert _all_files(run_dir) == set(RUN_FILES)  # and no temp files left behind

        res = read_run(run_dir)
        assert res.run_dir == run_dir
        assert res.config["strategy"] == {"name": "proto_avg", "params": {"lam": 1.0}}
        assert res.config["seed"] == 0
        pd.testing.assert_frame_equal(res.metrics, metrics, check_dtype=False)
        np.testing.assert_allclose(res.matrix, MATRIX, atol=5e-7, equal_nan=True)
        assert res.matrix[0, 0] == pytest.approx(0.912346)  # 6 decimals
        assert list(res.summary) == list(SUMMARY_KEYS)
        expected = _summary()
        for k in SUMMARY_KEYS:
            assert res.summary[k] == pytest.approx(expected[k]), k

    def test_matrix_csv_format(self, tmp_path: Path) -> None:
        RunWriter(tmp_path).write_matrix(MATRIX)
        lines = (tmp_path / "accuracy_matrix.csv").read_text().splitlines()
        assert lines == [
            "trained_through,task_0,task_1,task_2",
            "0,0.912346,,",
            "1,0.600000,0.800000,",
            "2,0.300000,0.500000,0.700000",
        ]

    def test_matrix_task_names_extra_column(self, tmp_path: Path) -> None:
        RunWriter(tmp_path).write_matrix(MATRIX, task_names=["classes 0,1", "classes 2,3", "classes 4,5"])
        df = pd.read_csv(tmp_path / "accuracy_matrix.csv")
        assert list(df.columns) == ["trained_through", "task_0", "task_1", "task_2", "task_name"]
        assert df["task_name"].tolist()[1] == "classes 2,3"
        np.testing.assert_allclose(read_matrix(tmp_path / "accuracy_matrix.csv"), MATRIX, atol=5e-7, equal_nan=True)
        with pytest.raises(ValueError, match="task_names"):
            RunWriter(tmp_path).write_matrix(MATRIX, task_names=["only one"])
        with pytest.raises(ValueError, match="T x T"):
            RunWriter(tmp_path).write_matrix(np.zeros((2, 3)))

    def test_summary_nan_is_null_and_round_trips_as_nan(self, tmp_path: Path) -> None:
        one = np.array([[0.8]])
        RunWriter(tmp_path).write_summary(_summary(one, num_tasks=1, extra_info={"k": np.float32(0.5)}))
        text = (tmp_path / "summary.json").read_text()
        assert "NaN" not in text and '"avg_forgetting": null' in text and '"bwt": null' in text
        assert text.startswith('{\n  "scenario"')  # indent 2
        raw = json.loads(text)
        assert raw["seed"] == 0 and raw["extra_info"] == {"k": 0.5}
        assert math.isnan(results._read_summary(tmp_path / "summary.json")["bwt"])

    def test_config_has_versions(self, tmp_path: Path) -> None:
        RunWriter(tmp_path).write_config({"name": "x", "seed": np.int64(3), "tasks": {"class_order": (2, 0, 1)}})
        text = (tmp_path / "config.yaml").read_text()
        assert text.index("name:") < text.index("seed:") < text.index("versions:")  # sort_keys=False
        cfg = yaml.safe_load(text)
        assert cfg["seed"] == 3 and cfg["tasks"]["class_order"] == [2, 0, 1]
        v = cfg["versions"]
        assert set(v) >= {"python", "protofed", "flwr", "torch", "ray", "numpy"}
        assert v["protofed"] == simulator.__version__
        assert v["numpy"] == np.__version__
        assert all(isinstance(x, str) and x for x in v.values())

    def test_config_keeps_given_versions(self, tmp_path: Path) -> None:
        RunWriter(tmp_path).write_config({"name": "x", "versions": {"python": "3.0"}})
        assert yaml.safe_load((tmp_path / "config.yaml").read_text())["versions"] == {"python": "3.0"}

    def test_metrics_need_contract_columns(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="eval_task"):
            RunWriter(tmp_path).write_metrics([{"task": 0, "round": 1, "accuracy": 0.5}])
        assert not (tmp_path / "metrics.csv").exists()
        RunWriter(tmp_path).write_metrics([{"task": 0, "round": 1, "eval_task": 0, "accuracy": 0.5, "loss": 0.1}])
        assert pd.read_csv(tmp_path / "metrics.csv").columns.tolist() == ["task", "round", "eval_task", "accuracy", "loss"]

    def test_write_table(self, tmp_path: Path) -> None:
        w = RunWriter(tmp_path)
        w.write_table("clients", pd.DataFrame({"client": [0, 1], "num_samples": [10, 20]}))
        w.write_table("rounds.csv", [{"round": 1, "bytes_up": 5}])
        assert pd.read_csv(tmp_path / "clients.csv")["num_samples"].tolist() == [10, 20]
        assert pd.read_csv(tmp_path / "rounds.csv")["bytes_up"].tolist() == [5]
        for bad in ("../x.csv", "a/b.csv", "", ".hidden"):
            with pytest.raises(ValueError):
                w.write_table(bad, [{"a": 1}])
        assert _all_files(tmp_path) == {"clients.csv", "rounds.csv"}


class TestAtomicity:
    def test_missing_summary_key_leaves_no_file(self, tmp_path: Path) -> None:
        s = _summary()
        del s["bytes_down"], s["completed"]
        with pytest.raises(ValueError, match="bytes_down, completed"):
            RunWriter(tmp_path / "run").write_summary(s)
        assert not (tmp_path / "run" / "summary.json").exists()
        assert not (tmp_path / "run").exists() or _all_files(tmp_path / "run") == set()

    def test_failed_rewrite_keeps_previous_file(self, tmp_path: Path) -> None:
        w = RunWriter(tmp_path)
        w.write_summary(_summary())
        before = (tmp_path / "summary.json").read_bytes()
        with pytest.raises(TypeError):
            w.write_summary(_summary(strange=object()))  # not serialisable
        assert (tmp_path / "summary.json").read_bytes() == before
        assert _all_files(tmp_path) == {"summary.json"}

    def test_failure_during_replace_removes_temp(self, tmp_path: Path, monkeypatch) -> None:
        target = tmp_path / "out.txt"
        target.write_text("old")

        def boom(src, dst):
            raise OSError("disk full")

        monkeypatch.setattr(results.os, "replace", boom)
        with pytest.raises(OSError, match="disk full"):
            results.atomic_write_text(target, "new content")
        assert target.read_text() == "old"
        assert os.listdir(tmp_path) == ["out.txt"]

    def test_atomic_write_creates_parents_and_normal_permissions(self, tmp_path: Path) -> None:
        p = tmp_path / "x" / "y.bin"
        results.atomic_write_bytes(p, b"\x00\x01")
        assert p.read_bytes() == b"\x00\x01"
        umask = os.umask(0)
        os.umask(umask)
        assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)


class TestReading:
    def test_read_run_names_missing_file(self, tmp_path: Path) -> None:
        _write_run(tmp_path)
        (tmp_path / "accuracy_matrix.csv").unlink()
        with pytest.raises(FileNotFoundError, match="accuracy_matrix.csv"):
            read_run(tmp_path)
        with pytest.raises(FileNotFoundError, match="nowhere"):
            read_run(tmp_path / "nowhere")

    def test_is_run_dir(self, tmp_path: Path) -> None:
        assert not is_run_dir(tmp_path)
        assert not is_run_dir(tmp_path / "missing")
        RunWriter(tmp_path).write_metrics(_metrics())
        assert is_run_dir(tmp_path)
        other = tmp_path / "s"
        RunWriter(other).write_summary(_summary())
        assert is_run_dir(other)
        assert not is_run_dir(other / "summary.json")

    def test_read_matrix_rejects_wrong_columns(self, tmp_path: Path) -> None:
        p = tmp_path / "m.csv"
        p.write_text("trained_through,task_0,task_2\n0,0.5,\n1,0.5,0.5\n")
        with pytest.raises(ValueError, match="task_0..task_1"):
            read_matrix(p)


# --------------------------------------------------------------------------- plots
@pytest.fixture
def captured(monkeypatch) -> list[dict]:
    """Record what each saved figure shows (lines, texts, titles) before it is closed."""
    seen: list[dict] = []
    original = plots._save

    def spy(fig, path):
        ax = fig.axes[0]
        seen.append(
            {
                "path": Path(path),
                "lines": {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()},
                "texts": [t.get_text() for t in ax.texts],
                "title": ax.get_title(),
                "suptitle": fig._suptitle.get_text() if fig._suptitle else "",
                "legend": [t.get_text() for lg in fig.legends for t in lg.get_texts()],
                "xlabel": ax.get_xlabel(),
                "ylabel": ax.get_ylabel(),
                "ylim": ax.get_ylim(),
            }
        )
        original(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def _png_size(path: Path) -> tuple[int, int]:
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.std() > 0.05  # not a blank image
    return img.shape[1], img.shape[0]


class TestPlots:
    def test_uses_agg(self) -> None:
        assert matplotlib.get_backend().lower() == "agg"

    def test_plot_run_writes_two_pngs(self, tmp_path: Path, captured) -> None:
        _write_run(tmp_path)
        paths = plots.plot_run(tmp_path)
        assert paths == [tmp_path / "plots" / "forgetting.png", tmp_path / "plots" / "accuracy_matrix.png"]
        assert sorted(os.listdir(tmp_path / "plots")) == ["accuracy_matrix.png", "forgetting.png"]  # no temps
        w, h = _png_size(paths[0])
        assert 900 <= w <= 1300 and 500 <= h <= 720  # 9 x 5 in at 120 dpi
        w, h = _png_size(paths[1])
        assert 600 <= w <= 900 and 500 <= h <= 720  # 6 x 5 in at 120 dpi

        forg, mat = captured
        assert forg["title"] == "quickstart · proto_avg · seed 0"
        assert forg["xlabel"] == "round (tasks trained in order)"
        assert forg["ylabel"] == "accuracy on the task's test set"
        assert forg["ylim"][0] <= 0 and forg["ylim"][1] >= 1
        lines = {k: v for k, v in forg["lines"].items() if not k.startswith("_")}
        assert set(lines) == {"task 0", "task 1", "task 2", "average over seen tasks"}
        assert forg["legend"] == ["task 0", "task 1", "task 2", "average over seen tasks"]
        # 3 tasks x 2 rounds -> global rounds 1..6; task j first evaluated in round 2j+1
        assert lines["task 0"][0] == [1, 2, 3, 4, 5, 6]
        assert lines["task 2"][0] == [5, 6]
        np.testing.assert_allclose(lines["task 2"][1], [0.35, 0.7])
        np.testing.assert_allclose(lines["average over seen tasks"][1][-1], np.mean(MATRIX[2]))
        # two dashed task boundaries, between rounds 2|3 and 4|5
        vlines = [v for k, v in forg["lines"].items() if k.startswith("_")]
        assert sorted(x[0][0] for x in vlines) == [2.5, 4.5]

        assert mat["suptitle"] == "quickstart · proto_avg · seed 0"
        s = summarize(MATRIX)
        assert f"final average accuracy {s['final_avg_accuracy']:.2f}" in mat["title"]
        assert f"average forgetting {s['avg_forgetting']:.2f}" in mat["title"]
        assert sorted(mat["texts"]) == sorted(["0.91", "0.60", "0.80", "0.30", "0.50", "0.70"])  # lower triangle only

    def test_end_of_task_only_metrics(self, tmp_path: Path, captured) -> None:
        metrics = _metrics(rounds=1)
        _write_run(tmp_path, metrics)
        (tmp_path / "accuracy_matrix.csv").unlink()  # rebuilt from metrics.csv
        (tmp_path / "summary.json").unlink()  # title falls back to config.yaml
        paths = plots.plot_run(tmp_path)
        assert all(p.stat().st_size > 10_000 for p in paths)
        forg, mat = captured
        assert forg["title"] == "quickstart · proto_avg · seed 0"
        assert forg["lines"]["task 0"][0] == [1, 2, 3]
        assert forg["lines"]["task 2"][0] == [3]
        assert "0.50" in mat["title"]  # final average accuracy of MATRIX

    def test_task_labels_and_global_round(self, tmp_path: Path, captured) -> None:
        m = _metrics(num_tasks=2)
        m["global_round"] = (m["task"] * 10 + m["round"]).astype(int)
        plots.plot_forgetting(m, tmp_path / "f.png", task_labels={0: [0, 1], 1: "classes 2,3"})
        assert (tmp_path / "f.png").stat().st_size > 10_000
        (c,) = captured
        assert "task 0 (classes 0, 1)" in c["lines"] and "task 1 (classes 2,3)" in c["lines"]
        assert c["lines"]["task 1 (classes 2,3)"][0] == [11, 12]

    def test_single_task_matrix_and_incomplete_matrix(self, tmp_path: Path, captured) -> None:
        plots.plot_accuracy_matrix(np.array([[0.8]]), tmp_path / "one.png")
        inc = MATRIX.copy()
        inc[2, :] = NAN
        plots.plot_accuracy_matrix(inc, tmp_path / "inc.png", title="partial")
        one, partial = captured
        assert "0.80" in one["title"] and "n/a" in one["title"]
        assert "incomplete" in partial["title"] and partial["texts"].count("n/a") == 3
        assert _png_size(tmp_path / "one.png")[0] > 500

    def test_plot_run_without_metrics(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="metrics.csv"):
            plots.plot_run(tmp_path)
