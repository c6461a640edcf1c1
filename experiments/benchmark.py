"""
experiments/benchmark.py: where the time of the loop's own step goes, against transformers' generate.

    python -m experiments.benchmark                          # the embedded model: writes runs/sail/bench.json
    python -m experiments.benchmark --bench_model gpt2       # a real configuration with random weights

Measured in one process, medians of --bench_reps interleaved repetitions: sail.sample against
model.generate; train.train_step with each as its sampler, phase by phase; the cost of SAIL's
extra terms; on the embedded model, the gradient variance each --baseline leaves; peak memory.
"""
import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass
from statistics import median

import torch
from tqdm.auto import tqdm

import data
from experiments.stand_ins import STAND_INS, write_stand_in
from sail import sample
from data import check_writable_dir, load_inputs
from plumbing.checkpoint import State
from plumbing.distributed import pick_device
from plumbing.options import arg, check_values
from plumbing.outputs import peak_memory
import train
from train import cli, setup_run, train_step


@dataclass
class BenchOptions:
    bench_reps: int = arg(15, "repetitions of each timing (medians are reported)")
    bench_model: str = arg("embedded", "the model: embedded, or a real configuration with random weights, built locally "
                                       "(no download): gpt2, gpt2-medium, pythia-160m, pythia-410m")
    bench_batch_size: int = arg(16, "prompts per step (two responses each)")
    bench_new_tokens: int = arg(32, "tokens sampled per response (every row gets exactly this many)")
    bench_variance_steps: int = arg(50, "embedded: training steps before the gradient variance is measured a second time")

    def problems(self):
        return check_values(self, [(lambda x: x >= 1, ">= 1", ["bench_reps", "bench_batch_size", "bench_new_tokens", "bench_variance_steps"])],
                            {"bench_model": ("embedded",) + tuple(n for n in STAND_INS if STAND_INS[n].labels is None)})


def benchmark(cfg, opts):
    """`python -m experiments.benchmark`: --bench_batch_size prompts x 2 responses of exactly
    --bench_new_tokens new tokens, measured side by side in one process, medians of --bench_reps
    interleaved repetitions, on the embedded model or a real configuration with random weights
    (--bench_model: the same time and memory as the trained model). (1) sail.sample against
    model.generate(do_sample=True, use_cache=True), and the share of sample's time spent inside the
    model's forward. (2) The loop's own step (`alignment_step`, SAIL-PR with every pair online) with
    each of the two as its sampler, phase by phase. (3) The cost of SAIL's extra terms: the step's
    policy phase (forward, loss, backward) of SAIL-PR against online DPO on the same pairs (the
    learning rate is 0, so both steps see the same model and, from the same seeds, the same pairs).
    (4) On the embedded model, what the response-term baseline saves (`baseline_variance`).
    (5) Peak memory: the process's peak RSS on a CPU, peak allocated memory on CUDA."""
    device, n_new, n_prompts = pick_device(cfg.device), opts.bench_new_tokens, opts.bench_batch_size
    check_writable_dir(cfg.out_dir)  # before any measurement
    model = cfg.model if opts.bench_model == "embedded" else bench_checkpoint(cfg, opts.bench_model)
    bench = dataclasses.replace(cfg, method="sail-pr", g=1.0, batch_size=n_prompts, grad_accum=1, max_new_tokens=n_new, lr=0.0,
                                model=model)
    inputs = load_inputs(bench)
    run = setup_run(bench, inputs, device)
    prompts = data.encode_prompts(run.tokenizer, (inputs.train_prompts * n_prompts)[:n_prompts] * 2, bench.max_prompt_len)
    t_ours, t_generate, forward_share = time_samplers(run, *(t.to(device) for t in prompts), n_new, opts.bench_reps)
    step = time_steps(run, inputs, opts.bench_reps)
    variance = (baseline_variance(cfg, inputs, device, batches=4 * opts.bench_reps, train_steps=opts.bench_variance_steps)
                if opts.bench_model == "embedded" else None)
    result = {
        "device": str(device), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "model": opts.bench_model,
        "parameters": sum(p.numel() for p in run.policy.parameters()), "rows": 2 * n_prompts, "new_tokens": n_new,
        "sampler_ms": 1000 * t_ours, "generate_ms": 1000 * t_generate,
        "sampler_speedup_vs_generate": t_generate / t_ours, "sampler_forward_share": forward_share,
        "online_step_ms": {k: 1000 * v for k, v in step["ours"].items()},
        "online_step_with_generate_ms": {k: 1000 * v for k, v in step["generate"].items()},
        "online_step_ratio": sum(step["ours"].values()) / sum(step["generate"].values()),
        "online_step_phase_share": {k: v / sum(step["ours"].values()) for k, v in step["ours"].items()},
        "tokens_per_second": {"generated": 2 * n_prompts * n_new / step["ours"]["generate"],
                              "trained": step["trained_tokens"] / step["ours"]["policy"]},
        "policy_phase_sail_pr_ms": 1000 * step["ours"]["policy"], "policy_phase_online_dpo_ms": 1000 * step["dpo"]["policy"],
        "extra_terms_overhead": step["ours"]["policy"] / step["dpo"]["policy"] - 1,
        "gradient_variance": variance, "peak_memory_gb": peak_memory(device) / 2 ** 30,
        "peak_memory_kind": "peak allocated (CUDA)" if device.type == "cuda" else "peak RSS of the process",
    }
    with open(os.path.join(cfg.out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print_benchmark(result, cfg.out_dir)
    return result


def bench_checkpoint(cfg, name):
    """--bench_model's stand-in, written once to --cache_dir."""
    path = os.path.join(cfg.cache_dir, f"bench-{name}-random")
    if not os.path.isfile(os.path.join(path, "config.json")):
        check_writable_dir(cfg.cache_dir, "--cache_dir")
        write_stand_in(path, name, task_seed=cfg.task_seed)
    return path


def fixed_length_sample(model, ids, mask, *, max_new_tokens, temperature, eos_token_id, generator):
    """sail.sample with no token ending a row (EOS -1), so every row gets max_new_tokens tokens."""
    return sample(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=-1, generator=generator)


def fixed_length_generate(model, ids, mask, *, max_new_tokens, temperature, eos_token_id, generator):
    """model.generate doing the same work as fixed_length_sample, its output in sample's layout."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=temperature,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, use_cache=True, pad_token_id=eos_token_id)
    response = torch.ones_like(out[:, ids.shape[1]:])  # exactly max_new_tokens tokens, none of them EOS
    return out, torch.cat([mask, response], 1), torch.cat([torch.zeros_like(mask), response], 1)


def timed(device, fn):
    """Seconds that fn() takes (on CUDA, once the GPU has finished)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_samplers(run, prompt_ids, prompt_mask, n_new, reps):
    """(1) Medians of sail.sample's and model.generate's seconds, and of the share of sample's time
    spent inside the model's forward (timed by wrapping it)."""
    policy, forward_seconds, plain_forward = run.policy, [0.0], run.policy.forward

    @functools.wraps(plain_forward)  # the same signature: sail.sample reads it (a plain model's; a peft model's base is read)
    def timed_forward(*args, **kwargs):
        t0 = time.perf_counter()
        out = plain_forward(*args, **kwargs)
        forward_seconds[0] += time.perf_counter() - t0
        return out

    args = dict(max_new_tokens=n_new, temperature=1.0, eos_token_id=run.tokenizer.eos_token_id,
                generator=torch.Generator(run.device).manual_seed(run.cfg.seed))
    policy.eval()
    for sampler in (fixed_length_sample, fixed_length_generate):  # warm-up
        sampler(policy, prompt_ids, prompt_mask, **args)
    t_ours, t_generate, shares = [], [], []
    for _ in tqdm(range(reps), desc="sampler", dynamic_ncols=True, leave=False):
        forward_seconds[0], policy.forward = 0.0, timed_forward
        t_ours.append(timed(run.device, lambda: fixed_length_sample(policy, prompt_ids, prompt_mask, **args)))
        policy.forward = plain_forward
        shares.append(forward_seconds[0] / t_ours[-1])
        t_generate.append(timed(run.device, lambda: fixed_length_generate(policy, prompt_ids, prompt_mask, **args)))
    policy.train()
    return median(t_ours), median(t_generate), median(shares)


def time_steps(run, inputs, reps):
    """(2) and (3): median seconds per phase of the loop's step, {"ours", "generate", "dpo"} ->
    {phase: seconds}: with each sampler, and online DPO's step on the same pairs as "ours"."""
    dpo = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, method="online-dpo"))  # the same routes, gamma 0
    plan = {"ours": (run, fixed_length_sample), "generate": (run, fixed_length_generate), "dpo": (dpo, fixed_length_sample)}
    states = {k: State.new(run.cfg, run, len(inputs.train_prompts), len(inputs.pairs or []), history=[]) for k in plan}
    times, trained, sample = {k: [] for k in plan}, [], train.sample
    try:
        for rep in tqdm(range(reps + 1), desc="online step", dynamic_ncols=True, leave=False):  # the first is a warm-up
            for name, (r, sampler) in plan.items():
                train.sample = sampler  # the sampler train.build_pairs calls
                row = train_step(r, states[name], rep + 1)[0]
                if rep:
                    times[name].append({k[2:]: v for k, v in row.items() if k.startswith("t_")})
                    if name == "ours":
                        trained.append(row["trained_tokens"])
    finally:
        train.sample = sample
    out = {name: {k: median(t[k] for t in rows) for k in rows[0]} for name, rows in times.items()}
    out["trained_tokens"] = median(trained)
    return out


def baseline_variance(cfg, inputs, device, batches, train_steps=50):
    """(4) The variance of the step's gradient with each --baseline, for the default SAIL-PR (g =
    0.3: offline and online pairs in one batch), at the SFT policy and after `train_steps` steps:
    the trace of its covariance over `batches` steps of the same model (learning rate 0), each
    baseline on the same pairs (the same seeds), and the squared norm of the mean gradient."""
    base = dataclasses.replace(cfg, method="sail-pr", grad_accum=1, lr=0.0, grad_clip=0.0)
    runs = {b: setup_run(dataclasses.replace(base, baseline=b), inputs, device) for b in ("none", "loo-all", "loo")}
    trainer = setup_run(dataclasses.replace(base, lr=cfg.lr, grad_clip=cfg.grad_clip), inputs, device)
    state = State.new(trainer.cfg, trainer, len(inputs.train_prompts), len(inputs.pairs), history=[])
    out = {}
    for at in (0, train_steps):
        if at:  # the second measurement: train first, with the run's own learning rate and clipping
            for step in range(train_steps):
                train_step(trainer, state, step + 1)
        weights = trainer.policy.state_dict()
        for name, r in runs.items():
            r.policy.load_state_dict(weights)
            st = State.new(r.cfg, r, len(inputs.train_prompts), len(inputs.pairs), history=[])
            grads = []
            for k in tqdm(range(batches), desc=f"variance, --baseline {name}", dynamic_ncols=True, leave=False):
                train_step(r, st, k + 1)
                grads.append(torch.cat([p.grad.flatten() for p in r.policy.parameters()]).double())
            g = torch.stack(grads)  # (batches, parameters)
            out[f"step{at}_{name}"] = {"variance": (g - g.mean(0)).pow(2).sum(1).mean().item() * batches / (batches - 1),
                                       "mean_norm_sq": g.mean(0).pow(2).sum().item()}
    return out


def print_benchmark(r, out_dir):
    print(f"device {r['device']}, {r['cpu_threads']} threads, {r['model']} ({r['parameters'] / 1e6:.2f}M parameters), {r['rows']} rows")
    print(f"sampler, {r['new_tokens']} new tokens:   sail.sample {r['sampler_ms']:.1f} ms | model.generate {r['generate_ms']:.1f} ms | "
          f"speed-up {r['sampler_speedup_vs_generate']:.2f}x | time inside the model's forward {100 * r['sampler_forward_share']:.0f}%")
    print(f"the loop's sail-pr step: with sail.sample {sum(r['online_step_ms'].values()):.1f} ms | with model.generate "
          f"{sum(r['online_step_with_generate_ms'].values()):.1f} ms | ratio {r['online_step_ratio']:.2f}")
    print("  phases (ours):   " + " | ".join(f"{k} {r['online_step_ms'][k]:.1f} ms ({100 * v:.0f}%)"
                                          for k, v in r["online_step_phase_share"].items()))
    print(f"  tokens per second: generated {r['tokens_per_second']['generated']:.0f} | trained {r['tokens_per_second']['trained']:.0f}")
    print(f"policy phase, same pairs: sail-pr {r['policy_phase_sail_pr_ms']:.2f} ms | online-dpo {r['policy_phase_online_dpo_ms']:.2f} ms | "
          f"extra terms {100 * r['extra_terms_overhead']:+.1f}%")
    v = r["gradient_variance"] or {}
    for at in sorted({k.split("_")[0] for k in v}):
        print(f"gradient variance (trace), sail-pr at {at}: " + " | ".join(
            f"--baseline {k.split('_', 1)[1]} {v[k]['variance']:.3g}" for k in v if k.startswith(at + "_"))
            + f" | squared norm of the mean gradient {v[at + '_none']['mean_norm_sq']:.3g}")
    print(f"peak memory: {r['peak_memory_gb']:.2f} GB ({r['peak_memory_kind']})")
    print(f"benchmark: {out_dir}/bench.json")


if __name__ == "__main__":
    cli(run=benchmark, extra=BenchOptions, description="where the step's time goes (experiments/benchmark.py)")
