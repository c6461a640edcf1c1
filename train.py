"""
train.py: online preference alignment with SAIL, read top to bottom.

    python train.py                      # SFT (cached after the first run), SAIL-PR, evaluation
    python train.py --method sail-pp     # or dpo, online-dpo, sail-pr, sail-dp, mix, selm, xpo
    python train.py run.yaml             # the options from a YAML or JSON file (flags after it override it)
    torchrun --nproc_per_node=N -- train.py ...   # data parallel: the same loop on N GPUs
    python train.py --help               # every option with its default

Reading order: `Config`, `METHODS`; one step (`alignment_step`, which calls the rest in the paper's
order); the extensions (SELM, XPO, SAIL-RevKL), which enter the step at lines marked HOOK;
`evaluate`; `main`. What a run needs besides the algorithm (options, checkpoints, data parallelism,
models and LoRA, outputs) is in plumbing/. Outputs in --out_dir: metrics.jsonl, summary.json,
config.json, checkpoint/ (to resume), policy/ (`from_pretrained`-ready), reward.png (docs/usage.md).

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
  6. --grad_accum K cuts a step's pairs into K micro-batches after they are sampled and labelled,
     so that the update is one batch's (tested), at the cost of one more forward pass.
"""
import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

import data
import reward
from plumbing import checkpoint, distributed, models, options, outputs
from plumbing.checkpoint import State, stream_seeds
from plumbing.distributed import no_sync, stop_if_not_finite
from plumbing.evaluation import distinct_2, eval_reverse_kl, eval_samples, halves, make_eval_set
from plumbing.microbatch import MicroBatches
from plumbing.models import sample_responses
from plumbing.options import RunOptions, arg
from sail import (DP, PP, PR, accuracy, leave_one_out_mean, logits_of, official_sail_loss, pair_value, reverse_kl,
                  revkl_proxy_of_pairs, sail_loss, selm_bonus, sequence_logps_of, xpo_bonus)


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


METHODS = {  # method -> probabilities of the routes (OFFLINE, DP, PP, PR), as in the official code
    "dpo": lambda c: (1, 0, 0, 0),
    "online-dpo": lambda c: (0, 0, 0, 1),  # all pairs online and oracle-labelled, gamma = 0
    "sail-dp": lambda c: (1 - c.r, c.r, 0, 0),  # the rest of the pairs stay offline DPO pairs
    "sail-pp": lambda c: (1 - c.p, 0, c.p, 0),
    "sail-pr": lambda c: (1 - c.g, 0, 0, c.g),  # --g 1 for purely online SAIL-PR
    "mix": lambda c: (1 - c.r - c.p - c.g, c.r, c.p, c.g),
    "selm": lambda c: (0, 0, 0, 1),  # online DPO + a bonus on the reference's greedy response
    "xpo": lambda c: (0, 0, 0, 1),  # online DPO + a bonus on a sample of the reference
}
EXPLORE = {"selm", "xpo"}  # methods that also need a response y~ of the reference per prompt


# -----------------------------------------------------------------------------
# ALGORITHM: one SAIL step, in the paper's order (`alignment_step`). They read `run` (plumbing/models.Run:
# run.policy; run.reference, its frozen SFT copy; run.labeller; each term's coefficient per route) and
# `state` (plumbing/checkpoint.State: the random streams).

def draw_routes(run, state, B):
    """Route each of B pairs with the method's probabilities and draw what it needs: a dataset pair
    or a training prompt. Returns this rank's (route (B,), dataset pair ids, prompt ids). ddp: every
    rank draws all ranks' routes, pairs and prompts from the same streams and keeps its own share."""
    routes = [np.sort(r) for r in state.route_rng.choice(4, size=B * run.world, p=run.route_probs).reshape(run.world, B)]
    n_dataset = [int((r <= DP).sum()) for r in routes]  # per rank: OFFLINE and DP pairs, the dataset's
    pair_ids = state.pair_stream.next(sum(n_dataset))
    prompt_ids = state.prompt_stream.next(B * run.world - sum(n_dataset))
    state.used_pairs.update(pair_ids)  # each distinct dataset pair counts its dataset's labels once (outputs.label_totals)
    a, b = sum(n_dataset[:run.rank]), sum(B - n for n in n_dataset[:run.rank])  # ddp: where this rank's share starts
    return routes[run.rank], pair_ids[a:a + n_dataset[run.rank]], prompt_ids[b:b + B - n_dataset[run.rank]]


def build_pairs(run, state, B):
    """Route B pairs and give each its two responses: a dataset pair's own (offline DPO, SAIL-DP),
    or two fresh samples y1, y2 ~ pi_theta for a training prompt (SAIL-PP, SAIL-PR)."""
    cfg, tok, device = run.cfg, run.tokenizer, run.device
    route, pair_ids, prompt_ids = draw_routes(run, state, B)
    n_ds, n_on = len(pair_ids), len(prompt_ids)
    rows = [run.pairs[i] for i in pair_ids]
    prompts = [x["prompt"] for x in rows] + [run.train_prompts[i] for i in prompt_ids]
    texts = [x["chosen"] for x in rows] + [None] * n_on + [x["rejected"] for x in rows] + [None] * n_on
    y1, y2, generated = [], [], 0  # blocks of rows (ids, attention_mask, response_mask)
    if n_ds:
        ds = data.encode_responses(tok, prompts[:n_ds] * 2, texts[:n_ds] + texts[B:B + n_ds], cfg.max_prompt_len, cfg.max_new_tokens)
        y1.append(tuple(t[:n_ds].to(device) for t in ds))
        y2.append(tuple(t[n_ds:].to(device) for t in ds))
    if n_on:
        p_ids, p_mask = (t.to(device) for t in data.encode_prompts(tok, prompts[n_ds:] * 2, cfg.max_prompt_len))  # 2 per prompt
        on = sample_responses(run, run.policy, p_ids, p_mask, cfg.temperature, state.sampling_gen, run.amp)  # y1, y2 ~ pi_theta
        y1.append(tuple(t[:n_on] for t in on))
        y2.append(tuple(t[n_on:] for t in on))
        on_texts = data.decode(tok, on[0], on[2])
        texts[n_ds:B], texts[B + n_ds:] = on_texts[:n_on], on_texts[n_on:]
        generated += int(on[2].sum())
    pairs = data.Pairs(route, prompts, texts, y1 + y2, generated)  # batch: its blocks of rows, one tensor after pad_cat below
    reference_samples(run, state, pairs)  # HOOK (SELM/XPO, SAIL-RevKL): responses of the reference
    pairs.batch = data.pad_cat(pairs.batch, tok.pad_token_id)  # (2B [+ B], T)
    return pairs


def oracle_labels(run, state, pairs):
    """Bradley-Terry labels from the labeller (the oracle, or --proxy) for the SAIL-PR pairs: one
    query each, a tie too; every other pair keeps y1 as its winner here."""
    B = len(pairs.route)
    labels = reward.Labels(torch.ones(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool), torch.full((2 * B,), float("nan")))
    idx = torch.nonzero(torch.from_numpy(pairs.route == PR)).squeeze(1)  # (n_pr,)
    if len(idx):
        r = run.labeller([pairs.prompts[i] for i in idx] * 2, [pairs.texts[i] for i in idx] + [pairs.texts[B + i] for i in idx])
        r1, r2 = r[:len(idx)], r[len(idx):]  # (n_pr,) each
        labels.scores[idx], labels.scores[B + idx], labels.score_sum = r1, r2, r.sum().item()
        labels.y1_wins[idx], labels.valid[idx] = reward.bradley_terry_label(r1, r2, run.cfg.label_mode, state.label_gen, run.cfg.ties)
        labels.queries = len(idx)
        labels.ties = int((r1 == r2).sum()) if run.cfg.label_mode == "hard" else 0  # sampled: every pair gets a label
    return labels


@torch.no_grad()  # reference log-probs never need a graph
def reference_logps(run, batch, model=None):
    """Log-probs (rows,) of a batch's rows under the frozen reference (or `model`: SELM's moving one)."""
    batch = tuple(t.to(run.ref_device) for t in batch)
    return sequence_logps_of(run.reference if model is None else model, *batch, run.ref_amp).to(run.device)


def policy_delta(run, micro, ref):
    """Delta(y) = L_theta(y) - L_ref(y) (2B,) of every row, detached, and the policy's log-probs with
    their graph, which the loss reuses when the step is one micro-batch (else None: with several,
    Delta comes from a pass without a graph, and each micro-batch's loss redoes its forward)."""
    B = micro.B
    if len(micro) == 1:
        logps = sequence_logps_of(run.train_policy, *micro.rows(micro.idx[0]), run.amp)  # (2B [+ B],)
        return (logps[:2 * B] - ref[0][:2 * B]).detach(), logps
    with torch.no_grad():
        return micro.gather([sequence_logps_of(run.policy, *micro.rows(idx), run.amp) - r for idx, r in zip(micro, ref)]), None


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
    Bernoulli(sigmoid(beta h)) (no oracle query); z decides which of y1, y2 is chosen in the loss."""
    B = len(pairs.route)
    mine = torch.from_numpy((pairs.route == DP) | (pairs.route == PP))  # (B,)
    if mine.any():
        labels.y1_wins[mine] = reward.self_label(delta[:B][mine] - delta[B:][mine], run.cfg.beta, state.label_gen)


def response_baselines(run, pairs, labels, delta):
    """Each pair's response-term baseline b (B,), or None: the mean cost -v (sail.pair_value) of the
    *other* pairs of the step that carry the response term (loo), or of all other pairs (loo-all)."""
    if run.cfg.baseline == "none" or run.cfg.response_term in ("official", "official-size"):
        return None  # the official sizes have no baseline
    cost = -pair_value(margin(labels, delta), run.cfg.beta, labels.valid.to(run.device))  # (B,) -v
    route = torch.from_numpy(pairs.route).to(run.device)
    return leave_one_out_mean(cost, None if run.cfg.baseline == "loo-all" else run.response_coefs[route] > 0)


def pair_losses(run, pairs, labels, baseline, idx, logps, ref):
    """SAIL's surrogate loss of each pair idx (m,) of a micro-batch, with its route's coefficients
    (an offline pair's are 0: DPO). logps, ref: (2m [+ m],) its rows, y1 rows, then y2 rows, then y~."""
    cfg, m = run.cfg, len(idx)
    y1_wins, valid = labels.y1_wins[idx].to(run.device), labels.valid[idx].to(run.device)  # (m,)
    route = torch.from_numpy(pairs.route[idx.numpy()]).to(run.device)  # (m,)
    (logps, explore_logps), (ref, explore_ref) = (x.split([2 * m, len(x) - 2 * m]) for x in (logps, ref))
    pair = (*order_pairs(y1_wins, logps), *order_pairs(y1_wins, ref), cfg.beta)  # (policy w, l, reference w, l): (m,) each
    loss = sail_loss if cfg.response_term == "exact" else functools.partial(official_sail_loss, variant=cfg.response_term)  # HOOK
    # label coefficients per route (0, rho, pi, 0), response (0, 0, pi, gamma) x --response_scale (setup_run)
    losses = loss(*pair, label_coef=run.label_coefs[route], response_coef=run.response_coefs[route],
                  baseline=None if baseline is None else baseline[idx.to(run.device)], valid=valid)[0]  # (m,)
    if cfg.method in EXPLORE:  # HOOK (SELM/XPO): online DPO plus the exploration bonus on y~
        losses = losses + exploration_bonus(run, explore_logps, explore_ref)
    return losses


def backward(run, step, pairs, labels, baseline, micro, ref, logps=None):
    """The gradient of the mean loss over the step's pairs (ddp: of all ranks), one micro-batch at a
    time; a non-finite reward or loss stops the run before the update. Returns SAIL-RevKL's penalty
    of each pair (B,), else None."""
    cfg = run.cfg
    run.optimizer.zero_grad(set_to_none=True)
    penalties = []
    for k, idx in enumerate(micro):
        last = k == len(micro) - 1
        with no_sync(run, last=last and not cfg.revkl):  # ddp: average the gradients after the last backward
            if logps is None or k > 0:
                logps = sequence_logps_of(run.train_policy, *micro.rows(idx), run.amp)  # (2m [+ m],)
            losses = pair_losses(run, pairs, labels, baseline, idx, logps, ref[k])  # (m,)
            loss = losses.sum() * run.world / cfg.batch_size  # the mean over the step's pairs (ddp: of all ranks)
            stop_if_not_finite(step, {"an oracle reward": labels.score_sum, "the loss": loss.item()}, cfg.out_dir, run.world, run.device)
            loss.backward()
        if cfg.revkl:  # HOOK (SAIL-RevKL): its penalty, in a pass of its own (DDP allows one forward per backward)
            with no_sync(run, last=last):
                penalties.append(revkl_backward(run, step, pairs, labels, micro, idx))
    return torch.cat(penalties) if penalties else None


def optimizer_step(run, step):
    """Clip the gradient, stop on a non-finite norm, step; SELM: the policy becomes the next
    iteration's reference every run.ref_every steps. Returns the norm before clipping."""
    clip = run.cfg.grad_clip if run.cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), clip)
    stop_if_not_finite(step, {"the gradient norm": grad_norm.item()}, run.cfg.out_dir, run.world, run.device)
    run.optimizer.step()
    if run.ref_every and step % run.ref_every == 0:  # HOOK (SELM): this policy is the next iteration's reference
        run.train_reference.load_state_dict(run.policy.state_dict())
    return grad_norm


def alignment_step(run, state, step):
    """One update, one iteration of the paper's Algorithm 1, for every method. Returns the step's
    metrics line, and its pairs and labels."""
    clock = outputs.Clock(run.device)
    # 1. Route each pair; its responses come from the dataset, or fresh: y1, y2 ~ pi_theta.
    pairs = build_pairs(run, state, run.cfg.batch_size // run.world)
    clock.lap("generate")
    # 2. The oracle labels the SAIL-PR pairs (SAIL-DP/PP pairs are labelled by the policy in 4).
    labels = oracle_labels(run, state, pairs)
    clock.lap("label")
    # 3. Delta(y) = L_theta(y) - L_ref(y) of every row (--grad_accum: in micro-batches of pairs).
    micro = MicroBatches(pairs, run.cfg.grad_accum)
    ref = [reference_logps(run, micro.rows(idx), model=run.train_reference) for idx in micro]  # (2m [+ m],) each
    clock.lap("reference")
    delta, logps = policy_delta(run, micro, ref)  # (2B,) detached; logps: the loss's forward, or None
    # 4. SAIL-DP and SAIL-PP pairs: the policy labels them itself, z ~ Bernoulli(sigmoid(beta h)).
    self_labels(run, state, pairs, labels, delta)
    # 5. Each pair's loss: DPO + the label term + the response term with its baseline; their mean; backward.
    baseline = response_baselines(run, pairs, labels, delta)  # (B,) or None
    penalty = backward(run, step, pairs, labels, baseline, micro, ref, logps)  # SAIL-RevKL's (B,), or None
    clock.lap("policy")
    # 6. One optimiser step on the gradient.
    grad_norm = optimizer_step(run, step)
    clock.lap("optimizer")
    row = outputs.step_metrics(run, state, step, pairs, labels, margin(labels, delta), delta, penalty, grad_norm, clock.times)
    return row, (pairs, labels)


# -----------------------------------------------------------------------------
# EXTENSIONS, each entering the step at lines marked HOOK: SELM and XPO (an exploration bonus on a
# response y~ of the reference), SAIL-RevKL (a penalty KL(pi_ref || pi_theta) on every pair).

def reference_samples(run, state, pairs):
    """Responses of the reference added to the pairs: SELM's greedy y~ or XPO's sampled y~ per
    prompt, as extra rows of the batch; SAIL-RevKL's (exact) y ~ pi_ref per pair, at temperature 1."""
    cfg, explore, revkl = run.cfg, run.cfg.method in EXPLORE, run.cfg.revkl and run.cfg.revkl_estimate == "exact"
    if explore or revkl:
        p_ids, p_mask = (t.to(run.ref_device) for t in data.encode_prompts(run.tokenizer, pairs.prompts, cfg.max_prompt_len))
    if explore:  # all pairs online: one y~ of the training reference (SELM: its last iterate) per prompt
        y = sample_responses(run, run.train_reference, p_ids, p_mask, 0.0 if cfg.method == "selm" else cfg.temperature,
                             state.explore_gen, run.ref_amp)
        pairs.batch.append(tuple(t.to(run.device) for t in y))
        pairs.generated += int(y[2].sum())
    if revkl:
        y = sample_responses(run, run.reference, p_ids, p_mask, 1.0, state.revkl_gen, run.ref_amp)
        pairs.ref_samples = tuple(t.to(run.device) for t in y)
        pairs.generated += int(y[2].sum())


def exploration_bonus(run, explore_logps, explore_ref):
    """SELM's bonus alpha beta Delta(y~), or XPO's alpha log pi(y~), of each pair (m,) (sail.py)."""
    cfg = run.cfg
    return selm_bonus(explore_logps, explore_ref, cfg.beta, cfg.selm_alpha) if cfg.method == "selm" else xpo_bonus(explore_logps, cfg.xpo_alpha)


def revkl_backward(run, step, pairs, labels, micro, idx):
    """SAIL-RevKL's penalty of the pairs idx (m,) of a micro-batch, times --revkl, averaged like the
    loss, and its backward. exact: KL(pi_ref || pi_theta) on each pair's sample of the reference
    (sail.reverse_kl); proxy: the authors' token proxy on the micro-batch's own chosen and/or
    rejected responses (sail.revkl_proxy), pooled over the micro-batch as theirs is over a device's
    batch (so with --grad_accum its update is not one batch's). Returns the penalties (m,), detached."""
    cfg, m = run.cfg, len(idx)
    if cfg.revkl_estimate == "exact":
        ids, attention, response = (t[idx.to(t.device)] for t in pairs.ref_samples)  # (m, T') each
    else:
        ids, attention, response = (t[:2 * m] for t in micro.rows(idx))  # (2m, T') y1 rows, then y2 rows
    policy = logits_of(run.train_policy, ids, attention, run.amp)  # (rows, T', V)
    with torch.no_grad():
        reference = logits_of(run.reference, ids.to(run.ref_device), attention.to(run.ref_device), run.ref_amp).to(run.device)
    if cfg.revkl_estimate == "exact":
        penalty = reverse_kl(policy, reference, response)  # (m,)
    else:  # the chosen rows as the authors' code has them: y1 for a SAIL-DP pair (it never swaps its texts) and a tie (a strict >)
        y1_chosen = (labels.y1_wins[idx] | ~labels.valid[idx] | torch.from_numpy(pairs.route[idx.numpy()] == DP)).to(run.device)  # (m,)
        penalty = revkl_proxy_of_pairs(policy, reference, ids, response, y1_chosen, cfg.revkl_on, cfg.revkl_estimate == "proxy-aligned").expand(m)
    loss = cfg.revkl * penalty.sum() * run.world / cfg.batch_size
    stop_if_not_finite(step, {"the RevKL penalty": loss.item()}, cfg.out_dir, run.world, run.device)
    loss.backward()
    return penalty.detach()


# -----------------------------------------------------------------------------
# Evaluation: the policy on held-out prompts

@torch.no_grad()
def evaluate(run, eval_set, sft_rewards):
    """Held-out figures of the policy: gold reward (--proxy: and the proxy's), win rate against the
    SFT model's responses (a tie is half a win), KL(policy || reference) from samples at temperature
    1, KL(reference || policy) on the reference's samples, implicit-reward accuracy and margin on
    the held-out pairs. Returns them, and the rewards by figure prefix. Every evaluation samples with
    the same seed as the SFT baseline's: common random numbers make the comparison less noisy."""
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
    kl = sequence_logps_of(policy, ids, attention, response, run.amp) - reference_logps(run, (ids, attention, response))  # (N,)
    for prefix, rewards in scores.items():  # eval_reward, eval_win (--proxy: eval_proxy_reward, eval_proxy_win)
        out[prefix + "reward"] = rewards.mean().item()
        if sft_rewards is not None:  # against the SFT model's response to the same prompt, with the same noise
            out[prefix + "win"] = ((rewards > sft_rewards[prefix]).float() + 0.5 * (rewards == sft_rewards[prefix]).float()).mean().item()
    out.update(eval_kl=kl.mean().item(), eval_revkl=eval_reverse_kl(run, eval_set.ref_samples))
    out.update(halves(eval_set, eval_reward=scores["eval_"], eval_kl=kl))  # eval_reward_a, _b, eval_kl_a, _b: the prompts' halves
    if eval_set.pair_batch is not None:
        logps = sequence_logps_of(policy, *eval_set.pair_batch[:3], run.amp) - eval_set.pair_batch[3]  # (2M,)
        h = logps[:len(logps) // 2] - logps[len(logps) // 2:]  # (M,) chosen rows first
        out["eval_acc"], out["eval_margin"] = accuracy(h).mean().item(), (cfg.beta * h).mean().item()
    policy.train(was_training)
    return out, scores


# -----------------------------------------------------------------------------
# The run: inputs, models, the SFT baseline, the loop, the summary

def setup_run(cfg, inputs, device, rank=0, world=1):
    """The models (plumbing/models.py) and what the step needs of the method: each route's
    probability, and each term's coefficient per route (OFFLINE, DP, PP, PR)."""
    gamma = 0.0 if cfg.method in ("online-dpo", "selm", "xpo") else cfg.gamma  # plain DPO on their online pairs
    # The exact term is averaged over the step's pairs like the rest of the loss, scaled by
    # --response_scale; the official hook's is summed over each rank's pairs, unscaled.
    scale = cfg.batch_size / world if cfg.response_term in ("official", "official-size") else cfg.response_scale
    return models.setup_run(cfg, inputs, device, rank, world, route_probs=np.clip(METHODS[cfg.method](cfg), 0, 1),
                            label_coefs=torch.tensor([0.0, cfg.rho, cfg.pi, 0.0], device=device),
                            response_coefs=scale * torch.tensor([0.0, 0.0, cfg.pi, gamma], device=device),
                            ref_every=cfg.ref_update_every if cfg.ref_update_every >= 0 else (cfg.steps // 3 if cfg.method == "selm" else 0))


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
    sft_eval, sft_rewards = evaluate(run, eval_set, None) if master else ({}, None)  # ddp: rank 0 evaluates
    sft_eval.update({prefix + "win": 0.5 for prefix in sft_rewards or ()})  # the SFT model against itself
    print("sft  | " + " | ".join(f"{k[5:]} {v:.3f}" for k, v in sft_eval.items() if not k.endswith(("_a", "_b"))))
    state = State.new(cfg, run, len(inputs.train_prompts), len(inputs.pairs or []), history=[{"step": 0, **sft_eval}])
    if saved:
        checkpoint.load_checkpoint(*saved, run, state)
    distributed.wrap_ddp(run)
    metrics_file = outputs.open_metrics(cfg, state.step) if master else None
    # The loop: one alignment step, then (rank 0) its log line, evaluation and checkpoint when due.
    t_align = time.perf_counter()
    for step in tqdm(range(state.step + 1, cfg.steps + 1), initial=state.step, total=cfg.steps, desc=cfg.method,
                     dynamic_ncols=True, leave=False, disable=not master):
        row, (pairs, labels) = alignment_step(run, state, step)
        state.step = step
        save = step % cfg.save_every == 0 or step == cfg.steps
        streams = distributed.gather_rng_states(state, world) if save else None  # ddp: every rank's random streams
        if not master:
            continue  # ddp: evaluation, logging and checkpoints are rank 0's
        if step % cfg.eval_every == 0 or step == cfg.steps:
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
