"""Smoke tests of the benchmarks at toy sizes: they run, their results have the promised structure,
and the exact sweep agrees with brute force. No timing assertions (timings are the benchmarks' job)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import (
    BenchResult,
    Check,
    best_ratio,
    calls_per_sample,
    fmt,
    interleaved,
    markdown_table,
    pair_ratio,
)
from benchmarks.__main__ import main as bench_main
from benchmarks.__main__ import parse_budgets
from benchmarks.bench_scoring import ScoringConfig, naive_signals
from benchmarks.bench_scoring import run as run_scoring
from benchmarks.bench_sweep import SweepConfig, tied_scores
from benchmarks.bench_sweep import run as run_sweep
from mia.core.signals import all_signals
from mia.core.thresholds import brute_force_sweep, sweep

TOY_WIDTHS = {"resnet34": 4, "vgg16": 4, "mobilenetv2": 4}


def _quiet(*_):
    pass


# ---------------------------------------------------------------------------------------------
# Helpers


def test_markdown_table_and_fmt():
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    assert fmt(None) == "n/a"
    assert fmt(12345) == "12,345"
    assert fmt(0.000123456) == "0.000123"
    assert fmt(4321.7) == "4,322"


def test_interleaved_counts_every_call_and_ratio():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    times = interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, repeat=3, calls={"b": 4})
    assert calls == {"a": 3, "b": 12}
    assert set(times) == {"a", "b"} and all(len(times[k][c]) == 3 for k in times for c in ("wall", "cpu"))
    fake = {"slow": {"wall": [4.0, 6.0, 9.0]}, "fast": {"wall": [1.0, 2.0, 3.0]}}
    assert pair_ratio(fake, "slow", "fast") == 3.0  # median of 4, 3, 3
    assert best_ratio(fake, "slow", "fast") == 4.0  # fastest of each: 4 / 1
    assert calls_per_sample(lambda: None, min_seconds=0.0) == 1


# ---------------------------------------------------------------------------------------------
# Sweep


def test_tied_scores_have_ties_and_half_members():
    scores, membership = tied_scores(2000, seed=1)
    assert scores.shape == membership.shape == (2000,)
    assert np.unique(scores).size < 2000  # ties
    assert membership.sum() == 1000


@pytest.mark.parametrize("n", [1, 7, 500])
def test_exact_sweep_matches_brute_force_on_tied_scores(n):
    scores, membership = tied_scores(n, seed=n)
    exact, brute = sweep(scores, membership), brute_force_sweep(scores, membership)
    assert exact.best_accuracy == brute.best_accuracy
    assert exact.best_threshold == brute.best_threshold
    np.testing.assert_array_equal(exact.accuracies, brute.accuracies)


def test_sweep_benchmark_full_and_extrapolated():
    full = run_sweep(SweepConfig(sizes=(300, 2000), repeat=1, brute_force_cap_s=60.0), log=_quiet)
    assert isinstance(full, BenchResult) and full.name == "sweep"
    assert [r["n"] for r in full.rows] == [300, 2000]
    for r in full.rows:
        assert not r["brute_force_extrapolated"]
        assert r["same_best_accuracy"] and r["same_accuracy_at_every_candidate_checked"]
        assert r["best_accuracy"] == r["brute_force_best_accuracy"]
        assert r["grid_best_accuracy"] <= r["best_accuracy"]
        assert math.isclose(r["grid_accuracy_loss_pp"], 100 * (r["best_accuracy"] - r["grid_best_accuracy"]))
        for key in ("sweep_cpu_seconds", "brute_force_wall_seconds", "speedup_vs_brute_force_cpu",
                    "speedup_vs_grid_wall"):
            assert r[key] > 0
    assert full.checks == []  # the n = 1e4 target is only judged when n = 1e4 is measured
    assert "| 2,000 |" in full.tables[0]

    capped = run_sweep(SweepConfig(sizes=(10_000,), repeat=1, brute_force_cap_s=0.0, subset=50), log=_quiet)
    (r,) = capped.rows
    assert r["brute_force_extrapolated"] and r["brute_force_candidates_timed"] <= 51
    assert r["same_best_accuracy"] and r["brute_force_best_accuracy"] == r["best_accuracy"]
    assert "extrapolated" in capped.tables[0]
    (check,) = capped.checks
    assert isinstance(check, Check) and isinstance(check.passed, bool) and "extrapolated" in check.measured


# ---------------------------------------------------------------------------------------------
# Scoring


def test_naive_signals_hand_computed():
    # logits [0, 0], label 0: p = (1/2, 1/2); all four seed signals are -log 2 except confidence 1/2.
    out = naive_signals(np.zeros((1, 2), dtype=np.float32), np.array([0]))
    assert out["confidence"][0] == pytest.approx(0.5)
    for name in ("neg_entropy", "neg_modified_entropy", "neg_loss"):
        assert out[name][0] == pytest.approx(-math.log(2))


def test_naive_signals_agree_with_all_signals():
    rng = np.random.default_rng(0)
    logits = 4 * rng.standard_normal((50, 10))
    labels = rng.integers(0, 10, 50)
    naive, fast = naive_signals(logits, labels), all_signals(logits, labels)
    for name, values in naive.items():
        np.testing.assert_allclose(values, fast[name], rtol=1e-10, atol=1e-12)


def test_scoring_benchmark_toy():
    cfg = ScoringConfig(sizes=(32, 64), n=6, widths=TOY_WIDTHS, device="cpu", repeat=1, signal_n=100)
    res = run_scoring(cfg, log=_quiet)
    assert res.name == "scoring"
    model_rows = [r for r in res.rows if "arch" in r]
    assert [(r["arch"], r["size"]) for r in model_rows] == [(a, s) for a in ("resnet34", "vgg16", "mobilenetv2")
                                                            for s in (32, 64)]
    for r in model_rows:
        assert r["width"] == 4 and r["n"] == 6
        assert r["flops_per_record"] > 0 and r["naive_records_per_s"] > 0 and r["project_records_per_s"] > 0
        assert r["speedup"] > 0 and r["naive_peak_fraction"] is None  # no peak on CPU by default
    # 64x64 costs about 4x the FLOPs of 32x32 (adaptive pooling, same weights)
    for a, b in zip(model_rows[::2], model_rows[1::2]):
        assert 3.0 < b["flops_per_record"] / a["flops_per_record"] < 5.0
    sig = res.rows[-1]["signals_only"]
    assert sig["n"] == 100 and sig["max_relative_difference"] < 1e-10
    assert len(res.tables) == 2 and "resnet34 (4)" in res.tables[0]
    (check,) = res.checks
    assert isinstance(check.passed, bool)


def test_scoring_peak_fraction_and_threads():
    import torch

    before = torch.get_num_threads()
    cfg = ScoringConfig(archs=("vgg16",), sizes=(32,), n=4, widths={"vgg16": 4}, device="cpu", repeat=1,
                        signal_n=20, peak_tflops=1.0, threads=2)
    res = run_scoring(cfg, log=_quiet)
    (row,) = [r for r in res.rows if "arch" in r]
    assert row["project_peak_fraction"] == pytest.approx(row["project_tflops"] / 1.0)
    assert res.settings["torch_threads_used"] == 2 and "2 torch thread(s)" in res.tables[0]
    assert torch.get_num_threads() == before  # restored



def test_scoring_benchmark_times_the_bf16_option():
    # on CUDA by default (the targets are the bf16 path's); asked for here, on the CPU's autocast
    cfg = ScoringConfig(archs=("vgg16",), sizes=(32,), n=4, widths={"vgg16": 4}, device="cpu", repeat=1,
                        signal_n=20, peak_tflops=1.0, bf16=True)
    res = run_scoring(cfg, log=_quiet)
    (row,) = [r for r in res.rows if "arch" in r]
    assert row["bf16_records_per_s"] > 0 and row["bf16_peak_fraction"] == pytest.approx(row["bf16_tflops"] / 1.0)
    assert "bf16 rec/s" in res.tables[0] and "bf16 % peak" in res.tables[0]
    assert ScoringConfig(device="cpu").resolved().bf16 is False


@pytest.mark.slow
def test_scoring_benchmark_times_the_compiled_path():
    cfg = ScoringConfig(archs=("vgg16",), sizes=(32,), n=6, widths={"vgg16": 4}, device="cpu", repeat=1,
                        signal_n=20, compile=True)
    res = run_scoring(cfg, log=_quiet)
    (row,) = [r for r in res.rows if "arch" in r]
    assert row["compiled_records_per_s"] > 0 and row["compiled_speedup"] > 0
    assert "compiled rec/s" in res.tables[0]


# ---------------------------------------------------------------------------------------------
# End to end and the CLI


@pytest.mark.slow
def test_end_to_end_on_tiny_bundle(tiny_bundle):
    from benchmarks.bench_end_to_end import EndToEndConfig
    from benchmarks.bench_end_to_end import run as run_e2e

    before = sorted(p.relative_to(tiny_bundle) for p in tiny_bundle.rglob("*"))
    # the seed's method keeps the attacks short; scoring, caching, writing and the children are the same
    cfg = EndToEndConfig(bundle=tiny_bundle, device="cpu", repeat=1, subprocess=True, extra={"method": "seed"})
    res = run_e2e(cfg, log=_quiet)
    assert sorted(p.relative_to(tiny_bundle) for p in tiny_bundle.rglob("*")) == before  # source untouched
    in_process = [r for r in res.rows if r.get("where") == "in-process"]
    assert [r["mode"] for r in in_process] == ["cold", "warm"]
    cold, warm = in_process
    assert cold["victims"] == warm["victims"] == 3
    assert cold["cache_hits"] == 0 and warm["cache_hits"] == 6
    assert warm["files_written"] == cold["files_written"] == 2 * 3 * 3 + 1  # (predictions + scores) x 3 tasks x 3 victims + result.json
    children = [r for r in res.rows if r.get("where") == "child"]
    assert [c["mode"] for c in children] == ["imports only", "cold", "warm", "warm, plots drawn", "warm, plots cached"]
    assert all(c["seconds"] > 0 and c["peak_rss_mib"] > 0 for c in children)
    (check,) = res.checks
    assert check.passed in (True, False)
    assert "`python -m mia run`" in res.tables[0]


def test_cli_sweep_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_main(["--only", "sweep", "--tiny", "--repeat", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "## Machine" in text and "### Threshold sweep" in text and "## Targets" in text
    doc = json.loads(out.read_text())
    assert set(doc["benchmarks"]) == {"sweep"}
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["torch"]
    rows = doc["benchmarks"]["sweep"]["rows"]
    assert [r["n"] for r in rows] == [1_000, 10_000]
    assert all(r["same_best_accuracy"] for r in rows)
    (check,) = doc["benchmarks"]["sweep"]["checks"]
    assert check["target"].startswith("exact sweep >= 100x")


def test_cli_rejects_unknown_benchmark():
    with pytest.raises(SystemExit):
        bench_main(["--only", "sweeps"])


def test_budgets_parse_counts_and_all():
    assert parse_budgets("1,2,all") == (1, 2, None)
    assert parse_budgets(" 8 ") == (8,)
    for bad in ("0", "two", "", "1,-2"):
        with pytest.raises(SystemExit):
            parse_budgets(bad)
    assert parse_budgets("0,2,all", zero=True) == (0, 2, None)  # the precision benchmark's: 0 = no references
    with pytest.raises(SystemExit):
        parse_budgets("-1", zero=True)


def test_training_benchmark_toy():
    from benchmarks.bench_training import DEMO_EPOCHS, DEMO_IMAGES, TrainingConfig, run

    res = run(TrainingConfig(archs=("vgg16",), sizes=(32,), n=16, width=2, device="cpu", k=8), log=lambda _: None)
    (row,) = res.rows
    assert row["images_per_s"] > 0 and row["n"] == 16 and row["width"] == 2
    assert row["k8_demo_minutes"] * 60 == pytest.approx(8 * DEMO_IMAGES * DEMO_EPOCHS / row["images_per_s"])
    assert "training images/s" in res.tables[0]


def test_precision_benchmark_on_the_tiny_bundle(tiny_bundle, tmp_path, monkeypatch):
    from benchmarks.bench_precision import PrecisionConfig, run

    monkeypatch.setenv("MIA_CACHE_DIR", str(tmp_path / "cache"))
    res = run(PrecisionConfig(bundle=tiny_bundle, victims=("vgg16_fashionmnist",), head_sample=8), log=lambda _: None)
    tasks = [r for r in res.rows if "task" in r]
    assert [r["task"] for r in tasks] == ["task1", "task2", "task3"]
    deltas = [r for r in res.rows if "max_abs_logit_delta" in r]
    assert 0 < deltas[0]["max_abs_logit_delta"] < 0.1  # bf16 moves the logits a little
    assert len(res.checks) == 3 and "attack fp32" in res.tables[0]


@pytest.fixture
def bundle_with_two_references(tiny_bundle, copy_bundle, tmp_path, monkeypatch):
    """A copy of the tiny bundle whose vgg16 victim has two reference models (the cache in tmp_path)."""
    from mia.bundle import discover
    from mia.references import ReferenceRecipe, train_references

    monkeypatch.setenv("MIA_CACHE_DIR", str(tmp_path / "cache"))
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    victim = discover(root, victims=["vgg16_fashionmnist"]).victims[0]
    train_references(root, victim, ReferenceRecipe(k=2, epochs=1, batch_size=16, device="cpu"), progress=False)
    return root


@pytest.mark.slow
def test_attacks_benchmark_with_and_without_references(bundle_with_two_references):
    from benchmarks.bench_attacks import AttacksConfig, run

    root = bundle_with_two_references
    res = run(AttacksConfig(bundle=root, device="cpu", victims=("vgg16_fashionmnist",), budgets=(1, 2, None)),
              log=lambda _: None)
    ks = [(r["access"], r["k"]) for r in res.rows if r["attack"].startswith("ours")]
    assert ks == [("posterior", 0), ("label", 0), ("posterior", 1), ("label", 1), ("posterior", 2), ("label", 2)]
    one, two = ([r["training_s"] for r in res.rows if r["k"] == k] for k in (1, 2))
    assert 0 < one[0] < two[0]  # the first model's training time, then both (None repeats K = 2: not reported)
    names = [r["attack"] for r in res.rows if r["k"] == 2 and r["access"] == "posterior"]
    assert names[0].startswith("ours: ") and {"lira_online", "lira_offline", "rmia"} <= set(names)
    assert all(r["training_s"] > 0 for r in res.rows if r["k"] == 2)
    assert all(0 <= r["auc"] <= 1 for r in res.rows)


@pytest.mark.slow
def test_precision_benchmark_with_reference_models(bundle_with_two_references, tiny_bundle):
    from benchmarks.bench_precision import PrecisionConfig, run

    root = bundle_with_two_references
    res = run(PrecisionConfig(bundle=root, victims=("vgg16_fashionmnist",), head_sample=8, budgets=(0, None)),
              log=lambda _: None)
    assert [(r["k"], r["task"]) for r in res.rows if "task" in r] == [(k, f"task{t}") for k in (0, 2) for t in (1, 2, 3)]
    with pytest.raises(SystemExit, match="no reference models"):  # a budget on a bundle without them
        run(PrecisionConfig(bundle=tiny_bundle, victims=("vgg16_fashionmnist",), head_sample=8, budgets=(1,)),
            log=lambda _: None)


def test_the_bf16_peak_is_looked_up_by_the_gpus_name():
    from benchmarks.bench_scoring import bf16_peak_tflops

    assert bf16_peak_tflops("NVIDIA H200") == 989.0 and bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("NVIDIA H200 NVL") == 835.0 and bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and bf16_peak_tflops("Tesla T4") is None


def test_attack_budgets_count_the_distilled_models_first(tmp_path):
    from benchmarks.bench_attacks import _training_seconds

    for folder, seconds in (("v", (10.0, 20.0)), ("v-distilled", (100.0,))):
        (tmp_path / "references" / folder).mkdir(parents=True)
        for j, s in enumerate(seconds):
            (tmp_path / "references" / folder / f"model_{j:03d}.json").write_text(json.dumps({"seconds": s}))
    assert [_training_seconds(tmp_path, "v", k) for k in (1, 2, 3)] == [100.0, 110.0, 130.0]
