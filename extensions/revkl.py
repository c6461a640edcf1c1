"""
extensions/revkl.py: SAIL-RevKL (Wu, Liu, Aggarwal, Chen, "On the Convergence of Self-Improving
Online LLM Alignment", arXiv 2606.31524): a penalty KL(pi_ref || pi_theta) added to every pair's
loss, with any method, which makes SAIL's objective Polyak-Lojasiewicz.

    python train.py --revkl 1e-3                            # exact: on one sample of the reference per pair
    python train.py --revkl 1e-3 --revkl_estimate proxy     # the authors' token proxy, as their code has it

It enters the step through extensions/step.py: the reference's samples are drawn with the pairs'
responses, and `revkl_backward` adds the penalty's gradient after each micro-batch's loss, in a
pass of its own. `reverse_kl` also gives every run's held-out KL(reference || policy)
(plumbing/evaluation.py, where it is written).

Departures from the paper's code:
  1. The penalty is estimated without bias on a sample of the reference (`reverse_kl`); the
     authors' token proxy on the pairs' own responses is kept as `revkl_proxy` (--revkl_estimate proxy).
"""
import torch

from plumbing.evaluation import reverse_kl  # noqa: F401 (the penalty's estimator, written once)
from plumbing.options import REVKL_ESTIMATES  # noqa: F401
from sail import DP, logits_of


def revkl_proxy(policy_logits, reference_logits, ids, response_mask, aligned=False):
    """The SAIL-RevKL authors' token-level proxy, as their code computes it (`_token_kl_ref_pi` in
    xudongwu-0/SAIL, cdpo/cdpo_trainer.py): the mean over every response token of the batch
    (pooled over rows, not per sequence) of log pi_ref(y_t) - log pi_theta(y_t), on whatever
    responses the batch holds (their code: chosen, rejected, or the mean of the two).
    Their code scores token t with the logits *at* position t, which predict token t + 1 (their
    log-prob helper shifts; this one does not): aligned=True shifts, as sequence_logps does.
    Aligned or not, it is not KL(pi_ref || pi_theta) or its gradient: aligned, its expectation on
    responses of the policy is about minus the per-token KL(pi_theta || pi_ref), and its gradient,
    -mean_t grad log pi_theta(y_t), is maximum likelihood of the batch's responses (about zero in
    expectation on the policy's own samples); misaligned, it raises the probability of each
    response token's repeating itself.
    policy_logits, reference_logits: (B, T, V); ids, response_mask: (B, T). Returns a scalar."""
    if aligned:
        policy_logits, reference_logits, ids, response_mask = policy_logits[:, :-1], reference_logits[:, :-1], ids[:, 1:], response_mask[:, 1:]
    float_type = torch.promote_types(policy_logits.dtype, torch.float32)
    log_p, log_r = (x.to(float_type).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
                    for x in (policy_logits, reference_logits))
    mask = response_mask.bool()
    return torch.where(mask, log_r - log_p, 0.0).sum() / mask.sum().clamp(min=1)


def revkl_proxy_of_pairs(policy_logits, reference_logits, ids, response_mask, y1_chosen, on="both", aligned=False):
    """revkl_proxy on a batch of m pairs as the authors' code applies it: on the chosen responses, the
    rejected ones, or the mean of the two (on="both"). Rows: y1 of every pair, then y2 (2m);
    y1_chosen: (m,) bool, which of each pair's responses their code calls chosen. Returns a scalar."""
    chosen = torch.cat([y1_chosen, ~y1_chosen])  # (2m,)
    parts = [rows for name, rows in (("chosen", chosen), ("rejected", ~chosen)) if on in (name, "both")]
    return sum(revkl_proxy(policy_logits, reference_logits, ids, response_mask * rows[:, None], aligned) for rows in parts) / len(parts)


def revkl_backward(run, pairs, labels, rows, idx):
    """SAIL-RevKL's penalty of the pairs idx (m,) of a micro-batch, times --revkl, averaged like the
    loss, and its backward. exact: KL(pi_ref || pi_theta) on each pair's sample of the reference
    (reverse_kl); proxy: the authors' token proxy on the micro-batch's own chosen and/or rejected
    responses (revkl_proxy), pooled over the micro-batch as theirs is over a device's batch (so
    with --grad_accum its update is not one batch's). rows: the micro-batch's rows, y1 then y2
    (then y~). Returns the penalties (m,), detached."""
    cfg, m = run.cfg, len(idx)
    if cfg.revkl_estimate == "exact":
        ids, attention, response = (t[idx.to(t.device)] for t in pairs.extension["revkl_samples"])  # (m, T') each
    else:
        ids, attention, response = (t[:2 * m] for t in rows)  # (2m, T') y1 rows, then y2 rows
    policy = logits_of(run.train_policy, ids, attention)  # (rows, T', V)
    with torch.no_grad():
        reference = logits_of(run.reference, ids, attention).to(run.device)  # --offload_reference: computed on the CPU
    if cfg.revkl_estimate == "exact":
        penalty = reverse_kl(policy, reference, response)  # (m,)
    else:  # the chosen rows as the authors' code has them: y1 for a SAIL-DP pair (it never swaps its texts) and a tie (a strict >)
        y1_chosen = (labels.y1_wins[idx] | ~labels.valid[idx] | torch.from_numpy(pairs.route[idx.numpy()] == DP)).to(run.device)  # (m,)
        penalty = revkl_proxy_of_pairs(policy, reference, ids, response, y1_chosen, cfg.revkl_on, cfg.revkl_estimate == "proxy-aligned").expand(m)
    (cfg.revkl * penalty.sum() * run.world / cfg.batch_size).backward()
    return penalty.detach()
