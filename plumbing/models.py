"""
plumbing/models.py: what the step runs on, set up once: the SFT policy and its frozen reference,
the oracle (the yardstick of evaluation) and the labeller of online pairs (the oracle, or a
learned proxy), LoRA adapters, the optimiser; gathered in a `Run`.

The reference is a frozen copy of the SFT policy (eval mode, no gradients). With LoRA it is the
policy itself with its adapters switched off (`AdaptersOff`): exactly the SFT model, and no second
copy in memory. SELM's moving reference (its last iterate) is a copy of its own.
"""
import copy
import functools
import hashlib
import json
import os
import time
import types
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import data
import reward
from data import check_writable_dir
from plumbing.checkpoint import stream_seeds
from sail import disable_dropout, sample


@dataclass
class Run:
    """What the step needs, set up once (`setup_run`). The step changes only the weights (and
    SELM's train_reference); `main` wraps the policy in DDP."""
    cfg: object                       # train.Config
    policy: torch.nn.Module           # the model being aligned
    reference: torch.nn.Module        # its frozen SFT copy: train.py's loss's reference, and the yardstick of KL
    train_reference: torch.nn.Module  # extensions/step.py's loss's reference: `reference`, or SELM's last iterate
    tokenizer: object
    labeller: object                  # texts -> rewards: who labels online pairs (`gold`, or --proxy)
    gold: object                      # texts -> rewards: the oracle, evaluation's yardstick (the gold reward, or --reward_model)
    optimizer: torch.optim.Optimizer
    train_prompts: list
    pairs: list
    device: torch.device
    ref_device: torch.device          # the reference may live on the CPU (--offload_reference)
    pair_labels: np.ndarray           # per offline pair: the oracle labels its dataset spent on it (ties included)
    ref_every: int                    # SELM: copy the policy into train_reference every this many steps (0: never)
    sft_seconds: float = 0.0
    rank: int = 0
    world: int = 1
    train_policy: torch.nn.Module = None  # what the loss's forward runs through: the policy, or its DDP wrapper

    def __post_init__(self):
        if self.train_policy is None:
            self.train_policy = self.policy


def setup_run(cfg, inputs, device, rank=0, world=1, *, ref_every=0):
    """The oracle, the SFT policy, its frozen reference and the optimiser, in a Run; ref_every: SELM's
    moving reference, copied from the policy every this many steps (0: never)."""
    use_bf16 = bf16_supported(device)
    oracle = reward.GoldReward(inputs.task.gold if inputs.task else reward.gold_reward)  # the yardstick, and the labeller unless --proxy
    if cfg.reward_model:  # in eval mode, no gradients, its own tokenizer; bf16 weights where the policy computes in bf16
        oracle = reward.HFRewardModel(cfg.reward_model, device, cfg.reward_batch_size, label=cfg.reward_label,
                                      dtype=torch.bfloat16 if use_bf16 else None, text_pair=cfg.reward_text_pair, what="--reward_model")
    policy, tokenizer, sft_seconds = load_policy(cfg, inputs, device, rank, world)
    labeller = proxy_labeller(cfg, inputs, tokenizer, device, rank, world) if cfg.proxy else oracle
    # The reference: a frozen copy of the SFT policy, set up here once (eval mode, no gradients; its
    # forward passes run under torch.no_grad in train.reference_logps). LoRA: set below.
    ref_device = torch.device("cpu") if cfg.offload_reference else device
    reference = None if cfg.lora_rank else copy.deepcopy(policy).to(ref_device).eval().requires_grad_(False)
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
    trained = [p for p in policy.parameters() if p.requires_grad]  # every weight, or (LoRA) the adapters only
    run = Run(cfg=cfg, policy=policy, reference=reference, train_reference=train_reference, tokenizer=tokenizer, labeller=labeller, gold=oracle,
              # fused on CUDA: one kernel per step, without the foreach path's temporary copy of the
              # second moments (+4 bytes per trained parameter at the step)
              optimizer=torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"),
              train_prompts=inputs.train_prompts, pairs=inputs.pairs, device=device, ref_device=ref_device,
              pair_labels=np.array([x.get("labels", 1) for x in inputs.pairs or []], dtype=np.int64),
              ref_every=ref_every, sft_seconds=sft_seconds, rank=rank, world=world)
    # The instruments around the step, on the models themselves, so that no caller names them: bf16
    # autocast inside each forward pass (fp32 master weights), and the offloaded reference's inputs
    # moved to the CPU (sail.sequence_logps_of brings L(y) back).
    for model in {id(m): m for m in (policy, reference, train_reference) if isinstance(m, torch.nn.Module)}.values():
        on_device = model is policy or ref_device == device  # an offloaded reference computes in fp32 on the CPU
        if use_bf16 and on_device:
            compute_in_bf16(model, device)
        if not on_device:
            inputs_to_cpu(model)
    lora = f", {sum(p.numel() for p in trained) / 1e6:.2f}M in LoRA adapters of rank {cfg.lora_rank} trained" if cfg.lora_rank else ""
    print(f"policy: {cfg.model} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters{lora}) | "
          f"reference {'= the policy, adapters off' if cfg.lora_rank else 'on ' + str(ref_device)} | oracle: {cfg.reward_model or 'embedded gold reward'}"
          f"{'' if cfg.reward_model or cfg.task == 'review' else ' of the ' + cfg.task + ' task'}"
          f"{' (the yardstick; labeller: the proxy)' if cfg.proxy else ''}")
    data.check_lengths(cfg, inputs, getattr(policy.config, "max_position_embeddings", None), tokenizer)
    return run


def bf16_supported(device):
    """Do the models compute in bf16 on this device (CUDA with bf16), or in fp32?"""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def compute_in_bf16(model, device):
    """Every forward pass of `model` under bf16 autocast on `device` (its weights stay fp32): the
    same arithmetic as `with torch.autocast(...)` around each call, with no caller naming it. A bound
    method of the model's own, so that copy.deepcopy rebinds it to the copy."""
    cls_forward = type(model).forward

    @functools.wraps(cls_forward)  # its signature stays the model's (sail.forward_takes reads it)
    def forward(self, *args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return cls_forward(self, *args, **kwargs)
    model.forward = types.MethodType(forward, model)


def inputs_to_cpu(model):
    """--offload_reference: the model lives on the CPU, and a pre-hook moves each call's tensors
    there; its outputs stay on the CPU (sail.sequence_logps_of moves L(y) back)."""
    def to_cpu(module, args, kwargs):
        move = lambda x: x.cpu() if torch.is_tensor(x) else x
        return tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}
    model.register_forward_pre_hook(to_cpu, with_kwargs=True)


def sample_responses(run, model, prompt_ids, prompt_mask, temperature, generator):
    """One response per row of `model` (sail.sample, which samples in eval mode), with the run's
    length limit and EOS: the reference's responses (extensions/, evaluation)."""
    return sample(model, prompt_ids, prompt_mask, max_new_tokens=run.cfg.max_new_tokens, temperature=temperature,
                  eos_token_id=run.tokenizer.eos_token_id, generator=generator)


def proxy_labeller(cfg, inputs, tokenizer, device, rank=0, world=1):
    """--proxy: the labeller, a reward model loaded from a path, or (fit) fit by Bradley-Terry on the
    offline pairs with the policy's tokenizer and cached like the SFT model; its accuracy on the
    held-out pairs is printed (against their labels: the gold reward's, on the embedded task)."""
    path = cfg.proxy
    if cfg.proxy == "fit":
        pairs = inputs.pairs[:cfg.proxy_pairs or None]
        seed = stream_seeds(cfg.seed)["proxy_fit"]  # each --seed its own proxy: the labeller's randomness is in the intervals
        # what it was fit on and how: the pairs, the tokenizer, the seed of its start and batches
        made_of = [pairs, sorted(tokenizer.get_vocab().items()), seed, cfg.proxy_width, cfg.proxy_steps]
        digest = hashlib.sha1(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:10]
        path = os.path.join(cfg.cache_dir, f"proxy-pairs{len(pairs)}-width{cfg.proxy_width}-{digest}")
        if world > 1 and rank:  # ddp: rank 0 fits and caches it first
            dist.barrier()
        if not os.path.isfile(os.path.join(path, "config.json")):
            check_writable_dir(cfg.cache_dir, "--cache_dir")
            t0 = time.perf_counter()
            reward.fit_reward_model(path, pairs, inputs.eval_pairs, copy.deepcopy(tokenizer), width=cfg.proxy_width,
                                    steps=cfg.proxy_steps, seed=seed, device=device)
            print(f"proxy: fit on {len(pairs)} pairs and saved to {path} in {time.perf_counter() - t0:.1f}s")
        if world > 1 and not rank:
            dist.barrier()
    proxy = reward.HFRewardModel(path, device, cfg.reward_batch_size, what="--proxy")
    # its fit pairs (fit: the first --proxy_pairs offline pairs) cost gold labels: outputs.label_totals charges them
    proxy.fit_pairs = len(pairs) if cfg.proxy == "fit" else 0
    proxy.held_out_accuracy = reward.pair_accuracy(proxy, inputs.eval_pairs) if inputs.eval_pairs else None
    if inputs.eval_pairs:
        print(f"proxy: {path} | held-out pair accuracy {proxy.held_out_accuracy:.3f} ({len(inputs.eval_pairs)} pairs)")
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
