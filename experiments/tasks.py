"""
experiments/tasks.py: the answer on every embedded task, not one. For each task (plumbing/tasks.py),
what it is built to have, measured, then the comparison at equal KL and at equal gold labels
(experiments/compare.py, over its betas and seeds), and one table across the tasks.

    python -m experiments.tasks --out_dir runs/tasks --eval_every 10   # 3 tasks x 6 rows x 3 betas x 5 seeds
    python -m experiments.tasks --out_dir runs/tasks --tasks explore --compare_seeds 2   # any compare or train.py option
    python -m experiments.tasks --out_dir runs/dial --tasks_key_rates 0.005,0.01,0.02,0.05 --tasks_samples 32   # the dial, measured only

Writes OUT_DIR/tasks.md, tasks.json and tasks.png (each task's frontier, one panel each): per task, its measured properties (`measure`): the SFT
model's gold reward on the held-out prompts, the share of its samples in the top reward band, the
best reward a response can score, and how far off-policy the offline pairs are (the SFT model's
mean log-likelihood per response token of the offline responses, against that of its own samples
on the same prompts); then each task's comparison against online DPO at each budget (Holm over each
task's section, as compare.py does), and how long each took. Each task's own report is
OUT_DIR/TASK/compare/results.md, with its frontier plots. Finished runs are reused.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
from experiments import frontier
from experiments.compare import CompareOptions, code_line, compare, holm, interval, t_test
from plumbing.distributed import pick_device
from plumbing.options import arg
from plumbing.outputs import pyplot
from plumbing.tasks import KEY_WORDS, TASKS
from reward import CATEGORY_OF, subject_of
from sail import sample, sequence_logps_of
from train import cli

def best_review(subject):
    return f" the {subject} was great , excellent and lovely ."


BEST_RESPONSE = {"review": best_review, "offpolicy": best_review,  # subject -> a response at the task's maximum, 4
                 "explore": lambda s: f" the {s} is {KEY_WORDS[CATEGORY_OF[s]]} ."}
TOP_BAND = 3.0  # the top reward band: 3 and above of the maximum 4


@dataclass
class TasksOptions(CompareOptions):
    tasks: str = arg(",".join(TASKS), "the embedded tasks to measure and compare, comma-separated (plumbing/tasks.py)")
    tasks_samples: int = arg(8, "SFT samples per held-out prompt for the measured properties")
    tasks_key_rates: str = arg("", "the explore task's difficulty dial, measured only (no run): its SFT model's top-band share at "
                                   "each --explore_key_rate, comma-separated (e.g. 0.005,0.01,0.02,0.05), against the review task's")
    compare_methods: str = arg("dpo,online-dpo,sail-pr,sail-pr-g1,sail-pp,sail-dp", "rows, as compare.py's --compare_methods")
    compare_betas: str = arg("0.1,0.3,1", "betas, as compare.py's --compare_betas (equal KL and equal labels need several)")

    def problems(self):
        unknown = [t for t in self.tasks.split(",") if t not in TASKS]
        try:
            rates = [float(x) for x in self.tasks_key_rates.split(",")] if self.tasks_key_rates else []
            bad = [x for x in rates if not 0 < x <= 0.5]
        except ValueError:
            bad = [self.tasks_key_rates]
        return super().problems() + ([f"--tasks_key_rates {self.tasks_key_rates!r}: give rates in (0, 0.5], comma-separated"] if bad else []) \
            + ([f"--tasks: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(TASKS)}"] if unknown else []) \
            + ([f"--tasks_samples must be >= 1, got {self.tasks_samples}"] if self.tasks_samples < 1 else []) \
            + (["--compare_betas: give several betas (the tasks are compared at equal KL and equal labels)"] if not self.compare_betas else [])


def measure(cfg, samples_per_prompt=8):
    """What `cfg.task` is built to have, measured on its SFT model (cached in --cache_dir, or trained):
    {gold_sft, gold_sft_half (95% normal half-width over prompts' means), top_band_share, samples,
    best_response (the gold reward of BEST_RESPONSE, on every held-out prompt: the least), logp_own,
    logp_offline, offline_pairs, seconds}."""
    t0 = time.perf_counter()
    task, device = data.embedded_task(cfg), pick_device(cfg.device)
    model, tokenizer, _ = data.embedded_policy(cfg, task, device)  # trained here if not cached: before no_grad
    model, tokenizer = model.to(device).eval(), data.prepare_tokenizer(tokenizer)
    with torch.no_grad():
        return {**properties(cfg, task, model, tokenizer, device, samples_per_prompt), **data_properties(task),
                "seconds": time.perf_counter() - t0}


def data_properties(task):
    """What a task's texts hold, exactly (no model): its SFT corpus's share of texts in the top band;
    its offline pairs, the oracle labels spent on them (a tied candidate pair is dropped and charged),
    the share of candidate pairs that tied, and the share of chosen responses in the top band."""
    sft = np.array([task.gold(p, y) for p, y in task.sft])
    chosen = np.array([task.gold(x["prompt"], x["chosen"]) for x in task.pairs])
    labels = sum(x["labels"] for x in task.pairs)
    return {"sft_texts": len(sft), "sft_top": int((sft >= TOP_BAND).sum()), "pairs": len(task.pairs), "labels": labels,
            "tie_share": 1 - len(task.pairs) / labels, "chosen_top": int((chosen >= TOP_BAND).sum())}


def fisher_exact(a, n, b, m):
    """Two-sided Fisher exact test of a of n against b of m (the sum of the tables as likely as or
    less likely than the one seen, given both margins)."""
    from math import comb
    k = a + b
    prob = [comb(n, x) * comb(m, k - x) / comb(n + m, k) for x in range(max(0, k - m), min(n, k) + 1)]
    seen = comb(n, a) * comb(m, b) / comb(n + m, k)
    return min(1.0, sum(q for q in prob if q <= seen * (1 + 1e-9)))


def wilson(k, n, z=1.96):
    """The 95% Wilson score interval of a share k of n (it stays inside [0, 1], and is not empty at k = 0)."""
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return max(0.0, centre - half), min(1.0, centre + half)


def measure_dial(cfg, opts):
    """--tasks_key_rates: the explore task at each key rate (its SFT model trained once per rate and
    cached under its corpus's digest), measured as `measure` does with --tasks_samples per held-out
    prompt, against the review task's SFT model measured alike: each rate's top-band share with its
    Wilson interval and Fisher's exact test against review's. Writes OUT_DIR/dial.md and dial.json;
    runs nothing else: the rates of a comparison are chosen from these figures, before it."""
    rates = [float(x) for x in opts.tasks_key_rates.split(",")]
    review = measure(dataclasses.replace(cfg, task="review"), opts.tasks_samples)
    found = {rate: measure(dataclasses.replace(cfg, task="explore", explore_key_rate=rate), opts.tasks_samples) for rate in rates}
    lines = [f"SFT samples at temperature 1, {opts.tasks_samples} per held-out prompt ({review['samples']} per model), in the top "
             "band (gold reward >= 3 of 4), [95% Wilson interval]; Fisher's exact test against the review task's SFT model.", "",
             "| task | key rate (corpus) | SFT texts in the top band | SFT samples in the top band | against review |", "|---|---|---|---|---|",
             f"| review | — | {review['sft_top']} of {review['sft_texts']} | {review['top_band_count']} of {review['samples']} "
             f"({100 * review['top_band_share']:.2f}% [{', '.join(f'{100 * x:.2f}' for x in wilson(review['top_band_count'], review['samples']))}]) | — |"]
    for rate, m in found.items():
        lo, hi = wilson(m["top_band_count"], m["samples"])
        p = fisher_exact(m["top_band_count"], m["samples"], review["top_band_count"], review["samples"])
        lines.append(f"| explore | {rate:g} | {m['sft_top']} of {m['sft_texts']} | {m['top_band_count']} of {m['samples']} "
                     f"({100 * m['top_band_share']:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}]) | p = {p:.2g} |")
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "dial.json"), "w") as f:
        json.dump({"review": review, "explore": {str(k): v for k, v in found.items()}}, f, indent=1)
    with open(os.path.join(cfg.out_dir, "dial.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"review": review, "explore": found}


def sample_batches(model, tokenizer, prompts, cfg, device, generator):
    """The model's samples (temperature 1) for `prompts`, in batches of 64: [(ids, attention_mask, response_mask)]."""
    out = []
    for i in range(0, len(prompts), 64):
        ids, mask = (t.to(device) for t in data.encode_prompts(tokenizer, prompts[i:i + 64], cfg.max_prompt_len))
        out.append(sample(model, ids, mask, max_new_tokens=cfg.max_new_tokens, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
                          generator=generator))
    return out


def token_logp(model, batches, device):
    """The model's mean log-likelihood per response token over `batches` of (ids, attention_mask, response_mask)."""
    logps = [sequence_logps_of(model, *b).sum().item() for b in batches]  # summed per row
    return sum(logps) / sum(b[2].sum().item() for b in batches)


def properties(cfg, task, model, tokenizer, device, samples_per_prompt):
    """measure's figures, under no_grad."""
    generator = torch.Generator(device).manual_seed(int(np.random.SeedSequence(cfg.task_seed).generate_state(1)[0]))
    prompts = [p for p in task.eval_prompts for _ in range(samples_per_prompt)]
    texts = [y for b in sample_batches(model, tokenizer, prompts, cfg, device, generator) for y in data.decode(tokenizer, b[0], b[2])]
    gold = np.array([task.gold(p, y) for p, y in zip(prompts, texts)])
    per_prompt = gold.reshape(len(task.eval_prompts), samples_per_prompt).mean(1)  # prompts are the independent units
    offline = task.pairs[:256]
    off_prompts = [x["prompt"] for x in offline for _ in range(2)]
    off_texts = [x[k] for x in offline for k in ("chosen", "rejected")]
    off_batches = [tuple(t.to(device) for t in data.encode_responses(tokenizer, off_prompts[i:i + 64], off_texts[i:i + 64],
                                                                     cfg.max_prompt_len, cfg.max_new_tokens))
                   for i in range(0, len(off_prompts), 64)]
    return {"gold_sft": float(gold.mean()), "gold_sft_half": float(1.96 * per_prompt.std(ddof=1) / np.sqrt(len(per_prompt))),
            "top_band_share": float((gold >= TOP_BAND).mean()), "top_band_count": int((gold >= TOP_BAND).sum()), "samples": len(texts),
            "best_response": min(task.gold(p, BEST_RESPONSE[cfg.task](subject_of(p))) for p in task.eval_prompts),
            # the SFT model's own samples on the offline pairs' prompts, one per offline response, against those responses
            "logp_own": token_logp(model, sample_batches(model, tokenizer, off_prompts, cfg, device, generator), device),
            "logp_offline": token_logp(model, off_batches, device), "offline_pairs": len(offline)}


def interactions(runs, task, budgets, by):
    """{"row@b": d values}: per budget, (row - online DPO) on `task` minus (row - online DPO) on the
    review task, paired by seed (seed s's runs on both tasks draw from the same root seed): what the
    task changes in each row's gap to online DPO, cross-fitted as frontier.budget_section's tests are,
    and skipped where frontier.paired finds nothing to test. runs: {task: its compare.json runs}."""
    rows = frontier.by_row_and_seed([{**r, "method": f"{t}/{r['method']}"} for t in (task, "review") for r in runs[t]])
    out = {}
    for b in budgets:
        found = {(row, b): {s: frontier.best_within(points, b, by) for s, points in seeds.items()} for row, seeds in rows.items()}
        alone = {(row, b): {s: all(p["step"] == 0 for p in frontier.within(points, b, by)) for s, points in seeds.items()}
                 for row, seeds in rows.items()}
        for row in dict.fromkeys(r["method"] for r in runs[task]):
            quad = [f"{task}/{row}", f"{task}/online-dpo", f"review/{row}", "review/online-dpo"]
            if row != "online-dpo" and all(q in rows for q in quad) and frontier.paired(found, alone, b, quad) is not None:
                out[f"{row}@{b:g}"] = [(x - y) - (z - w) for x, y, z, w in frontier.paired(found, alone, b, quad)]
    return out


def task_family(vs, crossed):
    """One Holm family for a task and a section: its rows against online DPO (compare.py's tests, their
    unadjusted p) and its interactions with the review task; an interaction whose every difference is
    exactly 0 (a row that reads no offline pair, on a task that changes only those) is the same runs
    twice, and is not tested. Returns {key: {difference, half_width, p, p_holm} or {"identical": True}}."""
    tests = {k: (v["difference"], v["half_width"], v["p"]) for k, v in vs.items()}
    identical = {k for k, d in crossed.items() if not any(d)}
    tests.update({f"{k} x review": (*interval(d), t_test(d)) for k, d in crossed.items() if k not in identical and len(d) >= 2})
    adjusted = holm({k: v[2] for k, v in tests.items()})
    return {**{k: {"difference": d, "half_width": h, "p": p, "p_holm": adjusted[k]} for k, (d, h, p) in tests.items()},
            **{f"{k} x review": {"identical": True} for k in identical}}


def verdicts(tests, budgets, rows, suffix=""):
    """{row: [one cell per budget]}: the row's test "row@b" + suffix as "+0.12 [-0.10, +0.34]", * where
    its Holm-adjusted p < 0.05; "≡ 0" for the same runs twice; "—" where nothing was tested."""
    out = {}
    for row in rows:
        cells = []
        for b in budgets:
            t = tests.get(f"{row}@{b:g}{suffix}")
            cells.append("—" if t is None else "≡ 0 (the same runs)" if t.get("identical") else
                         f"{t['difference']:+.2f} [{t['difference'] - t['half_width']:+.2f}, {t['difference'] + t['half_width']:+.2f}]"
                         + (" *" if t["p_holm"] < 0.05 else ""))
        out[row] = cells
    return out


def summary_lines(results, opts):
    """tasks.md: the measured properties, one row per task; per section, every row against online DPO
    on each task, then each other task against the review task (the interaction), * where Holm's p <
    0.05 over that task's section (its rows against online DPO and its interactions, together)."""
    kl, labels = opts.numbers("compare_kl_budgets"), opts.numbers("compare_label_budgets")
    lines = ["## What each task is built to have, measured", "",
             f"On the SFT model, {next(iter(results.values()))['measured']['samples']} samples (temperature 1) on the held-out prompts: "
             "gold reward (mean ± 95% over prompts), the share at 3 or more of the best 4; log-likelihood per response token "
             "(EOS included) of 512 offline responses (256 pairs) and of as many of the SFT model's own samples on the same prompts.", "",
             "| task | SFT gold reward | share in the top band (≥ 3) | best a response scores | log p per token: own samples | "
             "offline responses | offline − own |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["measured"]
        lines.append(f"| {name} | {m['gold_sft']:.2f} ± {m['gold_sft_half']:.2f} | {100 * m['top_band_share']:.1f}% | "
                     f"{m['best_response']:.0f} | {m['logp_own']:.2f} | {m['logp_offline']:.2f} | {m['logp_offline'] - m['logp_own']:+.2f} |")
    review = results.get("review", {}).get("measured")
    for name, r in results.items():  # the top band's share against the review task's, tested, not two figures side by side
        m = r["measured"]
        if review and name != "review" and "top_band_count" in m:
            lines.append(f"\n{name} against review, SFT samples in the top band: {m['top_band_count']} of {m['samples']} against "
                         f"{review['top_band_count']} of {review['samples']}, Fisher's exact p = "
                         f"{fisher_exact(m['top_band_count'], m['samples'], review['top_band_count'], review['samples']):.2g}.")
    lines += ["", "What each task's texts hold (exact, no model; `data_properties`):", "",
              "| task | SFT texts in the top band | offline pairs | oracle labels spent on them | candidate pairs that tied | "
              "offline chosen responses in the top band |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["measured"]
        if "labels" in m:
            lines.append(f"| {name} | {m['sft_top']} of {m['sft_texts']} ({100 * m['sft_top'] / m['sft_texts']:.1f}%) | {m['pairs']} | "
                         f"{m['labels']} | {100 * m['tie_share']:.1f}% | {m['chosen_top']} ({100 * m['chosen_top'] / m['pairs']:.1f}%) |")
    for by, budgets, unit in (("kl", kl, "nats"), ("labels", labels, "gold labels")):
        what = "KL" if by == "kl" else "gold labels"
        lines += ["", f"## Δ gold reward against online DPO at equal {what}", "",
                  f"Best cross-fitted gold reward within each budget ({unit}) minus online DPO's on the same task, paired by seed, "
                  "[95% t-interval]; * where Holm's p < 0.05 over that task's section (its rows against online DPO and its "
                  "interactions below, together); without * not resolved at this budget.", "",
                  "| task | row | " + " | ".join(f"within {b:g}" for b in budgets) + " |", "|---|---" + "|---" * len(budgets) + "|"]
        for name, r in results.items():
            for row, cells in verdicts(r["tests"][by], budgets, [x for x in r["rows"] if x != "online-dpo"]).items():
                lines.append(f"| {name} | {row} | " + " | ".join(cells) + " |")
        crossed = [name for name in results if name != "review" and any(k.endswith(" x review") for k in results[name]["tests"][by])]
        if crossed:
            lines += ["", f"Against the review task at equal {what}: (row − online DPO) on the task minus (row − online DPO) on the "
                      "review task, paired by seed, in the task's Holm family: what the task changes in the row's gap.", "",
                      "| task | row | " + " | ".join(f"within {b:g}" for b in budgets) + " |", "|---|---" + "|---" * len(budgets) + "|"]
            for name in crossed:
                r = results[name]
                for row, cells in verdicts(r["tests"][by], budgets, [x for x in r["rows"] if x != "online-dpo"], " x review").items():
                    lines.append(f"| {name} | {row} | " + " | ".join(cells) + " |")
    lines += ["", "Time: " + "; ".join(f"{name} {r['minutes']:.1f} min of runs ({r['wall'] / 60:.1f} min this invocation)"
                                        for name, r in results.items())]
    return lines


def plot_tasks(runs, path, budget):
    """tasks.png: one panel per task, each row's upper envelope over its betas and checkpoints against
    KL (frontier.draw_envelopes, cross-fitted), the mean over seeds with its 95% t-band, up to 1.5 x budget."""
    plt = pyplot("the tasks' frontier plot")
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), sharey=True, squeeze=False)
    grid = np.linspace(0, 1.5 * budget, 90)
    for ax, (name, task_runs) in zip(axes[0], runs.items()):
        frontier.draw_envelopes(ax, frontier.by_row_and_seed(task_runs), grid, "kl", interval)
        ax.set(title=f"task: {name}", xlabel="KL budget (nats)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best gold reward within the budget")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_tasks(cfg, opts):
    """`python -m experiments.tasks`: for each task, `measure` then compare.compare in OUT_DIR/TASK;
    then each other task against the review task (if it ran), and tasks.md. --tasks_key_rates:
    the explore task's dial measured instead (`measure_dial`), and nothing run."""
    if opts.tasks_key_rates:
        return measure_dial(cfg, opts)
    results, runs, vs = {}, {}, {}
    for name in opts.tasks.split(","):
        tcfg = dataclasses.replace(cfg, task=name, out_dir=os.path.join(cfg.out_dir, name))
        measured = measure(tcfg, opts.tasks_samples)
        print(f"tasks: {name}: {json.dumps(measured)}")
        t0 = time.perf_counter()
        vs[name] = compare(tcfg, opts)  # each row against online DPO, per section
        with open(os.path.join(tcfg.out_dir, "compare", "compare.json")) as f:
            runs[name] = json.load(f)["runs"]
        results[name] = {"measured": measured, "rows": opts.compare_methods.split(","),
                         "wall": time.perf_counter() - t0, "minutes": sum(r["summary"]["seconds"] for r in runs[name]) / 60}
    for name, r in results.items():
        r["tests"] = {by: task_family(vs[name][by], interactions(runs, name, opts.numbers(budgets), by)
                                      if name != "review" and "review" in runs else {})
                      for by, budgets in (("kl", "compare_kl_budgets"), ("labels", "compare_label_budgets"))}
    lines = summary_lines(results, opts) + ["", code_line([r for task_runs in runs.values() for r in task_runs])]
    plot_tasks(runs, os.path.join(cfg.out_dir, "tasks.png"), max(opts.numbers("compare_kl_budgets")))
    with open(os.path.join(cfg.out_dir, "tasks.json"), "w") as f:
        json.dump({"config": {**dataclasses.asdict(cfg), **dataclasses.asdict(opts)}, "tasks": results}, f, indent=1)
    with open(os.path.join(cfg.out_dir, "tasks.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    cli(run=run_tasks, extra=TasksOptions, description="every method on every embedded task (experiments/tasks.py)")
