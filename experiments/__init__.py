"""
experiments/: what a learner does not need to learn SAIL, built on the four modules (never
imported by them): the side-by-side comparison (compare.py, its frontier statistics in frontier.py),
the comparison on every embedded task (tasks.py), the benchmark (benchmark.py), the real-size
stand-ins (stand_ins.py), the check against TRL (peer_trl.py), and their tests (test_experiments.py).
Each runs on its own: `python -m experiments.compare`, `python -m experiments.tasks`,
`python -m experiments.benchmark`, `python -m experiments.stand_ins`.
"""
