"""
plumbing/distributed.py: the device, data parallelism and the stops on a non-finite value.

Data parallel (ddp): `torchrun --nproc_per_node=N train.py ...` starts N copies of train.py; each
rank samples, labels and trains on its own share of every step's pairs, DDP averages the
gradients, and rank 0 alone evaluates, prints and writes. With one process every helper here is
a no-op. The step never sees the ranks: `share_draws` makes train.draw_routes on each rank draw its
share of one draw for all ranks, and extensions/step.py (which every ddp run takes) runs the loss's
forward through DDP (`wrap_ddp`) and averages over the ranks' pairs.

Non-finite values (`stop_on_non_finite`, `checks`, `stop_at`): a NaN or inf oracle reward, Delta,
loss or gradient stops the run before the update that would use it, with the last good checkpoint
kept and a line naming the step (or evaluation) and the quantity; the step holds no check.
"""
import contextlib
import functools
import gc
import inspect
import os
import sys

import torch
import torch.distributed as dist

import data

from plumbing.checkpoint import latest_checkpoint, rng_states


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


def wrap_ddp(run):
    """ddp: the loss's forward goes through DistributedDataParallel, which averages the gradients over ranks."""
    if run.world > 1:
        device = run.device
        run.train_policy = torch.nn.parallel.DistributedDataParallel(run.policy, device_ids=[device.index] if device.type == "cuda" else None)


def share_draws(run, state):
    """ddp: every rank draws the routes, dataset pairs and prompts of all ranks' pairs from the same
    streams (the same seeds) and keeps its own share, so that N ranks of B pairs draw what one
    process of N x B pairs would, rank by rank. No-op on one process."""
    if run.world > 1:
        state.route_rng = ShareOfRoutes(state.route_rng, run.rank, run.world)
        state.pair_stream, state.prompt_stream = (ShareOfStream(s, run.rank, run.world) for s in (state.pair_stream, state.prompt_stream))


class ShareOfRoutes:
    """A numpy Generator's `choice` of size B for each rank: one draw of size N x B, the rank's row."""

    def __init__(self, rng, rank, world):
        self.rng, self.rank, self.world = rng, rank, world

    @property
    def bit_generator(self):  # its state is the generator's (checkpoints)
        return self.rng.bit_generator

    def choice(self, a, size, p):
        return self.rng.choice(a, size=size * self.world, p=p).reshape(self.world, size)[self.rank]  # (size,)


class ShareOfStream(data.Stream):
    """A data.Stream whose `next(k)` on each rank takes the ranks' k together, then keeps this rank's slice."""

    def __init__(self, stream, rank, world):
        super().__init__(stream.n, stream.seed)
        self.epoch, self.pos, self.rank, self.world = stream.epoch, stream.pos, rank, world

    def next(self, k):
        counts = [None] * self.world
        dist.all_gather_object(counts, k)
        start = sum(counts[:self.rank])
        return super().next(sum(counts))[start:start + k]


def all_ranks_ids(ids, world):
    """The list `ids` of every rank, concatenated in rank order (ids itself on one process)."""
    if world == 1:
        return ids
    every = [None] * world
    dist.all_gather_object(every, list(ids))
    return [i for rank_ids in every for i in rank_ids]


def all_ranks_sum(x, world):
    """The sum of tensor x over all ranks (x itself on one process)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def no_sync(run, last):
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


class NonFinite(Exception):
    """A NaN or inf where a number must be finite: args (what, its value). `stop_at` turns it into the
    run's stop, naming where it happened."""


def check_finite(values, world=1, device="cpu"):
    """Raise NonFinite for the first of values ({name: number or tensor}) holding a NaN or inf. A NaN
    or inf would poison every later step. Under DDP every rank raises if any rank must."""
    firsts = {}
    for name, value in values.items():
        t = torch.as_tensor(value).detach().reshape(-1)
        bad = t[~torch.isfinite(t)]
        firsts[name] = bad[0].item() if len(bad) else None
    stop = [v is not None for v in firsts.values()]
    if world > 1:  # ddp
        stop = (all_ranks_sum(torch.tensor(stop, dtype=torch.float64, device=device), world) > 0).tolist()
    for (name, value), must in zip(firsts.items(), stop):
        if must:
            raise NonFinite(name, "not finite on another rank" if value is None else value)


def checks(name, fn, arg=None):
    """fn(run, ...), checked: a NaN or inf in its result, or (arg: a parameter's name) in that
    argument before fn runs, raises NonFinite(name). train.py wraps step functions with it, below the step."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(run, *args, **kwargs):
        world, device = getattr(run, "world", 1), getattr(run, "device", "cpu")  # a learner's run may name neither
        if arg is not None:
            check_finite({name: signature.bind(run, *args, **kwargs).arguments[arg]}, world, device)
        out = fn(run, *args, **kwargs)
        if arg is None:
            check_finite({name: out}, world, device)
        return out
    return checked


@contextlib.contextmanager
def stop_at(where, out_dir, updated=False, on_stop=None):
    """A NonFinite raised inside stops the run (exit status 1) with one line naming where and what,
    the last good checkpoint kept. where: "step N" (before its update), "step N's evaluation" (after
    it: updated=True; on_stop writes its checkpoint when one is due) or the SFT model's evaluation."""
    try:
        yield
    except NonFinite as stop:
        name, value = stop.args
        if on_stop:
            on_stop()
        kept = latest_checkpoint(out_dir)
        raise SystemExit(f"error: {where}: {name} is {value}; "
                         + ("stopped after the update. " if updated else "stopped before the update. ")
                         + (f"The last good checkpoint is kept in {kept}." if kept else "No checkpoint was written yet.")) from None


def stop_on_non_finite(run):
    """A NaN or inf stops the run before it reaches the weights (raised as NonFinite, stopped by
    `stop_at`): an oracle's or labeller's reward when it is given (`FiniteRewards`; installed before
    the SFT model's evaluation), and the gradient's norm just before the optimiser's step (a step
    pre-hook; under ddp every rank stops if any must). train.py also checks Delta before the
    self-labels and the pairs' losses before the backward pass (`checks`)."""
    if run.labeller is run.gold:
        run.labeller = run.gold = FiniteRewards(run.gold)
    else:
        run.labeller, run.gold = FiniteRewards(run.labeller), FiniteRewards(run.gold)

    def check_gradient(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item() if grads else 0.0
        check_finite({"the gradient norm": norm}, run.world, run.device)

    run.optimizer.register_step_pre_hook(check_gradient)


class FiniteRewards:
    """A reward (texts -> rewards) that stops the run on a non-finite one; anything else is the reward's own."""

    def __init__(self, reward):
        self.reward = reward

    def __call__(self, prompts, responses):
        rewards = self.reward(prompts, responses)
        check_finite({"an oracle reward": rewards})  # each rank its own: every rank labels its own pairs
        return rewards

    def __getattr__(self, name):  # only for names not found on the wrapper itself
        if name == "reward":
            raise AttributeError(name)
        return getattr(self.reward, name)
