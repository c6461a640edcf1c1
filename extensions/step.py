"""
extensions/step.py: SAIL's step with what is not SAIL on one device around it. train.py's
`alignment_step` is this step without any of it; `train.train_step` takes this one (train.is_plain)
when a run needs

  * data parallelism (torchrun): the loss's forward through DDP, the mean over all ranks' pairs;
  * micro-batches (--grad_accum K): Delta from a pass without a graph, then each micro-batch's
    forward, loss and backward (plumbing/microbatch.py), so that the update is one batch's;
  * SELM or XPO (selm.py, xpo.py): a response y~ of the reference per prompt, as extra rows of the
    batch, and a bonus on each pair's loss;
  * SAIL-RevKL (revkl.py): a sample of the reference per pair, and the penalty's backward after
    each micro-batch's loss;
  * the official code's response term (official.py): its loss in place of sail.sail_loss, no baseline;
  * a moving reference (SELM's iterations, --ref_update_every): the loss's reference is
    run.train_reference, into which the policy is copied every run.ref_every steps.

Everything else is train.py's own functions (build_pairs, oracle_labels, self_labels,
response_baselines, pair_losses, optimizer_step, ...), which train.py hands over as `sail_step`:
no part of the algorithm is written twice, and on a plain run both steps give the same bits
(tested). Departures: none; this is the plumbing of the extensions.
"""
import torch

from extensions.official import has_baseline, official_sail_loss, response_scale
from extensions.revkl import revkl_backward
from extensions.selm import selm_bonus
from extensions.xpo import xpo_bonus
from plumbing.distributed import check_finite, no_sync
from plumbing.microbatch import MicroBatches
from plumbing.models import sample_responses
from plumbing.outputs import timed
from sail import sequence_logps_of

import data

EXPLORE = {"selm", "xpo"}  # methods that also need a response y~ of the reference per prompt


def alignment_step(run, state, sail_step):
    """train.alignment_step with the extensions, micro-batches and data parallelism around it; the
    same returns. sail_step: train.py's module, whose functions do the rest."""
    cfg = run.cfg
    # 1. Routes and responses (ddp: this rank's share of the pairs), and the reference's responses.
    pairs = sail_step.build_pairs(run, state, cfg.batch_size // run.world)
    reference_samples(run, state, pairs)
    # 2. Oracle labels.
    labels = sail_step.oracle_labels(run, state, pairs)
    # 3. Delta(y) of every row, against the loss's reference (SELM: its last iterate), micro-batch by micro-batch.
    micro = MicroBatches(pairs, cfg.grad_accum)
    ref = [reference_logps(run, micro.rows(idx)) for idx in micro]  # (2m [+ m],) each
    delta, logps = policy_delta(run, micro, ref)  # (2B,) detached; logps: the loss's forward, or None
    # 4. Self-labels.
    labels = sail_step.self_labels(run, state, pairs, labels, delta)
    # 5. Each pair's loss and its backward, micro-batch by micro-batch; SAIL-RevKL's penalty after each.
    baseline = sail_step.response_baselines(run, pairs, labels, delta) if has_baseline(cfg) else None  # (B,) or None
    penalty = backward(run, sail_step, pairs, labels, baseline, micro, ref, logps)
    if penalty is not None:
        pairs.extension["revkl_penalty"] = penalty  # (B,) for the metrics line
    # 6. One optimiser step; SELM: the policy becomes the next iteration's reference.
    grad_norm = sail_step.optimizer_step(run)
    if run.ref_every and (state.step + 1) % run.ref_every == 0:
        run.train_reference.load_state_dict(run.policy.state_dict())
    return pairs, labels, delta, grad_norm


@timed("generate")
def reference_samples(run, state, pairs):
    """Responses of the reference added to the pairs: SELM's greedy y~ or XPO's sampled y~ per
    prompt, as extra rows of the batch; SAIL-RevKL's (exact) y ~ pi_ref per pair, at temperature 1."""
    cfg, explore, revkl = run.cfg, run.cfg.method in EXPLORE, run.cfg.revkl and run.cfg.revkl_estimate == "exact"
    if explore or revkl:
        p_ids, p_mask = (t.to(run.ref_device) for t in data.encode_prompts(run.tokenizer, pairs.prompts, cfg.max_prompt_len))
    if explore:  # all pairs online: one y~ of the training reference (SELM: its last iterate) per prompt
        y = sample_responses(run, run.train_reference, p_ids, p_mask, 0.0 if cfg.method == "selm" else cfg.temperature,
                             state.explore_gen)
        pairs.batch = data.pad_cat([pairs.batch, tuple(t.to(run.device) for t in y)], run.tokenizer.pad_token_id)  # (3B, T)
        pairs.generated += int(y[2].sum())
    if revkl:
        y = sample_responses(run, run.reference, p_ids, p_mask, 1.0, state.revkl_gen)
        pairs.extension["revkl_samples"] = tuple(t.to(run.device) for t in y)
        pairs.generated += int(y[2].sum())


@timed("reference")
@torch.no_grad()
def reference_logps(run, rows):
    """train.reference_logps against the loss's reference, run.train_reference: the frozen SFT model,
    or SELM's last iterate."""
    return sequence_logps_of(run.train_reference, *rows)  # --offload_reference: computed on the CPU


@timed("policy")
def policy_delta(run, micro, ref):
    """Delta(y) = L_theta(y) - L_ref(y) (2B,) of every row, detached, and the policy's log-probs with
    their graph, which the loss reuses when the step is one micro-batch (else None: with several,
    Delta comes from a pass without a graph, and each micro-batch's loss redoes its forward)."""
    B = micro.B
    if len(micro) == 1:
        logps = sequence_logps_of(run.train_policy, *micro.rows(micro.idx[0]))  # (2B [+ B],)
        return (logps[:2 * B] - ref[0][:2 * B]).detach(), logps
    with torch.no_grad():
        return micro.gather([sequence_logps_of(run.policy, *micro.rows(idx)) - r for idx, r in zip(micro, ref)]), None


def pair_losses(run, sail_step, pairs, labels, baseline, idx, logps, ref):
    """Each loss (m,) of the pairs idx of a micro-batch: train.pair_losses (or the official term's),
    plus SELM's or XPO's bonus. logps, ref: (2m [+ m],) its rows, y1 rows, then y2 rows, then y~."""
    cfg, m = run.cfg, len(idx)
    (logps, explore_logps), (ref, explore_ref) = (x.split([2 * m, len(x) - 2 * m]) for x in (logps, ref))
    route, y1_wins, valid = pairs.route[idx.numpy()], labels.y1_wins[idx], labels.valid[idx]  # (m,) each
    baseline = None if baseline is None else baseline[idx.to(run.device)]
    if cfg.response_term == "exact":
        losses = sail_step.pair_losses(run, route, y1_wins, valid, baseline, logps, ref)  # (m,)
    else:  # official.py: train.pair_losses with the official code's term
        y1_wins, valid, route = y1_wins.to(run.device), valid.to(run.device), torch.from_numpy(route).to(run.device)
        pair = (*sail_step.order_pairs(y1_wins, logps), *sail_step.order_pairs(y1_wins, ref), cfg.beta)
        label_coef, response_coef = (c.to(run.device)[route] for c in sail_step.coefficients(cfg, response_scale(cfg, run.world)))
        losses = official_sail_loss(*pair, label_coef=label_coef, response_coef=response_coef,
                                    baseline=baseline, valid=valid, variant=cfg.response_term)[0]  # (m,)
    if cfg.method == "selm":  # alpha beta Delta(y~) on the reference's greedy response
        losses = losses + selm_bonus(explore_logps, explore_ref, cfg.beta, cfg.selm_alpha)
    elif cfg.method == "xpo":  # alpha log pi(y~) on a sample of the reference
        losses = losses + xpo_bonus(explore_logps, cfg.xpo_alpha)
    return losses


@timed("policy")
def backward(run, sail_step, pairs, labels, baseline, micro, ref, logps=None):
    """The gradient of the mean loss over the step's pairs (ddp: of all ranks), one micro-batch at a
    time. Returns SAIL-RevKL's penalty of each pair (B,), else None."""
    cfg = run.cfg
    run.optimizer.zero_grad(set_to_none=True)
    penalties = []
    for k, idx in enumerate(micro):
        last = k == len(micro) - 1
        with no_sync(run, last=last and not cfg.revkl):  # ddp: average the gradients after the last backward
            if logps is None or k > 0:
                logps = sequence_logps_of(run.train_policy, *micro.rows(idx))  # (2m [+ m],)
            losses = pair_losses(run, sail_step, pairs, labels, baseline, idx, logps, ref[k])  # (m,)
            check_finite({"a pair's loss": losses}, run.world, run.device)  # with the bonus or official term: stop before the backward
            (losses.sum() * run.world / cfg.batch_size).backward()  # the mean over the step's pairs (ddp: of all ranks)
        if cfg.revkl:  # SAIL-RevKL: its penalty, in a pass of its own (DDP allows one forward per backward)
            with no_sync(run, last=last):
                penalties.append(revkl_backward(run, pairs, labels, micro.rows(idx), idx))
    return torch.cat(penalties) if penalties else None
