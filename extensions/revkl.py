"""
extensions/revkl.py: SAIL-RevKL (Wu, Liu, Aggarwal, Chen, "On the Convergence of Self-Improving
Online LLM Alignment", arXiv 2606.31524): a penalty KL(pi_ref || pi_theta) added to every pair's
loss, with any method, which makes SAIL's objective Polyak-Lojasiewicz.

    python train.py --revkl 1e-3                            # exact: on one sample of the reference per pair
    python train.py --revkl 1e-3 --revkl_estimate proxy     # the authors' token proxy, as their code has it

It enters the step through extensions/step.py: the reference's samples are drawn with the pairs'
responses, and `revkl_backward` adds the penalty's gradient after each micro-batch's loss, in a
pass of its own. `reverse_kl` also gives every run's held-out KL(reference || policy)
(plumbing/evaluation.py).

Departures from the paper's code:
  1. The penalty is estimated without bias on a sample of the reference (`reverse_kl`); the
     authors' token proxy on the pairs' own responses is kept as `revkl_proxy` (--revkl_estimate proxy).
"""
import torch

from sail import DP, logits_of


REVKL_ESTIMATES = ("exact", "proxy", "proxy-aligned")


def reverse_kl(policy_logits, reference_logits, response_mask):
    """SAIL-RevKL's penalty (Wu et al. 2026, arXiv 2606.31524): KL(pi_ref || pi_theta) of each row,
    for rows y ~ pi_ref (sampled at temperature 1), as the sum over its response positions of the
    full-vocabulary KL between the next-token distributions,

        sum_t KL(pi_ref(. | x, y<t) || pi_theta(. | x, y<t)).

    Its expectation over y ~ pi_ref is the sequence-level KL(pi_ref || pi_theta) (the chain rule of
    KL: each position's log-ratio averaged over its token given the prefix), and since y's
    distribution does not depend on theta, its gradient's expectation is that KL's gradient,
    -E_{y ~ pi_ref}[grad log pi_theta(y)]: unbiased for both. Each position's term is averaged over
    its next token exactly, which usually gives less variance than the plain log-ratio
    log pi_ref(y) - log pi_theta(y), though not always (a later position's KL depends on the
    earlier tokens). On samples of the policy it would estimate neither: the prefixes must come
    from pi_ref.
    policy_logits, reference_logits: (B, T, V) on the rows; response_mask: (B, T), as in
    sequence_logps (position t predicts token t + 1). Returns (B,)."""
    float_type = torch.promote_types(policy_logits.dtype, torch.float32)
    log_p = policy_logits[:, :-1].to(float_type).log_softmax(-1)  # (B, T-1, V)
    log_r = reference_logits[:, :-1].to(float_type).log_softmax(-1)  # (B, T-1, V)
    kl = torch.where(log_r > -torch.inf, log_r.exp() * (log_r - log_p), 0.0).sum(-1)  # (B, T-1) each next token's KL (0 log 0 = 0)
    return torch.where(response_mask[:, 1:].bool(), kl, 0.0).sum(-1)  # (B,)


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
    policy = logits_of(run.train_policy, ids, attention, run.amp)  # (rows, T', V)
    with torch.no_grad():
        reference = logits_of(run.reference, ids.to(run.ref_device), attention.to(run.ref_device), run.ref_amp).to(run.device)
    if cfg.revkl_estimate == "exact":
        penalty = reverse_kl(policy, reference, response)  # (m,)
    else:  # the chosen rows as the authors' code has them: y1 for a SAIL-DP pair (it never swaps its texts) and a tie (a strict >)
        y1_chosen = (labels.y1_wins[idx] | ~labels.valid[idx] | torch.from_numpy(pairs.route[idx.numpy()] == DP)).to(run.device)  # (m,)
        penalty = revkl_proxy_of_pairs(policy, reference, ids, response, y1_chosen, cfg.revkl_on, cfg.revkl_estimate == "proxy-aligned").expand(m)
    (cfg.revkl * penalty.sum() * run.world / cfg.batch_size).backward()
    return penalty.detach()
