"""
train.py: online preference alignment with SAIL, read top to bottom.

    python train.py                      # SFT (cached after the first run), SAIL-PR, evaluation
    python train.py --method sail-pp     # or dpo, online-dpo, sail-pr, sail-dp, mix, selm, xpo
    python train.py --compare            # every method x 3 seeds: results.md, compare.json, plots
    python train.py --benchmark          # where an online step's time goes, against model.generate
    torchrun --nproc_per_node=N -- train.py ...   # data parallel: the same loop on N GPUs (lines marked ddp)
    python train.py --help               # every option with its default

Phases of `main`: (1) the SFT policy: on the embedded task, fine-tune a small GPT-2 on the task's
corpus once and cache it with `save_pretrained`; with --model, load any causal LM. (2) A frozen
copy of it is the reference. (3) Each step builds a batch of preference pairs, routed per pair as
in the official code: offline DPO pairs from the dataset, SAIL-DP (dataset responses,
self-labels), SAIL-PP (policy responses, self-labels), SAIL-PR (policy responses, oracle labels);
then one reference forward, one policy forward+backward on all chosen+rejected rows, one
optimiser step. (4) Evaluation on held-out prompts against the SFT model, under the gold reward.
`compare` and `benchmark`, at the end of the file, call the same pieces.

Outputs in --out_dir: metrics.jsonl (one line per step), summary.json, config.json, checkpoint/
(to resume), policy/ (the final policy and tokenizer, `from_pretrained`-ready), reward.png.

Departures from the paper (see also sail.py):
  1. Every method is a routing of pairs: dpo = all offline; sail-dp / sail-pp / sail-pr route a
     pair to their SAIL variant with probability r / p / g and keep the rest as offline DPO pairs
     (as the official code does); online-dpo = all pairs online with gamma 0; mix = all three
     routes at once; selm and xpo = online DPO plus their exploration bonus.
  2. Each training step draws fresh prompts, so new prompts keep entering the online pool (the
     official code stops after its first generation round), and responses stay attached to the
     prompt that produced them, in one tensor (the official code pairs mismatched lists).
  3. Tied oracle labels are left out of the loss and still counted as queries.
  4. Tiny models need AdamW at ~5e-4, not the paper's RMSprop 1e-5 with LoRA on 7B models.
  5. The response term uses a leave-one-out baseline by default (--baseline none for the plain
     estimator), which lowers its variance without biasing it, and its coefficients are scaled
     by --response_scale (0.1), standing in for the official code's division by |log pi(y)|.
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

import data
import reward
from sail import leave_one_out_mean, sail_loss, sample, selm_loss, sequence_logps, xpo_loss


# -----------------------------------------------------------------------------
# Config: one dataclass; every field becomes a --flag with its help line.

def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to run
    method: str = arg("sail-pr", "dpo | online-dpo | sail-pr | sail-pp | sail-dp | mix | selm | xpo (see METHODS)")
    r: float = arg(0.4, "probability that a pair is routed to SAIL-DP: dataset responses, self-labels (sail-dp, mix)")
    p: float = arg(0.3, "probability that a pair is routed to SAIL-PP: policy responses, self-labels (sail-pp, mix)")
    g: float = arg(0.3, "probability that a pair is routed to SAIL-PR: policy responses, oracle labels (sail-pr, mix)")
    rho: float = arg(0.2, "label-term coefficient of SAIL-DP pairs")
    pi: float = arg(0.2, "label- and response-term coefficient of SAIL-PP pairs")
    gamma: float = arg(0.3, "response-term coefficient of SAIL-PR pairs")
    selm_alpha: float = arg(1e-3, "selm: bonus alpha * beta * Delta(y~) on the reference's greedy response y~")
    xpo_alpha: float = arg(1e-5, "xpo: bonus alpha * log pi(y~) on a sample y~ of the reference")
    ref_update_every: int = arg(-1, "copy the policy into the training reference every N steps (SELM's iterations); -1: steps // 3 for selm, else never")
    response_scale: float = arg(0.1, "multiplies every response-term coefficient (the official code divides that term by |log pi(y)|, ~10 here)")
    beta: float = arg(0.1, "KL strength beta of DPO/SAIL")
    baseline: str = arg("loo", "response-term baseline: loo (mean -l of the other pairs in the batch) | none")
    label_mode: str = arg("hard", "oracle labels: hard (r1 > r2; ties dropped) | sampled (Bernoulli(sigmoid(r1 - r2)))")
    # optimisation
    steps: int = arg(150, "alignment steps (optimiser updates)")
    batch_size: int = arg(16, "preference pairs per step (online pairs: prompts x 2 responses)")
    lr: float = arg(5e-4, "AdamW learning rate of the alignment phase")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)")
    grad_accum: int = arg(1, "split each step's pairs into this many micro-batches (less memory, same update)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, slower)")
    offload_reference: bool = arg(False, "keep the frozen reference model on the CPU (less GPU memory, slower)")
    # generation
    max_new_tokens: int = arg(24, "longest sampled response, in tokens")
    temperature: float = arg(1.0, "sampling temperature (log-probs always use temperature 1; see sail.py)")
    max_prompt_len: int = arg(32, "prompts keep their last this-many tokens (truncations are counted and printed)")
    # models and data
    model: str = arg("embedded", "policy: 'embedded' (tiny GPT-2, SFT on the embedded task) or a causal-LM id/path")
    reward_model: str = arg("", "oracle: '' for the embedded gold reward, or a sequence-classification id/path")
    reward_label: str = arg("", "for a classifier with several outputs: the label whose logit is the reward (e.g. POSITIVE)")
    reward_batch_size: int = arg(32, "texts per reward-model forward pass")
    reward_text_pair: bool = arg(False, "give the reward model (prompt, response) as a text pair instead of one text")
    prompts: str = arg("", "training prompts JSONL ({'prompt'} per line); default: the embedded task's")
    eval_prompts: str = arg("", "held-out prompts JSONL; default: the embedded task's")
    pairs: str = arg("", "offline pairs JSONL ({'prompt','chosen','rejected'}); default: the embedded task's")
    eval_pairs: str = arg("", "held-out pairs JSONL for implicit-reward accuracy; default: the embedded task's")
    holdout: float = arg(0.1, "with --prompts/--pairs but no held-out file: the fraction held out for evaluation")
    task_seed: int = arg(0, "seed of the embedded task and its SFT model (kept fixed across --seed)")
    sft_steps: int = arg(600, "SFT steps for the embedded model (only when it is not cached)")
    sft_lr: float = arg(2e-3, "SFT learning rate (AdamW, cosine decay)")
    sft_batch_size: int = arg(64, "SFT batch size")
    cache_dir: str = arg(".cache", "where the embedded SFT model is saved and found again")
    # evaluation and logging
    eval_every: int = arg(25, "evaluate on held-out prompts every this many steps (and at the end)")
    eval_samples: int = arg(4, "responses per held-out prompt in evaluation")
    sample_every: int = arg(50, "print a prompt with its chosen and rejected responses every this many steps")
    out_dir: str = arg("runs/sail", "output directory")
    save_every: int = arg(50, "write a resumable checkpoint every this many steps (and at the end)")
    resume: str = arg("auto", "auto: continue from the checkpoint in --out_dir if there is one | no: start over")
    seed: int = arg(0, "seed of the alignment run (routing, prompt order, sampling, labels)")
    device: str = arg("auto", "auto (cuda > mps > cpu) | cuda | mps | cpu")
    # side by side
    compare: bool = arg(False, "run every --compare_methods method for --compare_seeds seeds; write a table, JSON and plots")
    compare_methods: str = arg("dpo,online-dpo,sail-pr,sail-pp,sail-dp,mix,selm,xpo", "methods of --compare, comma-separated")
    compare_seeds: int = arg(3, "seeds per method in --compare (--seed, --seed + 1, ...)")
    benchmark: bool = arg(False, "measure the sampler and an online step against transformers' generate; write bench.json")
    bench_reps: int = arg(15, "repetitions of each timing in --benchmark (medians are reported)")


OFFLINE, DP, PP, PR = range(4)  # the four routes a pair can take
METHODS = {  # method -> probabilities of (offline DPO, SAIL-DP, SAIL-PP, SAIL-PR), as in the official code
    "dpo": lambda c: (1, 0, 0, 0),
    "online-dpo": lambda c: (0, 0, 0, 1),  # all pairs online and oracle-labelled, gamma = 0
    "sail-dp": lambda c: (1 - c.r, c.r, 0, 0),  # the rest of the pairs stay offline DPO pairs
    "sail-pp": lambda c: (1 - c.p, 0, c.p, 0),
    "sail-pr": lambda c: (1 - c.g, 0, 0, c.g),  # --g 1 for purely online SAIL-PR
    "mix": lambda c: (1 - c.r - c.p - c.g, c.r, c.p, c.g),
    "selm": lambda c: (0, 0, 0, 1),  # online DPO + a bonus on the reference's greedy response
    "xpo": lambda c: (0, 0, 0, 1),  # online DPO + a bonus on a sample of the reference
}
EXPLORE = {"selm", "xpo"}  # methods that also need a response of the reference per prompt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is bool:  # --flag, or --flag true/false
            parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True,
                                default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=f.type, default=f.default, help=f.metadata["help"])
    cfg = Config(**vars(parser.parse_args(argv)))
    problems = check_config(cfg)
    if problems:  # one line per problem, no traceback, exit status 1
        raise SystemExit("\n".join(f"error: {p}" for p in problems))
    return cfg


# The valid range of every numeric option: (test, what the test says, options).
RANGES = [
    (lambda x: x > 0, "> 0", ["beta", "lr", "sft_lr", "temperature"]),
    (lambda x: x >= 0, ">= 0", ["rho", "pi", "gamma", "response_scale", "selm_alpha", "xpo_alpha", "weight_decay",
                                "grad_clip", "seed", "task_seed"]),
    (lambda x: 0 <= x <= 1, "between 0 and 1 (a probability)", ["r", "p", "g"]),
    (lambda x: 0 < x < 1, "strictly between 0 and 1", ["holdout"]),
    (lambda x: x >= 1, ">= 1", ["steps", "grad_accum", "max_new_tokens", "max_prompt_len", "reward_batch_size", "sft_steps",
                                "sft_batch_size", "eval_every", "eval_samples", "sample_every", "save_every",
                                "compare_seeds", "bench_reps"]),
    (lambda x: x >= 2, ">= 2 (the response-term baseline needs another pair)", ["batch_size"]),
    (lambda x: x >= -1, ">= 0, or -1 for the method's default", ["ref_update_every"]),
]
CHOICES = {"method": METHODS, "baseline": ("loo", "none"), "label_mode": ("hard", "sampled"), "resume": ("auto", "no")}


def check_config(cfg):
    """Every problem with the options, as messages naming the option (empty: all good). Nothing
    here touches the disk, so a refused command changes nothing."""
    problems = []
    for test, what, names in RANGES:
        for name in names:
            value = getattr(cfg, name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"--{name} must be a finite number, got {value}")
            elif not test(value):
                problems.append(f"--{name} must be {what}, got {value}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            problems.append(f"--{name} {getattr(cfg, name)!r}: choose one of {', '.join(choices)}")
    if cfg.method == "mix" and cfg.r + cfg.p + cfg.g > 1 + 1e-9:
        problems.append(f"--r + --p + --g must be <= 1, got {cfg.r + cfg.p + cfg.g:g}")
    if cfg.grad_accum >= 1 and (cfg.batch_size % cfg.grad_accum or cfg.batch_size // cfg.grad_accum < 2):
        problems.append(f"--batch_size {cfg.batch_size} must split into --grad_accum {cfg.grad_accum} micro-batches of >= 2 pairs")
    unknown = [m for m in cfg.compare_methods.split(",") if m not in METHODS]
    if unknown:
        problems.append(f"--compare_methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    device_problem = check_device(cfg.device)
    if device_problem:
        problems.append(device_problem)
    return problems


def check_device(name):
    """A message if --device names hardware this machine does not have (None if it is fine)."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r}: choose auto, cpu, cuda, cuda:N or mps"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}); use --device auto or cpu"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: Apple's MPS is not available here; use --device auto or cpu"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"--device {name!r}: choose auto, cpu, cuda, cuda:N or mps"
    return None


# -----------------------------------------------------------------------------
# Small helpers: seeding, device, forward passes

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def sequence_logps_of(model, ids, attention_mask, response_mask, amp):
    """Summed response log-probs (B,) of one batch through `model` (one forward pass)."""
    position = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) count real tokens only
    with amp:
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position).logits  # (B, T, V)
    return sequence_logps(logits, ids, response_mask)  # (B,)


def decode(tokenizer, ids, response_mask):
    """Response texts of a batch, without the prompt, EOS or padding."""
    return tokenizer.batch_decode(torch.where(response_mask.bool(), ids, tokenizer.eos_token_id),
                                  skip_special_tokens=True)


def order_pairs(y1_wins, x):
    """Values (2B,) of the rows [all y1; all y2] -> (chosen, rejected), each (B,)."""
    y1, y2 = x[:len(y1_wins)], x[len(y1_wins):]
    return torch.where(y1_wins, y1, y2), torch.where(y1_wins, y2, y1)


def accuracy(h):
    """Per pair: 1 if the implicit reward prefers the chosen response, 0.5 on a tie (h = 0)."""
    return (h > 0).float() + 0.5 * (h == 0).float()


def disable_dropout(model):
    # Dropout would make the policy's and the reference's log-probs of the same text disagree
    # at initialisation, and adds noise to h; DPO implementations switch it off.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def supervised_finetune(model, tokenizer, task, cfg, device):
    """Maximum likelihood of the task's reviews given their prompts (the SFT phase)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.sft_steps)))
    rng = random.Random(cfg.task_seed)
    model.train()
    bar = tqdm(range(cfg.sft_steps), desc="sft", dynamic_ncols=True)
    for _ in bar:
        prompts, responses = zip(*rng.sample(task.sft, cfg.sft_batch_size))
        batch = [t.to(device) for t in data.encode_responses(tokenizer, prompts, responses, cfg.max_prompt_len,
                                                              cfg.max_new_tokens)]
        logps = sequence_logps_of(model, *batch, amp=torch.autocast(device.type, enabled=False))  # (B,)
        loss = -logps.sum() / batch[2].sum()  # mean negative log-likelihood per response token
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(nll=f"{loss.item():.3f}")


def embedded_policy(cfg, task, device):
    """The embedded SFT model: load it from the cache, or build, fine-tune and save it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = os.path.join(cfg.cache_dir, f"embedded-sft-task{cfg.task_seed}-steps{cfg.sft_steps}")
    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"sft: loading the cached SFT model from {path}")
        what = "--cache_dir holds a broken SFT model (delete it to train it again):"
        return reward.load_pretrained(AutoModelForCausalLM, path, what), reward.load_pretrained(AutoTokenizer, path, what), 0.0
    check_writable_dir(cfg.cache_dir, "--cache_dir")  # before the SFT run, not after it
    if cfg.sft_batch_size > len(task.sft):
        raise SystemExit(f"error: --sft_batch_size {cfg.sft_batch_size} is larger than the SFT corpus ({len(task.sft)} texts)")
    t0 = time.perf_counter()
    tokenizer = data.build_tokenizer([p + y for p, y in task.sft])
    tokenizer.model_max_length = 64
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.task_seed)
    model = GPT2LMHeadModel(config).to(device)
    disable_dropout(model)
    supervised_finetune(model, data.prepare_tokenizer(tokenizer), task, cfg, device)
    os.makedirs(path + ".tmp", exist_ok=True)
    model.save_pretrained(path + ".tmp")
    tokenizer.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)  # a half-written cache is never mistaken for a finished one
    print(f"sft: trained and saved to {path} in {time.perf_counter() - t0:.1f}s")
    return model.cpu(), tokenizer, time.perf_counter() - t0


# -----------------------------------------------------------------------------
# Checkpoints: everything a run needs to continue exactly where it stopped

RESUMABLE_CHANGES = {"steps", "eval_every", "sample_every", "save_every", "resume", "device", "out_dir",
                     "compare", "compare_methods", "compare_seeds", "benchmark", "bench_reps"}


def save_checkpoint(out_dir, policy, train_reference, optimizer, state):
    """Write out_dir/checkpoint atomically: build checkpoint.tmp/, then swap it in. The previous
    checkpoint is deleted only once the new one is complete, so a kill at any moment (SIGKILL
    included) leaves one good checkpoint: `checkpoint/`, or `checkpoint.old/` mid-swap."""
    path = os.path.join(out_dir, "checkpoint")
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)  # safetensors
    if train_reference is not None:  # SELM's moving reference
        train_reference.save_pretrained(os.path.join(tmp, "reference"))
    torch.save({"optimizer": optimizer.state_dict(), **state}, os.path.join(tmp, "state.pt"))
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def refuse_changed_settings(saved, cfg, advice):
    """A run continues only with its own settings (a few, in RESUMABLE_CHANGES, may change)."""
    changed = {k: (v, getattr(cfg, k)) for k, v in saved.items() if k not in RESUMABLE_CHANGES and v != getattr(cfg, k, v)}
    if changed:
        raise SystemExit(f"error: {cfg.out_dir} holds a run with other settings ("
                         + ", ".join(f"--{k} {a} there, {b} now" for k, (a, b) in changed.items()) + f"); {advice}")


def latest_checkpoint(out_dir):
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.isfile(os.path.join(out_dir, name, "state.pt")):
            return os.path.join(out_dir, name)
    return None


def rng_states(*generators):
    """Every random stream of the run: Python, numpy, torch (CPU and CUDA), and our own generators
    (torch.Generator or numpy Generator), in a form torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "own": [g.get_state() if isinstance(g, torch.Generator) else g.bit_generator.state for g in generators]}


def set_rng_states(states, *generators):
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    for g, state in zip(generators, states["own"]):
        if isinstance(g, torch.Generator):
            g.set_state(state)
        else:
            g.bit_generator.state = state


def check_writable_dir(path, option="--out_dir"):
    """Fail at once, before any training, if a directory the run writes to cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")  # one per process (ranks check at once)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: {option} {path!r} cannot be written: {e.strerror or e}") from None


def stop_if_not_finite(step, values, out_dir, world=1, device="cpu"):
    """A NaN or inf would poison every later step: stop now, before the update, with the last good
    checkpoint kept. values: {name: number}. Under DDP every rank stops if any rank must."""
    bad = [not math.isfinite(v) for v in values.values()]
    if world > 1:  # ddp
        bad = (all_ranks_sum(torch.tensor(bad, dtype=torch.float64, device=device), world) > 0).tolist()
    for (name, value), stop in zip(values.items(), bad):
        if stop:
            kept = latest_checkpoint(out_dir)
            raise SystemExit(f"error: step {step}: {name} is {value if not math.isfinite(value) else 'not finite on another rank'}; "
                             "stopped before the update. "
                             + (f"The last good checkpoint is kept in {kept}." if kept else "No checkpoint was written yet."))


def all_ranks_sum(x, world):
    """ddp: the sum of tensor x over all ranks (x itself on one process)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def check_ranks_in_sync(model, world, device):
    """ddp: DDP keeps the ranks' weights identical; check it (max and min of a checksum agree)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().to(device)
    high, low = checksum.clone(), checksum.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(high == low)


def token_lengths(tokenizer, texts, **kwargs):
    """The token count of each text; each distinct text is tokenized once (pair files repeat prompts)."""
    unique = list(dict.fromkeys(texts))
    count = dict(zip(unique, map(len, tokenizer(unique, **kwargs)["input_ids"]))) if unique else {}
    return [count[x] for x in texts]


def report_truncation(what, lengths, limit, option, kept):
    """Never truncate silently: count the texts longer than `limit` tokens and say so."""
    n = sum(length > limit for length in lengths)
    if n:
        print(f"note: {n} of {len(lengths)} {what} are longer than {option} {limit} tokens and keep their {kept} {limit}")
    return n


# -----------------------------------------------------------------------------
# Evaluation: held-out prompts, gold reward, win rate against SFT, KL, pair accuracy

@torch.no_grad()
def evaluate(policy, reference_logps, tokenizer, oracle, eval_batch, eval_prompts, sft_rewards, pair_batch, cfg, amp):
    """Sample held-out responses with a fixed generator (the same noise for every evaluation
    and for the SFT baseline: common random numbers make the comparison less noisy)."""
    was_training = policy.training
    policy.eval()
    generator = torch.Generator(eval_batch[0].device).manual_seed(cfg.seed + 1)
    with amp:
        ids, attention, response = sample(policy, *eval_batch, max_new_tokens=cfg.max_new_tokens,
                                          temperature=cfg.temperature, eos_token_id=tokenizer.eos_token_id,
                                          generator=generator)
    rewards = oracle(eval_prompts, decode(tokenizer, ids, response))  # (N,)
    kl = sequence_logps_of(policy, ids, attention, response, amp) - reference_logps(ids, attention, response)  # (N,)
    out = {"eval_reward": rewards.mean().item(), "eval_kl": kl.mean().item()}
    if sft_rewards is not None:
        out["eval_win"] = ((rewards > sft_rewards).float() + 0.5 * (rewards == sft_rewards).float()).mean().item()
    if pair_batch is not None:  # (ids, attention, response, reference log-probs): the reference is frozen
        logps = sequence_logps_of(policy, *pair_batch[:3], amp) - pair_batch[3]  # (2M,)
        h = logps[:len(logps) // 2] - logps[len(logps) // 2:]  # (M,) chosen rows first
        out["eval_acc"], out["eval_margin"] = accuracy(h).mean().item(), (cfg.beta * h).mean().item()
    policy.train(was_training)
    return out, rewards


def main(cfg):
    t_start = time.perf_counter()
    hf_logging.disable_progress_bar()  # our own bars only
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    # Data parallel (a one-GPU reader can skip the lines marked "ddp"): `torchrun --nproc_per_node=N
    # train.py` starts N copies of this script, ranks 0..N-1. Each samples, labels and trains on its
    # own share of every step's pairs; DDP averages the gradients; rank 0 alone prints and writes.
    # Plain `python train.py` is rank 0 of 1.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # ddp
    master = rank == 0
    if world > 1:  # ddp
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if not master:
            sys.stdout = open(os.devnull, "w")
        if cfg.batch_size % (world * cfg.grad_accum) or cfg.batch_size // (world * cfg.grad_accum) < 2:
            raise SystemExit(f"error: --batch_size {cfg.batch_size} must split into {world} ranks x --grad_accum "
                             f"{cfg.grad_accum} micro-batches of >= 2 pairs")
        print(f"data parallel: {world} ranks | global batch {cfg.batch_size} pairs = {world} ranks x "
              f"{cfg.batch_size // world} pairs ({cfg.grad_accum} micro-batches each)")
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # fp32 master weights
    if device.type == "cuda":  # TF32 for whatever autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"device: {device} | compute dtype: {'bfloat16 autocast' if use_bf16 else 'float32'}")

    # -------------------------------------------------------------------------
    # Inputs first: a bad file or directory should fail before any minute of training is spent.
    task = data.make_task(cfg.task_seed) if cfg.model == "embedded" or not cfg.prompts else None
    train_prompts, eval_prompts = (task.train_prompts, task.eval_prompts) if task else (None, None)
    pairs, eval_pairs = (task.pairs, task.eval_pairs) if task else (None, None)
    if cfg.prompts:  # a file without a held-out file gives up a --holdout fraction to evaluation
        train_prompts, eval_prompts = data.load_split(cfg.prompts, cfg.eval_prompts, data.load_prompts, cfg.holdout, cfg.task_seed)
    elif cfg.eval_prompts:
        eval_prompts = data.load_prompts(cfg.eval_prompts)
    if cfg.pairs:
        pairs, eval_pairs = data.load_split(cfg.pairs, cfg.eval_pairs, data.load_pairs, cfg.holdout, cfg.task_seed)
    elif cfg.eval_pairs:
        eval_pairs = data.load_pairs(cfg.eval_pairs)
    route_probs = np.clip(METHODS[cfg.method](cfg), 0, 1)
    if (route_probs[OFFLINE] or route_probs[DP]) and not pairs:
        raise SystemExit(f"error: --method {cfg.method} trains on offline pairs: give --pairs")
    check_writable_dir(cfg.out_dir)
    checkpoint = latest_checkpoint(cfg.out_dir) if cfg.resume == "auto" else None
    if checkpoint:  # resuming: the run's settings must be the checkpoint's (a few may change)
        try:
            state = torch.load(os.path.join(checkpoint, "state.pt"), weights_only=True)
        except Exception as e:  # noqa: BLE001  a truncated or foreign file: say so, touch nothing
            raise SystemExit(f"error: --out_dir {cfg.out_dir}: its checkpoint {checkpoint}/state.pt cannot be read "
                             f"({type(e).__name__}); use another --out_dir, or --resume no to start over") from None
        refuse_changed_settings(state["config"], cfg, "use another --out_dir, or --resume no to start over")
    oracle = reward.GoldReward()
    if cfg.reward_model:  # in eval mode, no gradients, its own tokenizer; bf16 weights where the policy computes in bf16
        oracle = reward.HFRewardModel(cfg.reward_model, device, cfg.reward_batch_size, label=cfg.reward_label,
                                      dtype=torch.bfloat16 if use_bf16 else None, text_pair=cfg.reward_text_pair, what="--reward_model")

    # -------------------------------------------------------------------------
    # Policy (the SFT model) and the frozen reference: a copy of it, set up here once.
    t0 = time.perf_counter()
    if cfg.model == "embedded":
        if world > 1 and not master:  # ddp: rank 0 trains and caches the SFT model first
            dist.barrier()
        policy, tokenizer, sft_seconds = embedded_policy(cfg, task, device)
        if world > 1 and master:
            dist.barrier()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        policy, sft_seconds = reward.load_pretrained(AutoModelForCausalLM, cfg.model, "--model"), 0.0
        tokenizer = reward.load_pretrained(AutoTokenizer, cfg.model, "--model")
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"error: --model {cfg.model}: its tokenizer has no EOS token, so no response could end")
    data.prepare_tokenizer(tokenizer)
    disable_dropout(policy)
    ref_device = torch.device("cpu") if cfg.offload_reference else device
    reference = copy.deepcopy(policy).to(ref_device).eval().requires_grad_(False)  # frozen: eval, no grads
    ref_amp = amp if ref_device == device else torch.autocast("cpu", enabled=False)
    # SELM trains in iterations: its training reference is the last iterate, so it gets its own
    # copy; the SFT reference stays the yardstick of KL in evaluation.
    ref_every = cfg.ref_update_every if cfg.ref_update_every >= 0 else (cfg.steps // 3 if cfg.method == "selm" else 0)
    train_reference = copy.deepcopy(reference) if ref_every else reference
    policy.to(device).train()
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()

    @torch.no_grad()  # reference log-probs never need a graph
    def reference_logps(ids, attention_mask, response_mask, model=reference):
        batch = (ids.to(ref_device), attention_mask.to(ref_device), response_mask.to(ref_device))
        return sequence_logps_of(model, *batch, ref_amp).to(device)  # (B,)

    print(f"policy: {cfg.model} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters) | "
          f"reference on {ref_device} | oracle: {cfg.reward_model or 'embedded gold reward'} | method: {cfg.method} | "
          f"routing offline/DP/PP/PR = {'/'.join(f'{x:g}' for x in route_probs)}")
    t_load = time.perf_counter() - t0
    positions = getattr(policy.config, "max_position_embeddings", None)
    if positions and cfg.max_prompt_len + cfg.max_new_tokens > positions:
        raise SystemExit(f"error: --max_prompt_len {cfg.max_prompt_len} + --max_new_tokens {cfg.max_new_tokens} = "
                         f"{cfg.max_prompt_len + cfg.max_new_tokens} tokens, more than the model's {positions} positions")
    all_pairs = (pairs or []) + (eval_pairs or [])
    for what, prompts in [("training prompts", train_prompts), ("held-out prompts", eval_prompts),
                          ("pair prompts", [x["prompt"] for x in all_pairs])]:
        report_truncation(what, token_lengths(tokenizer, prompts or []), cfg.max_prompt_len, "--max_prompt_len", "last")
    responses = [x[k] for x in all_pairs for k in ("chosen", "rejected")]
    report_truncation("pair responses", [n + 1 for n in token_lengths(tokenizer, responses, add_special_tokens=False)],  # + EOS
                      cfg.max_new_tokens, "--max_new_tokens (EOS included)", "first")

    # -------------------------------------------------------------------------
    # Evaluation batches, fixed for the run, and the SFT baseline they are compared against.
    repeated = [p for p in eval_prompts for _ in range(cfg.eval_samples)]
    p_ids, p_mask = data.encode_prompts(tokenizer, repeated, cfg.max_prompt_len)
    eval_batch = (p_ids.to(device), p_mask.to(device))
    pair_batch = None
    if eval_pairs:
        pair_batch = tuple(t.to(device) for t in data.encode_responses(
            tokenizer, [x["prompt"] for x in eval_pairs] * 2, [x["chosen"] for x in eval_pairs] + [x["rejected"] for x in eval_pairs],
            cfg.max_prompt_len, cfg.max_new_tokens))
        pair_batch += (reference_logps(*pair_batch),)  # computed once
    # The policy is still the SFT model here (a resumed run loads its checkpoint below).
    sft_eval, sft_rewards = {}, None  # ddp: only rank 0 evaluates
    if master:
        sft_eval, sft_rewards = evaluate(policy, reference_logps, tokenizer, oracle, eval_batch, repeated, None, pair_batch, cfg, amp)
    sft_eval["eval_win"] = 0.5
    print("sft  | " + " | ".join(f"{k[5:]} {v:.3f}" for k, v in sft_eval.items()))

    # -------------------------------------------------------------------------
    # The run's state: optimiser, random streams, data order, counters. A checkpoint holds all of
    # it, so a resumed run continues exactly where the interrupted one stopped.
    route_rng = np.random.default_rng([cfg.seed, 0])  # which route each pair takes
    prompt_stream = data.Stream(len(train_prompts), seed=cfg.seed)
    pair_stream = data.Stream(len(pairs) if pairs else 1, seed=cfg.seed)
    rank_seed = cfg.seed + 7919 * rank  # ddp: every rank samples and labels with streams of its own
    sampling_gen = torch.Generator(device).manual_seed(rank_seed)  # responses: its own stream
    label_gen = torch.Generator().manual_seed(rank_seed)  # BT and self-labels (CPU)
    explore_gen = torch.Generator(ref_device).manual_seed(rank_seed + 2)  # XPO's samples of the reference
    generators = (route_rng, sampling_gen, label_gen, explore_gen)
    oracle_queries, used_pairs, ties = 0, set(), 0
    phase_seconds, token_totals = {}, {"generated": 0, "trained": 0}  # summed over steps, for the time breakdown
    history = [{"step": 0, **sft_eval}]
    start = 1
    if checkpoint:
        policy.load_state_dict(type(policy).from_pretrained(checkpoint).state_dict())  # weights via safetensors
        if ref_every:
            train_reference.load_state_dict(type(policy).from_pretrained(os.path.join(checkpoint, "reference")).state_dict())
        if state["world_size"] != world:
            raise SystemExit(f"error: {checkpoint} was written by {state['world_size']} processes; resume it with as many")
        set_rng_states(state["rng"][rank], *generators)
        (prompt_stream.epoch, prompt_stream.pos), (pair_stream.epoch, pair_stream.pos) = state["streams"]
        oracle_queries, ties, history = state["oracle_queries"], state["ties"], state["history"]
        phase_seconds, token_totals = state["phase_seconds"], state["token_totals"]
        used_pairs = set(state["used_pairs"])
        start = state["step"] + 1
        print(f"resuming from {checkpoint} at step {state['step']} of {cfg.steps}")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if checkpoint:
        optimizer.load_state_dict(state["optimizer"])
    train_policy = policy  # what the loss's forward runs through: the policy itself, or its DDP wrapper
    if world > 1:  # ddp: averages the gradients over ranks during backward
        train_policy = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
    metrics_file = None
    if master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        # metrics.jsonl holds exactly the steps up to the checkpoint (a killed run may have logged more).
        metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        kept = []
        if checkpoint and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = f.readlines()[:start - 1]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
        metrics_file = open(metrics_path, "a")

    # -------------------------------------------------------------------------
    # The alignment loop
    label_coefs = torch.tensor([0.0, cfg.rho, cfg.pi, 0.0], device=device)  # per route
    gamma = 0.0 if cfg.method in ("online-dpo", "selm", "xpo") else cfg.gamma  # plain DPO on their online pairs
    response_coefs = cfg.response_scale * torch.tensor([0.0, 0.0, cfg.pi, gamma], device=device)
    B = cfg.batch_size // (world * cfg.grad_accum)  # pairs per micro-batch on this rank
    t_align = time.perf_counter()
    for step in tqdm(range(start, cfg.steps + 1), initial=start - 1, total=cfg.steps, desc=cfg.method,
                     dynamic_ncols=True, leave=False, disable=not master):
        t0, times = time.perf_counter(), {}

        def lap(name):  # wall time of a phase; CUDA runs asynchronously, so wait for it first
            nonlocal t0
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()

        optimizer.zero_grad(set_to_none=True)
        logged = {"neg_ell": [], "h": [], "valid": [], "kl": [], "scores": []}
        tokens = {"generated": 0, "trained": 0}
        step_queries = step_ties = 0
        for micro in range(cfg.grad_accum):  # gradient accumulation: one update from several micro-batches
            # Route each pair, sorted so a batch reads: dataset pairs (offline, DP), then online (PP, PR).
            # Every rank draws the whole micro-batch of all ranks (the same routes, pairs and prompts,
            # from the same streams) and keeps its own slice: ranks never share a pair or a prompt.
            routes = [np.sort(r) for r in route_rng.choice(4, size=B * world, p=route_probs).reshape(world, B)]
            route = routes[rank]
            n_ds = int((route <= DP).sum())
            n_on = B - n_ds
            ds_all = pair_stream.next(sum(int((r <= DP).sum()) for r in routes))
            on_all = prompt_stream.next(sum(int((r > DP).sum()) for r in routes))
            ds_start = sum(int((r <= DP).sum()) for r in routes[:rank])
            on_start = sum(int((r > DP).sum()) for r in routes[:rank])
            first = 0
            for r in routes:  # dataset pairs used with their (oracle) dataset label, on any rank
                used_pairs.update(ds_all[first:first + int((r == OFFLINE).sum())])
                first += int((r <= DP).sum())
            prompts_ds, prompts_on, texts = [], [], [None] * (2 * B)
            halves = []  # (y1 rows, y2 rows) per part, to be stacked as [all y1; all y2]
            if n_ds:
                rows = [pairs[i] for i in ds_all[ds_start:ds_start + n_ds]]
                prompts_ds = [x["prompt"] for x in rows]
                ds = data.encode_responses(tokenizer, prompts_ds * 2, [x["chosen"] for x in rows] + [x["rejected"] for x in rows],
                                           cfg.max_prompt_len, cfg.max_new_tokens)
                halves.append(tuple(t[:n_ds].to(device) for t in ds) + tuple(t[n_ds:].to(device) for t in ds))
                texts[:n_ds] = [x["chosen"] for x in rows]
                texts[B:B + n_ds] = [x["rejected"] for x in rows]
            if n_on:
                prompts_on = [train_prompts[i] for i in on_all[on_start:on_start + n_on]]
                p_ids, p_mask = data.encode_prompts(tokenizer, prompts_on * 2, cfg.max_prompt_len)  # two responses per prompt
                policy.eval()  # sampling uses the KV cache (gradient checkpointing, if on, only applies in train mode)
                with amp:
                    on = sample(policy, p_ids.to(device), p_mask.to(device), max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, eos_token_id=tokenizer.eos_token_id, generator=sampling_gen)
                policy.train()
                halves.append(tuple(t[:n_on] for t in on) + tuple(t[n_on:] for t in on))
                on_texts = decode(tokenizer, on[0], on[2])
                texts[n_ds:B], texts[B + n_ds:] = on_texts[:n_on], on_texts[n_on:]
                tokens["generated"] += int(on[2].sum())
            explore = None
            if cfg.method in EXPLORE:  # a response y~ of the reference per prompt: greedy (SELM) or sampled (XPO)
                with ref_amp:
                    explore = sample(train_reference, p_ids[:n_on].to(ref_device), p_mask[:n_on].to(ref_device),
                                     max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     temperature=0.0 if cfg.method == "selm" else cfg.temperature, generator=explore_gen)
                explore = tuple(t.to(device) for t in explore)
                tokens["generated"] += int(explore[2].sum())
            lap("generate")

            # Oracle labels, only for the SAIL-PR pairs (each is one query; self-labels are free).
            is_pr = torch.from_numpy(route == PR)
            y1_wins, valid = torch.ones(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
            scores = torch.full((2 * B,), float("nan"))  # NaN: not scored
            oracle_sum = 0.0  # checked for NaN / inf below
            if is_pr.any():
                idx = torch.nonzero(is_pr).squeeze(1)
                prompts = [(prompts_ds + prompts_on)[i] for i in idx] * 2
                r = oracle(prompts, [texts[i] for i in idx] + [texts[B + i] for i in idx])  # (2 n_pr,)
                scores[idx], scores[B + idx], oracle_sum = r[:len(idx)], r[len(idx):], r.sum().item()
                y1_wins[idx], valid[idx] = reward.bradley_terry_label(r[:len(idx)], r[len(idx):], cfg.label_mode, label_gen)
                step_queries += len(idx)
                step_ties += int((~valid[idx]).sum())
            lap("label")

            blocks = [h[:3] for h in halves] + [h[3:] for h in halves] + ([explore] if explore else [])
            batch = data.pad_cat(blocks, tokenizer.pad_token_id)  # (2B, T) rows [all y1; all y2], then any y~
            tokens["trained"] += int(batch[1].sum())
            ref = reference_logps(*batch, model=train_reference)  # (2B,) once per pair, no graph
            lap("reference")

            last = micro == cfg.grad_accum - 1  # ddp: average gradients over ranks once, after the last micro-batch
            sync = train_policy.no_sync() if world > 1 and not last else contextlib.nullcontext()
            with sync:
                logps = sequence_logps_of(train_policy, *batch, amp)  # (2B,) chosen and rejected through one forward
                (logps, logps_explore), (ref, ref_explore) = logps.split([2 * B, len(logps) - 2 * B]), ref.split([2 * B, len(ref) - 2 * B])
                delta = (logps - ref).detach()  # (2B,) Delta(y) = L_theta(y) - L_ref(y)
                self_labelled = torch.from_numpy((route == DP) | (route == PP))
                if self_labelled.any():  # SAIL-DP / SAIL-PP: the policy labels its own pairs
                    y1_wins[self_labelled] = reward.self_label(delta[:B][self_labelled] - delta[B:][self_labelled], cfg.beta, label_gen)
                y1_wins, valid, route_t = y1_wins.to(device), valid.to(device), torch.from_numpy(route).to(device)
                h = torch.sub(*order_pairs(y1_wins, delta))  # (B,) Delta(y_w) - Delta(y_l): implicit reward margin / beta
                neg_ell = -F.logsigmoid(cfg.beta * h)  # (B,) -l, the DPO loss of each pair
                pair = (*order_pairs(y1_wins, logps), *order_pairs(y1_wins, ref), cfg.beta)
                if cfg.method == "selm":
                    losses, _, _ = selm_loss(*pair, policy_explore_logps=logps_explore, reference_explore_logps=ref_explore,
                                             alpha=cfg.selm_alpha)
                elif cfg.method == "xpo":
                    losses, _, _ = xpo_loss(*pair, policy_explore_logps=logps_explore, alpha=cfg.xpo_alpha)
                else:
                    losses, _, _ = sail_loss(*pair, label_coef=label_coefs[route_t], response_coef=response_coefs[route_t],
                                             baseline=leave_one_out_mean(neg_ell) if cfg.baseline == "loo" else None)
                # The mean over the valid pairs of all ranks (DDP averages over ranks, hence the factor world).
                n_valid = all_ranks_sum(valid.sum().float(), world)
                loss = torch.where(valid, losses, 0.0).sum() * world / n_valid.clamp(min=1) / cfg.grad_accum
                stop_if_not_finite(step, {"an oracle reward": oracle_sum, "the loss": loss.item()},
                                   cfg.out_dir, world, device)
                loss.backward()
            lap("policy")
            on_rows = torch.cat([torch.arange(n_ds, B), torch.arange(B + n_ds, 2 * B)]) if n_on else torch.arange(2 * B)
            for k, v in [("neg_ell", neg_ell), ("h", h), ("valid", valid), ("kl", delta[on_rows.to(device)]), ("scores", scores)]:
                logged[k].append(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        stop_if_not_finite(step, {"the gradient norm": grad_norm.item()}, cfg.out_dir, world, device)
        optimizer.step()
        lap("optimizer")
        if ref_every and step % ref_every == 0:  # SELM: this policy is the next iteration's reference
            train_reference.load_state_dict(policy.state_dict())
        for k, v in times.items():
            phase_seconds[k] = phase_seconds.get(k, 0.0) + v

        # ---- logging: one line per step (sums over all ranks), a sample every so often, evaluation
        neg_ell, h, valid, kl, scores = (torch.cat(logged[k]) for k in ("neg_ell", "h", "valid", "kl", "scores"))
        sums = all_ranks_sum(torch.tensor([
            valid.sum(), torch.where(valid, neg_ell, 0.0).sum(), torch.where(valid, accuracy(h), 0.0).sum(),
            torch.where(valid, cfg.beta * h, 0.0).sum(), kl.sum(), kl.numel(), scores.nan_to_num(0.0).sum().item(),
            (~scores.isnan()).sum(), step_queries, step_ties, tokens["generated"], tokens["trained"]],
            dtype=torch.float64, device=device), world).tolist()
        n_valid, loss_sum, acc_sum, margin_sum, kl_sum, n_kl, reward_sum, n_scored, step_queries, step_ties, n_gen, n_train = sums
        oracle_queries, ties = oracle_queries + int(step_queries), ties + int(step_ties)
        tokens = {"generated": int(n_gen), "trained": int(n_train)}
        row = {"step": step, "loss": loss_sum / max(n_valid, 1), "acc": acc_sum / max(n_valid, 1),
               "margin": margin_sum / max(n_valid, 1),
               "kl": kl_sum / n_kl,  # mean log-ratio of the policy-sampled responses: a KL estimate
               "reward": reward_sum / n_scored if n_scored else None,
               "grad_norm": grad_norm.item(), "oracle_queries": oracle_queries + len(used_pairs), "ties": ties,
               "generated_tokens": tokens["generated"], "trained_tokens": tokens["trained"],
               "dt": sum(times.values()), **{f"t_{k}": v for k, v in times.items()}}
        for k in token_totals:
            token_totals[k] += tokens[k]
        save = step % cfg.save_every == 0 or step == cfg.steps
        if save:  # every rank's random streams go into the checkpoint, so that each can resume its own
            states = [rng_states(*generators)]
            if world > 1:  # ddp
                states = [None] * world
                dist.all_gather_object(states, rng_states(*generators))
        if not master:
            continue  # ddp: the rest of the step (evaluation, logging, checkpoints) is rank 0's
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row.update(evaluate(policy, reference_logps, tokenizer, oracle, eval_batch, repeated, sft_rewards, pair_batch, cfg, amp)[0])
            history.append({"step": step, **{k: v for k, v in row.items() if k.startswith("eval_")}})
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        line = f"step {step} | loss {row['loss']:.3f} | acc {row['acc']:.2f} | margin {row['margin']:.2f} | kl {row['kl']:.2f}"
        line += f" | reward {row['reward']:.2f}" if row["reward"] is not None else ""
        line += f" | dt {1000 * row['dt']:.0f}ms"
        line += "".join(f" | {k} {v:.3f}" for k, v in row.items() if k.startswith("eval_"))
        tqdm.write(line)
        if step % cfg.sample_every == 0:  # a pair of the last micro-batch
            i = 0 if n_ds == B else n_ds  # show an online pair when there is one
            w, l = (i, B + i) if bool(y1_wins[i]) else (B + i, i)
            shown = oracle([(prompts_ds + prompts_on)[i]] * 2, [texts[w], texts[l]])  # display only: not a query
            how = ["offline pair", "SAIL-DP: self-labelled", "SAIL-PP: self-labelled", "SAIL-PR: oracle-labelled"][route[i]]
            tqdm.write(f"  prompt   {(prompts_ds + prompts_on)[i]!r}  [{how}{'' if valid[-B + i] else ', a tie: left out'}]\n"
                       f"  chosen   {texts[w]!r}  (reward {shown[0]:.2f})\n  rejected {texts[l]!r}  (reward {shown[1]:.2f})")
        if save:
            save_checkpoint(cfg.out_dir, policy, train_reference if ref_every else None, optimizer, {
                "step": step, "config": dataclasses.asdict(cfg), "world_size": world, "rng": states,
                "streams": [(prompt_stream.epoch, prompt_stream.pos), (pair_stream.epoch, pair_stream.pos)],
                "oracle_queries": oracle_queries, "ties": ties, "used_pairs": sorted(used_pairs),
                "phase_seconds": phase_seconds, "token_totals": token_totals, "history": history})
    t_align = time.perf_counter() - t_align
    if world > 1:  # ddp: the ranks' weights must still agree; then rank 0 writes the results
        in_sync = check_ranks_in_sync(policy, world, device)
        dist.barrier()  # every rank is past its last collective
        # DDP holds the process group: free it now, so that gloo's threads are joined here and not
        # during interpreter exit, where they can abort the process ("terminate called ...").
        del train_policy
        gc.collect()
        dist.destroy_process_group()
        if not master:
            return None
        if not in_sync:
            raise SystemExit("error: the ranks' weights differ at the end of training")
    metrics_file.close()

    # -------------------------------------------------------------------------
    # Save the policy and the summary; print the final table.
    policy.save_pretrained(os.path.join(cfg.out_dir, "policy"))
    tokenizer.save_pretrained(os.path.join(cfg.out_dir, "policy"))
    final = history[-1]
    summary = {
        "method": cfg.method, "steps": cfg.steps, "seed": cfg.seed, "world_size": world,
        "gold_reward_sft": sft_eval["eval_reward"], "gold_reward_final": final["eval_reward"],
        "win_rate_vs_sft": final["eval_win"], "kl": final["eval_kl"],
        "pair_accuracy_sft": sft_eval.get("eval_acc"), "pair_accuracy_final": final.get("eval_acc"),
        "margin_final": final.get("eval_margin"),
        "oracle_queries": oracle_queries + len(used_pairs), "ties": ties,
        "seconds": time.perf_counter() - t_start,
        "seconds_by_phase": {"sft": sft_seconds, "load_and_setup": t_load - sft_seconds, "align": t_align},
        "seconds_per_step": {k: v / cfg.steps for k, v in phase_seconds.items()},
        "phase_share": {k: v / sum(phase_seconds.values()) for k, v in phase_seconds.items()},
        "tokens_per_second": {"generated": token_totals["generated"] / max(phase_seconds.get("generate", 0.0), 1e-9),
                              "trained": token_totals["trained"] / max(phase_seconds["policy"], 1e-9)},
    }
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_history(history, os.path.join(cfg.out_dir, "reward.png"), cfg.method)

    print(f"\n{'held-out prompts':<26}{'SFT':>10}{cfg.method:>12}")
    for name, key in [("gold reward", "eval_reward"), ("win rate vs SFT", "eval_win"), ("KL to reference", "eval_kl"),
                      ("pair accuracy", "eval_acc"), ("implicit margin", "eval_margin")]:
        if key in final:
            print(f"{name:<26}{sft_eval[key]:>10.3f}{final[key]:>12.3f}")
    print("time per step: " + " | ".join(f"{k} {1000 * v:.0f}ms ({100 * summary['phase_share'][k]:.0f}%)"
                                         for k, v in summary["seconds_per_step"].items())
          + f" | tokens/s generated {summary['tokens_per_second']['generated']:.0f}, trained {summary['tokens_per_second']['trained']:.0f}")
    print(f"oracle queries {summary['oracle_queries']} | time: sft {sft_seconds:.0f}s, align {t_align:.0f}s, "
          f"total {summary['seconds']:.0f}s | outputs in {cfg.out_dir}/")
    return summary


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
    """Gold reward on held-out prompts against step."""
    plt = pyplot("reward.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["step"] for h in history], [h["eval_reward"] for h in history], marker="o")
    ax.set(xlabel="step", ylabel="gold reward (held-out)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Side by side: every method, several seeds, one table, two plots

def compare(cfg):
    """`python train.py --compare`: every method from the same SFT model, with the same number of
    updates and pairs per update, over several seeds. The oracle-label budget is the same cap for
    all (batch_size x steps labels); the self-labelling variants use less of it, and the table says
    how much. Finished runs are not redone; an interrupted one resumes from its checkpoint."""
    import platform

    root = os.path.join(cfg.out_dir, "compare")
    check_writable_dir(root)
    t0 = time.perf_counter()
    runs = []
    plan = [(m, cfg.seed + k) for m in cfg.compare_methods.split(",") for k in range(cfg.compare_seeds)]
    for method, seed in tqdm(plan, desc="compare", dynamic_ncols=True):
        out = os.path.join(root, f"{method}-seed{seed}")
        run_cfg = dataclasses.replace(cfg, method=method, seed=seed, out_dir=out, compare=False)
        done = os.path.isfile(os.path.join(out, "summary.json"))
        if done:  # finished: reuse it if it ran with these settings (more --steps: it resumes and goes on)
            with open(os.path.join(out, "config.json")) as f:
                refuse_changed_settings(json.load(f), run_cfg, "delete it or use another --out_dir")
            with open(os.path.join(out, "summary.json")) as f:
                done = json.load(f)["steps"] == cfg.steps
        if not done:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "log.txt"), "a") as log, contextlib.redirect_stdout(log):
                main(run_cfg)
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            evals = [{k: v for k, v in json.loads(x).items() if k == "step" or k.startswith("eval_")} for x in f]
        sft = {"step": 0, "eval_reward": summary["gold_reward_sft"], "eval_kl": 0.0}
        runs.append({"method": method, "seed": seed, "summary": summary, "history": [sft] + [e for e in evals if len(e) > 1]})
    wall = time.perf_counter() - t0

    stats = {}  # method -> {figure: (mean, std)}
    for method in dict.fromkeys(r["method"] for r in runs):
        group = [r["summary"] for r in runs if r["method"] == method]
        figures = {k: [s[k] for s in group] for k in ("gold_reward_final", "win_rate_vs_sft", "kl", "oracle_queries")}
        figures["seconds_per_step"] = [sum(s["seconds_per_step"].values()) for s in group]
        for phase in group[0]["seconds_per_step"]:
            figures[f"ms_{phase}"] = [1000 * s["seconds_per_step"][phase] for s in group]
        figures["tokens_per_second_generated"] = [s["tokens_per_second"]["generated"] for s in group]
        figures["tokens_per_second_trained"] = [s["tokens_per_second"]["trained"] for s in group]
        stats[method] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in figures.items()}
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {pick_device(cfg.device)}"
    with open(os.path.join(root, "compare.json"), "w") as f:
        json.dump({"machine": machine, "wall_seconds": wall, "config": dataclasses.asdict(cfg), "stats": stats, "runs": runs}, f, indent=1)

    sft_reward = runs[0]["summary"]["gold_reward_sft"]
    budget = cfg.batch_size * cfg.steps
    run_minutes = sum(r["summary"]["seconds"] for r in runs) / 60  # not just this invocation's: some runs may be reused
    lines = [f"{len(plan)} runs ({cfg.compare_seeds} seeds), {cfg.steps} updates x {cfg.batch_size} pairs each, "
             f"oracle-label budget {budget} per run; {machine}; the runs took {run_minutes:.1f} min. Mean ± std over seeds.", "",
             f"| method | gold reward (SFT {sft_reward:.2f}) | win rate vs SFT | KL to SFT | oracle labels used | s/step |",
             "|---|---|---|---|---|---|"]

    def pm(m, k, d=2):  # "mean ± std"
        return f"{stats[m][k][0]:.{d}f} ± {stats[m][k][1]:.{d}f}"

    for m in stats:
        lines.append(f"| {m} | {pm(m, 'gold_reward_final')} | {pm(m, 'win_rate_vs_sft')} | {pm(m, 'kl', 1)} | "
                     f"{stats[m]['oracle_queries'][0]:.0f} | {stats[m]['seconds_per_step'][0]:.3f} |")
    phases = [k[3:] for k in stats[next(iter(stats))] if k.startswith("ms_")]
    lines += ["", "Time per step (ms, share of the step) and throughput:", "",
              "| method | " + " | ".join(phases) + " | generated tok/s | trained tok/s |", "|---" * (len(phases) + 3) + "|"]
    for m in stats:
        total = sum(stats[m][f"ms_{p}"][0] for p in phases)
        lines.append(f"| {m} | " + " | ".join(f"{stats[m][f'ms_{p}'][0]:.1f} ({100 * stats[m][f'ms_{p}'][0] / total:.0f}%)" for p in phases)
                     + f" | {stats[m]['tokens_per_second_generated'][0]:.0f} | {stats[m]['tokens_per_second_trained'][0]:.0f} |")
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_compare(runs, root)
    print(f"compare: outputs in {root}/")
    return stats


def plot_compare(runs, root):
    """reward_vs_step.png (mean ± std over seeds) and reward_vs_kl.png (the reward-KL frontier)."""
    plt = pyplot("the plots")
    if plt is None:
        return
    fig1, ax1 = plt.subplots(figsize=(6.4, 4))
    fig2, ax2 = plt.subplots(figsize=(6.4, 4))
    for method in dict.fromkeys(r["method"] for r in runs):
        histories = [r["history"] for r in runs if r["method"] == method]
        steps = [h["step"] for h in histories[0]]
        reward = np.array([[h["eval_reward"] for h in hist] for hist in histories])  # (seeds, evals)
        kl = np.array([[h["eval_kl"] for h in hist] for hist in histories])
        line, = ax1.plot(steps, reward.mean(0), marker=".", label=method)
        ax1.fill_between(steps, reward.mean(0) - reward.std(0), reward.mean(0) + reward.std(0), color=line.get_color(), alpha=0.15)
        ax2.plot(kl.mean(0), reward.mean(0), marker="o", markersize=3, label=method)
    ax1.set(xlabel="step", ylabel="gold reward, held-out prompts", title="Gold reward during alignment")
    ax2.set(xlabel="KL(policy || SFT), sampled estimate", ylabel="gold reward, held-out prompts", title="Reward-KL frontier")
    for fig, ax, name in [(fig1, ax1, "reward_vs_step.png"), (fig2, ax2, "reward_vs_kl.png")]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(root, name), dpi=120)
        plt.close(fig)


# -----------------------------------------------------------------------------
# Benchmark: where an online step's time goes, against transformers' generate

def benchmark(cfg):
    """`python train.py --benchmark`, on the embedded SFT model (2 layers, 128 wide), 16 prompts x 2
    responses, measured side by side in one process, medians of --bench_reps interleaved runs:
    (1) sail.sample against model.generate(do_sample=True, use_cache=True), both made to produce
    exactly 32 new tokens, and the share of sample's time spent inside the model's forward;
    (2) an online sail-pr step against the same step built around model.generate (again exactly
    32 new tokens, so both do the same work), with the share of each phase; (3) the cost of SAIL's extra terms:
    one update (forward, loss, backward, optimiser) on the same pairs with gamma > 0 and gamma = 0."""
    from statistics import median

    device = pick_device(cfg.device)
    task = data.make_task(cfg.task_seed)
    policy, tokenizer, _ = embedded_policy(cfg, task, device)
    data.prepare_tokenizer(tokenizer)
    disable_dropout(policy)
    policy.to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    off = torch.autocast(device.type, enabled=False)
    prompts = task.train_prompts[:16]
    p_ids, p_mask = (t.to(device) for t in data.encode_prompts(tokenizer, prompts * 2, cfg.max_prompt_len))
    eos, gen, n_new = tokenizer.eos_token_id, torch.Generator(device).manual_seed(cfg.seed), 32
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)  # the full update's work, without drifting the model

    def clock(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    def generate(max_tokens, until_eos):  # a lean wrapper around model.generate, output in sample's layout
        ids = policy.generate(input_ids=p_ids, attention_mask=p_mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                              max_new_tokens=max_tokens, min_new_tokens=None if until_eos else max_tokens, use_cache=True,
                              pad_token_id=eos)
        new = ids[:, p_ids.shape[1]:]  # (B, n)
        is_eos = (new == eos).long()
        response = (is_eos.cumsum(1) - is_eos == 0).long()  # up to and including the first EOS
        return ids, torch.cat([p_mask, response], 1), torch.cat([torch.zeros_like(p_mask), response], 1)

    def ours(max_tokens, until_eos):
        return sample(policy, p_ids, p_mask, max_new_tokens=max_tokens, temperature=1.0,
                      eos_token_id=eos if until_eos else -1, generator=gen)  # -1: no token ends a row

    def update(batch, ref, gamma):  # policy forward, loss, backward, optimiser step
        logps = sequence_logps_of(policy, *batch, off)  # (2B,)
        pair = (logps[:16], logps[16:], ref[:16], ref[16:], cfg.beta)
        neg_ell = -F.logsigmoid(cfg.beta * ((logps[:16] - ref[:16]) - (logps[16:] - ref[16:]))).detach()
        loss = sail_loss(*pair, response_coef=gamma, baseline=leave_one_out_mean(neg_ell) if gamma else None)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def online_step(generator_fn):  # one sail-pr step (all pairs online), timed by phase
        times = {}
        times["generate"], batch = clock(lambda: generator_fn(n_new, False))
        texts = decode(tokenizer, batch[0], batch[2])
        times["label"], _ = clock(lambda: reward.bradley_terry_label(*reward.GoldReward()(prompts * 2, texts).split(16)))
        times["reference"], ref = clock(lambda: torch.no_grad()(sequence_logps_of)(reference, *batch, off))
        times["update"], _ = clock(lambda: update(batch, ref, cfg.gamma * cfg.response_scale))
        return times

    # (1) the sampler: fixed work, 32 tokens for every row
    forward_seconds = [0.0]
    plain_forward = policy.forward

    def timed_forward(*args, **kwargs):
        t0 = time.perf_counter()
        out = plain_forward(*args, **kwargs)
        forward_seconds[0] += time.perf_counter() - t0
        return out

    policy.eval()
    ours(n_new, False), generate(n_new, False)  # warm-up
    t_ours, t_generate, shares = [], [], []
    for _ in tqdm(range(cfg.bench_reps), desc="sampler", dynamic_ncols=True, leave=False):
        forward_seconds[0], policy.forward = 0.0, timed_forward
        seconds, _ = clock(lambda: ours(n_new, False))
        policy.forward = plain_forward
        t_ours.append(seconds)
        shares.append(forward_seconds[0] / seconds)
        t_generate.append(clock(lambda: generate(n_new, False))[0])

    # (2) an online step, and (3) the extra terms' cost on one fixed batch
    steps_ours, steps_generate = [], []
    for _ in tqdm(range(cfg.bench_reps), desc="online step", dynamic_ncols=True, leave=False):
        steps_ours.append(online_step(ours))
        steps_generate.append(online_step(generate))
    batch = ours(n_new, False)
    with torch.no_grad():
        ref = sequence_logps_of(reference, *batch, off)
    t_sail, t_dpo = [], []
    for _ in range(3 * cfg.bench_reps):
        t_sail.append(clock(lambda: update(batch, ref, cfg.gamma * cfg.response_scale))[0])
        t_dpo.append(clock(lambda: update(batch, ref, 0.0))[0])

    step_ours = {k: median(s[k] for s in steps_ours) for k in steps_ours[0]}
    step_generate = {k: median(s[k] for s in steps_generate) for k in steps_generate[0]}
    result = {
        "device": str(device), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "model": "embedded GPT-2, 2 layers x 128 wide", "rows": 32, "new_tokens": n_new,
        "sampler_ms": 1000 * median(t_ours), "generate_ms": 1000 * median(t_generate),
        "sampler_speedup_vs_generate": median(t_generate) / median(t_ours), "sampler_forward_share": median(shares),
        "online_step_ms": {k: 1000 * v for k, v in step_ours.items()},
        "online_step_with_generate_ms": {k: 1000 * v for k, v in step_generate.items()},
        "online_step_ratio": sum(step_ours.values()) / sum(step_generate.values()),
        "online_step_phase_share": {k: v / sum(step_ours.values()) for k, v in step_ours.items()},
        "update_sail_pr_ms": 1000 * median(t_sail), "update_online_dpo_ms": 1000 * median(t_dpo),
        "extra_terms_overhead": median(t_sail) / median(t_dpo) - 1,
    }
    check_writable_dir(cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    r = result
    print(f"device {device}, {r['cpu_threads']} threads, {r['model']}, {r['rows']} rows")
    print(f"sampler, {n_new} new tokens:   sail.sample {r['sampler_ms']:.1f} ms | model.generate {r['generate_ms']:.1f} ms | "
          f"speed-up {r['sampler_speedup_vs_generate']:.2f}x | time inside the model's forward {100 * r['sampler_forward_share']:.0f}%")
    print(f"online sail-pr step:     ours {sum(step_ours.values()) * 1000:.1f} ms | around model.generate "
          f"{sum(step_generate.values()) * 1000:.1f} ms | ratio {r['online_step_ratio']:.2f}")
    print("  phase shares (ours):   " + " | ".join(f"{k} {100 * v:.0f}%" for k, v in r["online_step_phase_share"].items()))
    print(f"update on the same pairs: sail-pr {r['update_sail_pr_ms']:.2f} ms | online-dpo {r['update_online_dpo_ms']:.2f} ms | "
          f"extra terms {100 * r['extra_terms_overhead']:+.1f}%")
    print(f"benchmark: {cfg.out_dir}/bench.json")
    return result


def cli(argv=None):
    try:
        cfg = parse_args(argv)
        return compare(cfg) if cfg.compare else benchmark(cfg) if cfg.benchmark else main(cfg)
    except (data.DataError, reward.ModelError) as e:  # bad input: the message says where and what
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli()
