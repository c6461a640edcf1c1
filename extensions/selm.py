"""
extensions/selm.py: SELM (Zhang et al., "Self-Exploring Language Models: Active Preference
Elicitation for Online Alignment", arXiv 2405.19332): online DPO plus an optimism bonus.

    python train.py --method selm            # --selm_alpha, --ref_update_every

loss = -l + alpha * beta * Delta(y~), with y~ the greedy response of the reference to the pair's
prompt. The reference is the last iterate: every --ref_update_every steps (steps // 3 by default)
the policy is copied into it (SELM trains in iterations); the SFT model stays the yardstick of KL.
It enters the step through extensions/step.py: y~ as extra rows of the batch, the bonus added to
each pair's loss, the copy after the update.

Departures from the paper: one greedy y~ per prompt, alpha * beta = 1e-4 by default on the toy
task (the paper: beta = 0.01, alpha * beta about 1e-5 on 7B models); iterations within one run.
"""
from sail import dpo_loss


def selm_bonus(policy_explore_logps, reference_explore_logps, beta, alpha):
    """SELM's optimism bonus alpha * beta * Delta(y~) (B,) on a response y~ of the reference."""
    return alpha * beta * (policy_explore_logps - reference_explore_logps)


def selm_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
              policy_explore_logps, reference_explore_logps, alpha, valid=None):
    """SELM (Zhang et al. 2024, arXiv 2405.19332): DPO plus an optimism bonus on a response of
    the reference, loss = -l + alpha * beta * Delta(y~), y~ the reference's greedy response.

    Each *_logps argument: (B,) summed response log-probs; the explore ones are of y~ under the
    policy and the reference. Minimising the bonus lowers the policy's implicit reward of what the
    reference would already say, pushing probability towards unexplored responses. valid: as in
    dpo_loss (a tied pair keeps its bonus, which does not depend on the label).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                        reference_chosen_logps, reference_rejected_logps, beta, valid)
    return losses + selm_bonus(policy_explore_logps, reference_explore_logps, beta, alpha), chosen_rewards, rejected_rewards
