"""`treepo bench train`'s held-out curves: the train clock, interpolation at equal budgets, the PNG, the table."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from treepo.trainer import bench
from treepo.trainer.demo import DemoResult, HeldOutCurve
from treepo.trainer.evaluate import EvalResult
from treepo.trainer.plots import plot_comparison


def _result(accuracy: float) -> EvalResult:
    return EvalResult(accuracy, num_problems=4, num_samples=8, stderr=0.1, policy_version=0, wall_s=0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_curve_excludes_evaluation_time_and_accumulates_tokens() -> None:
    clock = FakeClock()
    curve = HeldOutCurve(_result(0.25), clock=clock)

    def slow_eval(accuracy: float):
        def run() -> EvalResult:
            clock.now += 50.0  # an evaluation takes 50 s: none of it is training
            return _result(accuracy)

        return run

    clock.now += 10.0
    curve.add_step({"decoded_tokens": 300})
    clock.now += 10.0
    curve.add_step({"decoded_tokens": 200})
    curve.measure(2, slow_eval(0.5))
    clock.now += 5.0
    curve.add_step({"decoded_tokens": 100})
    curve.measure(3, slow_eval(0.75))

    assert [(p["step"], p["train_s"], p["decoded_tokens"], p["accuracy"]) for p in curve.points] == [
        (0, 0.0, 0, 0.25),
        (2, 20.0, 500, 0.5),
        (3, 25.0, 600, 0.75),
    ]
    assert curve.train_s() == 25.0
    assert curve.points[0]["stderr"] == 0.1


CURVE = [
    {"step": 0, "train_s": 0.0, "decoded_tokens": 0, "accuracy": 0.2},
    {"step": 10, "train_s": 10.0, "decoded_tokens": 1000, "accuracy": 0.4},
    {"step": 20, "train_s": 30.0, "decoded_tokens": 1500, "accuracy": 0.8},
]


@pytest.mark.parametrize(
    ("key", "budget", "expected"),
    [
        ("train_s", 0.0, 0.2),
        ("train_s", 5.0, 0.3),
        ("train_s", 10.0, 0.4),
        ("train_s", 20.0, 0.6),
        ("train_s", 30.0, 0.8),
        ("train_s", 99.0, 0.8),  # clamped at the end
        ("decoded_tokens", 1250, 0.6),
    ],
)
def test_accuracy_at_interpolates_linearly_between_held_out_points(
    key: str, budget: float, expected: float
) -> None:
    assert bench.accuracy_at(CURVE, key, budget) == pytest.approx(expected)


def test_equal_budgets_are_what_every_variant_reached() -> None:
    short = [
        {"step": 0, "train_s": 0.0, "decoded_tokens": 0, "accuracy": 0.2},
        {"step": 20, "train_s": 20.0, "decoded_tokens": 2000, "accuracy": 0.6},
    ]
    results = {"long": {"curve": CURVE}, "short": {"curve": short}}
    assert bench.add_equal_budget_accuracy(results) == (20.0, 1500)
    assert results["long"]["accuracy_at_equal_train_s"] == pytest.approx(0.6)
    assert results["long"]["accuracy_at_equal_tokens"] == pytest.approx(0.8)
    assert results["short"]["accuracy_at_equal_train_s"] == pytest.approx(0.6)
    assert results["short"]["accuracy_at_equal_tokens"] == pytest.approx(0.5)


def test_plot_comparison_writes_two_panel_png(tmp_path: Path) -> None:
    path = plot_comparison({"grpo-seq": CURVE, "treepo": CURVE[:2]}, tmp_path / "c.png", budgets=(10.0, 1000))
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000


def test_run_bench_stores_curves_writes_comparison_png_and_renders_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []

    def fake_run_demo(options):  # the glue only: run_demo itself is tested end to end in test_demo.py
        seen.append(options)
        scale = 2.0 if options.name == "treepo" else 1.0
        curve = [dict(p, train_s=p["train_s"] * scale) for p in CURVE]
        summary = dict.fromkeys(
            ("accuracy_before", "accuracy_after", "accuracy_gain", "tokens_saved_fraction", "train_wall_s"),
            0.5,
        )
        summary.update(tokens_decoded_tree=1500, tokens_independent=3000, wall_s=1.0, steps=20,
                       trees_consumed=9, filtered_prompts=1, curve=curve)  # fmt: skip
        return DemoResult(tmp_path, summary)

    monkeypatch.setattr(bench, "run_demo", fake_run_demo)
    result = bench.run_bench(["grpo-seq", "treepo"], steps=20, seed=0, output_dir=tmp_path, eval_every=10)

    assert [o.eval_every for o in seen] == [10, 10]
    assert Path(result["comparison_png"]).stat().st_size > 10_000
    assert result["equal_train_s"] == 30.0 and result["equal_decoded_tokens"] == 1500
    assert result["variants"]["grpo-seq"]["accuracy_at_equal_train_s"] == pytest.approx(0.8)
    assert result["variants"]["treepo"]["accuracy_at_equal_train_s"] == pytest.approx(
        0.5
    )  # 0.4 + 0.1 at 30 s
    assert result["variants"]["treepo"]["curve"][-1]["train_s"] == 60.0
    console = Console(record=True, width=200)
    console.print(bench.render_table(result))
    text = console.export_text()
    assert "acc at 30 train s" in text and "acc at 1,500 tokens" in text and "comparison.png" in text
