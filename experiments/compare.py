"""
experiments/compare.py: every method side by side, over several seeds, from one SFT model.

    python -m experiments.compare                          # 15 rows x 5 seeds, 2 runs at once
    python -m experiments.compare --compare_methods online-dpo,sail-pr --g 1   # any train.py option too
    python -m experiments.compare --compare_betas 0.03,0.1,0.3,1 --eval_every 10   # at equal KL and labels (frontier.py)

Each run is `train.main` with the row's settings, in its own out_dir (runs/sail/compare/ROW-seedS);
finished runs are reused, an interrupted one resumes. Writes results.md (means with 95% intervals
over seeds; each row's gold reward against online DPO's and a suffixed row's against its own
method's, paired by seed, with Holm's correction over the table), compare.json and four plots.
A row is a method (train.METHODS) or one with a response term and a suffix of ROWS, which
changes one thing, or a named few, from it (-g1 and -gamma0 on sail-pr alone: ROW_METHODS); every
row's settings pass train.py's checks before the first run starts; any row may end in a suffix of LABELLED (-rm, -rm512)
to be labelled by a reward model fit for each seed instead of the gold reward. With
--compare_betas every row runs at every beta (runs/sail/compare/ROW-betaB-seedS), and results.md
compares the methods at equal KL and at equal gold labels instead (experiments/frontier.py), with
a proxy row's interaction with its labeller, and the early-stopping rule at --beta.
"""
import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

import data
from data import check_writable_dir, embedded_policy
from experiments import frontier
from plumbing.checkpoint import refuse_changed_settings
from plumbing.distributed import pick_device
from plumbing.models import proxy_labeller
from plumbing.options import arg, check_config, check_values
from plumbing.outputs import CODE, pyplot
from sail import PP
from extensions.step import EXPLORE
from train import METHODS, cli, main

OFFICIAL = ("sail-pr", "sail-pp", "mix")  # methods with a response term: a compared row can add a suffix
ROWS = {  # the compared rows' suffixes: what each changes from the method's own row, one thing or a named few
    "-official": dict(response_term="official", ties="first"),  # the official code: the hook (its sign, its size), its ties
    "-official-size": dict(response_term="official-size", ties="first"),  # -official with the exact sign: its size alone
    "-official-sign": dict(response_term="official-sign", ties="first"),  # -official at the exact size: its sign alone
    "-ties-first": dict(ties="first"),  # the exact term with the official tie handling (y1 chosen)
    "-g1": dict(g=1.0),  # sail-pr only: every pair online, purely online SAIL-PR
    "-gamma0": dict(gamma=0.0),  # sail-pr only: no response term, the same routing, its offline and online pairs trained by DPO alone
}
# The methods each suffix of ROWS means what it says on: g and gamma are SAIL-PR's alone (on sail-pp they
# would change nothing; on mix, -gamma0 would keep SAIL-PP's response term and -g1 route with probabilities
# that sum past 1); the official term and tie handling act on every method with a response term.
ROW_METHODS = {"-g1": ("sail-pr",), "-gamma0": ("sail-pr",)}
LABELLED = {  # any row above labelled by a proxy instead of the gold reward: a reward model fit for each seed (--proxy fit)
    "-rm": dict(proxy="fit", proxy_pairs=0),  # fit on every offline pair
    "-rm512": dict(proxy="fit", proxy_pairs=512),  # on the first 512: a weaker proxy (held-out accuracy ~0.8 on the embedded task)
}
REVKL_ROWS = {  # SAIL-RevKL's penalty added to any method: at the authors' coefficient, at a larger one, and their proxy
    "-revkl": dict(revkl=1e-3),
    "-revkl0.01": dict(revkl=0.01),
    "-revkl0.1": dict(revkl=0.1),
    "-revkl-proxy": dict(revkl=1e-3, revkl_estimate="proxy"),
    "-revkl0.1-proxy": dict(revkl=0.1, revkl_estimate="proxy"),
    "-revkl0.1-proxy-aligned": dict(revkl=0.1, revkl_estimate="proxy-aligned"),  # the proxy without its off-by-one
}


@dataclass
class CompareOptions:
    compare_methods: str = arg("dpo,online-dpo,sail-pr,sail-pr-ties-first,sail-pr-official-sign,sail-pr-official-size,sail-pr-official,"
                               "sail-pp,sail-pp-official-sign,sail-pp-official-size,sail-pp-official,sail-dp,mix,selm,xpo",
                               "rows, comma-separated: methods, or a method with a response term and a suffix (ROWS): "
                               "-official (the official hook and tie handling), -official-size, -official-sign, -ties-first; "
                               "sail-pr only: -gamma0 (no response term), -g1 (every pair online); or any method with a SAIL-RevKL suffix (REVKL_ROWS): -revkl, "
                               "-revkl0.01, -revkl0.1, -revkl-proxy, -revkl0.1-proxy, -revkl0.1-proxy-aligned; any row ending -rm "
                               "or -rm512: labelled by a reward model fit for each seed on all or 512 offline pairs (LABELLED)")
    compare_seeds: int = arg(5, "seeds per row (--seed, --seed + 1, ...)")
    compare_betas: str = arg("", "betas, comma-separated (e.g. 0.03,0.1,0.3,1): run every row at each and compare the methods at equal "
                                 "KL and at equal oracle labels over all of them (experiments/frontier.py); '': the rows at --beta")
    compare_kl_budgets: str = arg("2,5,10,20", "--compare_betas: the KL budgets (nats) of the equal-KL section")
    compare_label_budgets: str = arg("500,1000,2000", "--compare_betas: the oracle-label budgets of the equal-labels section")
    compare_workers: int = arg(2, "runs at once, in processes sharing the CPU threads (1: one after another, in this process)")
    compare_reuse: str = arg("same-code", "finished runs to reuse: same-code (made by this code, summary.json's digest of the "
                                          "source a run executes; one made by other code is moved to OUT.code-DIGEST and rerun) | any")

    def numbers(self, name):
        """The comma-separated numbers of option `name` (an empty list for '')."""
        return [float(x) for x in getattr(self, name).split(",")] if getattr(self, name) else []

    def problems(self):
        problems = check_values(self, [(lambda x: x >= 1, ">= 1", ["compare_seeds", "compare_workers"])],
                                {"compare_reuse": ("same-code", "any")})
        for name in ("compare_betas", "compare_kl_budgets", "compare_label_budgets"):
            try:
                values = self.numbers(name)
            except ValueError:
                problems.append(f"--{name} {getattr(self, name)!r}: give numbers separated by commas")
                continue
            if (not values and name != "compare_betas") or any(not math.isfinite(x) or x <= 0 for x in values):
                problems.append(f"--{name} {getattr(self, name)!r}: give one or more numbers > 0, separated by commas")
        unknown = [m for m in self.compare_methods.split(",") if compare_row(m) is None]
        if unknown:
            problems.append(f"--compare_methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}, "
                            f"or one of {', '.join(OFFICIAL)} with a suffix {', '.join(s for s in ROWS if s not in ROW_METHODS)}, "
                            f"or sail-pr with {', '.join(ROW_METHODS)}, or one of them with {', '.join(REVKL_ROWS)}")
        return problems


def compare_row(name):
    """A compared row's (method, its settings) from its name, e.g. sail-pr-official-size,
    sail-pp-revkl0.1 or (labelled by a fitted proxy) sail-pr-gamma0-rm; None if unknown."""
    for suffix, labeller in LABELLED.items():
        if name.endswith(suffix) and compare_row(name.removesuffix(suffix)) is not None:
            method, settings = compare_row(name.removesuffix(suffix))
            return method, {**settings, **labeller}
    if name in METHODS:
        return name, {}
    for suffix in sorted(ROWS, key=len, reverse=True):
        if name.endswith(suffix) and name.removesuffix(suffix) in ROW_METHODS.get(suffix, OFFICIAL):
            return name.removesuffix(suffix), ROWS[suffix]
    for suffix in sorted(REVKL_ROWS, key=len, reverse=True):
        if name.endswith(suffix) and name.removesuffix(suffix) in METHODS:
            return name.removesuffix(suffix), REVKL_ROWS[suffix]
    return None


def labeller_suffix(row):
    """The row's LABELLED suffix (-rm, -rm512), or '' (labelled by the gold reward)."""
    return frontier.labeller_of(row, tuple(LABELLED))


def baseline_of(row):
    """The row a row's Δ is taken against: online DPO labelled the same way."""
    return "online-dpo" + labeller_suffix(row)


def own_row(row):
    """The row a suffixed row changes one thing from: a labelled row's gold-labelled twin, else its method's row."""
    return row.removesuffix(labeller_suffix(row)) if labeller_suffix(row) else compare_row(row)[0]


def compare(cfg, opts):
    """`python -m experiments.compare`: every method from the same SFT model, with the same number of
    updates and pairs per update, over several seeds; --compare_workers runs at once. Finished runs
    are not redone; an interrupted one resumes from its checkpoint. Writes results.md (means with
    95% intervals over seeds, and each method's difference from online DPO paired by seed),
    compare.json and the plots."""
    import platform

    root = os.path.join(cfg.out_dir, "compare")
    t0 = time.perf_counter()
    betas = opts.numbers("compare_betas")
    plan = [(m, b, cfg.seed + k) for m in opts.compare_methods.split(",") for b in betas or [cfg.beta] for k in range(opts.compare_seeds)]
    configs = {(m, b, seed): compare_config(cfg, m, seed, os.path.join(root, f"{m}-beta{b:g}-seed{seed}" if betas else f"{m}-seed{seed}"), beta=b)
               for m, b, seed in plan}
    refuse_bad_rows(configs)  # every row checked as `python train.py` checks its options, before the first run
    check_writable_dir(root)
    # The longest runs first (the exploring methods, then by their share of online pairs), so that
    # the workers finish together instead of one running the last long run alone.
    todo = sorted((c for c in configs.values() if not finished(c, opts.compare_reuse)),
                  key=lambda c: (c.method in EXPLORE, sum(METHODS[c.method](c)[PP:])), reverse=True)
    if opts.compare_workers == 1 or len(todo) < 2:
        for c in tqdm(todo, desc="compare", dynamic_ncols=True):
            compare_run(c)
    else:  # several processes; the SFT model (and the proxies to fit) are cached first, so that no two of them train one
        with contextlib.redirect_stdout(io.StringIO()):
            tokenizer = embedded_policy(cfg, data.embedded_task(cfg), pick_device(cfg.device))[1] if cfg.model == "embedded" else None
            fits = {(c.seed, c.proxy_pairs, c.proxy_width, c.proxy_steps): c for c in todo if c.proxy == "fit"}  # one per seed and fit
            if fits:
                from transformers import AutoTokenizer
                tokenizer = data.prepare_tokenizer(tokenizer or AutoTokenizer.from_pretrained(cfg.model))
                inputs = data.load_inputs(cfg)
                for c in tqdm(fits.values(), desc="proxies", dynamic_ncols=True):
                    proxy_labeller(c, inputs, tokenizer, pick_device(cfg.device))
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, torch.get_num_threads() // opts.compare_workers)
        with ProcessPoolExecutor(opts.compare_workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            for done in tqdm(as_completed([pool.submit(compare_run, c) for c in todo]), total=len(todo), desc="compare",
                             dynamic_ncols=True):
                done.result()
    runs = [{**read_run(m, seed, configs[m, b, seed].out_dir), "beta": b} for m, b, seed in plan]
    wall = time.perf_counter() - t0
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {pick_device(cfg.device)}"
    if betas:  # the methods at equal KL and at equal labels, over every beta
        return frontier_report(cfg, opts, runs, root, machine, wall)

    methods = list(dict.fromkeys(m for m, _, _ in plan))
    stats = {m: method_stats([r for r in runs if r["method"] == m]) for m in methods}
    tests = comparisons(runs, methods)
    with open(os.path.join(root, "compare.json"), "w") as f:
        json.dump({"machine": machine, "wall_seconds": wall, "config": {**dataclasses.asdict(cfg), **dataclasses.asdict(opts)},
                   "stats": stats,
                   "comparisons": [{"row": a, "against": b, "difference": v[0], "half_width": v[1], "p": v[2], "p_holm": v[3]}
                                   for (a, b), v in tests.items()], "runs": runs}, f, indent=1)
    lines = results_table(cfg, opts, runs, stats, tests, machine, wall)
    if "eval_proxy_reward" in runs[0]["history"][-1]:  # --proxy: where the gold reward peaks, and the picture
        lines += overoptimisation_table(runs, methods)
        plot_overoptimisation(runs, methods, root)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_compare(runs, root)
    print(f"compare: outputs in {root}/")
    return stats


def refuse_bad_rows(configs):
    """Each row's settings go through train.py's own checks (plumbing/options.check_config) before
    any run starts: a row that `python train.py` would refuse stops the comparison at once, with one
    line per problem naming the row, and nothing is run or written."""
    problems = dict.fromkeys(f"--compare_methods row {row}: {p}" for (row, _, _), c in configs.items()
                             for p in check_config(c, METHODS))
    if problems:
        raise SystemExit("\n".join(f"error: {p}" for p in problems))


def compare_config(cfg, name, seed, out, beta):
    """The settings of one compared run: a row's method with its suffix's settings (ROWS), at beta."""
    method, settings = compare_row(name)
    return dataclasses.replace(cfg, method=method, seed=seed, out_dir=out, beta=beta, **settings)


def finished(c, reuse="same-code"):
    """Has this run finished with these settings, and (reuse="same-code") by this code? A run with
    more --steps resumes and goes on; one made by other code (or before runs recorded theirs) is
    moved aside to OUT.code-DIGEST, nothing lost, and run again."""
    if not os.path.isfile(os.path.join(c.out_dir, "summary.json")):
        return False
    with open(os.path.join(c.out_dir, "config.json")) as f:
        refuse_changed_settings(json.load(f), c, "delete it or use another --out_dir")
    with open(os.path.join(c.out_dir, "summary.json")) as f:
        summary = json.load(f)
    made_by = (summary.get("code") or {}).get("digest")
    if reuse == "same-code" and made_by != CODE["digest"]:
        base = aside = f"{c.out_dir}.code-{(made_by or 'unrecorded')[:12]}"
        k = 1
        while os.path.exists(aside):  # never over an earlier one
            k += 1
            aside = f"{base}.{k}"
        os.replace(c.out_dir, aside)
        print(f"compare: {c.out_dir} was made by other code ({(made_by or 'unrecorded')[:12]}); moved aside, rerun by {CODE['digest'][:12]}")
        return False
    return summary["steps"] == c.steps


def code_line(runs):
    """Which code made a table's runs: each digest (summary.json's "code") with its commit, and how many runs."""
    made = collections.Counter(json.dumps(r["summary"].get("code"), sort_keys=True) for r in runs)
    def one(code):
        if code is None:
            return "code not recorded (runs made before it was)"
        commit = f"commit {code['commit'][:7]}" + (" with uncommitted changes" if code["dirty"] else "") if code["commit"] else "no git commit"
        return f"code {code['digest'][:12]} ({commit})"
    return "Made by " + "; ".join(f"{one(json.loads(k))}: {n} runs" for k, n in made.items()) + "."


def compare_run(c):
    """One compared run, its output in its own log.txt (in a worker process, or this one)."""
    os.makedirs(c.out_dir, exist_ok=True)
    with open(os.path.join(c.out_dir, "log.txt"), "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        main(c)


def read_run(method, seed, out):
    """A finished run's summary and its evaluations, each with the oracle labels and the training
    seconds (the steps' own time, without evaluation) spent up to it; the SFT model is step 0."""
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    history = [{"step": 0, "eval_reward": summary["gold_reward_sft"], "eval_kl": 0.0, "labels": 0, "seconds": 0.0,
                **summary.get("sft_halves", {})}]  # (runs made before the halves were measured have none)
    seconds = 0.0
    if "proxy_reward_sft" in summary:  # --proxy: the labeller's reward too
        history[0]["eval_proxy_reward"] = summary["proxy_reward_sft"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            seconds += row["dt"]
            if "eval_reward" in row:
                history.append({"step": row["step"], "eval_reward": row["eval_reward"], "eval_kl": row["eval_kl"],
                                # the gold labels spent (--proxy: the proxy's fit pairs and the offline pairs', not its queries)
                                "labels": row.get("gold_labels", row["oracle_queries"]), "seconds": seconds,
                                **{k: row[k] for k in ("eval_reward_a", "eval_reward_b", "eval_kl_a", "eval_kl_b") if k in row},
                                **({"eval_proxy_reward": row["eval_proxy_reward"]} if "eval_proxy_reward" in row else {})})
    return {"method": method, "seed": seed, "summary": summary, "history": history}


T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120,
       2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # Student t, 0.975


def interval(x):
    """(mean, half-width of its two-sided 95% Student-t interval) of the values x; None with one value."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return float(x.mean()), None
    df = len(x) - 1
    t = T95[df - 1] if df <= len(T95) else 1.96 + 2.37 / df  # beyond the table: the first-order expansion
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def clipped_interval(x, low, high):
    """(mean, low end, high end): the 95% Student-t interval of the mean of x, cut to the figure's
    range [low, high] (a rate in [0, 1], a KL >= 0), where a t-interval on a few skewed values can
    reach past it (a KL of 44.4 ± 103.2). A percentile bootstrap would stay in range too, but with 5
    seeds it covers the mean only ~85% of the time, not 95%."""
    mean, half = interval(x)
    if half is None:
        return mean, None, None
    return mean, max(low, mean - half), min(high, mean + half)


def t_test(d):
    """Two-sided p-value of the paired t-test that the differences d have mean 0 (Student's t with
    len(d) - 1 degrees of freedom: p = I_{df / (df + t^2)}(df / 2, 1 / 2), the regularised incomplete beta)."""
    d = np.asarray(d, dtype=float)
    df, sd = len(d) - 1, d.std(ddof=1)
    if sd == 0:
        return 1.0 if d.mean() == 0 else 0.0
    t = d.mean() / (sd / math.sqrt(len(d)))
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def incomplete_beta(a, b, x):
    """I_x(a, b), the regularised incomplete beta function, by its continued fraction (Numerical
    Recipes' betacf, modified Lentz) where that converges fast, else by I_x(a, b) = 1 - I_{1-x}(b, a)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 / (1 - (a + b) * x / (a + 1) or tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / (1 + num * d or tiny)
            c = 1 + num / c or tiny
            f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return f * math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a


def holm(pvalues):
    """Holm-Bonferroni adjusted p-values ({name: p} -> {name: p adjusted}): the k-th smallest of m is
    multiplied by m - k (k from 0), made non-decreasing, capped at 1. An adjusted p below 0.05 keeps
    the family-wise error rate of the whole table at 5%."""
    out, running = {}, 0.0
    for k, (name, p) in enumerate(sorted(pvalues.items(), key=lambda kv: kv[1])):
        running = max(running, min(1.0, (len(pvalues) - k) * p))
        out[name] = running
    return out


FIGURES = {"gold_reward_final": "gold reward", "win_rate_vs_sft": "win rate", "kl": "KL", "reverse_kl": "KL(ref || policy)",
           "oracle_queries": "labels", "gold_labels": "gold labels", "tie_rate": "tie rate", "distinct2_final": "distinct-2"}
BOUNDED = {"win_rate_vs_sft": (0.0, 1.0), "kl": (0.0, math.inf), "reverse_kl": (0.0, math.inf), "tie_rate": (0.0, 1.0),
           "distinct2_final": (0.0, 1.0)}  # with a range


def method_stats(group):
    """Each figure of one method's runs over seeds: the gold reward's mean with its 95% t-interval
    (mean, half-width); the bounded figures' mean with its t-interval cut to their range (mean, low, high)."""
    out = {}
    for k in FIGURES:
        values = [r["summary"].get(k) for r in group]  # (reverse_kl: None in runs from before it was measured)
        out[k] = (None, None) if None in values else clipped_interval(values, *BOUNDED[k]) if k in BOUNDED else interval(values)
    out["seconds_per_step"] = interval([sum(r["summary"]["seconds_per_step"].values()) for r in group])
    for phase in group[0]["summary"]["seconds_per_step"]:
        out[f"ms_{phase}"] = interval([1000 * r["summary"]["seconds_per_step"][phase] for r in group])
    for kind in ("generated", "trained"):
        out[f"tokens_per_second_{kind}"] = interval([r["summary"]["tokens_per_second"][kind] for r in group])
    return out


def paired_difference(group, baseline):
    """The gold reward of `group` minus that of `baseline`, paired by seed: (mean, half-width of its
    95% t-interval, two-sided p of the paired t-test), or None if they share fewer than 2 seeds."""
    by_seed = {r["seed"]: r["summary"]["gold_reward_final"] for r in baseline}
    d = [r["summary"]["gold_reward_final"] - by_seed[r["seed"]] for r in group if r["seed"] in by_seed]
    return (*interval(d), t_test(d)) if len(d) >= 2 else None


def comparisons(runs, methods):
    """Every paired comparison of the table, {(row, against): (mean, half-width, p, p Holm)}: each
    row against online DPO, each row with a suffix (ROWS) against its method's own row, and the
    RevKL authors' proxy against the same proxy aligned; Holm's correction is over all of them at once."""
    of = {m: [r for r in runs if r["method"] == m] for m in methods}
    pairs = [(m, base) for m in methods for base in [baseline_of(m)] if m != base and base in of]
    pairs += [(m, own_row(m)) for m in methods if compare_row(m)[1] and own_row(m) in of]
    pairs += [(m, m + "-aligned") for m in methods if m.endswith("-proxy") and m + "-aligned" in of]
    found = {p: paired_difference(of[p[0]], of[p[1]]) for p in pairs}
    found = {p: v for p, v in found.items() if v is not None}
    adjusted = holm({p: v[2] for p, v in found.items()})
    return {p: (*v, adjusted[p]) for p, v in found.items()}


def results_table(cfg, opts, runs, stats, tests, machine, wall):
    """results.md: the table, the paired comparisons, what runs of one seed share, the time per phase."""
    def pm(v, d=2):  # "mean ± half-width" or "mean [low, high]"
        if v[0] is None:
            return "n/a"
        if len(v) == 3:
            return f"{v[0]:.{d}f}" + ("" if v[1] is None else f" [{v[1]:.{d}f}, {v[2]:.{d}f}]")
        return f"{v[0]:.{d}f}" + ("" if v[1] is None else f" ± {v[1]:.{d}f}")

    def diff(v):  # the difference, its interval's ends, its Holm-adjusted p; * where that p < 0.05
        return (f"{v[0]:+.2f} [{v[0] - v[1]:+.2f}, {v[0] + v[1]:+.2f}], p_Holm {v[3]:.2g}" + (" *" if v[3] < 0.05 else "")
                if v else "—")

    seeds = sorted({r["seed"] for r in runs})
    run_minutes = sum(r["summary"]["seconds"] for r in runs) / 60  # some runs may be reused: their own time
    lines = [f"{len(runs)} runs: {len(stats)} methods x {len(seeds)} seeds ({', '.join(map(str, seeds))}), {cfg.steps} updates x "
             f"{cfg.batch_size} pairs each; {machine}; {opts.compare_workers} at once; this invocation took {wall / 60:.1f} min, "
             f"the runs {run_minutes:.1f} min in all. Gold reward: mean ± half-width of the 95% Student-t interval over seeds. "
             "Win rate and KL: mean [its 95% t-interval cut to the figure's range: [0, 1], >= 0]. Δ: the difference "
             "in gold reward paired by seed, [its 95% t-interval], and its paired t-test's p after Holm's correction over all "
             f"{len(tests)} comparisons of the table; * where that p < 0.05. A Δ without * is not resolved at this budget: "
             "its interval says how large it may be either way. " + code_line(runs), "",
             f"| method | gold reward (SFT {np.mean([r['summary']['gold_reward_sft'] for r in runs]):.2f}) | Δ vs online DPO | Δ vs its method's row "
             "| win rate vs SFT | KL to SFT | KL(SFT ‖ policy) | distinct-2 | oracle labels (-rm: gold labels) | tie rate | s/step |", "|---" * 11 + "|"]
    for m, st in stats.items():
        own = own_row(m) if compare_row(m)[1] else None
        lines.append(f"| {m} | {pm(st['gold_reward_final'])} | {diff(tests.get((m, baseline_of(m))))} | {diff(tests.get((m, own)))} | "
                     f"{pm(st['win_rate_vs_sft'])} | {pm(st['kl'], 1)} | {pm(st['reverse_kl'], 1)} | {pm(st['distinct2_final'])} | "
                     f"{(st['oracle_queries'] if st['gold_labels'][0] is None else st['gold_labels'])[0]:.0f} | "
                     f"{'n/a' if st['tie_rate'][0] is None else format(st['tie_rate'][0], '.2f')} | "
                     f"{st['seconds_per_step'][0]:.3f} |")
    direct = [(a, b) for a, b in tests if b not in (baseline_of(a), own_row(a))]  # neither column's: proxy vs aligned
    lines += [""] + [f"Δ {a} minus {b}, paired by seed: {diff(tests[a, b])}." for a, b in direct]
    lines += ["", "Rows with a suffix change one thing, or the named few, from their method's row (ROWS in experiments/compare.py): "
              "-ties-first, the tie handling alone (y1 chosen, as in the official code); -official-sign, that and the response "
              "term's sign (the official hook's, at the exact term's size: mean, --response_scale, baseline); -official-size, "
              "that and the term's size (the hook's: summed over the batch, divided by |log pi(y)|, no baseline) at the exact "
              "sign; -official, both: the official code's term and tie handling. -revkl adds SAIL-RevKL's penalty "
              "KL(SFT ‖ policy) at the authors' coefficient 1e-3 (the exact estimate, extensions/revkl.reverse_kl), -revkl0.01 at 0.01, -revkl0.1 at 0.1; "
              "-revkl-proxy and -revkl0.1-proxy, the authors' token proxy instead (extensions/revkl.revkl_proxy), and -revkl0.1-proxy-aligned the proxy with its logits aligned to its tokens.", "",
              "What the runs of one seed share: the SFT model (every run), the held-out prompts and the evaluation's "
              "generator (the same sampling noise for every method and for the SFT baseline), and every random stream's seed "
              "(each drawn from the seed by np.random.SeedSequence, so no two streams of a run, and no two seeds, share numbers). "
              "Methods with the same routing probabilities draw the same routes, offline pairs and prompts and their first "
              "samples with the same noise (a method and its suffixed rows; online-dpo, selm and xpo; and with p = g, the "
              "defaults, sail-pr and sail-pp split their pairs between offline and online the same way); they part ways as their "
              "policies do. Oracle labels count every label spent: online ones (ties included) and, for each dataset pair "
              "trained on (offline DPO or SAIL-DP), the labels its dataset spent on it (ties dropped while building it included).", ""]
    phases = [k[3:] for k in stats[next(iter(stats))] if k.startswith("ms_")]
    lines += ["Time per step (ms, share of the step) and throughput (runs sharing the CPU as above):", "",
              "| method | " + " | ".join(phases) + " | generated tok/s | trained tok/s |", "|---" * (len(phases) + 3) + "|"]
    for m, st in stats.items():
        total = sum(st[f"ms_{p}"][0] for p in phases)
        lines.append(f"| {m} | " + " | ".join(f"{st[f'ms_{p}'][0]:.1f} ({100 * st[f'ms_{p}'][0] / total:.0f}%)" for p in phases)
                     + f" | {st['tokens_per_second_generated'][0]:.0f} | {st['tokens_per_second_trained'][0]:.0f} |")
    return lines


def peaks(runs, methods):
    """Per method: the evaluation step where the mean gold reward over seeds is highest, and per
    seed: the gold reward and KL there, the gold and proxy rewards at the end. {method: (step,
    gold at peak (S,), KL at peak (S,), gold final (S,), proxy final (S,), cross-fitted?)}. Cross-fitted
    where every evaluation has its halves: the peak is chosen on one half of the held-out prompts
    (eval_reward_a) and both golds are read on the other (eval_reward_b), so the choice does not bias
    the drop; runs made before the halves were measured choose and read on all prompts."""
    out = {}
    for m in methods:
        hist = [r["history"] for r in runs if r["method"] == m]
        n = min(len(h) for h in hist)
        halves = all("eval_reward_a" in h[k] for h in hist for k in range(n))
        choose, read = ("eval_reward_a", "eval_reward_b") if halves else ("eval_reward", "eval_reward")
        i = int(np.argmax([np.mean([h[k][choose] for h in hist]) for k in range(n)]))
        out[m] = (hist[0][i]["step"], *(np.array([h[k][key] for h in hist]) for k, key in
                                        ((i, read), (i, "eval_kl"), (n - 1, read), (n - 1, "eval_proxy_reward"))), halves)
    return out


def overoptimisation_table(runs, methods):
    """results.md's over-optimisation section: per method, where the mean gold reward peaks (step,
    KL), the gold and proxy rewards at the end, and the end's drop from the peak, paired by seed,
    with its t-interval, descriptive only: the peak is the maximum of these same runs' mean curve,
    so the mean drop is <= 0 by construction and a test of it against 0 would reject a flat
    curve too often (8% at 5 seeds x 7 evaluations, 13% at x 16, in simulation)."""
    found = peaks(runs, methods)
    crossed = all(v[-1] for v in found.values())
    lines = ["", "Over-optimisation (--proxy: the proxy labels, the gold reward is the yardstick). Peak: the evaluation where the "
             "mean gold reward over seeds is highest. Drop: final gold reward minus the peak's, paired by seed, [95% t-interval]. "
             + ("The peak is chosen on one half of the held-out prompts and both gold rewards are read on the other half, so the "
                "choice does not bias the drop; it is still descriptive (no p-value)." if crossed else
                "The peak is picked on these same runs, so the drop is <= 0 by construction: no p-value is given, and a drop is "
                "a turn only where its interval is well clear of 0."), "",
             "| method | peak step | gold at peak | KL at peak | gold final | drop from peak | proxy final |", "|---|---|---|---|---|---|---|"]
    for m, (step, gold_peak, kl_peak, gold_final, proxy_final, _) in found.items():
        d, h = interval(gold_final - gold_peak)
        drop = "none: it peaks at the end" if np.array_equal(gold_final, gold_peak) else "—" if h is None else f"{d:+.2f} [{d - h:+.2f}, {d + h:+.2f}]"
        lines.append(f"| {m} | {step} | {np.mean(gold_peak):.2f} | {np.mean(kl_peak):.1f} | {np.mean(gold_final):.2f} | {drop} | "
                     f"{np.mean(proxy_final):.2f} |")
    return lines


def plot_overoptimisation(runs, methods, root):
    """overoptimisation.png: per method, the gold and the proxy reward on held-out prompts against
    KL(policy || SFT) over training (each evaluation: the means over seeds, with bands for the
    rewards' 95% intervals), the picture of Gao et al.'s reward-model over-optimisation."""
    plt = pyplot("the over-optimisation plot")
    if plt is None:
        return
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False, sharey=True)
    for ax, m in zip(axes.flat, methods):
        hist = [r["history"] for r in runs if r["method"] == m]
        n = min(len(h) for h in hist)
        kl = np.array([np.mean([h[i]["eval_kl"] for h in hist]) for i in range(n)])
        for key, label, color in (("eval_reward", "gold", "C0"), ("eval_proxy_reward", "proxy", "C3")):
            y = [interval([h[i][key] for h in hist]) for i in range(n)]
            mean, half = np.array([v[0] for v in y]), np.array([v[1] or 0.0 for v in y])
            ax.plot(kl, mean, marker=".", color=color, label=label)
            ax.fill_between(kl, mean - half, mean + half, color=color, alpha=0.15)
        ax.set(title=m, xlabel="KL(policy || SFT)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("reward, held-out prompts")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Gold and proxy reward against KL over training (mean, 95% interval over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "overoptimisation.png"), dpi=120)
    plt.close(fig)


PLOTS = {  # file -> (x axis: a key of the evaluations' history, its label, title)
    "reward_vs_labels.png": ("labels", "oracle labels used (ties and the offline pairs' included)", "Label efficiency"),
    "reward_vs_seconds.png": ("seconds", "training seconds (the steps, without evaluation)", "Gold reward against wall-clock time"),
    "reward_vs_kl.png": ("eval_kl", "KL(policy || SFT), sampled estimate", "Reward-KL frontier"),
    "reward_vs_step.png": ("step", "step", "Gold reward during alignment"),
}


def plot_compare(runs, root):
    """The gold reward of every method against each x of PLOTS: the mean over seeds, with a band
    (the KL plot: error bars) for the 95% interval of the reward; rows with a suffix (ROWS) dashed."""
    plt = pyplot("the plots")
    if plt is None:
        return
    methods = list(dict.fromkeys(r["method"] for r in runs))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"] if len(methods) <= 10 else plt.get_cmap("tab20").colors
    colors = dict(zip(methods, palette * 2))
    for name, (key, xlabel, title) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.4))
        for method in methods:
            hist = [r["history"] for r in runs if r["method"] == method]
            n = min(len(h) for h in hist)  # every seed evaluates at the same steps
            x, y = ([interval([h[i][k] for h in hist]) for i in range(n)] for k in (key, "eval_reward"))
            xm, ym = np.array([v[0] for v in x]), np.array([v[0] for v in y])
            yerr = np.array([v[1] or 0.0 for v in y])
            style = dict(color=colors[method], linestyle="--" if compare_row(method)[1] else "-", label=method)
            if key == "eval_kl":  # the x of each point varies too; its interval is in compare.json's runs
                ax.errorbar(xm, ym, yerr=yerr, marker="o", markersize=3, capsize=2, elinewidth=0.8, **style)
            else:
                ax.plot(xm, ym, marker=".", **style)
                ax.fill_between(xm, ym - yerr, ym + yerr, color=colors[method], alpha=0.12)
        ax.set(xlabel=xlabel, ylabel="gold reward, held-out prompts", title=f"{title} (mean, 95% interval over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(root, name), dpi=120)
        plt.close(fig)


def early_stopping_table(runs, beta):
    """results.md's early-stopping section (frontier.early_stopping): per row at one beta, the
    checkpoint chosen on one half of the held-out prompts against the last, read on the other."""
    found = frontier.early_stopping(runs, interval, t_test, holm)
    lines = ["", f"### Early stopping (beta {beta:g})", "",
             "The rule: evaluate every --eval_every steps and keep the checkpoint with the highest gold reward on half a of the "
             "held-out prompts (with a proxy labeller, these are gold labels spent on evaluation, not counted above). Read on "
             "half b, against keeping the last checkpoint: the gain paired by seed [95% t-interval], p after Holm's correction "
             f"over the {len(found)} rows; * where it is < 0.05.", "",
             "| row | chosen step (mean) | gold, chosen | gold, last | gain |", "|---|---|---|---|---|"]
    for row, (steps, chosen, last, (d, h, _, p)) in found.items():
        gain = "—" if h is None else f"{d:+.2f} [{d - h:+.2f}, {d + h:+.2f}], p_Holm {p:.2g}" + (" *" if p < 0.05 else "")
        lines.append(f"| {row} | {np.mean(steps):.0f} | {np.mean(chosen):.2f} | {np.mean(last):.2f} | {gain} |")
    return lines


def frontier_report(cfg, opts, runs, root, machine, wall):
    """--compare_betas: results.md with each row's final figures at each beta (descriptive) and the
    sections "Gold reward at equal KL" and "at equal gold labels" (experiments/frontier.py, one Holm
    family each, the method x labeller interactions included), early stopping at --beta, and with
    proxy rows (LABELLED) their accuracy and over-optimisation at --beta; compare.json, frontier.png,
    frontier_labels.png (and frontier_proxy.png, overoptimisation.png). Returns the sections' tests."""
    rows, betas = list(dict.fromkeys(r["method"] for r in runs)), list(dict.fromkeys(r["beta"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"{len(runs)} runs: {len(rows)} rows x {len(betas)} betas ({', '.join(f'{b:g}' for b in betas)}) x {len(seeds)} seeds, "
             f"{cfg.steps} updates x {cfg.batch_size} pairs, evaluated every {cfg.eval_every} steps on the "
             f"held-out prompts; {machine}; {opts.compare_workers} at once; this invocation took {wall / 60:.1f} min, the runs "
             f"{sum(r['summary']['seconds'] for r in runs) / 60:.1f} min in all. " + code_line(runs), "",
             "Where each run stops (descriptive: each row at each beta, mean over seeds of the last evaluation):", "",
             "| row | " + " | ".join(f"beta {b:g}: gold, KL, gold labels" for b in betas) + " |", "|---" * (len(betas) + 1) + "|"]
    for row in rows:
        cells = []
        for b in betas:
            group = [r["summary"] for r in runs if r["method"] == row and r["beta"] == b]
            cells.append(f"{np.mean([g['gold_reward_final'] for g in group]):.2f}, {np.mean([g['kl'] for g in group]):.1f}, "
                         f"{np.mean([g.get('gold_labels', g['oracle_queries']) for g in group]):.0f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    gold = [r for r in runs if not labeller_suffix(r["method"])]
    proxied = [r for r in runs if labeller_suffix(r["method"])]
    if proxied:  # one proxy per seed (and fit size): its accuracy on the held-out pairs, against their gold labels
        for suffix in LABELLED:
            fits = {r["seed"]: r["summary"] for r in proxied if labeller_suffix(r["method"]) == suffix}
            if fits:
                mean, half = interval([f["proxy_accuracy"] for f in fits.values()])
                lines += ["", f"Rows ending {suffix}: labelled by a proxy fit on {next(iter(fits.values()))['proxy_fit_pairs']} offline pairs, one "
                          f"fit for each seed (its seed drawn from the run's), held-out pair accuracy {mean:.3f} ± {half or 0:.3f} "
                          f"(95% t over the {len(fits)} proxies: " + ", ".join(f"{f['proxy_accuracy']:.3f}" for f in fits.values())
                          + "). Their gold labels are the proxy's fit pairs' and the offline pairs' trained on (a pair in both "
                          "charged once); the proxy's own queries are not gold labels."]
    tests = {}
    for by, budgets, title in (("kl", opts.numbers("compare_kl_budgets"), "Gold reward at equal KL"),
                               ("labels", opts.numbers("compare_label_budgets"), "Gold reward at equal gold labels")):
        section, tests[by] = frontier.budget_section(runs, budgets, by, title, interval, t_test, holm, suffixes=tuple(LABELLED))
        lines += section
        frontier.plot_frontier(gold if by == "kl" else runs,
                               os.path.join(root, "frontier.png" if by == "kl" else "frontier_labels.png"), by, interval, pyplot,
                               budgets, tuple(LABELLED))
    if proxied:  # the proxy rows with online DPO's two, at equal KL
        frontier.plot_frontier(proxied + [r for r in runs if r["method"] == "online-dpo"], os.path.join(root, "frontier_proxy.png"), "kl",
                               interval, pyplot, opts.numbers("compare_kl_budgets"), tuple(LABELLED))
    at_beta = [r for r in runs if r["beta"] == cfg.beta]
    if at_beta and all("eval_reward_a" in p for r in at_beta for p in r["history"]):
        lines += early_stopping_table(at_beta, cfg.beta)
        if proxied:
            rows_rm, proxied_at_beta = list(dict.fromkeys(r["method"] for r in proxied)), [r for r in proxied if r["beta"] == cfg.beta]
            lines += overoptimisation_table(proxied_at_beta, rows_rm)
            plot_overoptimisation(proxied_at_beta, rows_rm, root)
    with open(os.path.join(root, "compare.json"), "w") as f:
        json.dump({"machine": machine, "wall_seconds": wall, "config": {**dataclasses.asdict(cfg), **dataclasses.asdict(opts)},
                   "comparisons": tests, "runs": runs}, f, indent=1)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"compare: outputs in {root}/")
    return tests


if __name__ == "__main__":
    cli(run=compare, extra=CompareOptions, description="every method side by side over several seeds (experiments/compare.py)")
