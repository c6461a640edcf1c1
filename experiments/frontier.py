"""
experiments/frontier.py: methods compared where it is fair, at equal KL and at equal oracle labels.

A method that moves further from the SFT model buys reward with KL, so comparing methods where
each happens to stop mixes two things. `python -m experiments.compare --compare_betas 0.03,0.1,0.3,1`
runs every row at every beta; this module reads those runs:

  * frontier.png: the gold reward against KL(policy || SFT), each method's upper envelope over its
    betas and checkpoints (per seed: the best gold reward of any evaluation within KL k, cross-fitted
    as below), its mean and 95% t-band over seeds; frontier_labels.png the same against oracle labels.
  * "Gold reward at equal KL" and "at equal gold labels": for each budget, each method's best gold
    reward within it, paired by seed against online DPO labelled the same way; for a row labelled
    by a proxy (compare.LABELLED) whose gold-labelled twin ran too, the interaction (the row's gap
    to online DPO under the proxy minus the same gap under gold labels); Holm's correction over the
    section; none where both sides of a difference hold only the SFT model within the budget (0 by
    construction: a comparison with nothing to test, or an interaction repeating a gold row's test).
    Gold labels: the oracle's, the offline pairs', and a proxy's fit pairs'.
  * early_stopping: the checkpoint chosen on one half of the prompts against the last, read on the other.

Cross-fitting. The best of many checkpoints is biased upward if it is picked and read on the same
samples. Every evaluation also reports its figures on each half of the held-out prompts
(plumbing/evaluation.halves): the checkpoint (which beta, which step) is chosen on half a (its
gold reward there, within the budget by its KL there) and its gold reward is read on half b.
Nothing from half b enters the choice, so that reading is unbiased; the budget itself gates on
half a's KL, an estimate, so "equal KL" holds approximately (the tables show half b's KL). The
"envelope" is best_within at each budget: cross-fitted, it need not rise monotonically.
"""
import numpy as np

CHOOSE, READ = "a", "b"  # the halves of the held-out prompts: the choice is made on one, the figure read on the other


def within(points, budget, by):
    """The checkpoints within the budget: by="kl", KL on the choosing half <= budget; by="labels",
    oracle labels spent <= budget (the SFT model, step 0, is within every budget)."""
    return [p for p in points if (p[f"eval_kl_{CHOOSE}"] if by == "kl" else p["labels"]) <= budget]


def best_within(points, budget, by):
    """Cross-fitted: among the checkpoints within the budget, the one with the highest gold reward
    on the choosing half (the earliest on a tie); returns (its gold reward on the reading half, the point)."""
    best = max(within(points, budget, by), key=lambda p: p[f"eval_reward_{CHOOSE}"])  # max keeps the first of equals
    return best[f"eval_reward_{READ}"], best


def envelope(points, grid, by):
    """The upper envelope of one seed's checkpoints (all betas), cross-fitted as the tables are: at
    each budget x of grid, best_within's gold reward (the SFT model is within every budget)."""
    return np.array([best_within(points, x, by)[0] for x in grid])


def by_row_and_seed(runs):
    """{row: {seed: every checkpoint of the row's runs of that seed, over all betas}}."""
    out = {}
    for r in runs:
        out.setdefault(r["method"], {}).setdefault(r["seed"], []).extend(r["history"])  # the SFT model (step 0) first
    return out


def labeller_of(row, suffixes):
    """The suffix of a row labelled by a proxy (one of `suffixes`, e.g. -rm512), or '' (the gold reward)."""
    return next((x for x in suffixes if row.endswith(x)), "")


def paired(found, alone, b, rows):
    """Per seed that every row of `rows` ran: [each row's best gold reward within budget b]; None
    where some pair of rows (0 and 1, 2 and 3) both hold only the SFT model within b, every seed
    (alone[row, b][seed]: no checkpoint but step 0 within b): that pair's difference is 0 by
    construction, so a comparison of two rows has nothing to test, and an interaction would only
    repeat the other pair's test, negated (a proxy's fit labels alone can exceed a label budget).
    A pair that merely *chose* the SFT model at every seed, with later checkpoints within b, is
    tested: that is a finding of the data, not a construction."""
    seeds = sorted(set.intersection(*(set(found[r, b]) for r in rows)))
    at_sft = [all(alone[r, b][s] for s in seeds) for r in rows]
    if any(at_sft[k] and at_sft[k + 1] for k in range(0, len(rows), 2)):
        return None
    return [[found[r, b][s][0] for r in rows] for s in seeds]


def budget_section(runs, budgets, by, title, interval, t_test, holm, baseline="online-dpo", suffixes=()):
    """results.md's section: per budget, each row's cross-fitted best gold reward (mean ± half-width
    over seeds, and the mean KL or labels of the chosen checkpoints), and its difference from the
    baseline labelled the same way (online-dpo, or online-dpo-rm512 for a row ending -rm512: one of
    `suffixes`), paired by seed. Where a proxy row's gold-labelled twin and both baselines ran, the
    interaction: (row - baseline) under the proxy minus the same under gold labels, paired by seed.
    Holm's correction is over every comparison of the section, interactions included."""
    rows = by_row_and_seed(runs)
    found, alone, tests = {}, {}, {}
    for b in budgets:
        for row, seeds in rows.items():
            found[row, b] = {s: best_within(points, b, by) for s, points in seeds.items()}
            alone[row, b] = {s: all(p["step"] == 0 for p in within(points, b, by)) for s, points in seeds.items()}
        for row in rows:
            base = baseline + labeller_of(row, suffixes)
            if row != base and base in rows and paired(found, alone, b, [row, base]) is not None:
                d = [x - y for x, y in paired(found, alone, b, [row, base])]
                if len(d) >= 2:
                    tests["vs", row, b] = (*interval(d), t_test(d))
            gold = row.removesuffix(labeller_of(row, suffixes))
            quad = [row, base, gold, baseline]  # the row and its baseline under the proxy, then the same under gold labels
            if gold != row and row != base and all(r in rows for r in quad) and paired(found, alone, b, quad) is not None:
                d = [(x - y) - (z - w) for x, y, z, w in paired(found, alone, b, quad)]
                if len(d) >= 2:
                    tests["x", row, b] = (*interval(d), t_test(d))
    adjusted = holm({k: v[2] for k, v in tests.items()})

    def cell(key):
        d, h, _ = tests[key]
        return f"{d:+.2f} [{d - h:+.2f}, {d + h:+.2f}], p_Holm {adjusted[key]:.2g}" + (" *" if adjusted[key] < 0.05 else "")

    unit = "nats" if by == "kl" else "gold labels"
    lines = ["", f"### {title}", "",
             f"For each budget ({unit}), each method's best gold reward within it over all its betas and evaluations, cross-fitted: "
             f"the checkpoint is chosen on one half of the held-out prompts (its gold reward there, "
             + ("its KL there within the budget" if by == "kl" else "its gold labels within the budget")
             + ") and its gold reward read on the other half, so the maximum is not biased upward by the choice. "
             f"Mean ± 95% t half-width over seeds; Δ: minus {baseline}'s (labelled the same way), paired by seed, [95% t-interval], "
             f"p after Holm's correction over the section's {len(tests)} comparisons (interactions included); * where it is < 0.05. "
             "A Δ without * is not resolved at this budget.", "",
             "| method | " + " | ".join(f"within {b:g}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for row in rows:
        cells = []
        for b in budgets:
            values = list(found[row, b].values())
            mean, half = interval([v[0] for v in values])
            spent = np.mean([v[1]["eval_kl_b" if by == "kl" else "labels"] for v in values])
            cells.append(f"{mean:.2f}" + ("" if half is None else f" ± {half:.2f}") + f" ({'KL' if by == 'kl' else 'labels'} {spent:.3g})"
                         + (f"; Δ {cell(('vs', row, b))}" if ("vs", row, b) in tests else ""))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    crossed = [row for row in rows if any(("x", row, b) in tests for b in budgets)]
    if crossed:
        lines += ["", f"Method × labeller: (row − {baseline}) under the proxy minus (the same rows − {baseline}) under gold labels, "
                  "paired by seed (the row's proxy and gold runs of a seed share everything but the labeller), in the same Holm family:", "",
                  "| row | " + " | ".join(f"within {b:g}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
        lines += [f"| {row} | " + " | ".join(cell(("x", row, b)) if ("x", row, b) in tests else "—" for b in budgets) + " |" for row in crossed]
    return lines, {f"{row}@{b:g}" if kind == "vs" else f"{row}@{b:g} interaction":
                   {"difference": v[0], "half_width": v[1], "p": v[2], "p_holm": adjusted[kind, row, b]}
                   for (kind, row, b), v in tests.items()}


def early_stopping(runs, interval, t_test, holm):
    """Per row (one beta): the rule "keep the evaluation with the highest gold reward on half a of
    the held-out prompts" against keeping the last, both read on half b, paired by seed: {row: (the
    chosen steps (S,), gold of the chosen (S,), gold of the last (S,), (mean gain, half-width, p, p Holm))}."""
    out = {}
    for r in runs:
        best = max(r["history"], key=lambda p: p[f"eval_reward_{CHOOSE}"])  # the earliest of equals
        steps, chosen, last = out.setdefault(r["method"], ([], [], []))
        steps.append(best["step"])
        chosen.append(best[f"eval_reward_{READ}"])
        last.append(r["history"][-1][f"eval_reward_{READ}"])
    tests = {row: (*interval(np.subtract(c, l)), t_test(np.subtract(c, l))) for row, (_, c, l) in out.items()}
    adjusted = holm({row: v[2] for row, v in tests.items()})
    return {row: (*map(np.array, out[row]), (*tests[row], adjusted[row])) for row in out}


def draw_envelopes(ax, rows, grid, by, interval, suffixes=()):
    """On `ax`, each row's envelope at the budgets `grid`: the mean over seeds and its 95% t-band;
    rows labelled by a proxy (ending in one of `suffixes`) dashed. rows: by_row_and_seed's."""
    for row, seeds in rows.items():
        curves = np.array([envelope(points, grid, by) for points in seeds.values()])  # (S, len(grid))
        stats = [interval(c) for c in curves.T]
        mean, half = np.array([s[0] for s in stats]), np.array([s[1] or 0.0 for s in stats])
        line, = ax.plot(grid, mean, label=row, linestyle="--" if labeller_of(row, suffixes) else "-")
        ax.fill_between(grid, mean - half, mean + half, alpha=0.08, color=line.get_color())


def plot_frontier(runs, path, by, interval, pyplot, budgets, suffixes=()):
    """frontier.png (by="kl") or frontier_labels.png (by="labels"): each row's upper envelope over its
    betas and checkpoints, the mean over seeds with its 95% t-band, against KL or gold labels, up to
    1.5 times the largest budget of the section (a row's far end, KL 100 and more, would flatten the
    rest); rows labelled by a proxy (ending in one of `suffixes`) dashed."""
    plt = pyplot("the frontier plot")
    if plt is None:
        return
    rows = by_row_and_seed(runs)
    top = max(p["eval_kl_a" if by == "kl" else "labels"] for seeds in rows.values() for pts in seeds.values() for p in pts)
    grid = np.linspace(0, min(top, 1.5 * max(budgets)), 120)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    draw_envelopes(ax, rows, grid, by, interval, suffixes)
    ax.set(xlabel="KL budget (KL(policy || SFT) on the choosing half)" if by == "kl" else "gold labels spent (oracle queries, offline pairs', a proxy's fit pairs')",
           ylabel="best gold reward within the budget (the reading half)",
           title="Gold reward " + ("at equal KL" if by == "kl" else "at equal labels") + ": the envelope over betas and checkpoints")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
