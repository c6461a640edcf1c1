"""
plumbing/outputs.py: what a run prints and writes, and its timing.

Per step: `step_metrics` (the line of metrics.jsonl: means over the valid pairs of every rank,
counts and timings added to the run's totals), `log_step` (that line, and one fixed-format line
on the terminal), `show_sample` (a prompt with its chosen and rejected responses, now and then).
At the end: policy/ (from_pretrained-ready), summary.json, reward.png, and the final table.
`Clock` times the step's phases. `CODE`: the code this process runs (summary.json's "code"), so
that a result stays tied to the code that made it (experiments/compare.py reruns one made by other code).
"""
import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from plumbing.distributed import all_ranks_ids, all_ranks_sum
from sail import DP, PP, accuracy


def step_metrics(run, state, step, pairs, labels, h, delta, grad_norm, clock):
    """The step's line of metrics.jsonl: means over the valid pairs (of every rank); counts and
    timings added to the run's totals. h: (B,) each pair's margin; delta: (2B,) each row's
    Delta(y); clock: the step's `Clock`; SAIL-RevKL's penalty (B,) is in pairs.extension."""
    times, dt = clock.stop()
    penalty = pairs.extension.get("revkl_penalty")
    state.used_pairs.update(all_ranks_ids(pairs.pair_ids, run.world))  # each distinct dataset pair counts its dataset's labels once
    beta = run.cfg.beta
    neg_ell, valid, scores = -F.logsigmoid(beta * h), labels.valid.to(h.device), labels.scores  # (B,), (B,), (2B,)
    kl = delta[torch.from_numpy(np.concatenate([pairs.route >= PP] * 2)).to(delta.device)]  # the rows sampled from pi_theta
    sums = all_ranks_sum(torch.tensor([
        valid.sum(), torch.where(valid, neg_ell, 0.0).sum(), torch.where(valid, accuracy(h), 0.0).sum(),
        torch.where(valid, beta * h, 0.0).sum(), kl.sum(), kl.numel(), scores.nan_to_num(0.0).sum().item(),
        (~scores.isnan()).sum(), labels.queries, labels.ties, pairs.generated, int(pairs.batch[1].sum())],
        dtype=torch.float64, device=run.device), run.world).tolist()
    n_valid, loss_sum, acc_sum, margin_sum, kl_sum, n_kl, reward_sum, n_scored, queries, ties, generated, trained = sums
    state.oracle_queries, state.ties = state.oracle_queries + int(queries), state.ties + int(ties)
    for k, v in (("generated", generated), ("trained", trained)):
        state.token_totals[k] += int(v)
    for k, v in times.items():
        state.phase_seconds[k] = state.phase_seconds.get(k, 0.0) + v
    revkl = {}
    if penalty is not None:  # SAIL-RevKL's penalty before --revkl scales it, the mean over the step's pairs
        total, n = all_ranks_sum(torch.tensor([penalty.sum(), len(penalty)], dtype=torch.float64, device=run.device), run.world)
        revkl = {"revkl": (total / n).item()}
    return {"step": step, "loss": loss_sum / max(n_valid, 1), "acc": acc_sum / max(n_valid, 1), "margin": margin_sum / max(n_valid, 1),
            # the mean log-ratio to the loss's reference of the responses sampled this step (SELM: to its
            # last iterate; None if the step sampled none): a KL estimate at temperature 1 only, since the
            # samples must come from the policy itself; at another temperature it is logged as log_ratio
            ("kl" if run.cfg.temperature == 1 else "log_ratio"): kl_sum / n_kl if n_kl else None,
            "oracle_reward": reward_sum / n_scored if n_scored else None,  # the mean oracle score of the rows it labelled
            "tie_rate": ties / queries if queries else None,  # of this step's oracle labels
            "grad_norm": grad_norm.item(), **revkl, **label_totals(run, state),
            "generated_tokens": int(generated), "trained_tokens": int(trained),
            "dt": dt, **{f"t_{k}": v for k, v in times.items()}}


def label_totals(run, state):
    """The oracle labels spent so far, the same way for every pair: each online label (a tie too),
    and for each distinct dataset pair trained on (offline DPO or SAIL-DP), the labels its dataset
    spent on it (the ties dropped before it included: data.make_task). --proxy: the labeller's
    queries are counted there too, and gold_labels counts the gold labels alone: those of the
    distinct dataset pairs trained on or used to fit the proxy (the first fit_pairs; a pair in both
    is charged once), the proxy's queries not."""
    spent = run.pair_labels[list(state.used_pairs)].sum() if state.used_pairs else 0
    n_used = len(state.used_pairs)
    out = {"oracle_queries": state.oracle_queries + int(spent), "ties": state.ties + int(spent) - n_used}
    if run.labeller is not run.gold:  # the fit pairs (the first n), then the pairs trained on beyond them
        n = getattr(run.labeller, "fit_pairs", 0)
        out["gold_labels"] = int(run.pair_labels[:n].sum()) + int(run.pair_labels[[i for i in state.used_pairs if i >= n]].sum())
    return out


PHASES = {}  # the seconds of each phase of the running step, from the @timed functions (Clock clears it)


def timed(phase):
    """Decorator: the function's wall time is added to `phase` of the step's metrics line (t_PHASE);
    on CUDA, which runs asynchronously, after the GPU has finished. It changes nothing else."""
    def decorate(fn):
        @functools.wraps(fn)
        def timed_fn(*args, **kwargs):
            synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize()
            PHASES[phase] = PHASES.get(phase, 0.0) + time.perf_counter() - t0
            return out
        return timed_fn
    return decorate


def synchronize():
    if torch.cuda.is_initialized():  # never on a machine without CUDA
        torch.cuda.synchronize()


class Clock:
    """The seconds of one step: its phases' (from @timed functions, in the order they first ran)
    and the whole step's (dt)."""

    def __init__(self):
        PHASES.clear()
        self.t0 = time.perf_counter()

    def stop(self):
        synchronize()
        return dict(PHASES), time.perf_counter() - self.t0


def open_metrics(cfg, step):
    """config.json, and metrics.jsonl holding exactly the lines of steps 1..step (a killed run may
    have logged more than its checkpoint holds), open to append."""
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    kept = []
    if step and os.path.exists(path):
        with open(path) as f:
            kept = f.readlines()[:step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def log_step(metrics_file, row):
    """One JSON line per step, and one fixed-format line on the terminal."""
    metrics_file.write(json.dumps(row) + "\n")
    metrics_file.flush()
    line = f"step {row['step']} | loss {row['loss']:.3f} | acc {row['acc']:.2f} | margin {row['margin']:.2f}"
    line += f" | kl {row['kl']:.2f}" if row.get("kl") is not None else ""  # steps that sample responses, at temperature 1
    line += f" | reward {row['oracle_reward']:.2f} | ties {row['tie_rate']:.2f}" if row["tie_rate"] is not None else ""
    line += f" | revkl {row['revkl']:.3f}" if "revkl" in row else ""  # SAIL-RevKL's penalty
    line += f" | dt {1000 * row['dt']:.0f}ms"
    line += "".join(f" | {k} {v:.3f}" for k, v in row.items() if k.startswith("eval_") and not k.endswith(("_a", "_b")))
    tqdm.write(line)


def show_sample(run, pairs, labels):
    """A prompt with its chosen and rejected responses and their rewards by the oracle (run.gold) (an
    online pair if the step has one). The scores are for display, not oracle queries."""
    B = len(pairs.route)
    i = int((pairs.route <= DP).sum()) % B  # the first online pair, or the first pair
    w, l = (i, B + i) if bool(labels.y1_wins[i]) else (B + i, i)
    shown = run.gold([pairs.prompts[i]] * 2, [pairs.texts[w], pairs.texts[l]])
    labeller = "oracle" if run.labeller is run.gold else "proxy"
    how = ["offline pair", "SAIL-DP: self-labelled", "SAIL-PP: self-labelled", f"SAIL-PR: {labeller}-labelled"][pairs.route[i]]
    tqdm.write(f"  prompt   {pairs.prompts[i]!r}  [{how}{'' if labels.valid[i] else ', a tie: the fair coin'}]\n"
               f"  chosen   {pairs.texts[w]!r}  (reward {shown[0]:.2f})\n  rejected {pairs.texts[l]!r}  (reward {shown[1]:.2f})")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = ("train.py", "sail.py", "reward.py", "data.py", "plumbing", "extensions")  # what `python train.py` executes


def code_revision(root=ROOT):
    """The code a run executes: {"digest": sha256 of its source (SOURCE's .py files, tests excluded,
    each path and its bytes), "commit": git's HEAD or None, "dirty": whether that source differs
    from the commit (None without git)}. Two runs with one digest ran the same code."""
    files = [t for t in SOURCE if t.endswith(".py")] + sorted(
        os.path.relpath(os.path.join(d, f), root) for top in SOURCE if not top.endswith(".py")
        for d, _, names in os.walk(os.path.join(root, top)) for f in names if f.endswith(".py") and not f.startswith("test_"))
    digest = hashlib.sha256()
    for f in files:
        with open(os.path.join(root, f), "rb") as fh:
            digest.update(f.replace(os.sep, "/").encode() + b"\0" + fh.read() + b"\0")
    commit = dirty = None
    try:
        git = ["git", "-C", root]
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(git + ["status", "--porcelain", "--", *files], capture_output=True, text=True, timeout=10,
                                    check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):  # no git, or not a clone: the digest alone
        pass
    return {"digest": digest.hexdigest(), "commit": commit, "dirty": dirty}


CODE = code_revision()  # read when this process imported the code, which is the code it runs


def write_outputs(run, state, sft_eval, seconds, t_start):
    """policy/ (from_pretrained-ready), summary.json and reward.png; returns the summary. A LoRA
    policy is saved merged (W + (alpha / r) B A), a plain model again; the run's last use of it."""
    cfg, final = run.cfg, state.history[-1]
    if cfg.lora_rank:  # merged in place: the adapters, and with them the reference (adapters off), are gone
        run.policy, run.reference, run.train_reference = run.policy.merge_and_unload(), None, None
    run.policy.save_pretrained(os.path.join(cfg.out_dir, "policy"))
    run.tokenizer.save_pretrained(os.path.join(cfg.out_dir, "policy"))
    phases = state.phase_seconds
    summary = {
        "method": cfg.method, "steps": cfg.steps, "seed": cfg.seed, "world_size": run.world,
        "gold_reward_sft": sft_eval["eval_reward"], "gold_reward_final": final["eval_reward"],
        "win_rate_vs_sft": final["eval_win"], "kl": final["eval_kl"], "reverse_kl": final.get("eval_revkl"),
        "pair_accuracy_sft": sft_eval.get("eval_acc"), "pair_accuracy_final": final.get("eval_acc"),
        # on the held-out pairs whose texts are in no training pair (data.unseen_pairs; None if there is none)
        "pair_accuracy_unseen_sft": sft_eval.get("eval_acc_unseen"), "pair_accuracy_unseen_final": final.get("eval_acc_unseen"),
        **({"proxy_reward_sft": sft_eval["eval_proxy_reward"], "proxy_reward_final": final["eval_proxy_reward"],
            "proxy_win_rate_vs_sft": final["eval_proxy_win"], "proxy_accuracy": run.labeller.held_out_accuracy,
            "proxy_fit_pairs": run.labeller.fit_pairs} if cfg.proxy else {}),
        "margin_final": final.get("eval_margin"), "distinct2_sft": sft_eval.get("eval_distinct2"), "distinct2_final": final.get("eval_distinct2"),
        "sft_halves": {k: v for k, v in sft_eval.items() if k.endswith(("_a", "_b"))},  # the SFT model's figures on each half of the prompts
        **label_totals(run, state),  # oracle_queries, ties: all the labels spent, the offline pairs' included
        "seconds": time.perf_counter() - t_start, "seconds_by_phase": seconds,
        "seconds_per_step": {k: v / cfg.steps for k, v in phases.items()},
        "phase_share": {k: v / sum(phases.values()) for k, v in phases.items()},
        "tokens_per_second": {"generated": state.token_totals["generated"] / max(phases.get("generate", 0.0), 1e-9),
                              "trained": state.token_totals["trained"] / max(phases["policy"], 1e-9)},
        "peak_memory_gb": peak_memory(run.device) / 2 ** 30,  # RSS on a CPU, allocated on CUDA; a resumed run's since it resumed
    }
    summary["tie_rate"] = summary["ties"] / summary["oracle_queries"] if summary["oracle_queries"] else None
    summary["code"] = CODE  # the code that made this run: experiments/compare.py reuses it only under the same digest
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_history(state.history, os.path.join(cfg.out_dir, "reward.png"), cfg.method)
    return summary


def print_summary(cfg, summary, sft_eval, final):
    print(f"\n{'held-out prompts':<26}{'SFT':>10}{cfg.method:>12}")
    for name, key in [("gold reward", "eval_reward"), ("win rate vs SFT", "eval_win"), ("proxy reward (the labeller)", "eval_proxy_reward"),
                      ("proxy win rate vs SFT", "eval_proxy_win"), ("KL to reference", "eval_kl"),
                      ("KL(reference || policy)", "eval_revkl"),
                      ("pair accuracy", "eval_acc"), ("  on unseen texts", "eval_acc_unseen"), ("implicit margin", "eval_margin"), ("distinct bigrams", "eval_distinct2")]:
        if key in final:
            print(f"{name:<26}{sft_eval[key]:>10.3f}{final[key]:>12.3f}")
    print("time per step: " + " | ".join(f"{k} {1000 * v:.0f}ms ({100 * summary['phase_share'][k]:.0f}%)"
                                         for k, v in summary["seconds_per_step"].items())
          + f" | tokens/s generated {summary['tokens_per_second']['generated']:.0f}, trained {summary['tokens_per_second']['trained']:.0f}")
    s = summary["seconds_by_phase"]
    ties = f" ({summary['ties']} ties)" if summary["ties"] else ""
    gold = f" | gold labels {summary['gold_labels']} (the proxy's fit pairs and the offline pairs')" if "gold_labels" in summary else ""
    print(f"oracle queries {summary['oracle_queries']}{ties}{gold} | time: sft {s['sft']:.0f}s, align {s['align']:.0f}s, "
          f"total {summary['seconds']:.0f}s | peak memory {summary['peak_memory_gb']:.2f} GB | outputs in {cfg.out_dir}/")


def pyplot(what):
    """matplotlib's pyplot, headless; or None, with a note: plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"(pip install matplotlib to get {what}; the data is written all the same)")
        return None


def plot_history(history, path, title):
    """Gold reward on held-out prompts against step (--proxy: and the proxy's reward)."""
    plt = pyplot("reward.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("eval_reward", "gold"), ("eval_proxy_reward", "proxy (the labeller)")):
        if key in history[-1]:
            ax.plot([h["step"] for h in history], [h[key] for h in history], marker="o", label=label)
    ax.set(xlabel="step", ylabel="reward (held-out)", title=title)
    if "eval_proxy_reward" in history[-1]:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def peak_memory(device):
    """Bytes: the peak allocated on a CUDA device, or this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # macOS: bytes
