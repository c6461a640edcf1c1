"""
extensions/: the methods beyond the SAIL family, one module each, and the one seam through which
they enter the step. A learner of SAIL can skip this package.

  selm.py      SELM (arXiv 2405.19332): online DPO + alpha beta Delta(y~) on the reference's greedy response
  xpo.py       XPO (arXiv 2405.21046): online DPO + alpha log pi(y~) on a sample of the reference
  revkl.py     SAIL-RevKL (arXiv 2606.31524): + c KL(pi_ref || pi_theta) on every pair, exact or the authors' proxy
  official.py  the official SAIL code's response term (its gradient hook's sign and size), for comparison
  step.py      the seam: train.alignment_step with these, micro-batches and data parallelism around it,
               built from train.py's own functions (train.train_step picks it when a run needs it)

train.py adds METHODS below to its own (--method selm, --method xpo); its `is_plain` says which
runs take extensions/step.py's step.

Their tests are in test_sail.py (the losses, the exact gradients on a tabular policy) and
plumbing/test_plumbing.py (micro-batches, resume, torchrun).
"""

METHODS = {  # as train.METHODS: method -> probabilities of the routes (OFFLINE, DP, PP, PR); no response term
    "selm": lambda c: (0, 0, 0, 1),  # selm.py: online DPO + a bonus on the reference's greedy response
    "xpo": lambda c: (0, 0, 0, 1),  # xpo.py: online DPO + a bonus on a sample of the reference
}
