"""
plumbing/checkpoint.py: a run's state between steps, and checkpoints to resume it exactly.

`State` is everything of a run that changes from step to step besides the weights and the
optimiser: its random streams (each seeded from the one root --seed by `stream_seeds`), the
positions in the prompt and pair streams, the counters and the evaluation history. A checkpoint
holds it with the weights and the optimiser; it is written atomically, so a kill at any moment
(SIGKILL included) leaves one good checkpoint, and a resumed run ends bit-identical to one that
never stopped.
"""
import dataclasses
import os
import random
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch

import data


def set_seed(seed):
    """Python's, numpy's and torch's global streams."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)  # numpy's legacy seed takes 32 bits
    torch.manual_seed(seed)


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
           ("eval", False), ("lora", False), ("global", False), ("eval_kl", False), ("revkl", True), ("eval_revkl", False),
           ("proxy_fit", False)]  # appended last: a stream's seed depends on its index, so the others keep theirs


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
