"""
experiments/exercise_mistakes.py: exercise 8 (docs/exercises.md), its blanks and its check.

    python -m experiments.exercise_mistakes --blank A   # blank part A's functions in train.py (B, C: the others)
    python -m experiments.exercise_mistakes             # does the check catch a learner's mistakes? (~3 min)

--blank PART replaces that part's functions in train.py by their signatures, a docstring saying
what each returns (not how) and `raise NotImplementedError`, after saving the untouched train.py
as train.py.before-exercise-8 (once: blank A, write it, then blank B, and your A stays; `mv
train.py.before-exercise-8 train.py` restores the reference).

Without --blank: each mistake below is seeded alone into a copy of train.py, and the exercise's
tests (`test_sail.py -k step_by_hand`) run on it; then a correct step written in another order,
which must pass. It prints, for each, how many of the tests fail. The edits are text replacements
of train.py: test_experiments.py checks that each still applies.
"""
import ast
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP_SELF = "    labels = self_labels(run, state, pairs, labels, delta)\n"
MISTAKES = {  # a learner's mistake -> its edits of train.py (old text, new text), each found exactly once
 "skip the self-labels": [(STEP_SELF, "")],
 "one sample used as both y1 and y2": [("""        x, x_mask = (t.to(run.device) for t in data.encode_prompts(tok, p + p, cfg.max_prompt_len))  # (2m, Tp) each, m = B - n
        rows = sample(run.policy, x, x_mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      eos_token_id=tok.eos_token_id, generator=state.sampling_gen)  # (2m, T2) each: y1 rows, then y2 rows""",
 """        x, x_mask = (t.to(run.device) for t in data.encode_prompts(tok, p, cfg.max_prompt_len))
        rows = sample(run.policy, x, x_mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      eos_token_id=tok.eos_token_id, generator=state.sampling_gen)
        rows = tuple(torch.cat([t, t]) for t in rows)""")],
 "responses sampled from the reference": [("rows = sample(run.policy, x, x_mask,", "rows = sample(run.reference, x, x_mask,")],
 "responses greedy (temperature 0)": [("max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,\n                      eos_token_id=tok.eos_token_id, generator=state.sampling_gen)  # (2m",
                                       "max_new_tokens=cfg.max_new_tokens, temperature=0.0,\n                      eos_token_id=tok.eos_token_id, generator=state.sampling_gen)  # (2m")],
 "responses from torch's global random stream": [("eos_token_id=tok.eos_token_id, generator=state.sampling_gen)  # (2m", "eos_token_id=tok.eos_token_id, generator=None)  # (2m")],
 "y2 sampled after another pair's prompt": [("data.encode_prompts(tok, p + p, cfg.max_prompt_len))  # (2m, Tp)", "data.encode_prompts(tok, p + p[::-1], cfg.max_prompt_len))  # (2m, Tp)")],
 "dataset pair's y1 its rejected response": [("""prompts, y1, y2 = [x["prompt"] for x in dataset], [x["chosen"] for x in dataset], [x["rejected"] for x in dataset]""",
                                              """prompts, y1, y2 = [x["prompt"] for x in dataset], [x["rejected"] for x in dataset], [x["chosen"] for x in dataset]""")],
 "self-labels from -h": [(STEP_SELF, STEP_SELF.replace(", delta)", ", -delta)"))],
 "self-labels drawn after the loss": [(STEP_SELF, ""), ("    backward(run, losses.mean())\n", "    backward(run, losses.mean())\n" + STEP_SELF)],
 "Delta without the reference": [("    delta = (logps - ref).detach()  # (2B,)\n", "    delta = logps.detach()  # (2B,)\n")],
 "the loss summed, not averaged": [("backward(run, losses.mean())", "backward(run, losses.sum())")],
 "no baseline": [("    baseline = response_baselines(run, pairs, labels, delta)  # (B,) or None\n", "    baseline = None\n")],
 "a baseline that pools the pair's own cost": [("    return leave_one_out_mean(cost, None if run.cfg.baseline == \"loo-all\" else has_term.to(run.device))",
                                                "    return torch.where(has_term.to(run.device), cost, 0.0).sum().expand(len(cost)) / has_term.sum().clamp(min=1)")],
 "self-labelling the SAIL-PR pairs too": [("mine = torch.from_numpy((pairs.route == DP) | (pairs.route == PP))", "mine = torch.from_numpy(pairs.route >= DP)")],
 "self-labelling the SAIL-PP pairs only": [("mine = torch.from_numpy((pairs.route == DP) | (pairs.route == PP))", "mine = torch.from_numpy(pairs.route == PP)")],
 "self-labels without beta": [("delta[:B][mine] - delta[B:][mine], run.cfg.beta, state.label_gen)", "delta[:B][mine] - delta[B:][mine], 1.0, state.label_gen)")],
 "the baseline before the self-labels": [(STEP_SELF + """    # 5. Each pair's loss: DPO + the label term + the response term with its baseline.
    baseline = response_baselines(run, pairs, labels, delta)  # (B,) or None
""", """    baseline = response_baselines(run, pairs, labels, delta)  # (B,) or None
""" + STEP_SELF)],
 "the response term on SAIL-DP pairs": [("scale * torch.tensor([0.0, 0.0, cfg.pi, gamma])", "scale * torch.tensor([0.0, cfg.rho, cfg.pi, gamma])")],
 "the response term on online DPO's pairs": [("gamma = 0.0 if cfg.method in NO_RESPONSE_TERM else cfg.gamma", "gamma = cfg.gamma")],
 "the policy's log-probs detached": [("    logps = policy_logps(run, pairs.batch)  # (2B,)\n", "    logps = policy_logps(run, pairs.batch).detach()  # (2B,)\n")],
}
CORRECT_OTHER_ORDER = [  # a correct step: y1 and y2 sampled in two calls, the log-probs before the labels
 ("""    labels = oracle_labels(run, state, pairs)
    # 3. Delta(y) = L_theta(y) - L_ref(y) of every row; L_theta keeps its graph for the loss.
    ref = reference_logps(run, pairs.batch)  # (2B,)
    logps = policy_logps(run, pairs.batch)  # (2B,)
""", """    logps = policy_logps(run, pairs.batch)  # (2B,)
    ref = reference_logps(run, pairs.batch)  # (2B,)
    labels = oracle_labels(run, state, pairs)
"""),
 ("""        x, x_mask = (t.to(run.device) for t in data.encode_prompts(tok, p + p, cfg.max_prompt_len))  # (2m, Tp) each, m = B - n
        rows = sample(run.policy, x, x_mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      eos_token_id=tok.eos_token_id, generator=state.sampling_gen)  # (2m, T2) each: y1 rows, then y2 rows""",
  """        x, x_mask = (t.to(run.device) for t in data.encode_prompts(tok, p, cfg.max_prompt_len))
        y1s, y2s = (sample(run.policy, x, x_mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           eos_token_id=tok.eos_token_id, generator=state.sampling_gen) for _ in range(2))  # y1 of every prompt, then y2
        rows = data.pad_cat([y1s, y2s], tok.pad_token_id)"""),
]


def seeded(edits, text=None):
    """train.py's text with the edits applied; each old text must occur exactly once."""
    text = open(os.path.join(HERE, "train.py")).read() if text is None else text
    for old, new in edits:
        if text.count(old) != 1:
            raise ValueError(f"train.py holds {text.count(old)} copies of {old[:60]!r}")
        text = text.replace(old, new)
    return text


def run_tests(train_text):
    """The exercise's tests on a copy of the repository whose train.py is train_text: their last line."""
    with tempfile.TemporaryDirectory() as tree:
        files = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True, check=True).stdout.split()
        for f in files:
            os.makedirs(os.path.join(tree, os.path.dirname(f)), exist_ok=True)
            with open(os.path.join(HERE, f), "rb") as a, open(os.path.join(tree, f), "wb") as b:
                b.write(a.read())
        with open(os.path.join(tree, "train.py"), "w") as f:
            f.write(train_text)
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_sail.py", "-k", "step_by_hand"],
                           cwd=tree, capture_output=True, text=True)
        return p.stdout.strip().splitlines()[-1]


PARTS = {"A": ["coefficients", "self_labels", "response_baselines"], "B": ["alignment_step"], "C": ["build_pairs"]}
QUESTIONS = {  # a blanked function's docstring: what to return, not how (the reference's docstrings give part A away)
    "coefficients": "Each route's (OFFLINE, DP, PP, PR) label-term and response-term coefficients, (4,) each,\n"
                    "    from cfg (and response_scale, or cfg.response_scale when None). Which draws depend on theta on each route?",
    "self_labels": "Draw the self-labels of the pairs that need one into labels.y1_wins (B,) bool, from\n"
                   "    delta (2B,) and state.label_gen, and return labels. Which pairs, from which margin, with which probability?",
    "response_baselines": "Each pair's response-term baseline b (B,), or None (run.cfg.baseline: loo, loo-all, none).",
    "alignment_step": "One update of the SAIL family. Returns (pairs, labels, delta (2B,), grad_norm).",
    "build_pairs": "Route B pairs and give each its two responses y1, y2. Returns data.Pairs (docs/exercises.md, part C).",
}


def blanked(text, names):
    """train.py's text with each function of `names` reduced to its signature, a docstring saying what
    it returns (QUESTIONS) and `raise NotImplementedError`."""
    lines = text.splitlines(keepends=True)
    functions = {node.name: node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef)}
    for node in sorted((functions[n] for n in names), key=lambda n: -n.lineno):  # from the bottom up: line numbers hold
        start = node.body[0].lineno  # the docstring's first line (every function blanked has one)
        lines[start - 1:node.end_lineno] = [f'    """{QUESTIONS[node.name]}"""\n',
                                            f'    raise NotImplementedError("exercise 8: write {node.name}")\n']
    return "".join(lines)


def blank(part):
    """--blank PART: save train.py (once: blanking another part later keeps what you wrote), then
    blank that part's functions in it."""
    path, saved = os.path.join(HERE, "train.py"), os.path.join(HERE, "train.py.before-exercise-8")
    text = open(path).read()
    if not os.path.exists(saved):
        with open(saved, "w") as f:
            f.write(text)
    with open(path, "w") as f:
        f.write(blanked(text, PARTS[part]))
    print(f"train.py: blanked {', '.join(PARTS[part])}; the reference is in train.py.before-exercise-8 "
          "(mv it back to restore). Check: python -m pytest -q test_sail.py -k step_by_hand")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--blank"]:
        if sys.argv[2:] not in ([p] for p in PARTS):
            raise SystemExit(f"error: --blank takes one part: {', '.join(PARTS)}")
        blank(sys.argv[2])
        raise SystemExit(0)
    for name, edits in [*MISTAKES.items(), ("CORRECT, in another order", CORRECT_OTHER_ORDER)]:
        print(f"{name:45s} {run_tests(seeded(edits))}", flush=True)
