"""
plumbing/options.py: the run's options and the checks of every option.

train.py's `Config` holds the options a learner tunes (the method, its coefficients, beta, the
batch, sampling) and inherits `RunOptions`, the rest: the extensions' options (the official
term, SELM, XPO, SAIL-RevKL), micro-batches and LoRA, models, data files, the cache, evaluation,
checkpoints, the device. `parse_args` makes one command line and one `--help` of both (Hugging
Face's HfArgumentParser), reads a YAML or JSON config file the same way, and checks every value
before anything is loaded: each problem is one `error:` line naming the option.
"""
import dataclasses
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

import data
import reward
from plumbing.tasks import TASKS
from sail import DP, OFFLINE


def arg(default, help):
    """A dataclass field that becomes a --flag with this help line."""
    return field(default=default, metadata={"help": help})


@dataclass
class RunOptions:
    # the extensions (extensions/): the official code's term, SELM and XPO, SAIL-RevKL
    response_term: str = arg("exact", "exact (the score-function gradient, sail.sail_loss) | official (the official code's hook, "
                                      "extensions/official.py: summed over the batch, no baseline or --response_scale) | "
                                      "official-size (the exact sign at the hook's size) | official-sign (the hook's sign at the exact size)")
    selm_alpha: float = arg(1e-3, "selm: bonus alpha * beta * Delta(y~) on the reference's greedy response y~")
    xpo_alpha: float = arg(1e-5, "xpo: bonus alpha * log pi(y~) on a sample y~ of the reference")
    ref_update_every: int = arg(-1, "copy the policy into the training reference every N steps (SELM's iterations); -1: steps // 3 for selm, else never")
    revkl: float = arg(0.0, "SAIL-RevKL: coefficient of the penalty KL(pi_ref || pi_theta) added to every pair's loss, with every "
                            "method (0: off; the RevKL authors use 1e-3)")
    revkl_estimate: str = arg("exact", "exact (extensions/revkl.reverse_kl on one sample of the reference per pair at temperature 1: unbiased) | "
                                       "proxy (the RevKL authors' token proxy on the pairs' own responses, as their code computes "
                                       "it: revkl_proxy) | proxy-aligned (the same with its logits aligned to the tokens)")
    revkl_on: str = arg("both", "the proxy's responses: chosen | rejected | both (the mean of the two), as in the authors' code")
    # memory and LoRA
    grad_accum: int = arg(1, "cut each step's pairs into this many micro-batches for the forward and backward passes (less memory, the same "
                                "update; not with --revkl_estimate proxy, which the RevKL authors pool per micro-batch: 1.7%% off at 2, 8.9%% at 4)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, slower)")
    offload_reference: bool = arg(False, "keep the frozen reference model on the CPU (less GPU memory, slower)")
    lora_rank: int = arg(0, "LoRA (needs peft): train rank-R adapters instead of every weight; the reference is the same model "
                            "with its adapters off, so no second copy is held (0: full fine-tuning)")
    lora_alpha: float = arg(16.0, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank")
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
    holdout: float = arg(0.1, "with --prompts/--pairs but no held-out file: the fraction of their distinct prompts held out for evaluation, with all their rows")
    task: str = arg("review", "the embedded task: review (data.make_task), explore (a flat reward with a one-word jump to its top band) "
                              "or offpolicy (the review task, each offline response opened by a phrase the SFT model never writes): plumbing/tasks.py")
    task_seed: int = arg(0, "seed of the embedded task and its SFT model (kept fixed across --seed)")
    explore_key_rate: float = arg(0.05, "--task explore: the share of its SFT texts, and of its pairs' responses, that say the "
                                        "subject's key word (as many say another category's); 0.05: the task of docs/tasks.md")
    sft_steps: int = arg(600, "SFT steps for the embedded model (only when it is not cached)")
    sft_lr: float = arg(2e-3, "SFT learning rate (AdamW, cosine decay)")
    sft_batch_size: int = arg(64, "SFT batch size")
    cache_dir: str = arg(".cache", "where the embedded SFT model is saved and found again")
    # evaluation, logging, checkpoints
    eval_every: int = arg(25, "evaluate on held-out prompts every this many steps (and at the end)")
    eval_samples: int = arg(4, "responses per held-out prompt in evaluation")
    sample_every: int = arg(50, "print a prompt with its chosen and rejected responses every this many steps")
    out_dir: str = arg("runs/sail", "output directory")
    save_every: int = arg(50, "write a resumable checkpoint every this many steps (and at the end)")
    resume: str = arg("auto", "auto: continue from the checkpoint in --out_dir if there is one | no: start over")
    device: str = arg("auto", "auto (cuda > mps > cpu) | cuda | mps | cpu")


RESPONSE_TERMS = ("exact", "official", "official-size", "official-sign")  # --response_term (extensions/official.py)
REVKL_ESTIMATES = ("exact", "proxy", "proxy-aligned")  # --revkl_estimate (extensions/revkl.py)

# The valid range of every numeric option, train.py's and the run's: (test, what the test says, options).
RANGES = [
    (lambda x: x > 0, "> 0", ["beta", "lr", "sft_lr", "temperature", "lora_alpha"]),
    (lambda x: x >= 0, ">= 0", ["rho", "pi", "gamma", "revkl", "response_scale", "selm_alpha", "xpo_alpha", "weight_decay",
                                "grad_clip", "seed", "task_seed", "lora_rank", "proxy_pairs"]),
    (lambda x: 0 <= x <= 1, "between 0 and 1 (a probability)", ["r", "p", "g"]),
    (lambda x: 0 < x < 1, "strictly between 0 and 1", ["holdout"]),
    (lambda x: 0 < x <= 0.5, "in (0, 0.5] (as many texts again say a decoy)", ["explore_key_rate"]),
    (lambda x: x > 0 and x % 4 == 0, "a positive multiple of 4 (its 4 attention heads)", ["proxy_width"]),
    (lambda x: x >= 1, ">= 1", ["steps", "grad_accum", "proxy_steps", "max_new_tokens", "max_prompt_len", "reward_batch_size", "sft_steps",
                                "sft_batch_size", "eval_every", "eval_samples", "sample_every", "save_every"]),
    (lambda x: x >= 2, ">= 2 (the response-term baseline needs another pair)", ["batch_size"]),
    (lambda x: x >= -1, ">= 0, or -1 for the method's default", ["ref_update_every"]),
]
CHOICES = {"baseline": ("loo", "loo-all", "none"), "response_term": RESPONSE_TERMS, "label_mode": ("hard", "sampled"),
           "ties": ("average", "first"), "resume": ("auto", "no"), "revkl_estimate": REVKL_ESTIMATES,
           "revkl_on": ("chosen", "rejected", "both"), "task": tuple(TASKS)}


def parse_args(config, methods, argv=None, extra=None, description=None):
    """`config` (train.Config) from the command line (every field is a --flag; booleans take `--flag`
    or `--flag false`) or from a config file, as in Hugging Face's example scripts: `python train.py
    run.yaml` (or .json), with any flags after it overriding the file. Then every option is checked;
    a problem exits with one `error:` line each, before anything is loaded. methods: train.METHODS.
    extra: another dataclass of options with a problems() method (experiments/); then returns (cfg, extra's)."""
    from transformers import HfArgumentParser

    kinds = (config,) + ((extra,) if extra else ())
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_file_args(argv[0], kinds) + argv[1:]
    parser = HfArgumentParser(kinds, description=description)
    cfg, *more = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    problems = check_config(cfg, methods) + [p for x in more for p in x.problems()]
    if problems:  # one line per problem, no traceback, exit status 1
        raise SystemExit("\n".join(f"error: {p}" for p in problems))
    return (cfg, *more) if extra else cfg


def cli(config, methods, main, argv=None, extra=None, description=None):
    """Parse, check and run `main`: bad input exits with one line saying where and what."""
    try:
        parsed = parse_args(config, methods, argv, extra, description)
        return main(*parsed) if extra else main(parsed)
    except (data.DataError, reward.ModelError) as e:
        raise SystemExit(f"error: {e}") from None


def config_file_args(path, kinds):
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


def check_config(cfg, methods):
    """Every problem with the options, as messages naming the option (empty: all good). Nothing
    here touches the disk, so a refused command changes nothing."""
    problems = check_values(cfg, RANGES, {"method": methods, **CHOICES})
    if cfg.method == "mix" and cfg.r + cfg.p + cfg.g > 1 + 1e-9:
        problems.append(f"--r + --p + --g must be <= 1, got {cfg.r + cfg.p + cfg.g:g}")
    if cfg.grad_accum > cfg.batch_size:
        problems.append(f"--grad_accum {cfg.grad_accum} must be <= --batch_size {cfg.batch_size} (a micro-batch holds at least one pair)")
    probs = methods[cfg.method](cfg) if cfg.method in methods else (0, 0, 0, 0)
    no_pairs = not cfg.pairs and cfg.model != "embedded" and cfg.prompts  # no embedded task, no pair file
    if (probs[OFFLINE] or probs[DP]) and no_pairs:
        problems.append(f"--method {cfg.method} trains on offline pairs: give --pairs")
    files = [f"--{k}" for k in ("prompts", "eval_prompts", "pairs", "eval_pairs") if getattr(cfg, k)]
    if cfg.explore_key_rate != 0.05 and cfg.task != "explore":
        problems.append(f"--explore_key_rate {cfg.explore_key_rate:g} sets the explore task's corpus: use it with --task explore")
    if cfg.task != "review" and files:
        problems.append(f"--task {cfg.task} brings its own prompts and pairs: drop {', '.join(files)}, or use --task review")
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
