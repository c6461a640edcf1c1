"""
train.py: online preference alignment with SAIL, read top to bottom.

    python train.py                      # SFT (cached after the first run), SAIL-PR, evaluation
    python train.py --method sail-pp     # or dpo, online-dpo, sail-pr, sail-dp, mix, selm, xpo
    python train.py run.yaml             # the options from a YAML or JSON file (flags after it override it)
    torchrun --nproc_per_node=N -- train.py ...   # data parallel: the same loop on N GPUs (lines marked ddp)
    python train.py --help               # every option with its default
    (experiments/: python -m experiments.compare, .benchmark, .stand_ins, built on this file)

Reading order: `Config`; the ALGORITHM, one step of SAIL as small functions in the paper's order
(`alignment_step`: `build_pairs`, routes and dataset responses or y1, y2 ~ pi_theta;
`oracle_labels`; `reference_logps` and `policy_logps`, Delta; `self_labels`; `response_baselines`;
`backward`, which calls `pair_losses`; `optimizer_step`), then the step's plumbing; `main`, the
run's phases (inputs, policy and reference, the SFT baseline, the loop, the summary); evaluation
and logging; setup (device, inputs, the SFT model, its frozen reference); checkpoints;
data-parallel helpers. Every method is a routing of pairs, as in the official code: offline DPO
pairs from the dataset, SAIL-DP (dataset responses, self-labels), SAIL-PP (policy responses,
self-labels), SAIL-PR (policy responses, oracle labels).

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
  3. A tied hard oracle label is worth its expectation over Bradley-Terry's fair coin,
     1/2 [l(h) + l(-h)] (sail.pair_value), in the loss, the response term and the baseline, so the
     gradient stays exact; it counts as a query. --ties first keeps the official code's handling
     (y1 chosen: the same coin in distribution, noisier).
  4. Tiny models need AdamW at ~5e-4, not the paper's RMSprop 1e-5 with LoRA on 7B models; full
     fine-tuning is the default, and --lora_rank R trains LoRA adapters (peft) instead.
  5. The response term uses a leave-one-out baseline by default (--baseline none for the plain
     estimator), which lowers its variance without biasing it, and its coefficients are scaled
     by --response_scale (0.1). The official hook's per-pair size is larger by B / (0.1 |log pi(y)|),
     about 17 at the defaults (it is summed, not averaged, over the B pairs, and divided by
     |log pi(y)|, about 10 here). --response_term official runs the official code's hook instead
     (sail.sail_loss); official-size and official-sign separate its size from its sign.
  6. --grad_accum K cuts the step's pairs into K micro-batches only after they are sampled and
     labelled, so that the baseline, the self-labels and the mean are the whole step's: the
     update is that of one batch (tested), at the cost of one forward pass without a graph.
"""
import contextlib
import copy
import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

import data
import reward
from data import check_writable_dir, decode
from sail import (RESPONSE_TERMS, REVKL_ESTIMATES, disable_dropout, leave_one_out_mean, logits_of, pair_value, reverse_kl,
                  revkl_proxy, sail_loss, sample, selm_loss, sequence_logps_of, xpo_loss)


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
    response_term: str = arg("exact", "exact (the score-function gradient, sail.py) | official (the official code's hook: "
                                      "-coef * l / log pi(y) on each response's gradient, summed, no baseline or --response_scale) | "
                                      "official-size (the exact sign at the hook's size) | official-sign (the hook's sign at the exact size)")
    response_scale: float = arg(0.1, "multiplies every exact response-term coefficient (the official hook's term is summed over the batch "
                                     "and divided by |log pi(y)|: B / (0.1 |log pi(y)|), ~17x this size per pair at the defaults)")
    beta: float = arg(0.1, "KL strength beta of DPO/SAIL")
    baseline: str = arg("loo", "response-term baseline: loo (mean -l of the step's other pairs with a response term) | loo-all (of all its other pairs) | none")
    label_mode: str = arg("hard", "oracle labels: hard (r1 > r2; for a tie see --ties) | sampled (Bernoulli(sigmoid(r1 - r2)))")
    ties: str = arg("average", "a tied hard label: average (worth 1/2 [l(h) + l(-h)], its expectation over Bradley-Terry's fair coin) | "
                               "first (y1 is chosen, as in the official code: the same coin in distribution, noisier)")
    revkl: float = arg(0.0, "SAIL-RevKL: coefficient of the penalty KL(pi_ref || pi_theta) added to every pair's loss, with every "
                            "method (0: off; the RevKL authors use 1e-3)")
    revkl_estimate: str = arg("exact", "exact (sail.reverse_kl on one sample of the reference per pair at temperature 1: unbiased) | "
                                       "proxy (the RevKL authors' token proxy on the pairs' own responses, as their code computes "
                                       "it: sail.revkl_proxy) | proxy-aligned (the same with its logits aligned to the tokens)")
    revkl_on: str = arg("both", "the proxy's responses: chosen | rejected | both (the mean of the two), as in the authors' code")
    # optimisation
    steps: int = arg(150, "alignment steps (optimiser updates)")
    batch_size: int = arg(16, "preference pairs per step (online pairs: prompts x 2 responses)")
    lr: float = arg(5e-4, "AdamW learning rate of the alignment phase")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)")
    grad_accum: int = arg(1, "cut each step's pairs into this many micro-batches for the forward and backward passes (less memory, the same update)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, slower)")
    offload_reference: bool = arg(False, "keep the frozen reference model on the CPU (less GPU memory, slower)")
    lora_rank: int = arg(0, "LoRA (needs peft): train rank-R adapters instead of every weight; the reference is the same model "
                            "with its adapters off, so no second copy is held (0: full fine-tuning)")
    lora_alpha: float = arg(16.0, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank")
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
    proxy: str = arg("", "a learned labeller for online pairs, as in real RLHF: fit (a Bradley-Terry reward model fit on the offline "
                         "pairs, reward.fit_reward_model, cached in --cache_dir) or a sequence-classification reward model's path; "
                         "the oracle (the gold reward, or --reward_model) stays the yardstick of evaluation ('': the oracle labels)")
    proxy_pairs: int = arg(0, "--proxy fit: fit on the first N offline pairs (0: all of them)")
    proxy_width: int = arg(64, "--proxy fit: the reward model's width (a 2-layer GPT-2 sequence classifier)")
    proxy_steps: int = arg(300, "--proxy fit: AdamW steps of 64 pairs")
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
def parse_args(argv=None, extra=None, description=None):
    """Config from the command line (every field of Config is a --flag; booleans take `--flag` or
    `--flag false`) or from a config file, as in Hugging Face's example scripts:
    `python train.py run.yaml` (or .json), with any flags after it overriding the file. Then every
    option is checked; a problem exits with one `error:` line each, before anything is loaded.
    extra: another dataclass of options with a problems() method (experiments/); then returns (cfg, extra's)."""
    from transformers import HfArgumentParser

    kinds = (Config,) + ((extra,) if extra else ())
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_file_args(argv[0], kinds) + argv[1:]
    parser = HfArgumentParser(kinds, description=description or __doc__.split("\n\n")[0])
    cfg, *more = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    problems = check_config(cfg) + [p for x in more for p in x.problems()]
    if problems:  # one line per problem, no traceback, exit status 1
        raise SystemExit("\n".join(f"error: {p}" for p in problems))
    return (cfg, *more) if extra else cfg


def config_file_args(path, kinds=(Config,)):
    """A YAML or JSON file of {option: value} as command-line arguments, so that a file's values
    are typed and checked exactly as flags are (YAML reads 5e-4 as a string, for one)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: no such config file") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise SystemExit(f"error: {path}: not a readable {'JSON' if path.endswith('.json') else 'YAML'} file "
                         f"({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise SystemExit(f"error: {path}: expected a mapping of option: value, got {type(values).__name__}")
    fields = {f.name for kind in kinds for f in dataclasses.fields(kind)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise SystemExit(f"error: {path}: unknown option(s) {', '.join(map(repr, unknown))}; `python train.py --help` lists them")
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


# The valid range of every numeric option: (test, what the test says, options).
RANGES = [
    (lambda x: x > 0, "> 0", ["beta", "lr", "sft_lr", "temperature", "lora_alpha"]),
    (lambda x: x >= 0, ">= 0", ["rho", "pi", "gamma", "revkl", "response_scale", "selm_alpha", "xpo_alpha", "weight_decay",
                                "grad_clip", "seed", "task_seed", "lora_rank", "proxy_pairs"]),
    (lambda x: 0 <= x <= 1, "between 0 and 1 (a probability)", ["r", "p", "g"]),
    (lambda x: 0 < x < 1, "strictly between 0 and 1", ["holdout"]),
    (lambda x: x > 0 and x % 4 == 0, "a positive multiple of 4 (its 4 attention heads)", ["proxy_width"]),
    (lambda x: x >= 1, ">= 1", ["steps", "grad_accum", "proxy_steps", "max_new_tokens", "max_prompt_len", "reward_batch_size", "sft_steps",
                                "sft_batch_size", "eval_every", "eval_samples", "sample_every", "save_every"]),
    (lambda x: x >= 2, ">= 2 (the response-term baseline needs another pair)", ["batch_size"]),
    (lambda x: x >= -1, ">= 0, or -1 for the method's default", ["ref_update_every"]),
]
CHOICES = {"method": METHODS, "baseline": ("loo", "loo-all", "none"), "response_term": RESPONSE_TERMS,
           "label_mode": ("hard", "sampled"), "ties": ("average", "first"), "resume": ("auto", "no"),
           "revkl_estimate": REVKL_ESTIMATES, "revkl_on": ("chosen", "rejected", "both")}


def check_values(options, ranges, choices):
    """What is wrong with the options' values: each numeric one against its range, each choice
    against its list; messages naming the option."""
    problems = []
    for test, what, names in ranges:
        for name in names:
            value = getattr(options, name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"--{name} must be a finite number, got {value}")
            elif not test(value):
                problems.append(f"--{name} must be {what}, got {value}")
    for name, allowed in choices.items():
        if getattr(options, name) not in allowed:
            problems.append(f"--{name} {getattr(options, name)!r}: choose one of {', '.join(allowed)}")
    return problems


def check_config(cfg):
    """Every problem with the options, as messages naming the option (empty: all good). Nothing
    here touches the disk, so a refused command changes nothing."""
    problems = check_values(cfg, RANGES, CHOICES)
    if cfg.method == "mix" and cfg.r + cfg.p + cfg.g > 1 + 1e-9:
        problems.append(f"--r + --p + --g must be <= 1, got {cfg.r + cfg.p + cfg.g:g}")
    if cfg.grad_accum > cfg.batch_size:
        problems.append(f"--grad_accum {cfg.grad_accum} must be <= --batch_size {cfg.batch_size} (a micro-batch holds at least one pair)")
    probs = METHODS[cfg.method](cfg) if cfg.method in METHODS else (0, 0, 0, 0)
    no_pairs = not cfg.pairs and cfg.model != "embedded" and cfg.prompts  # no embedded task, no pair file
    if (probs[OFFLINE] or probs[DP]) and no_pairs:
        problems.append(f"--method {cfg.method} trains on offline pairs: give --pairs")
    if cfg.proxy == "fit" and no_pairs:
        problems.append("--proxy fit fits a reward model on the offline pairs: give --pairs")
    if cfg.proxy not in ("", "fit") and not os.path.isdir(cfg.proxy):
        problems.append(f"--proxy {cfg.proxy}: no such directory; give fit, or a directory written by save_pretrained")
    if cfg.lora_rank and cfg.offload_reference:
        problems.append("--offload_reference with --lora_rank: the reference is the policy with its adapters off, there is no copy to offload")
    if cfg.lora_rank and importlib.util.find_spec("peft") is None:
        problems.append("--lora_rank needs the peft library: pip install peft (or --lora_rank 0 for full fine-tuning)")
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
# ALGORITHM: one SAIL step, as small functions in the paper's order. `alignment_step` calls them.
# They read what they need from `run` (a Run, set up once, below) and `state` (a State: the random
# streams and counters a checkpoint saves). The names used here: run.policy, the model trained
# (run.train_policy: the same, or its DDP wrapper); run.reference, its frozen SFT copy (LoRA: the policy, adapters off)
# (run.train_reference: the same, or SELM's moving one); run.sampler, sail.sample; run.amp, bf16
# autocast on CUDA, else nothing; run.label_coefs / run.response_coefs, each term's coefficient
# per route, indexed by OFFLINE, DP, PP, PR.

@torch.no_grad()  # reference log-probs never need a graph
def reference_logps(run, batch, model=None):
    """Log-probs (B,) under the frozen reference (or `model`, SELM's training reference)."""
    batch = tuple(t.to(run.ref_device) for t in batch)
    return sequence_logps_of(run.reference if model is None else model, *batch, run.ref_amp).to(run.device)


def order_pairs(y1_wins, x):
    """Values (2B,) of the rows [all y1; all y2] -> (chosen, rejected), each (B,)."""
    y1, y2 = x[:len(y1_wins)], x[len(y1_wins):]
    return torch.where(y1_wins, y1, y2), torch.where(y1_wins, y2, y1)


def accuracy(h):
    """Per pair: 1 if the implicit reward prefers the chosen response, 0.5 on a tie (h = 0)."""
    return (h > 0).float() + 0.5 * (h == 0).float()


@dataclass
class Pairs:
    """The B preference pairs of one step (ddp: of this rank). Its 2B (+ B) rows, in order:
    [dataset y1 | online y1 | dataset y2 | online y2 | y~ of SELM/XPO], so row i and row B + i are
    the two responses of pair i; every function of the step relies on this layout."""
    route: np.ndarray  # (B,) OFFLINE, DP, PP or PR, sorted: dataset pairs first, then online pairs
    prompts: list      # (B,) the prompt of each pair
    texts: list        # (2B,) y1 of every pair, then y2 (a dataset pair: y1 its chosen, y2 its rejected)
    batch: tuple       # (ids, attention_mask, response_mask), each (2B [+ B], T)
    generated: int     # tokens sampled for it
    ref_samples: tuple = None  # --revkl exact: (ids, attention_mask, response_mask) of one y ~ pi_ref per pair, each (B, T')


@dataclass
class Labels:
    """Who won each pair: y1 until a label says otherwise (a dataset pair's y1 is its chosen
    response; SAIL-DP and SAIL-PP pairs get theirs from `self_labels`)."""
    y1_wins: torch.Tensor  # (B,) bool
    valid: torch.Tensor    # (B,) bool: False for a tied oracle label (worth its fair-coin value: sail.pair_value)
    scores: torch.Tensor   # (2B,) the oracle's rewards of the rows it labelled, NaN elsewhere
    score_sum: float = 0.0  # checked for NaN / inf
    queries: int = 0
    ties: int = 0


def draw_routes(run, state, B):
    """Route each of B pairs (offline, SAIL-DP, SAIL-PP, SAIL-PR, with the method's probabilities)
    and draw what it needs: a dataset pair or a training prompt. Returns this rank's
    (route (B,), dataset pair ids, prompt ids). ddp: every rank draws the routes, pairs and prompts
    of all ranks from the same streams and keeps its own share, so ranks never share a pair."""
    routes = [np.sort(r) for r in state.route_rng.choice(4, size=B * run.world, p=run.route_probs).reshape(run.world, B)]
    n_dataset = [int((r <= DP).sum()) for r in routes]  # per rank
    pair_ids = state.pair_stream.next(sum(n_dataset))
    prompt_ids = state.prompt_stream.next(B * run.world - sum(n_dataset))
    # A dataset pair (offline DPO or SAIL-DP) was labelled, and its ties dropped, when the dataset was
    # made: it goes into the label count (label_totals) once, however often it is drawn again.
    state.used_pairs.update(pair_ids)
    a, b = sum(n_dataset[:run.rank]), sum(B - n for n in n_dataset[:run.rank])  # ddp: where this rank's share starts
    return routes[run.rank], pair_ids[a:a + n_dataset[run.rank]], prompt_ids[b:b + B - n_dataset[run.rank]]


def sample_responses(run, model, prompt_ids, prompt_mask, temperature, generator, amp):
    """One response per row of `model`, in eval mode (the KV cache; gradient checkpointing only
    applies in train mode); the model's mode is restored after."""
    was_training = model.training
    model.eval()
    with amp:
        out = run.sampler(model, prompt_ids, prompt_mask, max_new_tokens=run.cfg.max_new_tokens, temperature=temperature,
                          eos_token_id=run.tokenizer.eos_token_id, generator=generator)
    model.train(was_training)
    return out


def build_pairs(run, state, B):
    """Route B pairs and give each its two responses: a dataset pair's own (offline DPO, SAIL-DP),
    or two fresh samples y1, y2 ~ pi_theta for a training prompt (SAIL-PP, SAIL-PR). SELM and XPO
    add a response y~ of their reference per prompt: greedy (SELM) or sampled (XPO)."""
    cfg, tok, device = run.cfg, run.tokenizer, run.device
    route, pair_ids, prompt_ids = draw_routes(run, state, B)
    n_ds, n_on = len(pair_ids), len(prompt_ids)
    rows = [run.pairs[i] for i in pair_ids]
    prompts = [x["prompt"] for x in rows] + [run.train_prompts[i] for i in prompt_ids]
    texts = [x["chosen"] for x in rows] + [None] * n_on + [x["rejected"] for x in rows] + [None] * n_on
    y1, y2, explore, generated = [], [], [], 0  # blocks of (ids, attention_mask, response_mask)
    if n_ds:
        ds = data.encode_responses(tok, prompts[:n_ds] * 2, texts[:n_ds] + texts[B:B + n_ds], cfg.max_prompt_len, cfg.max_new_tokens)
        y1.append(tuple(t[:n_ds].to(device) for t in ds))
        y2.append(tuple(t[n_ds:].to(device) for t in ds))
    if n_on:
        p_ids, p_mask = (t.to(device) for t in data.encode_prompts(tok, prompts[n_ds:] * 2, cfg.max_prompt_len))  # 2 per prompt
        on = sample_responses(run, run.policy, p_ids, p_mask, cfg.temperature, state.sampling_gen, run.amp)  # y1, y2 ~ pi_theta
        y1.append(tuple(t[:n_on] for t in on))
        y2.append(tuple(t[n_on:] for t in on))
        on_texts = decode(tok, on[0], on[2])
        texts[n_ds:B], texts[B + n_ds:] = on_texts[:n_on], on_texts[n_on:]
        generated += int(on[2].sum())
    if cfg.method in EXPLORE:  # all pairs online: one y~ of the reference per prompt
        p_ids, p_mask = p_ids[:n_on].to(run.ref_device), p_mask[:n_on].to(run.ref_device)
        y = sample_responses(run, run.train_reference, p_ids, p_mask, 0.0 if cfg.method == "selm" else cfg.temperature,
                             state.explore_gen, run.ref_amp)
        explore.append(tuple(t.to(device) for t in y))
        generated += int(y[2].sum())
    ref_samples = None
    if cfg.revkl and cfg.revkl_estimate == "exact":  # SAIL-RevKL: one y ~ pi_ref per pair, at temperature 1
        p_ids, p_mask = (t.to(run.ref_device) for t in data.encode_prompts(tok, prompts, cfg.max_prompt_len))
        y = sample_responses(run, run.reference, p_ids, p_mask, 1.0, state.revkl_gen, run.ref_amp)
        ref_samples = tuple(t.to(device) for t in y)
        generated += int(y[2].sum())
    batch = data.pad_cat(y1 + y2 + explore, tok.pad_token_id)  # (2B [+ B], T)
    return Pairs(route, prompts, texts, batch, generated, ref_samples)


def oracle_labels(run, state, pairs):
    """Bradley-Terry labels from the oracle for the SAIL-PR pairs: one query each (a tie too)."""
    B = len(pairs.route)
    labels = Labels(torch.ones(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool), torch.full((2 * B,), float("nan")))
    idx = torch.nonzero(torch.from_numpy(pairs.route == PR)).squeeze(1)  # (n_pr,)
    if len(idx):
        r = run.oracle([pairs.prompts[i] for i in idx] * 2, [pairs.texts[i] for i in idx] + [pairs.texts[B + i] for i in idx])
        labels.scores[idx], labels.scores[B + idx], labels.score_sum = r[:len(idx)], r[len(idx):], r.sum().item()
        r1, r2 = r[:len(idx)], r[len(idx):]
        labels.y1_wins[idx], labels.valid[idx] = reward.bradley_terry_label(r1, r2, run.cfg.label_mode, state.label_gen,
                                                                            run.cfg.ties)
        labels.queries = len(idx)
        labels.ties = int((r1 == r2).sum()) if run.cfg.label_mode == "hard" else 0  # sampled: every pair gets a label
    return labels


def self_labels(run, state, pairs, labels, delta):
    """SAIL-DP and SAIL-PP pairs: the policy labels them itself, z ~ Bernoulli(sigmoid(beta h)),
    from its implicit reward (no oracle query), written into labels.y1_wins: z decides which of
    y1, y2 is the chosen one in the loss. delta: (2B,) L_theta(y) - L_ref(y) of the rows."""
    B = len(pairs.route)
    mine = torch.from_numpy((pairs.route == DP) | (pairs.route == PP))  # (B,)
    if mine.any():
        labels.y1_wins[mine] = reward.self_label(delta[:B][mine] - delta[B:][mine], run.cfg.beta, state.label_gen)


def margin(labels, delta):
    """h = Delta(y_w) - Delta(y_l) (B,) of every pair, from the rows' Delta (2B,) and the labels."""
    chosen, rejected = order_pairs(labels.y1_wins.to(delta.device), delta)  # (B,) each
    return chosen - rejected


def response_baselines(run, pairs, labels, delta):
    """Each pair's response-term baseline b (B,), or None: the mean cost -v (sail.pair_value: -l, or a
    tie's fair-coin value) of the *other* pairs of the step that carry the response term (--baseline
    loo), or of every other pair (loo-all). delta: (2B,) of every pair of the step."""
    cfg = run.cfg
    if cfg.baseline == "none" or cfg.method in EXPLORE or cfg.response_term in ("official", "official-size"):
        return None  # the official sizes have no baseline
    cost = -pair_value(margin(labels, delta), cfg.beta, labels.valid.to(run.device))  # (B,) -v
    route = torch.from_numpy(pairs.route).to(run.device)
    return leave_one_out_mean(cost, None if cfg.baseline == "loo-all" else run.response_coefs[route] > 0)


def rows_of(pairs, idx):
    """The batch rows of the pairs idx (m,) in the layout [y1 | y2 | y~], each (2m [+ m], T'),
    without the trailing columns that are padding in every one of them."""
    B = len(pairs.route)
    if len(idx) == B:  # one micro-batch: the whole batch, as it is
        return pairs.batch
    rows = torch.cat([idx, B + idx] + ([2 * B + idx] if len(pairs.batch[0]) > 2 * B else []))
    ids, attention, response = (t[rows.to(t.device)] for t in pairs.batch)
    width = int(attention.bool().any(0).nonzero().max()) + 1
    return ids[:, :width], attention[:, :width], response[:, :width]


def pair_losses(run, pairs, labels, baseline, idx, logps, ref):
    """The loss of each pair idx (m,) of a micro-batch: SAIL's surrogate with each route's
    coefficients (an offline pair's are 0: DPO), or DPO plus SELM's or XPO's exploration bonus.
    logps, ref: (2m [+ m],) the micro-batch's rows, y1 rows, then y2 rows, then y~."""
    cfg, m = run.cfg, len(idx)
    y1_wins, valid = labels.y1_wins[idx].to(run.device), labels.valid[idx].to(run.device)  # (m,)
    (logps, explore_logps), (ref, explore_ref) = (x.split([2 * m, len(x) - 2 * m]) for x in (logps, ref))
    # (policy chosen, policy rejected, reference chosen, reference rejected, beta): each (m,)
    pair = (*order_pairs(y1_wins, logps), *order_pairs(y1_wins, ref), cfg.beta)
    if cfg.method == "selm":
        return selm_loss(*pair, policy_explore_logps=explore_logps, reference_explore_logps=explore_ref,
                         alpha=cfg.selm_alpha, valid=valid)[0]
    if cfg.method == "xpo":
        return xpo_loss(*pair, policy_explore_logps=explore_logps, alpha=cfg.xpo_alpha, valid=valid)[0]
    route = torch.from_numpy(pairs.route[idx.numpy()]).to(run.device)  # (m,)
    # Each pair's coefficients by its route: label (0, rho, pi, 0), response (0, 0, pi, gamma) times
    # --response_scale (setup_run; gamma is 0 for online-dpo, and the official term has its own scale)
    return sail_loss(*pair, label_coef=run.label_coefs[route], response_coef=run.response_coefs[route],
                     baseline=None if baseline is None else baseline[idx.to(run.device)], valid=valid,
                     response_term=cfg.response_term)[0]


def revkl_penalty(run, pairs, labels, idx):
    """SAIL-RevKL's penalty of each pair idx (m,) of a micro-batch, before --revkl scales it: exact,
    KL(pi_ref || pi_theta) on the pair's sample of the reference (sail.reverse_kl); proxy, the
    authors' token proxy on the micro-batch's chosen and/or rejected responses (sail.revkl_proxy),
    one value shared by its pairs and pooled over the micro-batch, as theirs is over a device's
    batch (so with --grad_accum the proxy's update is not one batch's). The reference is the
    frozen SFT model (SELM's moving one too)."""
    cfg, m = run.cfg, len(idx)
    if cfg.revkl_estimate == "exact":
        ids, attention, response = (t[idx.to(t.device)] for t in pairs.ref_samples)  # (m, T') each
    else:
        ids, attention, response = (t[:2 * m] for t in rows_of(pairs, idx))  # (2m, T') y1 rows, then y2 rows
    policy = logits_of(run.train_policy, ids, attention, run.amp)  # (rows, T', V)
    with torch.no_grad():
        reference = logits_of(run.reference, ids.to(run.ref_device), attention.to(run.ref_device), run.ref_amp).to(run.device)
    if cfg.revkl_estimate == "exact":
        return reverse_kl(policy, reference, response)  # (m,)
    # The rows that won their pair, as the authors' code has them: it never swaps a SAIL-DP pair's
    # texts (it flips the sign of the loss instead), so there the dataset's chosen response, y1.
    first = labels.y1_wins[idx] | torch.from_numpy(pairs.route[idx.numpy()] == DP)  # (m,)
    chosen = torch.cat([first, ~first]).to(run.device)  # (2m,)
    parts = [rows for name, rows in (("chosen", chosen), ("rejected", ~chosen)) if cfg.revkl_on in (name, "both")]
    aligned = cfg.revkl_estimate == "proxy-aligned"
    return (sum(revkl_proxy(policy, reference, ids, response * rows[:, None], aligned) for rows in parts) / len(parts)).expand(m)


def alignment_step(run, state, step):
    """One update, one iteration of the paper's Algorithm 1, for every method: pairs, labels,
    Delta, self-labels, losses, backward, optimiser. Returns the step's metrics line and its pairs
    and labels. The plumbing (micro-batches, data parallelism, NaN stops) is in the helpers below."""
    clock = Clock(run.device)
    # 1. Route each pair; its responses come from the dataset, or fresh: y1, y2 ~ pi_theta.
    pairs = build_pairs(run, state, run.cfg.batch_size // run.world)
    clock.lap("generate")
    # 2. The oracle labels the SAIL-PR pairs (SAIL-DP/PP pairs are labelled by the policy in 4).
    labels = oracle_labels(run, state, pairs)
    clock.lap("label")
    # 3. Delta(y) = L_theta(y) - L_ref(y) of every row: the loss's reference (the frozen SFT model; SELM: its last iterate), then the policy.
    micro = torch.arange(len(pairs.route)).tensor_split(run.cfg.grad_accum)  # the pairs of each micro-batch
    ref = [reference_logps(run, rows_of(pairs, idx), model=run.train_reference) for idx in micro]  # (2m [+ m],) each
    clock.lap("reference")
    delta, logps = policy_logps(run, pairs, micro, ref)  # (2B,) detached; the loss's forward, kept if one micro-batch
    # 4. SAIL-DP and SAIL-PP pairs: the policy labels them itself, z ~ Bernoulli(sigmoid(beta h)).
    self_labels(run, state, pairs, labels, delta)
    # 5. Each pair's loss (DPO, + the label term, + the response term with its baseline; + SAIL-RevKL's penalty), averaged; backward.
    baseline = response_baselines(run, pairs, labels, delta)  # (B,) or None
    penalty = backward(run, step, pairs, labels, baseline, micro, ref, logps)  # (B,) or None
    clock.lap("policy")
    # 6. One optimiser step on the accumulated gradient (SELM: a new iteration's reference when due).
    grad_norm = optimizer_step(run, step)
    clock.lap("optimizer")
    return step_metrics(run, state, step, step_figures(run, pairs, labels, delta, penalty), grad_norm, clock.times), (pairs, labels)


# -----------------------------------------------------------------------------
# The step's plumbing: micro-batches (--grad_accum), data parallelism (ddp), NaN stops

def policy_logps(run, pairs, micro, ref):
    """Delta (2B,) of every row, detached, and the policy's log-probs with their graph when the step
    is one micro-batch (its loss reuses that forward; else None). With several micro-batches Delta
    comes from a pass without a graph, so that the self-labels and baselines see the whole step,
    and each micro-batch's loss recomputes its forward (the update is the same: tested)."""
    B = len(pairs.route)
    if len(micro) == 1:
        logps = sequence_logps_of(run.train_policy, *rows_of(pairs, micro[0]), run.amp)  # (2B [+ B],)
        return (logps[:2 * B] - ref[0][:2 * B]).detach(), logps
    with torch.no_grad():
        delta = all_pairs(B, micro, [sequence_logps_of(run.policy, *rows_of(pairs, idx), run.amp) - r
                                     for idx, r in zip(micro, ref)])  # (2B,)
    return delta, None


def backward(run, step, pairs, labels, baseline, micro, ref, logps=None):
    """The gradient of the mean loss over the step's pairs (ddp: of all ranks), one micro-batch at a
    time; a non-finite oracle reward or loss stops the run before the update. --revkl: each
    micro-batch's penalty has a forward and backward pass of its own (DDP allows one forward per
    backward); returns its values (B,), else None."""
    run.optimizer.zero_grad(set_to_none=True)
    penalties = []
    for k, idx in enumerate(micro):
        last = k == len(micro) - 1
        with ddp_no_sync(run, last=last and not run.cfg.revkl):  # ddp: average the gradients after the last backward
            if logps is None or k > 0:
                logps = sequence_logps_of(run.train_policy, *rows_of(pairs, idx), run.amp)  # (2m [+ m],)
            losses = pair_losses(run, pairs, labels, baseline, idx, logps, ref[k])  # (m,)
            loss = losses.sum() * run.world / run.cfg.batch_size  # the mean over the step's pairs (ddp: of all ranks)
            stop_if_not_finite(step, {"an oracle reward": labels.score_sum, "the loss": loss.item()}, run.cfg.out_dir,
                               run.world, run.device)
            loss.backward()
        if run.cfg.revkl:
            with ddp_no_sync(run, last=last):
                penalty = revkl_penalty(run, pairs, labels, idx)  # (m,)
                loss = run.cfg.revkl * penalty.sum() * run.world / run.cfg.batch_size
                stop_if_not_finite(step, {"the RevKL penalty": loss.item()}, run.cfg.out_dir, run.world, run.device)
                loss.backward()
            penalties.append(penalty.detach())
    return torch.cat(penalties) if penalties else None


def optimizer_step(run, step):
    """Clip the gradient, stop on a non-finite norm, step; SELM: the policy becomes the next
    iteration's reference every run.ref_every steps. Returns the norm before clipping."""
    clip = run.cfg.grad_clip if run.cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), clip)
    stop_if_not_finite(step, {"the gradient norm": grad_norm.item()}, run.cfg.out_dir, run.world, run.device)
    run.optimizer.step()
    if run.ref_every and step % run.ref_every == 0:  # SELM: this policy is the next iteration's reference
        run.train_reference.load_state_dict(run.policy.state_dict())
    return grad_norm


def all_pairs(B, micro, values):
    """Per-row values of the micro-batches, each (2m [+ m],), back in the step's layout (2B,)."""
    out = torch.empty(2 * B, device=values[0].device)
    for idx, v in zip(micro, values):
        out[idx], out[B + idx] = v[:len(idx)], v[len(idx):2 * len(idx)]
    return out


def step_figures(run, pairs, labels, delta, penalty):
    """What the log needs of the step, per pair, and the log-ratio of its policy-sampled rows."""
    h = margin(labels, delta)  # (B,)
    online = torch.from_numpy(np.concatenate([pairs.route >= PP] * 2)).to(delta.device)  # (2B,) rows sampled from pi_theta
    return {"neg_ell": -F.logsigmoid(run.cfg.beta * h), "h": h, "valid": labels.valid.to(delta.device), "kl": delta[online],
            "scores": labels.scores, "queries": labels.queries, "ties": labels.ties, "generated": pairs.generated,
            "trained": int(pairs.batch[1].sum()), "revkl": penalty}


def step_metrics(run, state, step, fig, grad_norm, times):
    """The step's line of metrics.jsonl: means over the valid pairs (of every rank); counts and
    timings added to the run's totals."""
    neg_ell, h, valid, kl, scores = (fig[k] for k in ("neg_ell", "h", "valid", "kl", "scores"))
    beta = run.cfg.beta
    sums = all_ranks_sum(torch.tensor([
        valid.sum(), torch.where(valid, neg_ell, 0.0).sum(), torch.where(valid, accuracy(h), 0.0).sum(),
        torch.where(valid, beta * h, 0.0).sum(), kl.sum(), kl.numel(), scores.nan_to_num(0.0).sum().item(),
        (~scores.isnan()).sum(), *(fig[k] for k in ("queries", "ties", "generated", "trained"))],
        dtype=torch.float64, device=run.device), run.world).tolist()
    n_valid, loss_sum, acc_sum, margin_sum, kl_sum, n_kl, reward_sum, n_scored, queries, ties, generated, trained = sums
    state.oracle_queries, state.ties = state.oracle_queries + int(queries), state.ties + int(ties)
    for k, v in (("generated", generated), ("trained", trained)):
        state.token_totals[k] += int(v)
    for k, v in times.items():
        state.phase_seconds[k] = state.phase_seconds.get(k, 0.0) + v
    revkl = {}
    if fig["revkl"] is not None:  # SAIL-RevKL's penalty before --revkl scales it, the mean over the step's pairs
        total, n = all_ranks_sum(torch.tensor([fig["revkl"].sum(), len(fig["revkl"])], dtype=torch.float64, device=run.device), run.world)
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
            "dt": sum(times.values()), **{f"t_{k}": v for k, v in times.items()}}


def label_totals(run, state):
    """The oracle labels spent so far, the same way for every pair: each online label (a tie too),
    and for each distinct dataset pair trained on (offline DPO or SAIL-DP), the labels its dataset
    spent on it (the ties dropped before it included: data.make_task)."""
    spent = run.pair_labels[list(state.used_pairs)].sum() if state.used_pairs else 0
    n_used = len(state.used_pairs)
    return {"oracle_queries": state.oracle_queries + int(spent), "ties": state.ties + int(spent) - n_used}


class Clock:
    """Wall time per phase of a step; CUDA runs asynchronously, so it waits for the GPU first."""

    def __init__(self, device):
        self.device, self.times, self.t0 = device, {}, time.perf_counter()

    def lap(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self.t0
        self.t0 = time.perf_counter()


# -----------------------------------------------------------------------------
# The run: inputs, policy and reference, the SFT baseline, the loop, the summary

def main(cfg):
    t_start = time.perf_counter()
    hf_logging.disable_progress_bar()  # our own bars only
    set_seed(stream_seeds(cfg.seed)["global"])  # Python's, numpy's and torch's global streams
    device, rank, world = setup_device(cfg)  # ddp: joins the process group; plain `python train.py` is rank 0 of 1
    master = rank == 0

    # Inputs first: a bad file, directory or checkpoint fails before any minute of training is spent.
    inputs = data.load_inputs(cfg)
    check_writable_dir(cfg.out_dir)
    saved = read_checkpoint(cfg, world)  # resuming: None, or (path, its state) with this run's settings

    # Policy (the SFT model), its frozen reference, the oracle, the optimiser: everything the step needs.
    t0 = time.perf_counter()
    run = setup_run(cfg, inputs, device, rank, world)
    seconds = {"sft": run.sft_seconds, "load_and_setup": time.perf_counter() - t0 - run.sft_seconds}

    # The evaluation baseline: the SFT policy on held-out prompts (a resumed run loads its weights after this).
    eval_set = make_eval_set(run, inputs)
    sft_eval, sft_rewards = evaluate(run, eval_set, None) if master else ({}, None)  # ddp: rank 0 evaluates
    sft_eval.update({prefix + "win": 0.5 for prefix in sft_rewards or ()})  # the SFT model against itself
    print("sft  | " + " | ".join(f"{k[5:]} {v:.3f}" for k, v in sft_eval.items()))
    state = State.new(cfg, run, len(inputs.train_prompts), len(inputs.pairs or []), history=[{"step": 0, **sft_eval}])
    if saved:
        load_checkpoint(*saved, run, state)
    if world > 1:  # ddp: the loss's forward goes through DDP, which averages the gradients over ranks
        run.train_policy = torch.nn.parallel.DistributedDataParallel(
            run.policy, device_ids=[device.index] if device.type == "cuda" else None)
    metrics_file = open_metrics(cfg, state.step) if master else None

    # The loop: one alignment step, then (rank 0) its log line, evaluation and checkpoint when due.
    t_align = time.perf_counter()
    for step in tqdm(range(state.step + 1, cfg.steps + 1), initial=state.step, total=cfg.steps, desc=cfg.method,
                     dynamic_ncols=True, leave=False, disable=not master):
        row, (pairs, labels) = alignment_step(run, state, step)
        state.step = step
        save = step % cfg.save_every == 0 or step == cfg.steps
        streams = gather_rng_states(state, world) if save else None  # ddp: every rank's random streams
        if not master:
            continue  # ddp: evaluation, logging and checkpoints are rank 0's
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row.update(evaluate(run, eval_set, sft_rewards)[0])
            state.history.append({"step": step, **{k: v for k, v in row.items() if k.startswith("eval_")}})
        log_step(metrics_file, row)
        if step % cfg.sample_every == 0:
            show_sample(run, pairs, labels)
        if save:
            save_checkpoint(run, state, streams)
    seconds["align"] = time.perf_counter() - t_align
    if world > 1 and not finish_ddp(run):
        return None  # ddp: rank 0 alone writes the results
    metrics_file.close()

    # The summary: the final policy, summary.json, the plot, the table.
    summary = write_outputs(run, state, sft_eval, seconds, t_start)
    print_summary(cfg, summary, sft_eval, state.history[-1])
    return summary


# -----------------------------------------------------------------------------
# Evaluation and what a run prints and writes

def make_eval_set(run, inputs):
    """The held-out batches, fixed for the run: eval_samples responses per held-out prompt, and
    the held-out pairs with their reference log-probs (computed once: the reference is frozen)."""
    cfg = run.cfg
    prompts = [p for p in inputs.eval_prompts for _ in range(cfg.eval_samples)]
    batch = tuple(t.to(run.device) for t in data.encode_prompts(run.tokenizer, prompts, cfg.max_prompt_len))
    pair_batch = None
    if inputs.eval_pairs:
        pairs = inputs.eval_pairs
        pair_batch = tuple(t.to(run.device) for t in data.encode_responses(
            run.tokenizer, [x["prompt"] for x in pairs] * 2, [x["chosen"] for x in pairs] + [x["rejected"] for x in pairs],
            cfg.max_prompt_len, cfg.max_new_tokens))
        pair_batch += (reference_logps(run, pair_batch),)
    # Responses of the reference at temperature 1, for KL(pi_ref || pi_theta) (the frozen reference: drawn once)
    generator = torch.Generator(run.ref_device).manual_seed(stream_seeds(cfg.seed)["eval_revkl"])
    ref_samples = sample_responses(run, run.reference, *(t.to(run.ref_device) for t in batch), 1.0, generator, run.ref_amp)
    return SimpleNamespace(prompts=prompts, batch=batch, pair_batch=pair_batch, ref_samples=tuple(t.to(run.device) for t in ref_samples))


@torch.no_grad()
def evaluate(run, eval_set, sft_rewards):
    """Held-out figures of the policy: gold reward (--proxy: and the proxy's), KL to the SFT reference (from samples at
    temperature 1), win rate against the SFT model's responses (a tie is half a win), KL(reference || policy) (on the
    reference's samples), and implicit-reward accuracy and margin on the held-out pairs. Returns them, and the rewards of
    the samples by figure prefix (the SFT model's are the baseline of the win rates). Samples come from a generator seeded afresh (its own stream) at every evaluation,
    the same noise as the SFT baseline's: common random numbers make the comparison less noisy."""
    cfg, policy = run.cfg, run.policy
    was_training = policy.training
    policy.eval()
    generator = torch.Generator(eval_set.batch[0].device).manual_seed(stream_seeds(cfg.seed)["eval"])
    with run.amp:
        ids, attention, response = sample(policy, *eval_set.batch, max_new_tokens=cfg.max_new_tokens,
                                          temperature=cfg.temperature, eos_token_id=run.tokenizer.eos_token_id,
                                          generator=generator)
    texts = decode(run.tokenizer, ids, response)
    scores = {"eval_": run.yardstick(eval_set.prompts, texts)}  # (N,) the gold reward (or --reward_model)
    if run.oracle is not run.yardstick:  # --proxy: the labeller's reward too
        scores["eval_proxy_"] = run.oracle(eval_set.prompts, texts)
    if cfg.temperature != 1:  # KL(pi || ref) = E_{y ~ pi}[log pi(y) - log ref(y)] needs samples of pi itself: temperature 1
        generator = torch.Generator(eval_set.batch[0].device).manual_seed(stream_seeds(cfg.seed)["eval_kl"])  # its own noise
        with run.amp:
            ids, attention, response = sample(policy, *eval_set.batch, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                              eos_token_id=run.tokenizer.eos_token_id, generator=generator)
    kl = sequence_logps_of(policy, ids, attention, response, run.amp) - reference_logps(run, (ids, attention, response))  # (N,)
    out = {}
    for prefix, rewards in scores.items():  # eval_reward, eval_win (--proxy: eval_proxy_reward, eval_proxy_win)
        out[prefix + "reward"] = rewards.mean().item()
        if sft_rewards is not None:  # against the SFT model's response to the same prompt, with the same noise
            out[prefix + "win"] = ((rewards > sft_rewards[prefix]).float() + 0.5 * (rewards == sft_rewards[prefix]).float()).mean().item()
    out.update(eval_kl=kl.mean().item(), eval_revkl=eval_reverse_kl(run, eval_set.ref_samples))
    if eval_set.pair_batch is not None:
        logps = sequence_logps_of(policy, *eval_set.pair_batch[:3], run.amp) - eval_set.pair_batch[3]  # (2M,)
        h = logps[:len(logps) // 2] - logps[len(logps) // 2:]  # (M,) chosen rows first
        out["eval_acc"], out["eval_margin"] = accuracy(h).mean().item(), (cfg.beta * h).mean().item()
    policy.train(was_training)
    return out, scores


def eval_reverse_kl(run, rows, chunk=32):
    """KL(pi_ref || pi_theta) on held-out prompts: sail.reverse_kl on responses of the reference
    (rows: (ids, attention_mask, response_mask), each (N, T)), averaged; `chunk` rows at a time,
    since it needs the full logits of both models."""
    kl = []
    for i in range(0, len(rows[0]), chunk):
        ids, attention, response = (t[i:i + chunk] for t in rows)
        policy = logits_of(run.policy, ids, attention, run.amp)  # (chunk, T, V)
        reference = logits_of(run.reference, ids.to(run.ref_device), attention.to(run.ref_device), run.ref_amp).to(run.device)
        kl.append(reverse_kl(policy, reference, response))
    return torch.cat(kl).mean().item()


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
    line += "".join(f" | {k} {v:.3f}" for k, v in row.items() if k.startswith("eval_"))
    tqdm.write(line)


def show_sample(run, pairs, labels):
    """A prompt with its chosen and rejected responses and their rewards by the yardstick (an
    online pair if the step has one). The scores are for display, not oracle queries."""
    B = len(pairs.route)
    i = int((pairs.route <= DP).sum()) % B  # the first online pair, or the first pair
    w, l = (i, B + i) if bool(labels.y1_wins[i]) else (B + i, i)
    shown = run.yardstick([pairs.prompts[i]] * 2, [pairs.texts[w], pairs.texts[l]])
    labeller = "oracle" if run.oracle is run.yardstick else "proxy"
    how = ["offline pair", "SAIL-DP: self-labelled", "SAIL-PP: self-labelled", f"SAIL-PR: {labeller}-labelled"][pairs.route[i]]
    tqdm.write(f"  prompt   {pairs.prompts[i]!r}  [{how}{'' if labels.valid[i] else ', a tie: the fair coin'}]\n"
               f"  chosen   {pairs.texts[w]!r}  (reward {shown[0]:.2f})\n  rejected {pairs.texts[l]!r}  (reward {shown[1]:.2f})")


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
        **({"proxy_reward_sft": sft_eval["eval_proxy_reward"], "proxy_reward_final": final["eval_proxy_reward"],
            "proxy_win_rate_vs_sft": final["eval_proxy_win"]} if cfg.proxy else {}),
        "margin_final": final.get("eval_margin"),
        **label_totals(run, state),  # oracle_queries, ties: all the labels spent, the offline pairs' included
        "seconds": time.perf_counter() - t_start, "seconds_by_phase": seconds,
        "seconds_per_step": {k: v / cfg.steps for k, v in phases.items()},
        "phase_share": {k: v / sum(phases.values()) for k, v in phases.items()},
        "tokens_per_second": {"generated": state.token_totals["generated"] / max(phases.get("generate", 0.0), 1e-9),
                              "trained": state.token_totals["trained"] / max(phases["policy"], 1e-9)},
        "peak_memory_gb": peak_memory(run.device) / 2 ** 30,  # RSS on a CPU, allocated on CUDA; a resumed run's since it resumed
    }
    summary["tie_rate"] = summary["ties"] / summary["oracle_queries"] if summary["oracle_queries"] else None
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_history(state.history, os.path.join(cfg.out_dir, "reward.png"), cfg.method)
    return summary


def print_summary(cfg, summary, sft_eval, final):
    print(f"\n{'held-out prompts':<26}{'SFT':>10}{cfg.method:>12}")
    for name, key in [("gold reward", "eval_reward"), ("win rate vs SFT", "eval_win"), ("proxy reward (the labeller)", "eval_proxy_reward"),
                      ("proxy win rate vs SFT", "eval_proxy_win"), ("KL to reference", "eval_kl"),
                      ("KL(reference || policy)", "eval_revkl"),
                      ("pair accuracy", "eval_acc"), ("implicit margin", "eval_margin")]:
        if key in final:
            print(f"{name:<26}{sft_eval[key]:>10.3f}{final[key]:>12.3f}")
    print("time per step: " + " | ".join(f"{k} {1000 * v:.0f}ms ({100 * summary['phase_share'][k]:.0f}%)"
                                         for k, v in summary["seconds_per_step"].items())
          + f" | tokens/s generated {summary['tokens_per_second']['generated']:.0f}, trained {summary['tokens_per_second']['trained']:.0f}")
    s = summary["seconds_by_phase"]
    ties = f" ({summary['ties']} ties)" if summary["ties"] else ""
    print(f"oracle queries {summary['oracle_queries']}{ties} | time: sft {s['sft']:.0f}s, align {s['align']:.0f}s, "
          f"total {summary['seconds']:.0f}s | peak memory {summary['peak_memory_gb']:.2f} GB | outputs in {cfg.out_dir}/")


# -----------------------------------------------------------------------------
# Setup: device, inputs, the SFT policy, its reference, the oracle

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)  # numpy's legacy seed takes 32 bits
    torch.manual_seed(seed)


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_device(cfg):
    """The device, this process's rank and the number of ranks. ddp: `torchrun --nproc_per_node=N
    train.py` starts N copies of this script; each samples, labels and trains on its own share of
    every step's pairs, DDP averages the gradients, and rank 0 alone prints and writes."""
    device = pick_device(cfg.device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # ddp
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if rank:
            sys.stdout = open(os.devnull, "w")
        if cfg.batch_size % world or cfg.batch_size // world < max(2, cfg.grad_accum):
            raise SystemExit(f"error: --batch_size {cfg.batch_size} must split into {world} ranks of >= 2 pairs and "
                             f">= --grad_accum {cfg.grad_accum} pairs each")
        print(f"data parallel: {world} ranks | global batch {cfg.batch_size} pairs = {world} ranks x "
              f"{cfg.batch_size // world} pairs ({cfg.grad_accum} micro-batches each)")
    if device.type == "cuda":  # TF32 for whatever autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    print(f"device: {device} | compute dtype: {'bfloat16 autocast' if bf16 else 'float32'}")
    return device, rank, world


@dataclass
class Run:
    """What the step needs, set up once (`setup_run`). The step changes only the weights (and
    SELM's train_reference); `main` wraps the policy in DDP, the benchmark swaps the sampler."""
    cfg: Config
    policy: torch.nn.Module           # the model being aligned
    reference: torch.nn.Module        # its frozen SFT copy: the loss's reference and the yardstick of KL
    train_reference: torch.nn.Module  # the loss's reference: `reference`, or SELM's own (the last iterate)
    tokenizer: object
    oracle: object                    # texts -> rewards: the labeller of online pairs (the yardstick, or --proxy)
    yardstick: object                 # texts -> rewards: evaluation's reward (the gold reward, or --reward_model)
    optimizer: torch.optim.Optimizer
    train_prompts: list
    pairs: list
    device: torch.device
    ref_device: torch.device          # the reference may live on the CPU (--offload_reference)
    amp: object                       # bf16 autocast where supported, else a no-op
    ref_amp: object
    pair_labels: np.ndarray           # per offline pair: the oracle labels its dataset spent on it (ties included)
    route_probs: np.ndarray           # probabilities of (offline, SAIL-DP, SAIL-PP, SAIL-PR)
    label_coefs: torch.Tensor         # per route: label-term coefficient
    response_coefs: torch.Tensor      # per route: response-term coefficient
    ref_every: int                    # SELM: copy the policy into train_reference every this many steps (0: never)
    sft_seconds: float = 0.0
    rank: int = 0
    world: int = 1
    sampler: object = sample          # draws responses (the benchmark swaps in model.generate)
    train_policy: torch.nn.Module = None  # what the loss's forward runs through: the policy, or its DDP wrapper

    def __post_init__(self):
        if self.train_policy is None:
            self.train_policy = self.policy


def setup_run(cfg, inputs, device, rank=0, world=1):
    """The oracle, the SFT policy, its frozen reference and the optimiser."""
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # fp32 master weights
    oracle = reward.GoldReward()  # the yardstick, and the labeller unless --proxy
    if cfg.reward_model:  # in eval mode, no gradients, its own tokenizer; bf16 weights where the policy computes in bf16
        oracle = reward.HFRewardModel(cfg.reward_model, device, cfg.reward_batch_size, label=cfg.reward_label,
                                      dtype=torch.bfloat16 if use_bf16 else None, text_pair=cfg.reward_text_pair, what="--reward_model")
    policy, tokenizer, sft_seconds = load_policy(cfg, inputs, device, rank, world)
    labeller = proxy_labeller(cfg, inputs, tokenizer, device, rank, world) if cfg.proxy else oracle
    # The reference: a frozen copy of the SFT policy, set up here once (eval mode, no gradients; its
    # forward passes run under torch.no_grad in `reference_logps`). With LoRA it is the policy itself
    # with its adapters switched off: exactly the SFT model, and no second copy in memory.
    ref_device = torch.device("cpu") if cfg.offload_reference else device
    reference = None if cfg.lora_rank else copy.deepcopy(policy).to(ref_device).eval().requires_grad_(False)  # LoRA: set below
    ref_every = cfg.ref_update_every if cfg.ref_update_every >= 0 else (cfg.steps // 3 if cfg.method == "selm" else 0)
    policy.to(device).train()
    if cfg.gradient_checkpointing:  # transformers 5 renamed it activation checkpointing
        getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()
    if cfg.lora_rank:
        policy = add_lora(policy, cfg)
        reference = AdaptersOff(policy)
    # SELM trains in iterations: its training reference is the last iterate, so it gets its own copy
    # (with LoRA too: a whole second model, adapters included); the SFT reference stays the yardstick of KL.
    train_reference = reference
    if ref_every:
        train_reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.lora_rank else copy.deepcopy(reference)
    gamma = 0.0 if cfg.method in ("online-dpo", "selm", "xpo") else cfg.gamma  # plain DPO on their online pairs
    # The exact term is averaged over the step's pairs like the rest of the loss, scaled by
    # --response_scale; the official hook's is summed over each rank's pairs, unscaled (sail_loss).
    response_scale = cfg.batch_size / world if cfg.response_term in ("official", "official-size") else cfg.response_scale
    trained = [p for p in policy.parameters() if p.requires_grad]  # every weight, or (LoRA) the adapters only
    run = Run(cfg=cfg, policy=policy, reference=reference, train_reference=train_reference, tokenizer=tokenizer, oracle=labeller, yardstick=oracle,
              # fused on CUDA: one kernel per step, without the foreach path's temporary copy of the
              # second moments (+4 bytes per trained parameter at the step)
              optimizer=torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"),
              train_prompts=inputs.train_prompts, pairs=inputs.pairs, device=device, ref_device=ref_device, amp=amp,
              ref_amp=amp if ref_device == device else torch.autocast("cpu", enabled=False),
              pair_labels=np.array([x.get("labels", 1) for x in inputs.pairs or []], dtype=np.int64),
              route_probs=np.clip(METHODS[cfg.method](cfg), 0, 1),
              label_coefs=torch.tensor([0.0, cfg.rho, cfg.pi, 0.0], device=device),  # per route
              response_coefs=response_scale * torch.tensor([0.0, 0.0, cfg.pi, gamma], device=device),
              ref_every=ref_every, sft_seconds=sft_seconds, rank=rank, world=world)
    lora = f", {sum(p.numel() for p in trained) / 1e6:.2f}M in LoRA adapters of rank {cfg.lora_rank} trained" if cfg.lora_rank else ""
    print(f"policy: {cfg.model} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters{lora}) | "
          f"reference {'= the policy, adapters off' if cfg.lora_rank else 'on ' + str(ref_device)} | oracle: {cfg.reward_model or 'embedded gold reward'}"
          f"{' (the yardstick; labeller: the proxy)' if cfg.proxy else ''} | method: {cfg.method} | "
          f"routing offline/DP/PP/PR = {'/'.join(f'{x:g}' for x in run.route_probs)}")
    data.check_lengths(cfg, inputs, getattr(policy.config, "max_position_embeddings", None), tokenizer)
    return run


def proxy_labeller(cfg, inputs, tokenizer, device, rank=0, world=1):
    """--proxy: the labeller, a reward model loaded from a path, or (fit) fit by Bradley-Terry on the
    offline pairs with the policy's tokenizer and cached like the SFT model; its accuracy on the
    held-out pairs is printed (against their labels: the gold reward's, on the embedded task)."""
    path = cfg.proxy
    if cfg.proxy == "fit":
        pairs = inputs.pairs[:cfg.proxy_pairs or None]
        # what it was fit on and how: the pairs, the tokenizer, the seed of its start and batches
        made_of = [pairs, sorted(tokenizer.get_vocab().items()), cfg.task_seed, cfg.proxy_width, cfg.proxy_steps]
        digest = hashlib.sha1(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:10]
        path = os.path.join(cfg.cache_dir, f"proxy-pairs{len(pairs)}-width{cfg.proxy_width}-{digest}")
        if world > 1 and rank:  # ddp: rank 0 fits and caches it first
            dist.barrier()
        if not os.path.isfile(os.path.join(path, "config.json")):
            check_writable_dir(cfg.cache_dir, "--cache_dir")
            t0 = time.perf_counter()
            reward.fit_reward_model(path, pairs, inputs.eval_pairs, copy.deepcopy(tokenizer), width=cfg.proxy_width,
                                    steps=cfg.proxy_steps, seed=cfg.task_seed, device=device)
            print(f"proxy: fit on {len(pairs)} pairs and saved to {path} in {time.perf_counter() - t0:.1f}s")
        if world > 1 and not rank:
            dist.barrier()
    proxy = reward.HFRewardModel(path, device, cfg.reward_batch_size, what="--proxy")
    if inputs.eval_pairs:
        print(f"proxy: {path} | held-out pair accuracy {reward.pair_accuracy(proxy, inputs.eval_pairs):.3f} "
              f"({len(inputs.eval_pairs)} pairs)")
    return proxy


def load_policy(cfg, inputs, device, rank=0, world=1):
    """The SFT policy and its tokenizer (the embedded one, trained once and cached, or --model as
    loaded: then there is no SFT phase), dropout off; and the seconds SFT took."""
    if cfg.model == "embedded":
        if world > 1 and rank:  # ddp: rank 0 trains and caches the SFT model first
            dist.barrier()
        policy, tokenizer, sft_seconds = data.embedded_policy(cfg, inputs.task, device)
        if world > 1 and not rank:
            dist.barrier()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        policy, sft_seconds = reward.load_pretrained(AutoModelForCausalLM, cfg.model, "--model"), 0.0
        tokenizer = reward.load_pretrained(AutoTokenizer, cfg.model, "--model")
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"error: --model {cfg.model}: its tokenizer has no EOS token, so no response could end")
    data.prepare_tokenizer(tokenizer)
    disable_dropout(policy)
    return policy, tokenizer, sft_seconds


# LoRA's target modules per architecture: every linear map of attention and MLP, as in the LoRA
# papers' later practice (GPT-2's are Conv1D, weights stored transposed: fan_in_fan_out).
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}


def add_lora(policy, cfg):
    """The policy with LoRA adapters (peft): W x + (alpha / r) B A x, B = 0 at the start, so the
    policy begins exactly at the SFT model. Only A and B require gradients; the rest is frozen."""
    import peft

    arch = policy.config.model_type
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                             target_modules=LORA_TARGETS.get(arch, "all-linear"), fan_in_fan_out=arch == "gpt2")
    cuda = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # A's random start depends on --seed alone, not on what ran before
        torch.manual_seed(stream_seeds(cfg.seed)["lora"])
        model = peft.get_peft_model(policy, config)
    if cfg.gradient_checkpointing:  # reentrant checkpointing (older transformers) needs inputs that require grad
        model.enable_input_require_grads()
    return model


class AdaptersOff:
    """The reference of a LoRA policy: the same model, called with its adapters switched off,
    which is exactly the SFT model. Only calls (forward passes, under no_grad) and what sampling
    reads (its mode, config and base model) are allowed: anything else, such as .generate, would
    run with the adapters on, so it raises."""
    SHARED = {"training", "train", "eval", "config", "get_base_model"}  # the policy's own: the one model's mode

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, **inputs):
        with self.policy.disable_adapter():
            return self.policy(**inputs)

    def __getattr__(self, name):
        if name not in AdaptersOff.SHARED:
            raise AttributeError(f"the LoRA reference has no {name!r}: call it, as a model's forward")
        return getattr(self.policy, name)


# -----------------------------------------------------------------------------
# Checkpoints: the run's state, saved and loaded in one place

RESUMABLE_CHANGES = {"steps", "eval_every", "sample_every", "save_every", "resume", "device", "out_dir"}


@dataclass
class State:
    """Everything of a run that changes from step to step, besides the weights and the optimiser.
    A checkpoint holds it (`save_checkpoint` / `load_checkpoint`), so a resumed run continues
    exactly where the interrupted one stopped."""
    step: int
    route_rng: np.random.Generator  # which route each pair takes
    prompt_stream: data.Stream      # training prompts, in shuffled epochs
    pair_stream: data.Stream        # offline pairs, in shuffled epochs
    sampling_gen: torch.Generator   # responses y1, y2 ~ pi_theta
    label_gen: torch.Generator      # sampled oracle labels and self-labels (CPU)
    explore_gen: torch.Generator    # XPO's samples of the reference
    revkl_gen: torch.Generator      # --revkl exact's samples of the reference
    history: list                   # the evaluations so far, step 0 (SFT) first
    oracle_queries: int = 0         # online oracle labels (ties included)
    ties: int = 0
    used_pairs: set = field(default_factory=set)  # dataset pairs trained on: each cost its dataset's labels (Run.pair_labels)
    phase_seconds: dict = field(default_factory=dict)
    token_totals: dict = field(default_factory=lambda: {"generated": 0, "trained": 0})

    @classmethod
    def new(cls, cfg, run, n_prompts, n_pairs, history):
        seeds = stream_seeds(cfg.seed, run.rank)
        return cls(step=0, route_rng=np.random.default_rng(seeds["route"]), prompt_stream=data.Stream(n_prompts, seed=seeds["prompt"]),
                   pair_stream=data.Stream(n_pairs or 1, seed=seeds["pair"]),
                   sampling_gen=torch.Generator(run.device).manual_seed(seeds["sampling"]),
                   label_gen=torch.Generator().manual_seed(seeds["label"]),
                   explore_gen=torch.Generator(run.ref_device).manual_seed(seeds["explore"]),
                   revkl_gen=torch.Generator(run.ref_device).manual_seed(seeds["revkl"]), history=history)

    def generators(self):
        return self.route_rng, self.sampling_gen, self.label_gen, self.explore_gen, self.revkl_gen


# Every random stream of a run, each seeded from one root, --seed: (name, one per rank?). The routes,
# prompts and pairs are drawn alike on every rank (each keeps its share); ddp: each rank samples
# and labels with streams of its own.
STREAMS = [("route", False), ("prompt", False), ("pair", False), ("sampling", True), ("label", True), ("explore", True),
           ("eval", False), ("lora", False), ("global", False), ("eval_kl", False), ("revkl", True), ("eval_revkl", False)]


def stream_seeds(seed, rank=0):
    """{stream: its seed}, from np.random.SeedSequence(seed) with the spawn key (stream, rank): no two
    streams of a run, of two ranks or of two --seed values share their numbers (SeedSequence hashes
    the whole key, unlike seed + k, where seed + 1's first stream is seed's second). numpy uses all
    63 bits; torch's CPU generator keeps the low 32 (tested distinct for the compared seeds and ranks)."""
    return {name: int(np.random.SeedSequence(seed, spawn_key=(k, rank if per_rank else 0)).generate_state(1, np.uint64)[0] >> 1)
            for k, (name, per_rank) in enumerate(STREAMS)}


def save_checkpoint(run, state, streams):
    """Write out_dir/checkpoint atomically: build checkpoint.tmp/, then swap it in. The previous
    checkpoint is deleted only once the new one is complete, so a kill at any moment (SIGKILL
    included) leaves one good checkpoint: `checkpoint/`, or `checkpoint.old/` mid-swap.
    streams: every rank's random streams (gather_rng_states)."""
    path = os.path.join(run.cfg.out_dir, "checkpoint")
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(run.policy, tmp)
    if run.ref_every:  # SELM's moving reference
        save_weights(run.train_reference, os.path.join(tmp, "reference"))
    torch.save({"optimizer": run.optimizer.state_dict(), "step": state.step, "config": dataclasses.asdict(run.cfg),
                "world_size": run.world, "rng": streams,
                "streams": [(state.prompt_stream.epoch, state.prompt_stream.pos), (state.pair_stream.epoch, state.pair_stream.pos)],
                "oracle_queries": state.oracle_queries, "ties": state.ties, "used_pairs": sorted(state.used_pairs),
                "phase_seconds": state.phase_seconds, "token_totals": state.token_totals, "history": state.history},
               os.path.join(tmp, "state.pt"))
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(cfg, world):
    """The checkpoint to resume from, (path, saved state), or None; before any model is loaded, it
    must be readable, of this run's settings (a few may change) and of as many processes."""
    path = latest_checkpoint(cfg.out_dir) if cfg.resume == "auto" else None
    if path is None:
        return None
    try:
        saved = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    except Exception as e:  # noqa: BLE001  a truncated or foreign file: say so, touch nothing
        raise SystemExit(f"error: --out_dir {cfg.out_dir}: its checkpoint {path}/state.pt cannot be read "
                         f"({type(e).__name__}); use another --out_dir, or --resume no to start over") from None
    refuse_changed_settings(saved["config"], cfg, "use another --out_dir, or --resume no to start over")
    if saved["world_size"] != world:
        raise SystemExit(f"error: {path} was written by {saved['world_size']} processes; resume it with as many")
    return path, saved


def load_checkpoint(path, saved, run, state):
    """Weights (safetensors), optimiser, every random stream, data positions and counters."""
    load_weights(run.policy, path)
    if run.ref_every:
        load_weights(run.train_reference, os.path.join(path, "reference"))
    run.optimizer.load_state_dict(saved["optimizer"])
    set_rng_states(saved["rng"][run.rank], *state.generators())
    (state.prompt_stream.epoch, state.prompt_stream.pos), (state.pair_stream.epoch, state.pair_stream.pos) = saved["streams"]
    state.step, state.oracle_queries, state.ties, state.history = saved["step"], saved["oracle_queries"], saved["ties"], saved["history"]
    state.phase_seconds, state.token_totals, state.used_pairs = saved["phase_seconds"], saved["token_totals"], set(saved["used_pairs"])
    print(f"resuming from {path} at step {state.step} of {run.cfg.steps}")


def save_weights(model, path):
    """save_pretrained (safetensors): every weight, or a LoRA model's adapters only (its frozen base
    is the SFT model; peft is told not to look the base up on the hub for its embeddings)."""
    model.save_pretrained(path, **({"save_embedding_layers": False} if hasattr(model, "peft_config") else {}))


def load_weights(model, path):
    """What save_weights wrote to `path`, into `model`."""
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        loaded = set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
        if loaded.unexpected_keys:
            raise SystemExit(f"error: {path}: adapters that this model does not have ({loaded.unexpected_keys[0]}, ...)")
    else:
        model.load_state_dict(type(model).from_pretrained(path).state_dict())


def refuse_changed_settings(saved, cfg, advice):
    """A run continues only with its own settings (a few, in RESUMABLE_CHANGES, may change). An
    option newer than the run, not recorded in it, must be at its default (which keeps the old behaviour)."""
    changed = {k: (v, getattr(cfg, k)) for k, v in saved.items() if k not in RESUMABLE_CHANGES and v != getattr(cfg, k, v)}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    changed.update({k: ("not recorded", getattr(cfg, k)) for k in set(defaults) - set(saved) - RESUMABLE_CHANGES
                    if getattr(cfg, k) != defaults[k]})
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


# -----------------------------------------------------------------------------
# Data parallel helpers (ddp): with one process each is a no-op

def all_ranks_sum(x, world):
    """The sum of tensor x over all ranks (x itself on one process)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def ddp_no_sync(run, last):
    """Skip DDP's gradient averaging on all but the last micro-batch of a step."""
    return run.train_policy.no_sync() if run.world > 1 and not last else contextlib.nullcontext()


def gather_rng_states(state, world):
    """Every rank's random streams, for the checkpoint (a collective: every rank calls it)."""
    states = [rng_states(*state.generators())]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, rng_states(*state.generators()))
    return states


def finish_ddp(run):
    """At the end: check that the ranks hold the same weights, then leave the process group.
    Returns True on rank 0, which then writes the results."""
    checksum = torch.stack([p.detach().double().sum() for p in run.policy.parameters()]).sum().to(run.device)
    high, low = checksum.clone(), checksum.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.barrier()  # every rank is past its last collective
    # DDP holds the process group: free it now, so that gloo's threads are joined here and not
    # during interpreter exit, where they can abort the process ("terminate called ...").
    run.train_policy = run.policy
    gc.collect()
    dist.destroy_process_group()
    if run.rank:
        return False
    if high != low:
        raise SystemExit("error: the ranks' weights differ at the end of training")
    return True


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


def cli(argv=None, run=main, extra=None, description=None):
    """Parse, check and run: `python train.py` runs `main`; experiments/ pass their own `run` and
    options. Bad input exits with one line saying where and what."""
    try:
        parsed = parse_args(argv, extra, description)
        return run(*parsed) if extra else run(parsed)
    except (data.DataError, reward.ModelError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli()
