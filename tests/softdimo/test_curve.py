"""A training run's curve from its metrics.jsonl: a resume continues the clock, a step logged twice counts once."""

import json

from softdimo.train.curve import curve_table, training_curve


def _log(run_dir, records: list[dict]) -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_resume_whose_clock_restarted_continues_from_its_checkpoint(tmp_path):
    _log(
        tmp_path,
        [
            {"step": 1, "elapsed_s": 60.0, "loss": 1.0},
            {"step": 2, "elapsed_s": 120.0, "loss": 0.9, "pass": 0.5},
            {"step": 3, "elapsed_s": 180.0, "loss": 0.8},  # lost: the run stopped before its next checkpoint
            {"step": 3, "elapsed_s": 30.0, "loss": 0.8, "pass": 0.6},  # resumed from step 2, its clock from zero
            {"step": 4, "elapsed_s": 90.0, "loss": 0.7, "pass": 0.7},
        ],
    )
    assert training_curve(tmp_path) == [
        {"step": 2, "pass": 0.5, "minutes": 2.0},
        {"step": 3, "pass": 0.6, "minutes": 2.0},
        {"step": 4, "pass": 0.7, "minutes": 3.0},
    ]
    assert [r["step"] for r in training_curve(tmp_path, evaluated_only=False)] == [1, 2, 3, 4]
    rows = ["| 2 | 2.0 | 0.500 |", "| 3 | 2.0 | 0.600 |", "| 4 | 3.0 | 0.700 |"]
    assert curve_table(tmp_path).splitlines() == ["| step | minutes | pass |", "|---|---|---|", *rows]


def test_a_resume_whose_clock_went_on_keeps_its_times(tmp_path):
    _log(
        tmp_path,
        [
            {"step": 1, "elapsed_s": 60.0, "pass": 0.1},
            {"step": 2, "elapsed_s": 120.0, "pass": 0.2},
            {"step": 2, "elapsed_s": 150.0, "pass": 0.3},
        ],
    )
    expected = [{"step": 1, "pass": 0.1, "minutes": 1.0}, {"step": 2, "pass": 0.3, "minutes": 2.5}]
    assert training_curve(tmp_path) == expected
    _log(tmp_path, [{"step": 1, "elapsed_s": 60.0, "loss": 1.0}])
    assert curve_table(tmp_path) == f"{tmp_path}: no evaluations logged"
