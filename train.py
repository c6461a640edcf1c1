"""
train.py: online preference alignment with SAIL, read top to bottom.

    python train.py                      # SFT (cached after the first run), SAIL-PR, evaluation
    python train.py --g 1                # purely online SAIL-PR: every pair sampled and oracle-labelled
    python train.py --method online-dpo  # or dpo, sail-pp, sail-dp, mix; selm, xpo (extensions/)
    python train.py run.yaml             # the options from a YAML or JSON file (flags after it override it)
    torchrun --nproc_per_node=N -- train.py ...   # data parallel: the same loop on N GPUs
    python train.py --help               # every option with its default

Reading order: `Config` and `METHODS`; one SAIL step on one device, the small functions in the
paper's order and `alignment_step`, which calls them; `evaluate`; `main`. What a run needs besides
the algorithm (options, checkpoints, data parallelism, micro-batches, non-finite stops, timing,
models and LoRA, outputs) is in plumbing/. The methods beyond the SAIL family (SELM, XPO,
SAIL-RevKL, the official code's response term) are in extensions/: its step (extensions/step.py)
runs this file's functions with them, and with data parallelism or micro-batches, around them.
Outputs in --out_dir: metrics.jsonl, summary.json, config.json, checkpoint/ (to resume), policy/
(`from_pretrained`-ready), reward.png (docs/usage.md).

Departures from the paper (see also sail.py):
  1. Every method is a routing of pairs, as in the official code: a pair goes to SAIL-DP / -PP / -PR
     with probability r / p / g, else it stays an offline DPO pair (online-dpo: all online, gamma 0).
  2. Each step draws fresh prompts (the official code stops after one generation round), and the
     responses stay attached to the prompt that produced them.
  3. A tied hard oracle label is worth its expectation over Bradley-Terry's fair coin (sail.pair_value),
     so the gradient stays exact; --ties first keeps the official code's y1.
  4. AdamW at 5e-4 and full fine-tuning of tiny models, not RMSprop at 1e-5 with LoRA on 7B ones
     (--lora_rank R trains LoRA adapters).
  5. The response term has a leave-one-out baseline (unbiased, less variance) and is scaled by
     --response_scale (0.1); --response_term official runs the official code's hook instead.
"""
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

import data
import extensions
import reward
from extensions import step as extended
from plumbing import checkpoint, distributed, models, options, outputs
from plumbing.checkpoint import State, stream_seeds
from plumbing.evaluation import distinct_2, eval_reverse_kl, eval_samples, halves, make_eval_set
from plumbing.options import RunOptions, arg
from plumbing.outputs import timed
from sail import DP, PP, PR, accuracy, leave_one_out_mean, pair_value, sail_loss, sample, sequence_logps_of


@dataclass
class Config(RunOptions):  # the other options (the extensions, models, data, checkpoints, LoRA): plumbing/options.py
    # the method: which route each pair takes, and each term's coefficient
    method: str = arg("sail-pr", "dpo | online-dpo | sail-pr | sail-pp | sail-dp | mix | selm | xpo (see METHODS)")
    r: float = arg(0.4, "probability that a pair is routed to SAIL-DP: dataset responses, self-labels (sail-dp, mix)")
    p: float = arg(0.3, "probability that a pair is routed to SAIL-PP: policy responses, self-labels (sail-pp, mix)")
    g: float = arg(0.3, "probability that a pair is routed to SAIL-PR: policy responses, oracle labels (sail-pr, mix)")
    rho: float = arg(0.2, "label-term coefficient of SAIL-DP pairs")
    pi: float = arg(0.2, "label- and response-term coefficient of SAIL-PP pairs")
    gamma: float = arg(0.3, "response-term coefficient of SAIL-PR pairs")
    beta: float = arg(0.1, "KL strength beta of DPO/SAIL")
    response_scale: float = arg(0.1, "multiplies every exact response-term coefficient")
    baseline: str = arg("loo", "response-term baseline: loo (mean -l of the step's other pairs with a response term) | loo-all (of all its other pairs) | none")
    label_mode: str = arg("hard", "oracle labels: hard (r1 > r2; for a tie see --ties) | sampled (Bernoulli(sigmoid(r1 - r2)))")
    ties: str = arg("average", "a tied hard label: average (worth the fair coin's expectation, sail.pair_value) | first (y1 chosen, the official code's)")
    # optimisation and sampling
    steps: int = arg(150, "alignment steps (optimiser updates)")
    batch_size: int = arg(16, "preference pairs per step (online pairs: prompts x 2 responses)")
    lr: float = arg(5e-4, "AdamW learning rate of the alignment phase")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)")
    max_new_tokens: int = arg(24, "longest sampled response, in tokens")
    temperature: float = arg(1.0, "sampling temperature (log-probs always use temperature 1; see sail.py)")
    max_prompt_len: int = arg(32, "prompts keep their last this-many tokens (truncations are counted and printed)")
    seed: int = arg(0, "seed of the alignment run (routing, prompt order, sampling, labels)")


METHODS = {  # the SAIL family: method -> probabilities of the routes (OFFLINE, DP, PP, PR), as in the official code
    "dpo": lambda c: (1, 0, 0, 0),
    "online-dpo": lambda c: (0, 0, 0, 1),  # all pairs online and oracle-labelled, gamma = 0
    "sail-dp": lambda c: (1 - c.r, c.r, 0, 0),  # the rest of the pairs stay offline DPO pairs
    "sail-pp": lambda c: (1 - c.p, 0, c.p, 0),
    "sail-pr": lambda c: (1 - c.g, 0, 0, c.g),  # --g 1 for purely online SAIL-PR
    "mix": lambda c: (1 - c.r - c.p - c.g, c.r, c.p, c.g),
}
NO_RESPONSE_TERM = {"online-dpo"}  # plain DPO on its online pairs: gamma = 0
SAIL_FAMILY = tuple(METHODS)
# SELM and XPO (extensions/) are online DPO plus a bonus on a response of the reference: they add
# themselves here (--method selm, --method xpo), and extensions/step.py steps them.
METHODS.update(extensions.METHODS)
NO_RESPONSE_TERM.update(extensions.METHODS)


def coefficients(cfg, response_scale=None):
    """Each route's (OFFLINE, DP, PP, PR) label- and response-term coefficients, (4,) each: the label
    term rho on SAIL-DP pairs and pi on SAIL-PP pairs; the response term pi on SAIL-PP pairs and gamma
    on SAIL-PR pairs, times --response_scale (or response_scale: the official code's term has its
    own, extensions/official.py); an offline pair's are 0: plain DPO."""
    gamma = 0.0 if cfg.method in NO_RESPONSE_TERM else cfg.gamma
    scale = cfg.response_scale if response_scale is None else response_scale
    return torch.tensor([0.0, cfg.rho, cfg.pi, 0.0]), scale * torch.tensor([0.0, 0.0, cfg.pi, gamma])


# -----------------------------------------------------------------------------
# ONE SAIL STEP, on one device, in the paper's order. `alignment_step`, at the end of this section,
# calls the functions above it. They read two things:
#   run    plumbing/models.Run: run.cfg (the Config above), run.policy, run.reference (its frozen
#          SFT copy), run.labeller (the oracle), run.pairs (offline pairs, each {"prompt",
#          "chosen", "rejected"}), run.train_prompts, run.tokenizer, run.device, run.optimizer;
#   state  plumbing/checkpoint.State: the run's random streams.
# Nothing else of a run is here. Below the step ("Around the step"), some of these names are
# rebound to the same functions wrapped with a timer (build_pairs, oracle_labels, the log-probs,
# backward, optimizer_step) or a NaN/inf check (self_labels, pair_losses): each computes exactly
# what it computes here. bf16 and offloading live on the models (plumbing/models.py). Data
# parallelism, micro-batches and the extensions take extensions/step.py's step (`is_plain`, below).

def draw_routes(run, state, B):
    """Route each of B pairs with the method's probabilities and draw what it needs: a dataset pair
    (offline DPO, SAIL-DP) or a training prompt (SAIL-PP, SAIL-PR), each from a stream that goes
    through its items in shuffled epochs (data.Stream). Returns the routes (B,), sorted so that the
    n dataset pairs come first, the dataset pairs' ids (n,) and the online pairs' prompt ids (B - n,)."""
    probs = np.clip(METHODS[run.cfg.method](run.cfg), 0, 1)  # (4,) OFFLINE, DP, PP, PR (1 - r - p - g may round below 0)
    route = np.sort(state.route_rng.choice(4, size=B, p=probs))  # (B,) OFFLINE < DP < PP < PR
    n_dataset = int((route <= DP).sum())  # offline DPO and SAIL-DP pairs are the dataset's
    return route, state.pair_stream.next(n_dataset), state.prompt_stream.next(B - n_dataset)


def build_pairs(run, state, B):
    """Route B pairs and give each its two responses y1, y2: a dataset pair's own (offline DPO,
    SAIL-DP), or two fresh samples y1, y2 ~ pi_theta for a training prompt (SAIL-PP, SAIL-PR).
    Returns data.Pairs: its batch holds y1 of every pair in rows 0..B-1 and y2 in rows B..2B-1."""
    cfg, tok = run.cfg, run.tokenizer
    route, pair_ids, prompt_ids = draw_routes(run, state, B)  # (B,), (n,), (B - n,)
    prompts, y1, y2 = [], [], []  # per pair: its prompt and the texts of its two responses
    rows1, rows2 = [], []  # blocks of rows (ids, attention_mask, response_mask): y1's, then y2's
    generated = 0  # tokens sampled
    if pair_ids:  # dataset pairs: y1 is the pair's chosen response, y2 its rejected one
        dataset = [run.pairs[i] for i in pair_ids]
        prompts, y1, y2 = [x["prompt"] for x in dataset], [x["chosen"] for x in dataset], [x["rejected"] for x in dataset]
        rows = data.encode_responses(tok, prompts + prompts, y1 + y2, cfg.max_prompt_len, cfg.max_new_tokens)  # (2n, T1) each
        rows1.append(tuple(t[:len(prompts)].to(run.device) for t in rows))  # (n, T1) each
        rows2.append(tuple(t[len(prompts):].to(run.device) for t in rows))
    if prompt_ids:  # online pairs: two responses y1, y2 ~ pi_theta to each prompt (sail.sample)
        p = [run.train_prompts[i] for i in prompt_ids]
        x, x_mask = (t.to(run.device) for t in data.encode_prompts(tok, p + p, cfg.max_prompt_len))  # (2m, Tp) each, m = B - n
        rows = sample(run.policy, x, x_mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      eos_token_id=tok.eos_token_id, generator=state.sampling_gen)  # (2m, T2) each: y1 rows, then y2 rows
        texts = data.decode(tok, rows[0], rows[2])  # (2m,)
        prompts, y1, y2 = prompts + p, y1 + texts[:len(p)], y2 + texts[len(p):]  # the online pairs after the dataset's
        generated = int(rows[2].sum())
        rows1.append(tuple(t[:len(p)] for t in rows))  # (m, T2) each
        rows2.append(tuple(t[len(p):] for t in rows))
    batch = data.pad_cat(rows1 + rows2, tok.pad_token_id)  # (2B, T) each: y1 of every pair, then y2
    return data.Pairs(route, prompts, y1 + y2, batch, generated, pair_ids)


def oracle_labels(run, state, pairs):
    """Bradley-Terry labels from the labeller (the oracle, or --proxy) for the SAIL-PR pairs: one
    query each, a tie too; every other pair keeps y1 as its winner here."""
    B, cfg = len(pairs.route), run.cfg
    labels = reward.Labels(y1_wins=torch.ones(B, dtype=torch.bool), valid=torch.ones(B, dtype=torch.bool),
                           scores=torch.full((2 * B,), float("nan")))  # (B,), (B,), (2B,)
    idx = torch.nonzero(torch.from_numpy(pairs.route == PR)).squeeze(1)  # (n_pr,)
    if len(idx):
        y1, y2 = [pairs.texts[i] for i in idx], [pairs.texts[B + i] for i in idx]
        r = run.labeller([pairs.prompts[i] for i in idx] * 2, y1 + y2)  # (2 n_pr,) one reward per text
        r1, r2 = r[:len(idx)], r[len(idx):]  # (n_pr,) each
        labels.scores[idx], labels.scores[B + idx] = r1, r2
        labels.y1_wins[idx], labels.valid[idx] = reward.bradley_terry_label(r1, r2, cfg.label_mode, state.label_gen, cfg.ties)
        labels.queries = len(idx)
        labels.ties = int((r1 == r2).sum()) if cfg.label_mode == "hard" else 0  # sampled: every pair gets a label
    return labels


@torch.no_grad()  # reference log-probs never need a graph
def reference_logps(run, batch):
    """L_ref(y) (rows,) of a batch's rows (ids, attention_mask, response_mask) under the frozen reference."""
    return sequence_logps_of(run.reference, *batch)


def policy_logps(run, batch):
    """L_theta(y) (rows,) of a batch's rows under the policy, with the graph that the loss is built on."""
    return sequence_logps_of(run.policy, *batch)


def order_pairs(y1_wins, x):
    """Values (2B,) of the rows [all y1; all y2] -> (chosen, rejected), each (B,)."""
    y1, y2 = x[:len(y1_wins)], x[len(y1_wins):]
    return torch.where(y1_wins, y1, y2), torch.where(y1_wins, y2, y1)


def margin(labels, delta):
    """h = Delta(y_w) - Delta(y_l) (B,) of every pair, from the rows' Delta (2B,) and the labels."""
    chosen, rejected = order_pairs(labels.y1_wins.to(delta.device), delta)  # (B,) each
    return chosen - rejected


def self_labels(run, state, pairs, labels, delta):
    """SAIL-DP and SAIL-PP pairs: the policy labels them itself from its implicit reward, z ~
    Bernoulli(sigmoid(beta h)) (no oracle query); z decides which of y1, y2 is chosen in the loss.
    Returns the labels, their y1_wins (B,) drawn for those pairs."""
    B = len(pairs.route)
    mine = torch.from_numpy((pairs.route == DP) | (pairs.route == PP))  # (B,)
    if mine.any():
        labels.y1_wins[mine] = reward.self_label(delta[:B][mine] - delta[B:][mine], run.cfg.beta, state.label_gen)
    return labels


def response_baselines(run, pairs, labels, delta):
    """Each pair's response-term baseline b (B,), or None: the mean cost -v (sail.pair_value) of the
    *other* pairs of the step that carry the response term (loo), or of all other pairs (loo-all)."""
    if run.cfg.baseline == "none":
        return None
    cost = -pair_value(margin(labels, delta), run.cfg.beta, labels.valid.to(run.device))  # (B,) -v
    has_term = coefficients(run.cfg)[1][pairs.route] > 0  # (B,) the pairs with a response term: SAIL-PP, SAIL-PR
    return leave_one_out_mean(cost, None if run.cfg.baseline == "loo-all" else has_term.to(run.device))


def pair_losses(run, route, y1_wins, valid, baseline, logps, ref):
    """SAIL's surrogate loss of each pair (B,), with its route's coefficients (an offline pair's are
    0: DPO). route, y1_wins, valid: (B,); baseline: (B,) or None; logps, ref: (2B,) y1 rows, then y2.
    Per route: offline -l; SAIL-DP -l - rho l^2/2; SAIL-PP -l - pi l^2/2 + s pi sg(-l - b)(L_w + L_l);
    SAIL-PR -l + s gamma sg(-l - b)(L_w + L_l), s = --response_scale (sail.sail_loss)."""
    y1_wins, valid = y1_wins.to(run.device), valid.to(run.device)  # (B,) each
    label_coef, response_coef = (c[route].to(run.device) for c in coefficients(run.cfg))  # (B,) each, by route
    chosen, rejected = order_pairs(y1_wins, logps)  # (B,) each: L_theta(y_w), L_theta(y_l)
    ref_chosen, ref_rejected = order_pairs(y1_wins, ref)  # (B,) each: L_ref(y_w), L_ref(y_l)
    return sail_loss(chosen, rejected, ref_chosen, ref_rejected, run.cfg.beta, label_coef=label_coef, response_coef=response_coef,
                     baseline=baseline, valid=valid)[0]


def backward(run, loss):
    """The gradient of the loss, in the policy's .grad (zeroed first)."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()


def optimizer_step(run):
    """Clip the gradient's norm to --grad_clip, then one AdamW step. Returns the norm before clipping."""
    clip = run.cfg.grad_clip if run.cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), clip)
    run.optimizer.step()
    return grad_norm


def alignment_step(run, state):
    """One update, one iteration of the paper's Algorithm 1, for the SAIL family: offline and online
    DPO, SAIL-PR, -PP, -DP and their mixture. Returns the step's pairs, labels, each row's Delta
    (2B,) and the gradient's norm, which the metrics line reports (plumbing/outputs.step_metrics)."""
    # 1. Route each pair; its responses come from the dataset, or fresh: y1, y2 ~ pi_theta.
    pairs = build_pairs(run, state, run.cfg.batch_size)
    # 2. The oracle labels the SAIL-PR pairs (SAIL-DP/PP pairs are labelled by the policy in 4).
    labels = oracle_labels(run, state, pairs)
    # 3. Delta(y) = L_theta(y) - L_ref(y) of every row; L_theta keeps its graph for the loss.
    ref = reference_logps(run, pairs.batch)  # (2B,)
    logps = policy_logps(run, pairs.batch)  # (2B,)
    delta = (logps - ref).detach()  # (2B,)
    # 4. SAIL-DP and SAIL-PP pairs: the policy labels them itself, z ~ Bernoulli(sigmoid(beta h)).
    labels = self_labels(run, state, pairs, labels, delta)
    # 5. Each pair's loss: DPO + the label term + the response term with its baseline.
    baseline = response_baselines(run, pairs, labels, delta)  # (B,) or None
    losses = pair_losses(run, pairs.route, labels.y1_wins, labels.valid, baseline, logps, ref)  # (B,)
    # 6. One backward pass on their mean, one optimiser step.
    backward(run, losses.mean())
    grad_norm = optimizer_step(run)
    return pairs, labels, delta, grad_norm


# -----------------------------------------------------------------------------
# Around the step: what a run adds to it, none of it SAIL's

# Each phase's seconds (t_generate, ... in the metrics line): the step's functions, wrapped once here.
build_pairs, oracle_labels, reference_logps = timed("generate")(build_pairs), timed("label")(oracle_labels), timed("reference")(reference_logps)
policy_logps, backward, optimizer_step = timed("policy")(policy_logps), timed("policy")(backward), timed("optimizer")(optimizer_step)
# Non-finite stops (plumbing/distributed.py): Delta is checked before the self-labels, the pairs' losses
# before the backward pass; a NaN or inf raises NonFinite, and main stops the run before the update.
self_labels, pair_losses = distributed.checks("Delta (a log-probability)", self_labels, arg="delta"), distributed.checks("a pair's loss", pair_losses)
# The extended step (extensions/step.py) is built from these same functions: no part of SAIL is written twice.
SAIL_STEP = SimpleNamespace(build_pairs=build_pairs, oracle_labels=oracle_labels, self_labels=self_labels, order_pairs=order_pairs,
                            response_baselines=response_baselines, pair_losses=pair_losses, coefficients=coefficients,
                            optimizer_step=optimizer_step)


def is_plain(run):
    """Is `alignment_step` this run's whole step? Yes for the SAIL family on one device in one
    micro-batch with its exact response term; anything else (torchrun, --grad_accum, SELM, XPO,
    --revkl, --response_term official*, a moving reference) takes extensions/step.py's step."""
    cfg = run.cfg
    return (cfg.method in SAIL_FAMILY and run.world == 1 and cfg.grad_accum == 1 and cfg.revkl == 0
            and cfg.response_term == "exact" and run.ref_every == 0)


def train_step(run, state, step):
    """One step of the loop, `alignment_step` or the extended one, and its metrics line."""
    clock = outputs.Clock()  # the phases' seconds, from the timed functions
    if is_plain(run):
        pairs, labels, delta, grad_norm = alignment_step(run, state)
    else:
        pairs, labels, delta, grad_norm = extended.alignment_step(run, state, sail_step=SAIL_STEP)
    row = outputs.step_metrics(run, state, step, pairs, labels, margin(labels, delta), delta, grad_norm, clock)
    return row, (pairs, labels)


# -----------------------------------------------------------------------------
# Evaluation: the policy on held-out prompts

@torch.no_grad()
def evaluate(run, eval_set, sft_rewards):
    """Held-out figures of the policy: gold reward (--proxy: and the proxy's), win rate against the
    SFT model's responses (a tie is half a win), KL(policy || reference) from samples at temperature
    1, KL(reference || policy) on the reference's samples, implicit-reward accuracy and margin on
    the held-out pairs (accuracy also on those whose texts no training pair has: eval_acc_unseen).
    Returns them, and the rewards by figure prefix. Every evaluation samples with the same seed as
    the SFT baseline's: common random numbers make the comparison less noisy."""
    cfg, policy = run.cfg, run.policy
    was_training = policy.training
    policy.eval()
    ids, attention, response = eval_samples(run, eval_set, cfg.temperature, "eval")  # (N, T) each
    texts = data.decode(run.tokenizer, ids, response)
    scores = {"eval_": run.gold(eval_set.prompts, texts)}  # (N,) the gold reward (or --reward_model)
    out = {"eval_distinct2": distinct_2(texts)}  # repetition: the share of distinct word bigrams per response
    if run.labeller is not run.gold:  # --proxy: the labeller's reward too
        scores["eval_proxy_"] = run.labeller(eval_set.prompts, texts)
    if cfg.temperature != 1:  # KL(pi || ref) = E_{y ~ pi}[log pi(y) - log ref(y)] needs samples of pi itself
        ids, attention, response = eval_samples(run, eval_set, 1.0, "eval_kl")
    kl = sequence_logps_of(policy, ids, attention, response) - reference_logps(run, (ids, attention, response))  # (N,)
    for prefix, rewards in scores.items():  # eval_reward, eval_win (--proxy: eval_proxy_reward, eval_proxy_win)
        out[prefix + "reward"] = rewards.mean().item()
        if sft_rewards is not None:  # against the SFT model's response to the same prompt, with the same noise
            out[prefix + "win"] = ((rewards > sft_rewards[prefix]).float() + 0.5 * (rewards == sft_rewards[prefix]).float()).mean().item()
    out.update(eval_kl=kl.mean().item(), eval_revkl=eval_reverse_kl(run, eval_set.ref_samples))
    out.update(halves(eval_set, eval_reward=scores["eval_"], eval_kl=kl))  # eval_reward_a, _b, eval_kl_a, _b: the prompts' halves
    if eval_set.pair_batch is not None:
        logps = sequence_logps_of(policy, *eval_set.pair_batch[:3]) - eval_set.pair_batch[3]  # (2M,)
        h = logps[:len(logps) // 2] - logps[len(logps) // 2:]  # (M,) chosen rows first
        out["eval_acc"], out["eval_margin"] = accuracy(h).mean().item(), (cfg.beta * h).mean().item()
        if eval_set.unseen.any():  # on the held-out pairs whose texts no training pair has
            out["eval_acc_unseen"] = accuracy(h)[eval_set.unseen.to(h.device)].mean().item()
    policy.train(was_training)
    return out, scores


# -----------------------------------------------------------------------------
# The run: inputs, models, the SFT baseline, the loop, the summary

def setup_run(cfg, inputs, device, rank=0, world=1):
    """The models (plumbing/models.py): the policy, its frozen reference, the oracle, the optimiser;
    SELM: how often its training reference becomes the policy (ref_every)."""
    run = models.setup_run(cfg, inputs, device, rank, world,
                           ref_every=cfg.ref_update_every if cfg.ref_update_every >= 0 else (cfg.steps // 3 if cfg.method == "selm" else 0))
    print(f"method: {cfg.method} | routing offline/DP/PP/PR = {'/'.join(f'{x:g}' for x in np.clip(METHODS[cfg.method](cfg), 0, 1))}")
    return run


def main(cfg):
    t_start = time.perf_counter()
    hf_logging.disable_progress_bar()  # our own bars only
    checkpoint.set_seed(stream_seeds(cfg.seed)["global"])  # Python's, numpy's and torch's global streams
    device, rank, world = distributed.setup_device(cfg)  # ddp: joins the process group; else rank 0 of 1
    master = rank == 0
    # Inputs first: a bad file, directory or checkpoint fails before any minute of training is spent.
    inputs = data.load_inputs(cfg)
    data.check_writable_dir(cfg.out_dir)
    saved = checkpoint.read_checkpoint(cfg, world)  # resuming: None, or (path, its state)
    t0 = time.perf_counter()
    run = setup_run(cfg, inputs, device, rank, world)  # the policy (SFT), its frozen reference, the oracle, the optimiser
    seconds = {"sft": run.sft_seconds, "load_and_setup": time.perf_counter() - t0 - run.sft_seconds}
    # The evaluation baseline: the SFT policy on held-out prompts (a resumed run loads its weights after this).
    eval_set = make_eval_set(run, inputs, reference_logps)
    distributed.stop_on_non_finite(run)  # a NaN or inf reward or gradient raises NonFinite; stop_at stops the run
    with distributed.stop_at("the SFT model's evaluation", cfg.out_dir):
        sft_eval, sft_rewards = evaluate(run, eval_set, None) if master else ({}, None)  # ddp: rank 0 evaluates
    sft_eval.update({prefix + "win": 0.5 for prefix in sft_rewards or ()})  # the SFT model against itself
    print("sft  | " + " | ".join(f"{k[5:]} {v:.3f}" for k, v in sft_eval.items() if not k.endswith(("_a", "_b"))))
    state = State.new(cfg, run, len(inputs.train_prompts), len(inputs.pairs or []), history=[{"step": 0, **sft_eval}])
    distributed.share_draws(run, state)  # ddp: every rank draws all ranks' routes, pairs and prompts, and keeps its share
    if saved:
        checkpoint.load_checkpoint(*saved, run, state)
    distributed.wrap_ddp(run)
    metrics_file = outputs.open_metrics(cfg, state.step) if master else None
    # The loop: one alignment step, then (rank 0) its log line, evaluation and checkpoint when due.
    def keep(row, save, streams):  # a step whose evaluation stopped the run keeps its line and its due checkpoint
        outputs.log_step(metrics_file, row)
        if save:
            checkpoint.save_checkpoint(run, state, streams)
    t_align = time.perf_counter()
    for step in tqdm(range(state.step + 1, cfg.steps + 1), initial=state.step, total=cfg.steps, desc=cfg.method,
                     dynamic_ncols=True, leave=False, disable=not master):
        with distributed.stop_at(f"step {step}", cfg.out_dir):  # a NaN or inf: stopped before the update
            row, (pairs, labels) = train_step(run, state, step)
        state.step = step
        save = step % cfg.save_every == 0 or step == cfg.steps
        streams = distributed.gather_rng_states(state, world) if save else None  # ddp: every rank's random streams
        if not master:
            continue  # ddp: evaluation, logging and checkpoints are rank 0's
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with distributed.stop_at(f"step {step}'s evaluation", cfg.out_dir, updated=True,
                                     on_stop=lambda: keep(row, save, streams)):
                row.update(evaluate(run, eval_set, sft_rewards)[0])
            state.history.append({"step": step, **{k: v for k, v in row.items() if k.startswith("eval_")}})
        outputs.log_step(metrics_file, row)
        if step % cfg.sample_every == 0:
            outputs.show_sample(run, pairs, labels)
        if save:
            checkpoint.save_checkpoint(run, state, streams)
    seconds["align"] = time.perf_counter() - t_align
    if world > 1 and not distributed.finish_ddp(run):
        return None  # ddp: rank 0 alone writes the results
    metrics_file.close()
    summary = outputs.write_outputs(run, state, sft_eval, seconds, t_start)  # policy/, summary.json, reward.png
    outputs.print_summary(cfg, summary, sft_eval, state.history[-1])
    return summary


def parse_args(argv=None, extra=None, description=None):
    """Config from the command line or a config file, every option checked (plumbing/options.py)."""
    return options.parse_args(Config, METHODS, argv, extra, description or __doc__.split("\n\n")[0])


def cli(argv=None, run=main, extra=None, description=None):
    """Parse, check and run: `python train.py` runs `main`; experiments/ pass their own `run` and options."""
    return options.cli(Config, METHODS, run, argv, extra, description or __doc__.split("\n\n")[0])


if __name__ == "__main__":
    cli()
