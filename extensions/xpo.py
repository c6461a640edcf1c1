"""
extensions/xpo.py: XPO (Xie et al., "Exploratory Preference Optimization", arXiv 2405.21046):
online DPO plus an exploration bonus on a sample of the reference.

    python train.py --method xpo             # --xpo_alpha

loss = -l + alpha * log pi_theta(y~), y~ ~ pi_ref (a fresh sample per prompt and step; the
log pi_ref(y~) part of SELM's bonus has no gradient). It enters the step through
extensions/step.py: y~ as extra rows of the batch, the bonus added to each pair's loss.

Departures from the paper: none on purpose; alpha 1e-5 by default.
"""
from sail import dpo_loss


def xpo_bonus(policy_explore_logps, alpha):
    """XPO's bonus alpha * log pi_theta(y~) (B,) on a sample y~ of the reference."""
    return alpha * policy_explore_logps


def xpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
             policy_explore_logps, alpha, valid=None):
    """XPO (Xie et al. 2024, arXiv 2405.21046): loss = -l + alpha * log pi_theta(y~), y~ ~ pi_ref.

    Each *_logps argument: (B,) summed response log-probs; policy_explore_logps is log pi_theta of
    a fresh sample y~ of the reference (the log pi_ref(y~) part of SELM's bonus has no gradient).
    valid: as in selm_loss.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                        reference_chosen_logps, reference_rejected_logps, beta, valid)
    return losses + xpo_bonus(policy_explore_logps, alpha), chosen_rewards, rejected_rewards  # (B,) -l + alpha log pi(y~)

