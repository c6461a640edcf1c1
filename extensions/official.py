"""
extensions/official.py: the official SAIL code's response term, kept to compare with the exact one.

    python train.py --response_term official --ties first   # the official code's hook and tie handling
    python train.py --response_term official-size           # its size with the exact sign
    python train.py --response_term official-sign           # its sign at the exact size

The official code applies the response term with a gradient hook that flips its sign, divides it
by |log pi(y)| and sums it over the batch (docs/official.md, 1). `official_sail_loss` writes that
hook as a loss; `response_scale` gives it the hook's size per pair. It enters the step through
extensions/step.py, which uses it in place of sail.sail_loss and gives it no baseline.

Departures from the official code: none on purpose; a response of probability 1 (L = 0), where
the hook would divide by zero, is clamped to 1e-6.
"""
import torch

from plumbing.options import RESPONSE_TERMS
from sail import pair_value, sail_loss



def official_sail_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
                       label_coef=0.0, response_coef=0.0, baseline=None, valid=None, variant="official"):
    """sail_loss with the official code's response term (docs/official.md, 1), for comparison.
    Per response y of the pair, the gradient added to L(y) is
        "official"       -coef * (-v) / |L(y)|      the official code's hook: the opposite sign,
                                                    divided by |L(y)|, no baseline
        "official-size"  +coef * (-v) / |L(y)|      the exact sign at the official size
        "official-sign"  -coef * (-v - b)           the official sign at the exact size
    against sail_loss's +coef * (-v - b). The hook acts on the gradient whatever the loss's
    reduction, so it is summed over the batch: a caller that averages the losses over N pairs
    passes the official sizes' response_coef times N. Arguments and returns as in sail.sail_loss."""
    args = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)
    if variant == "official-sign":
        return sail_loss(*args, label_coef, -response_coef, baseline, valid)
    if variant not in ("official", "official-size"):
        raise ValueError(f"variant must be one of {', '.join(RESPONSE_TERMS[1:])}, got {variant!r}")
    losses, chosen_rewards, rejected_rewards = sail_loss(*args, label_coef, 0.0, None, valid)  # DPO and the label term
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)  # (B,)
    cost = (-pair_value(h, beta, valid)).detach()  # (B,)
    # sg(-v / |L(y)|) * L(y) per response (a response of probability 1, L = 0, would divide by zero: the clamp keeps it finite)
    response = sum(cost / L.detach().abs().clamp(min=1e-6) * L for L in (policy_chosen_logps, policy_rejected_logps))  # (B,)
    sign = -1.0 if variant == "official" else 1.0  # the official hook's sign is flipped
    return losses + sign * response_coef * response, chosen_rewards, rejected_rewards


def has_baseline(cfg):
    """The official sizes have no baseline; official-sign keeps the exact term's."""
    return cfg.response_term not in ("official", "official-size")


def response_scale(cfg, world):
    """What multiplies the response coefficients (train.coefficients): --response_scale for the exact
    term and official-sign, whose term is averaged over the step's pairs; at the official sizes the
    hook's gradient is summed over each rank's pairs, unscaled, so a pair's weight is times their number."""
    return cfg.batch_size / world if cfg.response_term in ("official", "official-size") else cfg.response_scale
