"""
experiments/peer_trl.py: this project's online DPO against Hugging Face TRL's OnlineDPOTrainer, the
implementation people already use, on the same task, side by side: quality and time per step.

    pip install -r experiments/requirements-peer.txt   # TRL (1.16), the one experiment that needs it
    python -m experiments.peer_trl                     # 5 seeds x 150 updates, then the timing
    python -m experiments.peer_trl --peer_seeds 2 --steps 20 --peer_timing_reps 1   # a quick look

Quality: for each seed, three runs from the same cached SFT model: the project's online DPO
(`train.main`), the same with --ties first (TRL's tie handling: y1 is a tie's winner, so the one
deliberate difference goes), and TRL's trainer with the settings of `trl_settings` (its defaults
overridden where they differ from the project's: learning rate and its constant schedule, fp32
(bf16 on a GPU that has it, as the project's autocast), no gradient checkpointing, temperature, lengths, batch, dropout off, no missing-EOS penalty). The
reward function TRL calls is the gold reward, and TRL's final policy is evaluated by the project's
own `train.evaluate` on the same held-out prompts with the same random streams as the project's
runs of that seed. The table pairs each project row with TRL's by seed (Holm over the table).

Time: at one thread, interleaved (each run in turn, then again), each run --steps updates with
no evaluation in between; the time per step is the wall time of one update (the project:
`alignment_step`, with its metrics line; TRL: its callbacks' on_step_begin to on_step_end, with
its statistics), with each one's phases and the tokens it sampled per step. How long a step takes
depends on how long the responses are, which depends on what each run's policy has learned, so
each is timed twice: "frozen" (learning rate 1e-12: each update moves a weight by about 1e-12,
both sample the SFT model at every step, the same work in distribution: the implementations
compared) and
"trained" (as in the quality table), with SAIL-PR with every pair online (online DPO's work plus
its extra terms) and online DPO with --ties first (TRL's tie rule) beside them.

Options TRL's side would not follow (--lora_rank, --proxy, --reward_model, --revkl,
--weight_decay, --grad_accum, --label_mode sampled) are refused in one line.

Departures, by design: TRL's loss forward passes no position_ids (left padding shifts GPT-2's
positions of a padded prompt; the project counts real tokens only), and TRL's logged
`objective/kl` sums over padding after EOS; only its logs are affected.
"""
import contextlib
import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
from data import check_writable_dir
from experiments.compare import holm, interval, t_test
from plumbing.distributed import pick_device
from plumbing.evaluation import make_eval_set
from plumbing.options import arg, check_values
import train
from train import cli, evaluate, main, reference_logps, setup_run

FROZEN = 1e-12  # the timing's "frozen" learning rate: updates of ~1e-12, both sample the SFT model throughout
PEER_KEY = (7, 0, 0)  # TRL's seed: a spawn key of the run's root seed that no stream of train.py uses (theirs have 2 entries)
FIGURES = {"gold_reward_final": "gold reward", "win_rate_vs_sft": "win rate vs SFT", "kl": "KL", "reverse_kl": "KL(ref ‖ policy)"}


@dataclass
class PeerOptions:
    peer_seeds: int = arg(5, "seeds (--seed, --seed + 1, ...): each runs the project's online DPO, with --ties first, and TRL's")
    peer_timing_reps: int = arg(3, "interleaved timing repetitions at one thread (0: no timing)")

    def problems(self):
        return check_values(self, [(lambda x: x >= 1, ">= 1", ["peer_seeds"]), (lambda x: x >= 0, ">= 0", ["peer_timing_reps"])], {})


def import_trl():
    """TRL's OnlineDPOTrainer and its config, or a one-line error naming the install."""
    try:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    except ImportError as e:
        raise SystemExit(f"error: experiments/peer_trl.py needs TRL ({e}); pip install -r experiments/requirements-peer.txt")
    return OnlineDPOConfig, OnlineDPOTrainer


def trl_seed(seed):
    """TRL's seed (its set_seed and data sampler) for the run of root seed `seed`, from np.random.SeedSequence."""
    return int(np.random.SeedSequence(seed, spawn_key=PEER_KEY).generate_state(1)[0])


def trl_settings(cfg, seed, out_dir):
    """OnlineDPOConfig's arguments for the project's settings `cfg`: TRL's defaults overridden where
    they differ (lr 5e-7 with linear decay, bf16, gradient checkpointing, temperature 0.9, 64 new
    tokens), every pair online, cfg.batch_size prompts x 2 completions per update, no accumulation."""
    return dict(output_dir=out_dir, seed=trl_seed(seed), data_seed=trl_seed(seed), max_steps=cfg.steps,
                per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
                learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay,
                max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else 1e30, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                beta=[cfg.beta], loss_type="sigmoid", temperature=cfg.temperature, top_k=0, top_p=1.0,
                max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_prompt_len + cfg.max_new_tokens, missing_eos_penalty=None,
                bf16=cfg.device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # as the project's autocast
                fp16=False, gradient_checkpointing=False, disable_dropout=True, use_cpu=cfg.device == "cpu",
                report_to=[], save_strategy="no", logging_steps=10, dataloader_num_workers=0, disable_tqdm=True)


class StepTimer:
    """TRL's time per update (on_step_begin to on_step_end: generation, both forwards, the reward,
    backward, clipping and the optimiser), and its phases, by wrapping the trainer's methods."""

    def __init__(self, trainer):
        self.steps, self.phases, self.t0, self.generated, self.forwards = [], {}, None, 0, 0

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                if name == "generate":  # its completion_mask: the tokens sampled, each response's EOS included
                    self.generated += int(out[3].sum())
                key = name
                if name == "forward":  # each step runs the policy's, then the reference's
                    key, self.forwards = ("policy forward", "reference forward")[self.forwards % 2], self.forwards + 1
                self.phases[key] = self.phases.get(key, 0.0) + time.perf_counter() - t
                return out
            return wrapper
        trainer._generate = timed("generate", trainer._generate)  # sampling, with tokenising the prompts
        trainer._forward = timed("forward", trainer._forward)  # the policy's (with its graph), then the reference's
        trainer._calculate_rewards_from_functions = timed("label", trainer._calculate_rewards_from_functions)
        trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)

    def callback(self):
        from transformers import TrainerCallback
        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                timer.t0 = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                timer.steps.append(time.perf_counter() - timer.t0)
        return Callback()


def trl_run(cfg, seed, out_dir, evaluated=True):
    """TRL's OnlineDPOTrainer from the cached SFT model (policy and reference, as from_pretrained
    loads them), the gold reward as its reward function, the training prompts; then (evaluated) its
    policy through train.evaluate with this seed's held-out set and streams. Returns (figures as in
    summary.json, ms per step, {phase: ms per step, "tokens sampled": per step})."""
    OnlineDPOConfig, OnlineDPOTrainer = import_trl()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    cfg = dataclasses.replace(cfg, method="online-dpo", seed=seed, out_dir=out_dir)
    check_writable_dir(out_dir)
    inputs = data.load_inputs(cfg)
    device = pick_device(cfg.device)
    run = setup_run(cfg, inputs, device)  # the SFT policy, its frozen reference, the gold reward; nothing trained yet
    eval_set = make_eval_set(run, inputs, reference_logps)
    sft_eval, sft_rewards = evaluate(run, eval_set, None) if evaluated else ({}, None)
    tokenizer = run.tokenizer
    assert all(tokenizer(p, add_special_tokens=False)["input_ids"] == tokenizer(p)["input_ids"] for p in inputs.train_prompts[:8]), \
        "TRL tokenises prompts without special tokens; this tokenizer adds some"

    def gold_reward(prompts, completions, **kwargs):
        return run.gold(prompts, completions).tolist()

    path = cfg.model if cfg.model != "embedded" else data.embedded_path(cfg)
    policy, ref = (AutoModelForCausalLM.from_pretrained(path).to(device) for _ in range(2))  # as a TRL user loads them
    trainer = OnlineDPOTrainer(model=policy, ref_model=ref, reward_funcs=gold_reward, processing_class=tokenizer,
                               args=OnlineDPOConfig(**trl_settings(cfg, seed, out_dir)),
                               train_dataset=Dataset.from_dict({"prompt": list(inputs.train_prompts)}))
    timer = StepTimer(trainer)
    trainer.add_callback(timer.callback())
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.train()
    run.policy = trainer.model.eval()
    figures = {}
    if evaluated:
        final = evaluate(run, eval_set, sft_rewards)[0]
        figures = {"gold_reward_sft": sft_eval["eval_reward"], "gold_reward_final": final["eval_reward"],
                   "win_rate_vs_sft": final["eval_win"], "kl": final["eval_kl"], "reverse_kl": final["eval_revkl"]}
    steps = len(timer.steps)
    return figures, 1000 * sum(timer.steps) / steps, {**{k: 1000 * v / steps for k, v in timer.phases.items()},
                                                      "tokens sampled": timer.generated / steps}


def project_run(cfg, seed, out_dir, **settings):
    """The project's online DPO (or settings' method: train.main) at this seed, from scratch, its
    output in out_dir/log.txt; its time per step is the wall time of train.train_step (the
    step's phases and its metrics line), as TRL's spans its step callbacks."""
    c = dataclasses.replace(cfg, **{"method": "online-dpo", **settings, "seed": seed, "out_dir": out_dir, "resume": "no"})
    os.makedirs(out_dir, exist_ok=True)
    steps, step = [], train.train_step

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = step(*args, **kwargs)
        steps.append(time.perf_counter() - t)
        return out
    train.train_step = timed  # main calls it by this name
    try:
        with open(os.path.join(out_dir, "log.txt"), "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            summary = main(c)
    finally:
        train.train_step = step
    per_step = summary["seconds_per_step"]
    sampled = summary["tokens_per_second"]["generated"] * per_step["generate"]  # per step
    return summary, 1000 * sum(steps) / len(steps), {**{k: 1000 * v for k, v in per_step.items()}, "tokens sampled": sampled}


def quality_table(rows, peer="TRL OnlineDPOTrainer"):
    """results.md's table: {row name: [figures of each seed, by seed order]}; each row's mean [95%
    t-interval] per figure, then each other row minus the peer's, paired by seed, Holm over the table."""
    tests = {(r, k): np.subtract([s[k] for s in rows[r]], [s[k] for s in rows[peer]]) for r in rows if r != peer for k in FIGURES}
    found = {key: (*interval(d), t_test(d)) for key, d in tests.items()}
    adjusted = holm({key: v[2] for key, v in found.items()})
    lines = ["| | " + " | ".join(FIGURES.values()) + " |", "|---" * (len(FIGURES) + 1) + "|"]
    for r, seeds in rows.items():
        lines.append(f"| {r} | " + " | ".join("{:.3f} ± {:.3f}".format(*interval([s[k] for s in seeds])) for k in FIGURES) + " |")
    for r in rows:
        if r != peer:
            cells = []
            for k in FIGURES:
                d, h, _ = found[r, k]
                cells.append(f"{d:+.3f} [{d - h:+.3f}, {d + h:+.3f}], p_Holm {adjusted[r, k]:.2g}" + (" *" if adjusted[r, k] < 0.05 else ""))
            lines.append(f"| {r} − TRL, paired by seed | " + " | ".join(cells) + " |")
    return lines, {f"{r} {k}": {"difference": v[0], "half_width": v[1], "p": v[2], "p_holm": adjusted[r, k]} for (r, k), v in found.items()}


def timing_table(times):
    """results.md's timing table: {name: [(ms per step, {phase: ms, "tokens sampled": n}) per
    repetition]}: each one's per-repetition times, their mean, its mean phases, the tokens it
    sampled per step and its generation time per sampled token."""
    lines = ["| | ms per step, each repetition | mean | phases (ms per step, mean over repetitions) | tokens sampled per step | "
             "generation, ms per sampled token |", "|---|---|---|---|---|---|"]
    for name, reps in times.items():
        phases = {k: np.mean([p[k] for _, p in reps]) for k in reps[0][1]}
        tokens = phases.pop("tokens sampled")
        lines.append(f"| {name} | {', '.join(f'{t:.0f}' for t, _ in reps)} | {np.mean([t for t, _ in reps]):.0f} | "
                     + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()) + f" | {tokens:.0f} | {phases['generate'] / tokens:.3f} |")
    return lines


def peer(cfg, opts):
    """`python -m experiments.peer_trl`: the quality table over --peer_seeds, then the timing."""
    unmapped = {"--lora_rank": cfg.lora_rank, "--proxy": cfg.proxy, "--reward_model": cfg.reward_model, "--revkl": cfg.revkl,
                "--weight_decay": cfg.weight_decay, "--grad_accum": cfg.grad_accum - 1, "--label_mode sampled": cfg.label_mode != "hard"}
    for name, value in unmapped.items():
        if value:
            raise SystemExit(f"error: experiments/peer_trl.py does not pass {name} to TRL; run it without")
    import_trl()  # before any minute is spent
    root = os.path.join(cfg.out_dir, "peer_trl")
    check_writable_dir(root)
    t0 = time.perf_counter()
    rows = {"project online DPO": [], "project online DPO, --ties first": [], "TRL OnlineDPOTrainer": []}
    for seed in range(cfg.seed, cfg.seed + opts.peer_seeds):
        rows["project online DPO"].append(project_run(cfg, seed, os.path.join(root, f"project-seed{seed}"))[0])
        rows["project online DPO, --ties first"].append(project_run(cfg, seed, os.path.join(root, f"ties-first-seed{seed}"), ties="first")[0])
        rows["TRL OnlineDPOTrainer"].append(trl_run(cfg, seed, os.path.join(root, f"trl-seed{seed}"))[0])
        print(f"peer_trl: seed {seed} done ({(time.perf_counter() - t0) / 60:.1f} min)")
    lines, tests = quality_table(rows)
    lines = [f"{opts.peer_seeds} seeds x {cfg.steps} updates of {cfg.batch_size} prompts x 2 responses, beta {cfg.beta}, lr {cfg.lr}, "
             f"temperature {cfg.temperature}; figures on the held-out prompts by train.evaluate, mean ± 95% t half-width over seeds; "
             f"the differences paired by seed, p after Holm's correction over the table's {len(tests)}; * where < 0.05. "
             f"{(time.perf_counter() - t0) / 60:.1f} min.", ""] + lines
    times = {}
    if opts.peer_timing_reps:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        quiet = dataclasses.replace(cfg, eval_every=cfg.steps, sample_every=cfg.steps + 1, save_every=cfg.steps)
        frozen = dataclasses.replace(quiet, lr=FROZEN)
        runs = {"project online DPO, frozen": lambda out: project_run(frozen, cfg.seed, out),
                "TRL OnlineDPOTrainer, frozen": lambda out: trl_run(frozen, cfg.seed, out, evaluated=False),
                "project SAIL-PR, every pair online (--g 1), frozen": lambda out: project_run(frozen, cfg.seed, out, method="sail-pr", g=1.0),
                "project online DPO, trained": lambda out: project_run(quiet, cfg.seed, out),
                "TRL OnlineDPOTrainer, trained": lambda out: trl_run(quiet, cfg.seed, out, evaluated=False),
                "project online DPO --ties first, trained": lambda out: project_run(quiet, cfg.seed, out, ties="first")}
        for rep in range(opts.peer_timing_reps):  # interleaved: each in turn, then again
            for k, (name, go) in enumerate(runs.items()):
                times.setdefault(name, []).append(go(os.path.join(root, f"time-{k}-{rep}"))[1:])
        torch.set_num_threads(threads)
        lines += ["", f"Time per update at one thread, {cfg.steps} updates per run, interleaved:", ""] + timing_table(times)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "peer.json"), "w") as f:
        json.dump({"config": {**dataclasses.asdict(cfg), **dataclasses.asdict(opts)}, "rows": rows, "comparisons": tests,
                   "times": times, "trl_settings": trl_settings(cfg, cfg.seed, root)}, f, indent=1)
    print("\n".join(lines))
    print(f"peer_trl: outputs in {root}/")
    return rows, tests, times


if __name__ == "__main__":
    cli(run=peer, extra=PeerOptions, description="the project's online DPO against TRL's OnlineDPOTrainer (experiments/peer_trl.py)")
