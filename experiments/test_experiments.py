"""
experiments/test_experiments.py: the tests of experiments/ (run with every other test by the
README's `python -m pytest -q`): the comparison's table, statistics and plots; the benchmark; the
stand-ins' sizes; the recipes of docs/scaling.md run as written on tiny stand-ins.
"""
import json
import math
import os
import re
import shlex

import pytest
import torch

import data
import train
from experiments import benchmark, compare, frontier, peer_trl, stand_ins, tasks
from test_sail import FAST, HERE, cache, few_eval_pairs  # noqa: F401  (fixtures)


@pytest.mark.parametrize("module,argv,message", [
    ("compare", ["--compare_methods", "dpo,ppo"], "--compare_methods: unknown 'ppo'"),
    ("compare", ["--compare_seeds", "0"], "--compare_seeds must be >= 1"),
    ("compare", ["--compare_workers", "0"], "--compare_workers must be >= 1"),
    ("compare", ["--compare_betas", "0.1,0"], "--compare_betas '0.1,0': give one or more numbers > 0"),
    ("compare", ["--compare_betas", "-1"], "--compare_betas '-1': give one or more numbers > 0"),
    ("compare", ["--compare_betas", ","], "--compare_betas ',': give numbers separated by commas"),
    ("compare", ["--compare_betas", "0.1,x"], "--compare_betas '0.1,x': give numbers separated by commas"),
    ("compare", ["--compare_kl_budgets", ""], "--compare_kl_budgets '': give one or more numbers > 0"),
    ("benchmark", ["--bench_reps", "0"], "--bench_reps must be >= 1"),
    ("benchmark", ["--bench_batch_size", "0"], "--bench_batch_size must be >= 1"),
    ("benchmark", ["--bench_new_tokens", "0"], "--bench_new_tokens must be >= 1"),
    ("benchmark", ["--bench_variance_steps", "0"], "--bench_variance_steps must be >= 1"),
    ("benchmark", ["--bench_model", "gpt3"], "--bench_model 'gpt3': choose one of embedded, gpt2"),
    ("stand_ins", ["--stand_ins", ""], "--stand_ins: name a directory"),
    ("peer_trl", ["--peer_seeds", "0"], "--peer_seeds must be >= 1"),
    ("peer_trl", ["--peer_timing_reps", "-1"], "--peer_timing_reps must be >= 0"),
    ("tasks", ["--tasks", "review,maze"], "--tasks: unknown 'maze'; choose from review, explore, offpolicy"),
    ("tasks", ["--tasks_samples", "0"], "--tasks_samples must be >= 1"),
    ("tasks", ["--compare_betas", ""], "--compare_betas: give several betas"),
])
def test_bad_experiment_options_are_refused(module, argv, message):
    """Each experiment's own options are checked as train.py's are: one line naming the option."""
    options = {"compare": compare.CompareOptions, "benchmark": benchmark.BenchOptions, "stand_ins": stand_ins.StandInOptions,
               "peer_trl": peer_trl.PeerOptions, "tasks": tasks.TasksOptions}[module]
    with pytest.raises(SystemExit) as refused:
        train.cli(argv, run=lambda *a: pytest.fail("ran"), extra=options)
    assert message in str(refused.value)


def test_compare_rows_change_what_their_suffix_names():
    """A row's name gives its method and settings: the official suffixes on methods with a response
    term only; SAIL-RevKL's on any method."""
    assert compare.compare_row("sail-pr-official-size") == ("sail-pr", dict(response_term="official-size", ties="first"))
    assert compare.compare_row("sail-pp-revkl0.1") == ("sail-pp", dict(revkl=0.1))
    assert compare.compare_row("online-dpo-revkl-proxy") == ("online-dpo", dict(revkl=1e-3, revkl_estimate="proxy"))
    assert compare.compare_row("dpo-official") is None and compare.compare_row("sail-pr-revkl0.2") is None


def test_compare_row_suffixes_are_accepted_only_where_they_mean_what_they_say():
    """-g1 and -gamma0 change SAIL-PR's g and gamma: on sail-pp they would change nothing (the same
    runs under a new name), on mix -gamma0 would keep SAIL-PP's response term and -g1 route with
    probabilities summing past 1; so they are refused there, and accepted on sail-pr (and labelled)."""
    assert compare.compare_row("sail-pr-g1") == ("sail-pr", dict(g=1.0))
    assert compare.compare_row("sail-pr-gamma0-rm512") == ("sail-pr", dict(gamma=0.0, proxy="fit", proxy_pairs=512))
    for row in ("sail-pp-g1", "sail-pp-gamma0", "mix-g1", "mix-gamma0", "mix-g1-rm", "online-dpo-g1"):
        assert compare.compare_row(row) is None, row
    assert compare.compare_row("mix-official") == ("mix", dict(response_term="official", ties="first"))
    with pytest.raises(SystemExit, match="unknown 'mix-g1'.*or sail-pr with -g1, -gamma0"):
        train.cli(["--compare_methods", "online-dpo,mix-g1"], run=lambda *a: pytest.fail("ran"), extra=compare.CompareOptions)


def test_every_compared_row_is_checked_as_train_py_checks_before_any_run(tmp_path):
    """A row whose settings `python train.py` would refuse stops the comparison before its first
    run, one line per problem naming the row, nothing written: here offline DPO with a prompt file
    and a model but no pairs, beside online rows that are fine (sail-pr-g1 routes nothing offline)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    out = tmp_path / "out"
    argv = ["--method", "online-dpo", "--model", str(tmp_path), "--prompts", str(prompts), "--out_dir", str(out),
            "--compare_methods", "online-dpo,dpo,sail-pr-g1", "--compare_seeds", "2"]
    with pytest.raises(SystemExit) as refused:
        train.cli(argv, run=compare.compare, extra=compare.CompareOptions)
    assert str(refused.value).splitlines() == ["error: --compare_methods row dpo: --method dpo trains on offline pairs: give --pairs"]
    assert not out.exists()


def test_a_proxy_runs_label_axis_is_its_gold_labels_not_its_queries(tmp_path):
    """The compare history's label axis (equal-labels section): a proxy run is charged its gold
    labels (its fit pairs and offline pairs), not the proxy's own queries."""
    (tmp_path / "summary.json").write_text(json.dumps({"gold_reward_sft": 0.5, "proxy_reward_sft": 0.4}))
    rows = [{"step": 1, "dt": 0.5, "oracle_queries": 40, "gold_labels": 684},
            {"step": 2, "dt": 0.5, "oracle_queries": 80, "gold_labels": 700, "eval_reward": 1.0, "eval_kl": 2.0, "eval_proxy_reward": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    history = compare.read_run("online-dpo-rm512", 0, tmp_path)["history"]
    assert [h["labels"] for h in history] == [0, 700] and history[1]["seconds"] == 1.0


def test_compare_runs_every_method_and_writes_table_json_plots(tmp_path, cache, few_eval_pairs):
    """`python -m experiments.compare`: every method, from one SFT model, resumable; also checks that
    each --method runs and counts its oracle labels."""
    argv = ["--compare_seeds", "1", "--steps", "2", "--out_dir", str(tmp_path), "--cache_dir", cache, *FAST,
            "--eval_pairs", few_eval_pairs]
    stats = compare.cli(argv, run=compare.compare, extra=compare.CompareOptions)
    root = tmp_path / "compare"
    names = compare.CompareOptions.compare_methods.split(",")
    suffixed = {f"{m}{suffix}" for m in ("sail-pr", "sail-pp") for suffix in compare.ROWS if suffix not in ("-ties-first", "-g1", "-gamma0")}
    assert set(stats) == set(train.METHODS) | suffixed | {"sail-pr-ties-first"} == set(names)
    # 2 steps x 16 pairs: an online SAIL-PR pair costs an online label; a dataset pair (offline DPO or
    # SAIL-DP; a prefix of one stream for every method) the labels its dataset spent on it; SAIL-PP's
    # self-labelled pairs cost none.
    offline = sum(data.make_task(0).pairs[i]["labels"] for i in data.Stream(4096, seed=train.stream_seeds(0)["pair"]).next(32))
    for method, (queries, _) in ((m, stats[m]["oracle_queries"]) for m in stats):
        expected = {"dpo": offline, "sail-dp": offline, "online-dpo": 32, "selm": 32, "xpo": 32}
        assert queries == expected[method] if method in expected else queries < offline, method
    assert offline > 32
    results = (root / "results.md").read_text()
    assert all(f"| {m} |" in results for m in names) and "generated tok/s" in results and "Δ vs online DPO" in results
    report = json.loads((root / "compare.json").read_text())
    assert len(report["runs"]) == len(names) and all(math.isfinite(r["summary"]["gold_reward_final"]) for r in report["runs"])
    for row, term, ties in [("sail-pr-official", "official", "first"), ("sail-pp-official-size", "official-size", "first"),
                            ("sail-pr-official-sign", "official-sign", "first"), ("sail-pr-ties-first", "exact", "first")]:
        c = json.loads((root / f"{row}-seed0" / "config.json").read_text())
        assert (c["method"], c["response_term"], c["ties"]) == (row[:7], term, ties)
    assert report["comparisons"] == []  # one seed: no interval, no test (comparisons are tested by hand)
    for png in compare.PLOTS:
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (root / png).stat().st_size > 10_000
    # Started again, it reuses every finished run instead of training it again.
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/summary.json")}
    compare.cli(argv, run=compare.compare, extra=compare.CompareOptions)
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/summary.json")} == stamps


def test_the_authors_proxy_is_compared_with_the_same_proxy_aligned_directly():
    """With both rows in the table, the misaligned proxy's gold reward minus the aligned one's,
    paired by seed, is one of the table's comparisons (in its Holm family), by hand."""
    def run(row, seed, gold):
        return {"method": row, "seed": seed, "summary": {"gold_reward_final": gold}}
    rows = ["sail-pr", "sail-pr-revkl0.1-proxy", "sail-pr-revkl0.1-proxy-aligned"]
    golds = {"sail-pr": [2.0, 2.1, 1.9], "sail-pr-revkl0.1-proxy": [0.5, 1.0, 0.0], "sail-pr-revkl0.1-proxy-aligned": [2.0, 2.2, 1.8]}
    runs = [run(m, s, g) for m in rows for s, g in enumerate(golds[m])]
    tests = compare.comparisons(runs, rows)
    assert set(tests) == {("sail-pr-revkl0.1-proxy", "sail-pr"), ("sail-pr-revkl0.1-proxy-aligned", "sail-pr"),
                          ("sail-pr-revkl0.1-proxy", "sail-pr-revkl0.1-proxy-aligned")}
    d, half, p, p_holm = tests["sail-pr-revkl0.1-proxy", "sail-pr-revkl0.1-proxy-aligned"]
    assert d == pytest.approx(-1.5) and half == pytest.approx(4.303 * 0.3 / math.sqrt(3)) and p_holm >= p  # d = -1.5, -1.2, -1.8


def point(step, labels, reward, reward_a, reward_b, kl, kl_a, kl_b):
    return dict(step=step, labels=labels, eval_reward=reward, eval_reward_a=reward_a, eval_reward_b=reward_b, eval_kl=kl,
                eval_kl_a=kl_a, eval_kl_b=kl_b)


# One seed's checkpoints (the SFT model, then three evaluations), with each figure on both halves of the prompts
POINTS = [point(0, 0, 0.5, 0.6, 0.4, 0.0, 0.0, 0.0), point(10, 160, 1.0, 1.4, 0.6, 3.0, 2.5, 3.5),
          point(20, 320, 1.5, 1.2, 1.8, 6.0, 6.5, 5.5), point(30, 480, 2.0, 2.1, 1.9, 12.0, 11.0, 13.0)]


def test_the_best_checkpoint_within_a_budget_is_chosen_on_one_half_and_read_on_the_other():
    """Within KL 5 on the choosing half: the SFT model and step 10, whose gold reward there (1.4) is
    the higher; its figure is read on the other half, 0.6 (not step 20's 1.8: its KL on the choosing
    half is 6.5). Within 6.5, step 20 is in but worse on the choosing half (1.2). Labels likewise; the
    earliest of two equals; the envelope is best_within at each budget."""
    assert frontier.best_within(POINTS, 5, "kl") == (0.6, POINTS[1])
    assert frontier.best_within(POINTS, 6.5, "kl")[0] == 0.6
    assert frontier.best_within(POINTS, 11, "kl")[0] == 1.9 and frontier.best_within(POINTS, 1, "kl")[0] == 0.4
    assert frontier.best_within(POINTS, 400, "labels")[0] == 0.6 and frontier.best_within(POINTS, 480, "labels")[0] == 1.9
    equal = POINTS + [point(40, 640, 2.0, 2.1, 0.0, 9.0, 9.0, 9.0)]  # as good on the choosing half as step 30, and within 11
    assert frontier.best_within(equal, 11, "kl")[1]["step"] == 30
    assert frontier.envelope(POINTS, [0, 3, 12], "kl").tolist() == [0.4, 0.6, 1.9]


def test_the_equal_budget_section_pairs_by_seed_with_holm_by_hand():
    """Two rows x 3 seeds, each run one evaluation after the SFT model: row X's best within KL 5 is
    that evaluation's reading-half reward (KL on the choosing half 2), within KL 1 the SFT model's.
    The differences from online DPO by seed, their mean, t-interval and Holm-corrected p, by hand."""
    def run(row, seed, b):
        return {"method": row, "seed": seed, "beta": 0.1, "history": [point(0, 0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0),
                                                                       point(10, 160, b, b, b, 2.0, 2.0, 2.0)]}
    online, other = [1.0, 1.2, 0.9], [1.5, 1.4, 1.6]
    runs = [run("online-dpo", s, v) for s, v in enumerate(online)] + [run("sail-pr", s, v) for s, v in enumerate(other)]
    lines, tests = frontier.budget_section(runs, [1, 5], "kl", "Gold reward at equal KL", compare.interval, compare.t_test, compare.holm)
    d = [0.5, 0.2, 0.7]  # sail-pr minus online DPO, by seed, within KL 5
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert tests["sail-pr@5"]["difference"] == pytest.approx(mean) and tests["sail-pr@5"]["half_width"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert "sail-pr@1" not in tests  # within KL 1 both hold the SFT model alone: 0 by construction, no test
    assert tests["sail-pr@5"]["p_holm"] == tests["sail-pr@5"]["p"]  # a family of one
    assert "### Gold reward at equal KL" in lines and any(line.startswith("| sail-pr | 0.50 ± 0.00 (KL 0)") for line in lines)


def test_a_comparison_is_skipped_only_where_the_sft_model_is_alone_within_the_budget():
    """The skip rule tests what frontier.paired's docstring says: both rows hold *only* the SFT model
    within the budget, every seed (0 by construction). Where both merely *chose* it, with a later
    checkpoint within the budget that is worse on the choosing half, the comparison is a finding of
    the data and is tested (here its differences are all 0: p = 1)."""
    def run(row, seed, b):  # step 10 within KL 5, but worse than the SFT model on the choosing half
        return {"method": row, "seed": seed, "beta": 0.1, "history": [point(0, 0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0),
                                                                       point(10, 160, b, 0.1, b, 2.0, 2.0, 2.0)]}
    runs = [run(row, s, v) for row in ("online-dpo", "sail-pr") for s, v in enumerate([1.0, 1.2, 0.9])]
    _, tests = frontier.budget_section(runs, [1, 5], "kl", "Gold reward at equal KL", compare.interval, compare.t_test, compare.holm)
    assert "sail-pr@1" not in tests  # within KL 1: the SFT model alone
    assert tests["sail-pr@5"]["difference"] == 0.0 and tests["sail-pr@5"]["p"] == 1.0  # chosen, not alone: tested


def test_the_method_by_labeller_interaction_is_paired_by_seed_by_hand():
    """Gold and proxy (-rm) rows of online DPO and SAIL-PR, 3 seeds, one evaluation each after the
    SFT model. A proxy row is compared with online-dpo-rm, a gold row with online-dpo, and the
    interaction is (sail-pr-rm - online-dpo-rm) - (sail-pr - online-dpo) per seed; the three tests
    share one Holm family. Within KL 1 every row holds only the SFT model: no test."""
    def run(row, seed, b):
        return {"method": row, "seed": seed, "beta": 0.1, "history": [point(0, 0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0),
                                                                       point(10, 160, b, b, b, 2.0, 2.0, 2.0)]}
    values = {"online-dpo": [1.0, 1.2, 0.9], "sail-pr": [1.5, 1.4, 1.6], "online-dpo-rm": [0.6, 0.7, 0.55], "sail-pr-rm": [1.3, 1.0, 1.5]}
    runs = [run(row, s, v) for row, vs in values.items() for s, v in enumerate(vs)]
    lines, tests = frontier.budget_section(runs, [1, 5], "kl", "Gold reward at equal KL", compare.interval, compare.t_test, compare.holm,
                                           suffixes=("-rm",))
    assert set(tests) == {"sail-pr@5", "sail-pr-rm@5", "sail-pr-rm@5 interaction"}  # within KL 1: the SFT model alone, no test
    assert tests["sail-pr-rm@5"]["difference"] == pytest.approx((0.7 + 0.3 + 0.95) / 3)  # against online-dpo-rm, not online-dpo
    d = [0.2, 0.1, 0.25]  # (0.7, 0.3, 0.95) under the proxy minus (0.5, 0.2, 0.7) under gold labels
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    x = tests["sail-pr-rm@5 interaction"]
    assert x["difference"] == pytest.approx(mean) and x["half_width"] == pytest.approx(4.303 * sd / math.sqrt(3))
    t = mean / (sd / math.sqrt(3))
    assert x["p"] == pytest.approx(compare.incomplete_beta(1.0, 0.5, 2 / (2 + t * t)))
    p = sorted(v["p"] for v in tests.values())  # Holm over the three: the smallest times 3
    assert min(v["p_holm"] for v in tests.values()) == pytest.approx(min(1.0, 3 * p[0]))
    table = lines[lines.index(next(x for x in lines if x.startswith("Method × labeller"))):]
    assert any(x.startswith("| sail-pr-rm | — | +0.18 [") for x in table)


def test_early_stopping_chooses_on_one_half_and_reads_on_the_other_by_hand():
    """Per seed: the evaluation with the highest gold reward on half a, read on half b, against the
    last evaluation read on half b. Seed 0 chooses step 10 (1.0 on a) and reads 0.8 against the last's
    1.2; seed 1 chooses its last (gain 0); seed 2 step 10 (1.4 against 0.6)."""
    def run(seed, a10, b10, a20, b20):
        return {"method": "online-dpo", "seed": seed, "history": [point(0, 0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0), point(10, 1, 0, a10, b10, 1, 1, 1),
                                                                  point(20, 2, 0, a20, b20, 2, 2, 2)]}
    runs = [run(0, 1.0, 0.8, 0.9, 1.2), run(1, 0.7, 0.9, 1.1, 1.0), run(2, 1.5, 1.4, 1.0, 0.6)]
    steps, chosen, last, (d, h, p, p_holm) = frontier.early_stopping(runs, compare.interval, compare.t_test, compare.holm)["online-dpo"]
    assert steps.tolist() == [10, 20, 10] and chosen.tolist() == [0.8, 1.0, 1.4] and last.tolist() == [1.2, 1.0, 0.6]
    gains = [-0.4, 0.0, 0.8]
    assert d == pytest.approx(sum(gains) / 3) and p == p_holm == pytest.approx(compare.t_test(gains))


def test_compare_over_betas_writes_the_equal_kl_and_equal_labels_sections(tmp_path, cache, few_eval_pairs):
    """--compare_betas: every row at every beta, in its own directory; results.md with both sections,
    compare.json with their comparisons, frontier.png and frontier_labels.png."""
    argv = ["--compare_methods", "online-dpo,sail-pr-g1", "--compare_betas", "0.1,1", "--compare_seeds", "2", "--compare_workers", "1",
            "--steps", "2", "--out_dir", str(tmp_path), "--cache_dir", cache, *FAST, "--eval_every", "1", "--eval_pairs", few_eval_pairs,
            "--compare_kl_budgets", "1,100", "--compare_label_budgets", "2,1000"]
    tests = compare.cli(argv, run=compare.compare, extra=compare.CompareOptions)
    root = tmp_path / "compare"
    assert json.loads((root / "sail-pr-g1-beta1-seed1" / "config.json").read_text())["beta"] == 1.0
    results = (root / "results.md").read_text()
    assert "### Gold reward at equal KL" in results and "### Gold reward at equal gold labels" in results
    assert "### Early stopping (beta 0.1)" in results
    assert set(tests["kl"]) == {"sail-pr-g1@1", "sail-pr-g1@100"}
    assert set(tests["labels"]) == {"sail-pr-g1@1000"}  # within 2 labels (step 1 costs 4) both rows hold the SFT model alone: no test
    for png in ("frontier.png", "frontier_labels.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_under_the_proxy_labeller_says_where_the_gold_reward_peaks(tmp_path, cache, few_eval_pairs):
    """With --proxy, compare adds the over-optimisation section (peak step and KL, the drop from the
    peak paired by seed) and overoptimisation.png; each run's history carries the proxy's reward."""
    from test_sail import PROXY
    argv = ["--compare_methods", "online-dpo,sail-pr", "--compare_seeds", "2", "--compare_workers", "1", "--steps", "4",
            "--eval_every", "2", "--out_dir", str(tmp_path), "--cache_dir", cache, *FAST, "--eval_pairs", few_eval_pairs, *PROXY]
    compare.cli(argv, run=compare.compare, extra=compare.CompareOptions)
    root = tmp_path / "compare"
    results = (root / "results.md").read_text()
    assert "| method | peak step | gold at peak | KL at peak |" in results and "| online-dpo | " in results.split("Over-optimisation")[1]
    assert (root / "overoptimisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((root / "compare.json").read_text())["runs"]
    assert all(len(r["history"]) == 3 and all("eval_proxy_reward" in h for h in r["history"]) for r in runs)
    found = compare.peaks([{**r, "method": r["method"]} for r in runs], ["online-dpo"])["online-dpo"]
    means = [sum(r["history"][k]["eval_reward"] for r in runs if r["method"] == "online-dpo") / 2 for k in range(3)]
    assert found[0] == [0, 2, 4][int(max(range(3), key=lambda k: means[k]))]


def test_intervals_and_paired_differences_by_hand():
    """The 95% Student-t interval: mean ± t(0.975, n - 1) * s / sqrt(n), s with n - 1; the paired
    difference is taken seed by seed, so noise that the runs of one seed share cancels; its t-test's
    p from the incomplete beta; Holm's correction; intervals cut to the figure's range."""
    mean, half = compare.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-12)
    assert compare.interval([2.0]) == (2.0, None)

    def run(method, seed, reward):
        return {"method": method, "seed": seed, "summary": {"gold_reward_final": reward}}

    base = [run("online-dpo", s, r) for s, r in enumerate([0.5, 2.5, 2.0])]
    other = [run("x", s, r) for s, r in enumerate([1.0, 2.0, 3.0])]  # differences 0.5, -0.5, 1.0
    d, half, p = compare.paired_difference(other, base)
    assert (d, half) == pytest.approx((1 / 3, 4.303 * math.sqrt(7 / 12) / math.sqrt(3)), rel=1e-12)
    # t = (1/3) / sqrt(7/36) = 0.7559 with 2 degrees of freedom: p = 1 - t / sqrt(2 + t^2), in closed form for df = 2
    t_stat = (1 / 3) / math.sqrt(7 / 12 / 3)
    assert p == pytest.approx(1 - t_stat / math.sqrt(2 + t_stat ** 2), rel=1e-10)
    shifted = compare.paired_difference([run("y", s, r + 0.2) for s, r in enumerate([0.5, 2.5, 2.0])], base)
    assert shifted[:2] == pytest.approx((0.2, 0.0), abs=1e-12) and shifted[2] < 1e-12  # shared noise cancels
    for t_value, df, two_sided in [(2.776, 4, 0.05), (2.571, 5, 0.05), (4.604, 4, 0.01), (12.706, 1, 0.05)]:  # t tables
        assert compare.incomplete_beta(df / 2, 0.5, df / (df + t_value ** 2)) == pytest.approx(two_sided, abs=2e-4)
    # Holm: the k-th smallest of m p-values times m - k, kept non-decreasing
    assert compare.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5}) == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    # the table's comparisons: each row against online DPO, a suffixed row against its own method's row too
    runs = base + [run("sail-pr", s, r) for s, r in enumerate([1.0, 2.0, 3.0])] + [run("sail-pr-official", s, r)
                                                                                 for s, r in enumerate([0.0, 1.5, 1.0])]
    tests = compare.comparisons(runs, ["online-dpo", "sail-pr", "sail-pr-official"])
    assert set(tests) == {("sail-pr", "online-dpo"), ("sail-pr-official", "online-dpo"), ("sail-pr-official", "sail-pr")}
    raw = {k: compare.paired_difference([r for r in runs if r["method"] == k[0]], [r for r in runs if r["method"] == k[1]])[2]
           for k in tests}
    assert {k: v[3] for k, v in tests.items()} == pytest.approx(compare.holm(raw)) and tests[("sail-pr", "online-dpo")][2] == p
    kl = [0.1, 0.2, 0.1, 0.3, 9.0]  # skewed, >= 0: the t-interval crosses 0, the reported one stops there
    mean, half = compare.interval(kl)
    assert half > mean and compare.clipped_interval(kl, 0.0, math.inf) == pytest.approx((1.94, 0.0, 1.94 + half))
    assert compare.clipped_interval([0.9, 1.0, 0.8], 0.0, 1.0)[2] == 1.0 and compare.clipped_interval([0.5], 0, 1) == (0.5, None, None)


def test_benchmark_measures_sampler_and_step(tmp_path, cache):
    result = benchmark.cli(run=benchmark.benchmark, extra=benchmark.BenchOptions, argv=["--bench_reps", "1", "--bench_variance_steps", "5",
                                                                                      "--out_dir", str(tmp_path), "--cache_dir", cache, "--sft_steps", "40"])
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    assert result["sampler_ms"] > 0 and result["generate_ms"] > 0 and 0.5 < result["sampler_forward_share"] <= 1
    assert set(result["online_step_ms"]) == {"generate", "label", "reference", "policy", "optimizer"}  # the loop's own phases
    assert result["policy_phase_sail_pr_ms"] > 0 and result["policy_phase_online_dpo_ms"] > 0
    assert abs(sum(result["online_step_phase_share"].values()) - 1) < 1e-9
    variance = result["gradient_variance"]  # each baseline at the SFT policy and after 5 steps (--bench_variance_steps)
    assert set(variance) == {f"step{s}_{b}" for s in (0, 5) for b in ("none", "loo-all", "loo")}
    assert all(v["variance"] > 0 and v["mean_norm_sq"] > 0 for v in variance.values())


@pytest.mark.parametrize("name", ["gpt2", "pythia-160m"])
def test_benchmark_of_a_real_configuration_with_random_weights(tmp_path, cache, monkeypatch, name):
    """--bench_model builds the named architecture with random weights, saves it with
    save_pretrained and measures it as a real checkpoint; here at a tiny size of the same kind."""
    from transformers import AutoConfig
    stand_in = stand_ins.STAND_INS[name]
    monkeypatch.setitem(stand_ins.STAND_INS, name, stand_in._replace(vocab=700, sizes={**stand_in.sizes, **stand_ins.TINY[stand_in.arch]}))
    result = benchmark.cli(run=benchmark.benchmark, extra=benchmark.BenchOptions, argv=["--bench_model", name, "--bench_reps", "1", "--bench_batch_size", "2", "--bench_new_tokens", "4",
                        "--out_dir", str(tmp_path), "--cache_dir", cache, "--sft_steps", "40"])
    config = AutoConfig.from_pretrained(os.path.join(cache, f"bench-{name}-random"))
    assert config.model_type == stand_in.arch and config.vocab_size == 700
    assert (result["model"], result["rows"], result["new_tokens"], result["gradient_variance"]) == (name, 4, 4, None)
    assert result["sampler_ms"] > 0 and result["tokens_per_second"]["generated"] > 0 and result["peak_memory_gb"] > 0


# The recipes of docs/scaling.md, exactly as written, on tiny stand-ins of their models and files

def readme_recipes():
    """The arguments of each recipe's `python train.py ...` command in docs/scaling.md."""
    text = open(os.path.join(HERE, "docs", "scaling.md"), encoding="utf-8").read()
    blocks = re.findall(r"\*\*Recipe \d.*?```bash\n(.*?)```", text, re.S)
    return [shlex.split(b.replace("\\\n", " "))[2:] for b in blocks]


@pytest.fixture(scope="module")
def tiny_stand_ins(tmp_path_factory):
    return stand_ins.write_stand_ins(str(tmp_path_factory.mktemp("stand_ins")), tiny=True)


def test_the_stand_ins_have_the_published_sizes():
    """Built on the meta device (no memory): the parameter counts of the checkpoints they stand in for."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    published = {"gpt2": 124.44e6, "gpt2-medium": 354.82e6, "pythia-160m": 162.32e6, "pythia-410m": 405.33e6,
                 "distilbert-imdb": 66.96e6, "reward-model-deberta-v3-large-v2": 435.06e6}
    for name, count in published.items():
        tokenizer, config = stand_ins.stand_in_config(name)
        with torch.device("meta"):
            auto = AutoModelForSequenceClassification if stand_ins.STAND_INS[name].labels else AutoModelForCausalLM
            model = auto.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(count, rel=2e-3), name
        assert len(tokenizer) == config.vocab_size, name  # every id the model can emit or read decodes
    reward_tokenizer = stand_ins.stand_in_config("distilbert-imdb", tiny=True)[0]
    ids = reward_tokenizer("<unused5><unused7> the", "review")["input_ids"]  # [CLS] a [SEP] b [SEP]: one token per word
    assert len(ids) == 3 + 1 + 3 and ids[0] == reward_tokenizer.cls_token_id and reward_tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("recipe,archs", [(0, ("gpt2", "distilbert")), (1, ("gpt_neox", "deberta-v2"))])
def test_the_readme_recipes_run_as_written_on_tiny_stand_ins(tmp_path, tiny_stand_ins, recipe, archs):
    """Each recipe's command with the hub ids and files swapped for stand-ins of the same
    architectures (and one step, one held-out sample each): it trains and saves its policy."""
    from transformers import AutoConfig
    argv = [tiny_stand_ins.get(a, a) for a in readme_recipes()[recipe]]
    assert sum(a in tiny_stand_ins.values() for a in argv) >= 3  # the models and the data files were swapped
    # Flags added after the command override its own (--steps, --out_dir), as on the command line.
    cfg = train.parse_args(argv + ["--steps", "1", "--eval_samples", "1", "--out_dir", str(tmp_path / "out")])
    assert (cfg.steps, cfg.eval_samples, cfg.out_dir) == (1, 1, str(tmp_path / "out"))
    summary = train.main(cfg)
    assert (AutoConfig.from_pretrained(cfg.model).model_type, AutoConfig.from_pretrained(cfg.reward_model).model_type) == archs
    assert summary["oracle_queries"] > 0 and math.isfinite(summary["gold_reward_final"]) and summary["peak_memory_gb"] > 0
    assert AutoConfig.from_pretrained(tmp_path / "out" / "policy").model_type == archs[0]


# ---------------------------------------------------------------------------------------------
# peer_trl.py without TRL: the settings it passes, its seed, its tables, the one-line error

def test_trl_gets_the_projects_settings_where_its_defaults_differ():
    """OnlineDPOConfig's arguments from train.py's defaults: the learning rate at a constant
    schedule (TRL: 5e-7, linear decay), fp32 and no gradient checkpointing (TRL: bf16, on),
    temperature 1 (TRL: 0.9), 24 new tokens (TRL: 64), 16 prompts x 2 completions, no
    accumulation, dropout off, no missing-EOS penalty, sampling from the whole vocabulary."""
    cfg = train.parse_args([])
    got = peer_trl.trl_settings(cfg, 0, "out")
    assert {k: got[k] for k in ("learning_rate", "lr_scheduler_type", "bf16", "fp16", "gradient_checkpointing", "temperature", "max_new_tokens",
                                "per_device_train_batch_size", "gradient_accumulation_steps", "disable_dropout", "missing_eos_penalty",
                                "top_k", "top_p", "beta", "max_steps", "max_grad_norm", "weight_decay", "loss_type")} == \
        dict(learning_rate=5e-4, lr_scheduler_type="constant", bf16=False, fp16=False, gradient_checkpointing=False, temperature=1.0,
             max_new_tokens=24, per_device_train_batch_size=16, gradient_accumulation_steps=1, disable_dropout=True, missing_eos_penalty=None,
             top_k=0, top_p=1.0, beta=[0.1], max_steps=150, max_grad_norm=1.0, weight_decay=0.0, loss_type="sigmoid")
    assert got["max_length"] == cfg.max_prompt_len + cfg.max_new_tokens and got["seed"] == got["data_seed"] == peer_trl.trl_seed(0)


def test_trls_seed_comes_from_the_root_seed_and_shares_no_stream():
    seeds = [peer_trl.trl_seed(s) for s in range(5)]
    streams = {v % 2 ** 32 for s in range(5) for v in train.stream_seeds(s).values()}
    assert len(set(seeds)) == 5 and not set(seeds) & streams and peer_trl.trl_seed(3) == peer_trl.trl_seed(3)


def test_the_peer_table_pairs_each_row_with_trls_by_seed_by_hand():
    """Two seeds: the project minus TRL per seed, their mean and t-interval (df 1: t = 12.706),
    Holm over the table's 4 figures x 1 row."""
    fig = lambda g, w, kl, rk: dict(gold_reward_final=g, win_rate_vs_sft=w, kl=kl, reverse_kl=rk)
    rows = {"project online DPO": [fig(2.8, 0.95, 6.0, 13.0), fig(2.9, 0.94, 7.0, 14.0)],
            "TRL OnlineDPOTrainer": [fig(2.7, 0.95, 6.5, 19.0), fig(2.6, 0.93, 5.5, 20.0)]}
    lines, tests = peer_trl.quality_table(rows)
    gold = tests["project online DPO gold_reward_final"]
    assert gold["difference"] == pytest.approx(0.2) and gold["half_width"] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert tests["project online DPO reverse_kl"]["difference"] == pytest.approx(-6.0) and tests["project online DPO reverse_kl"]["p"] == 0.0
    assert gold["p_holm"] == pytest.approx(min(1.0, 3 * gold["p"]))  # the 2nd smallest of 4 (reverse_kl's p is 0): times 3
    assert lines[2].startswith("| project online DPO | 2.850 ± ") and lines[4].startswith("| project online DPO − TRL, paired by seed | +0.200 [")
    timing = peer_trl.timing_table({"TRL": [(120.0, {"generate": 80.0, "tokens sampled": 300}), (130.0, {"generate": 90.0, "tokens sampled": 380})]})
    assert timing[2] == "| TRL | 120, 130 | 125 | generate 85 | 340 | 0.250 |"


def test_peer_trl_without_trl_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "trl", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "trl.experimental.online_dpo", None)
    with pytest.raises(SystemExit, match="pip install -r experiments/requirements-peer.txt"):
        peer_trl.import_trl()


@pytest.mark.parametrize("argv,name", [(["--lora_rank", "4"], "--lora_rank"), (["--proxy", "fit"], "--proxy"),
                                       (["--weight_decay", "0.1"], "--weight_decay"), (["--grad_accum", "2"], "--grad_accum")])
def test_peer_trl_refuses_options_it_does_not_pass_to_trl(argv, name):
    """An option TRL's side would silently ignore is refused in one line, before TRL is even imported."""
    with pytest.raises(SystemExit, match=f"error: experiments/peer_trl.py does not pass {name} to TRL"):
        train.cli(argv, run=peer_trl.peer, extra=peer_trl.PeerOptions)


def test_each_tasks_best_response_scores_the_maximum_on_every_prompt():
    from plumbing.tasks import TASKS
    from reward import subject_of
    for name, make in TASKS.items():
        task = make(0)
        assert {task.gold(p, tasks.BEST_RESPONSE[name](subject_of(p))) for p in task.eval_prompts + task.train_prompts} == {4.0}


def test_the_tasks_table_cells_by_hand():
    found = {"sail-pr@2": {"difference": 0.5, "half_width": 0.2, "p": 0.001, "p_holm": 0.01},
             "sail-pr@5": {"difference": -0.25, "half_width": 0.5, "p": 0.3, "p_holm": 0.6}}
    assert tasks.verdicts(found, [2, 5, 10], ["sail-pr"]) == {"sail-pr": ["+0.50 [+0.30, +0.70] *", "-0.25 [-0.75, +0.25]", "—"]}


def test_the_tasks_driver_measures_each_task_and_compares_its_rows(tmp_path, cache):
    """One task (offpolicy: its SFT model trained here, 40 steps), two rows x two betas x two seeds of 2 steps:
    the measured properties (its offline responses less likely than the SFT model's own samples), the
    comparison in OUT/offpolicy/compare, tasks.md with both tables, and tasks.png."""
    argv = ["--tasks", "offpolicy", "--tasks_samples", "1", "--compare_methods", "online-dpo,sail-pr-g1", "--compare_betas", "0.1,1",
            "--compare_seeds", "2", "--compare_workers", "1", "--steps", "2", "--out_dir", str(tmp_path), "--cache_dir", cache,
            "--sft_batch_size", "16", *FAST, "--eval_every", "1", "--compare_kl_budgets", "1,100", "--compare_label_budgets", "1000"]
    results = train.cli(argv, run=tasks.run_tasks, extra=tasks.TasksOptions)
    m = results["offpolicy"]["measured"]
    assert m["samples"] == 64 and m["best_response"] == 4.0 and m["logp_offline"] < m["logp_own"]  # the openers: less likely
    assert set(results["offpolicy"]["tests"]["kl"]) == {"sail-pr-g1@1", "sail-pr-g1@100"}
    assert (tmp_path / "offpolicy" / "compare" / "results.md").is_file()
    assert (tmp_path / "tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "tasks.md").read_text()
    assert "| offpolicy | " in table and "## Δ gold reward against online DPO at equal KL" in table and "| offpolicy | sail-pr-g1 |" in table
    assert json.loads((tmp_path / "tasks.json").read_text())["tasks"]["offpolicy"]["measured"] == m
    runs = json.loads((tmp_path / "offpolicy" / "compare" / "compare.json").read_text())["runs"]
    assert results["offpolicy"]["minutes"] == pytest.approx(sum(r["summary"]["seconds"] for r in runs) / 60)


def test_a_tasks_table_cell_is_starred_where_holms_p_is_below_005():
    def test(p, p_holm):
        return {"difference": 0.1, "half_width": 0.05, "p": p, "p_holm": p_holm}

    cells = tasks.verdicts({"a@1": test(0.01, 0.07), "b@1": test(0.01, 0.049), "c@1": test(0.01, 0.05)}, [1], ["a", "b", "c"])
    assert [c[0].endswith(" *") for c in cells.values()] == [False, True, False]


def test_the_measured_properties_by_hand(monkeypatch):
    """Two held-out prompts x 2 samples scored 3, 1 (pizza) and 4, 2 (soup): gold 2.5, half in the top band,
    the half-width over the prompts' means; the best response scored on every prompt (the least kept);
    the own samples drawn on the offline pairs' prompts, and the offline responses chosen and rejected."""
    from types import SimpleNamespace
    task = SimpleNamespace(eval_prompts=["Describe the pizza:", "Describe the soup:"],
                           pairs=[{"prompt": "P1", "chosen": "c1", "rejected": "r1"}, {"prompt": "P2", "chosen": "c2", "rejected": "r2"}],
                           gold=lambda p, y: float(y) if y[0].isdigit() else (4.0 if "pizza" in p else 3.0))
    sampled, encoded = [], []
    seeds = []
    monkeypatch.setattr(tasks, "sample_batches", lambda m, tok, prompts, cfg, dev, g: seeds.append(g.initial_seed()) or sampled.append(list(prompts)) or [prompts])
    monkeypatch.setattr(tasks.data, "decode", lambda tok, ids, mask: ["3", "1", "4", "2"])
    monkeypatch.setattr(tasks.data, "encode_responses", lambda tok, p, y, *a: encoded.append((p, y)) or (torch.zeros(1),))
    monkeypatch.setattr(tasks, "token_logp", lambda m, batches, d: 0.0)
    m = tasks.properties(train.parse_args(["--task", "explore", "--task_seed", "3", "--seed", "5"]), task, None, None, torch.device("cpu"), 2)
    import numpy as np
    assert seeds == [int(np.random.SeedSequence(3).generate_state(1)[0])] * 2  # the task's seed, not the run's: one stream
    assert m["gold_sft"] == 2.5 and m["top_band_share"] == 0.5 and m["best_response"] == 3.0
    assert m["gold_sft_half"] == pytest.approx(1.96 * 0.5 ** 0.5 / 2 ** 0.5)  # the prompts' means 2 and 3: std 0.707, over sqrt(2)
    assert sampled[1] == ["P1", "P1", "P2", "P2"] and encoded == [(["P1", "P1", "P2", "P2"], ["c1", "r1", "c2", "r2"])]


def test_token_logp_is_per_response_token(monkeypatch):
    monkeypatch.setattr(tasks, "sequence_logps_of", lambda m, ids, attn, resp: -resp.sum(1).float())  # -1 per response token
    b = (torch.zeros(2, 5), torch.ones(2, 5), torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]))
    assert tasks.token_logp(None, [b, b], torch.device("cpu")) == -1.0


def test_the_tasks_property_row_by_hand():
    opts = tasks.TasksOptions(compare_kl_budgets="1", compare_label_budgets="10")
    m = {"samples": 512, "gold_sft": 1.0, "gold_sft_half": 0.1, "top_band_share": 0.5, "best_response": 4.0, "logp_own": -2.0,
         "logp_offline": -5.0}
    lines = tasks.summary_lines({"explore": {"measured": m, "tests": {"kl": {}, "labels": {}}, "rows": ["online-dpo", "sail-pr"],
                                             "wall": 60.0, "minutes": 2.0}}, opts)
    assert "| explore | 1.00 ± 0.10 | 50.0% | 4 | -2.00 | -5.00 | -3.00 |" in lines
    m.update(top_band_count=9, sft_texts=20000, sft_top=857, pairs=4096, labels=6974, tie_share=0.413, chosen_top=633)
    review = {**m, "top_band_count": 15}
    lines = tasks.summary_lines({name: {"measured": x, "tests": {"kl": {}, "labels": {}}, "rows": ["online-dpo"], "wall": 1.0, "minutes": 1.0}
                                 for name, x in (("review", review), ("explore", m))}, opts)
    assert "\nexplore against review, SFT samples in the top band: 9 of 512 against 15 of 512, Fisher's exact p = 0.3." in lines
    assert "| explore | 857 of 20000 (4.3%) | 4096 | 6974 | 41.3% | 633 (15.5%) |" in lines


def test_paired_skips_a_pair_of_rows_only_when_both_hold_the_sft_model_alone_at_every_seed():
    found = {("a", 2): {0: (1.0, {}), 1: (2.0, {})}, ("b", 2): {0: (0.5, {}), 1: (0.7, {})}}
    both = [[1.0, 0.5], [2.0, 0.7]]
    for a_alone, b_alone, expected in [
            ({0: True, 1: True}, {0: True, 1: False}, both),   # b has a later checkpoint within the budget at seed 1: tested
            ({0: True, 1: True}, {0: False, 1: False}, both),  # one row alone is a finding, not a construction: tested
            ({0: True, 1: True}, {0: True, 1: True}, None)]:   # both alone at every seed: 0 by construction, not tested
        assert frontier.paired(found, {("a", 2): a_alone, ("b", 2): b_alone}, 2, ["a", "b"]) == expected


def test_a_task_against_the_review_task_is_paired_by_seed_in_one_family_by_hand():
    """Two tasks x three rows x 3 seeds, one evaluation each after the SFT model. The interaction is
    (row - online DPO) on the task minus the same on the review task, per seed; a row whose runs are
    the same on both tasks (reads no offline pair) is '≡ 0', untested; the task's family holds its
    rows against online DPO and its interactions, Holm over them together."""
    def run(row, seed, b):
        return {"method": row, "seed": seed, "beta": 0.1, "history": [point(0, 0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0),
                                                                       point(10, 160, b, b, b, 2.0, 2.0, 2.0)]}
    values = {"review": {"online-dpo": [1.0, 1.2, 0.9], "dpo": [0.8, 1.0, 0.6], "sail-pr-g1": [1.1, 1.0, 1.3]},
              "offpolicy": {"online-dpo": [1.0, 1.2, 0.9], "dpo": [0.6, 0.7, 0.55], "sail-pr-g1": [1.1, 1.0, 1.3]}}
    runs = {task: [run(row, s, v) for row, vs in rows.items() for s, v in enumerate(vs)] for task, rows in values.items()}
    crossed = tasks.interactions(runs, "offpolicy", [1, 5], "kl")
    assert set(crossed) == {"dpo@5", "sail-pr-g1@5"}  # within KL 1: the SFT model alone everywhere, no test
    assert crossed["dpo@5"] == pytest.approx([-0.2, -0.3, -0.05]) and crossed["sail-pr-g1@5"] == [0.0, 0.0, 0.0]
    _, vs = frontier.budget_section(runs["offpolicy"], [1, 5], "kl", "t", compare.interval, compare.t_test, compare.holm)
    family = tasks.task_family(vs, crossed)
    assert family["sail-pr-g1@5 x review"] == {"identical": True}
    assert set(family) == {"dpo@5", "sail-pr-g1@5", "dpo@5 x review", "sail-pr-g1@5 x review"}
    p = {k: v["p"] for k, v in family.items() if "p" in v}
    assert {k: family[k]["p_holm"] for k in p} == pytest.approx(compare.holm(p))  # three tested, one family
    assert family["dpo@5 x review"]["difference"] == pytest.approx(-0.55 / 3)
    cells = tasks.verdicts(family, [1, 5], ["dpo", "sail-pr-g1"], " x review")
    assert cells["sail-pr-g1"] == ["—", "≡ 0 (the same runs)"] and cells["dpo"][1].startswith("-0.18 [")


def test_each_seeded_mistake_of_exercise_8_still_applies_to_train_py():
    """experiments/exercise_mistakes.py's edits are text replacements of train.py: each must find
    its text exactly once, so that the script seeds what it says (running it takes minutes)."""
    from experiments import exercise_mistakes as m

    for name, edits in [*m.MISTAKES.items(), ("correct", m.CORRECT_OTHER_ORDER)]:
        assert m.seeded(edits) != open(os.path.join(m.HERE, "train.py")).read(), name


def test_an_interaction_is_the_same_runs_only_when_every_seeds_difference_is_zero():
    """'≡ 0' drops an interaction from Holm's family: only when the runs are the same on both tasks
    (every seed's difference exactly 0); one seed at exactly 0 is a difference like any other."""
    crossed = {"a@5": [0.0, -0.2, 0.1], "b@5": [0.0, 0.0, 0.0], "c@5": [-0.1, -0.3, -0.2]}
    family = tasks.task_family({}, crossed)
    assert family["b@5 x review"] == {"identical": True}
    assert family["a@5 x review"]["difference"] == pytest.approx(-0.1 / 3) and family["c@5 x review"]["difference"] == pytest.approx(-0.2)
    p = {k: compare.t_test(crossed[k.removesuffix(" x review")]) for k in ("a@5 x review", "c@5 x review")}
    assert {k: family[k]["p_holm"] for k in p} == pytest.approx(compare.holm(p))  # both tested, one family
    cells = tasks.verdicts(family, [5], ["a", "b"], " x review")
    assert cells["a"][0].startswith("-0.03 [") and cells["b"] == ["≡ 0 (the same runs)"]


def test_a_finished_run_made_by_other_code_is_moved_aside_and_rerun(tmp_path, capsys):
    """compare reuses a finished run only when summary.json's code digest is this code's (or when
    asked: --compare_reuse any); another's, or none recorded, is moved to OUT.code-DIGEST, nothing lost."""
    from plumbing import outputs
    cfg = train.parse_args(["--out_dir", str(tmp_path / "run"), "--steps", "3"])

    def made_by(code):
        os.makedirs(cfg.out_dir, exist_ok=True)
        outputs.open_metrics(cfg, 0).close()  # config.json, as the run wrote it
        (tmp_path / "run" / "summary.json").write_text(json.dumps({"steps": 3, **({"code": code} if code else {})}))

    made_by(outputs.CODE)
    assert compare.finished(cfg) and compare.finished(cfg, "any")
    made_by({**outputs.CODE, "digest": "0123456789abcdef"})
    assert compare.finished(cfg, "any")  # kept when asked
    assert not compare.finished(cfg) and not (tmp_path / "run").exists()
    assert json.loads((tmp_path / "run.code-0123456789ab" / "summary.json").read_text())["code"]["digest"] == "0123456789abcdef"
    assert "made by other code (0123456789ab); moved aside" in capsys.readouterr().out
    made_by(None)  # a run from before runs recorded their code
    assert not compare.finished(cfg) and (tmp_path / "run.code-unrecorded" / "summary.json").exists()
    made_by({**outputs.CODE, "digest": "0123456789abcdef"})  # moved aside again: the first is not overwritten
    assert not compare.finished(cfg) and (tmp_path / "run.code-0123456789ab.2" / "summary.json").exists()
    runs = [{"summary": {"code": outputs.CODE}}, {"summary": {"code": outputs.CODE}}, {"summary": {}}]
    line = compare.code_line(runs)
    assert line.startswith(f"Made by code {outputs.CODE['digest'][:12]} (") and ": 2 runs; code not recorded" in line


def test_what_each_tasks_texts_hold_is_what_docs_tasks_md_says():
    """data_properties recomputed on every task (exact, no model) and pinned: docs/tasks.md's figures
    are these, and a change to a task's texts that moves them fails here."""
    import plumbing.tasks  # noqa: F401  (registers explore and offpolicy)
    found = {name: tasks.data_properties(data.TASKS[name](0)) for name in ("review", "explore", "offpolicy")}
    pinned = {"review": (5344, 23.4, 393, 698), "explore": (6974, 41.3, 633, 857), "offpolicy": (5344, 23.4, 393, 698)}
    doc = open(os.path.join(HERE, "docs", "tasks.md"), encoding="utf-8").read()
    for name, (labels, tie, chosen, sft) in pinned.items():
        m = found[name]
        assert (m["pairs"], m["labels"], m["sft_texts"], m["chosen_top"], m["sft_top"]) == (4096, labels, 20000, chosen, sft), name
        assert round(100 * m["tie_share"], 1) == tie, name
        row = f"| {name} | {sft} of 20000 ({sft / 200:.1f}%) | 4096 | {labels} | {tie:.1f}% | {chosen} ({100 * chosen / 4096:.1f}%) |"
        assert row in doc, row


def test_fisher_exact_by_hand():
    """Two-sided: 9 of 512 against 15 of 512 (explore's and review's SFT samples in the top band) is p = 0.30;
    a table and its mirror give one p; 0 of 3 against 3 of 3 is 2 / 20."""
    from math import comb
    assert tasks.fisher_exact(9, 512, 15, 512) == pytest.approx(0.3017, abs=1e-4) == tasks.fisher_exact(15, 512, 9, 512)
    assert tasks.fisher_exact(0, 3, 3, 3) == pytest.approx(2 / comb(6, 3))
    assert tasks.fisher_exact(2, 4, 2, 4) == pytest.approx(1.0)


def test_exercise_8s_blanks_keep_each_signature_and_lose_nothing(tmp_path, monkeypatch):
    """--blank PART: each of the part's functions keeps its signature, gets a docstring that says what
    it returns (not the reference's) and raises NotImplementedError, its comments gone; every other
    function is untouched; the untouched train.py is saved once, so a second part keeps the first's work."""
    import ast
    from experiments import exercise_mistakes as ex
    text = open(os.path.join(HERE, "train.py")).read()
    before = {n.name: n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
    for part, names in ex.PARTS.items():
        out = ex.blanked(text, names)
        after = {n.name: n for n in ast.parse(out).body if isinstance(n, ast.FunctionDef)}
        assert after.keys() == before.keys()
        for name, node in after.items():
            if name in names:
                assert ast.get_docstring(node) == ast.get_docstring(ast.parse(f'def f():\n    """{ex.QUESTIONS[name]}"""').body[0])
                assert ast.dump(node.args) == ast.dump(before[name].args) and len(node.body) == 2 and isinstance(node.body[1], ast.Raise)
            else:
                assert ast.dump(node) == ast.dump(before[name]), name
        assert "# 1. Route each pair" not in out or part != "B"
    (tmp_path / "train.py").write_text(text)
    monkeypatch.setattr(ex, "HERE", str(tmp_path))
    ex.blank("A")
    mine = (tmp_path / "train.py").read_text().replace('raise NotImplementedError("exercise 8: write coefficients")', "return 1")
    (tmp_path / "train.py").write_text(mine)  # the learner's part A
    ex.blank("B")
    assert (tmp_path / "train.py.before-exercise-8").read_text() == text  # the reference, untouched
    now = (tmp_path / "train.py").read_text()
    assert "return 1" in now and 'raise NotImplementedError("exercise 8: write alignment_step")' in now


def test_wilson_interval_by_hand():
    """12 of 512: centre (p + z²/2n) / (1 + z²/n), half-width z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n); 0 of n is not empty."""
    p, n, z = 12 / 512, 512, 1.96
    d = 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    assert tasks.wilson(12, 512) == pytest.approx((centre - half, centre + half))
    lo, hi = tasks.wilson(0, 2048)
    assert lo == 0.0 and 0 < hi < 0.002


def test_the_dial_is_measured_per_rate_against_the_review_task_and_runs_nothing(tmp_path, monkeypatch):
    """--tasks_key_rates: `measure` on the review task and on explore at each rate (its option set on
    the config), one table row each with the share, its Wilson interval and Fisher's p; no compare."""
    seen = []

    def fake_measure(cfg, samples):
        seen.append((cfg.task, cfg.explore_key_rate, samples))
        k = {"review": 40, "explore": int(cfg.explore_key_rate * 1000)}[cfg.task]
        return {"samples": 2048, "top_band_count": k, "top_band_share": k / 2048, "sft_top": 7, "sft_texts": 20000}

    monkeypatch.setattr(tasks, "measure", fake_measure)
    monkeypatch.setattr(tasks, "compare", lambda *a, **k: pytest.fail("the dial runs no comparison"))
    argv = ["--tasks_key_rates", "0.01,0.05", "--tasks_samples", "32", "--out_dir", str(tmp_path)]
    out = train.cli(argv, run=tasks.run_tasks, extra=tasks.TasksOptions)
    assert seen == [("review", 0.05, 32), ("explore", 0.01, 32), ("explore", 0.05, 32)] and set(out["explore"]) == {0.01, 0.05}
    table = (tmp_path / "dial.md").read_text()
    lo, hi = tasks.wilson(10, 2048)
    assert f"| explore | 0.01 | 7 of 20000 | 10 of 2048 (0.49% [{100 * lo:.2f}, {100 * hi:.2f}]) | p = {tasks.fisher_exact(10, 2048, 40, 2048):.2g} |" in table
    assert json.loads((tmp_path / "dial.json").read_text())["explore"]["0.05"]["top_band_count"] == 50
    with pytest.raises(SystemExit, match=r"--tasks_key_rates '0.01,0.7': give rates in \(0, 0.5\]"):
        train.parse_args(["--tasks_key_rates", "0.01,0.7"], extra=tasks.TasksOptions)
