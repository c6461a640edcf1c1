"""
plumbing/: what a run of train.py needs that is not the algorithm (nanochat's pattern: short
scripts over a package). A learner reads sail.py, reward.py, data.py and train.py; this package
is called from train.py and never calls back into it.

  options.py      the run's options (the extensions', device, models, data, cache, evaluation, checkpoints, LoRA),
                  every option's valid range, the one command line and its config files
  checkpoint.py   the run's state between steps (random streams, counters), checkpoints and resume
  distributed.py  the device, data parallelism (torchrun: each rank's share of the draws, DDP) and the
                  stops on a non-finite reward or gradient (an optimiser pre-hook: the step holds no check)
  models.py       the policy, its frozen reference, the oracle and the proxy labeller, LoRA, the optimiser
  microbatch.py   --grad_accum: the step's pairs cut into micro-batches (used by extensions/step.py)
  evaluation.py   the held-out set, its sampling, its two halves, distinct-2, the chunked KL(pi_ref || pi_theta)
  tasks.py        the embedded tasks beyond the review task (explore, offpolicy) and the registry --task names
  outputs.py      the step's metrics line, metrics.jsonl, the samples shown, summary.json, the plot, the
                  phase timing (`timed`, which train.py wraps around the step's functions)

Its tests are in plumbing/test_plumbing.py (`python -m pytest -q plumbing`).
"""
