"""
plumbing/test_plumbing.py: the tests of plumbing/, what a run of train.py needs besides the algorithm
(run with every other test by the README's `python -m pytest -q`; alone: `python -m pytest -q plumbing`).

  * options.py: --help, config files, every bad option refused with one line, before anything is loaded
  * checkpoint.py: a killed run resumes bit for bit; every random stream its own numbers; NaN stops
  * microbatch.py: --grad_accum gives the update of one batch
  * models.py: real checkpoints by path (GPT-2, GPT-NeoX, a reward model with its own tokenizer); LoRA
  * distributed.py: two ranks under torchrun equal one rank of the whole batch
  * tasks.py: each embedded task's gold reward by hand, its data, what it is built to have, --task
"""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import data
import extensions.step
import reward
import sail
import train
from plumbing import checkpoint, models, options, outputs, tasks
from test_sail import (FAST, HERE, SHORT, SUMMARY_KEYS, assert_same_metrics, bad_files, cache, few_eval_pairs, gradient, load_model, metrics_without_timing, no_eval, perturbed_run, refusal, runs, tiny_causal_lm, weights, word_tokenizer, write_jsonl)  # noqa: F401  (fixtures)


# ---------------------------------------------------------------------------------------------
# options.py: one command line, every option checked, one `error:` line per problem before anything is loaded

def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(train.Config):
        assert f"--{f.name}" in help_text
    assert "(default: sail-pr)" in help_text

def test_a_config_file_gives_the_options_and_flags_after_it_override(tmp_path):
    """`python train.py run.yaml` (or .json), as in Hugging Face's example scripts."""
    (tmp_path / "run.yaml").write_text("method: sail-pp\nlr: 5e-4  # YAML reads this as a string\nsteps: 7\ngradient_checkpointing: true\n")
    (tmp_path / "run.json").write_text('{"method": "sail-pp", "lr": 0.0005, "steps": 7, "gradient_checkpointing": true}')
    for name in ("run.yaml", "run.json"):
        cfg = train.parse_args([str(tmp_path / name), "--steps", "9"])
        assert (cfg.method, cfg.lr, cfg.steps, cfg.gradient_checkpointing, cfg.beta) == ("sail-pp", 5e-4, 9, True, 0.1)
    assert train.parse_args(["--gradient_checkpointing"]).gradient_checkpointing is True  # a bare boolean flag
    assert train.parse_args(["--gradient_checkpointing", "false"]).gradient_checkpointing is False
    (tmp_path / "bad.yaml").write_text("lrr: 0.1\n")
    (tmp_path / "zero.yaml").write_text("beta: 0\n")
    (tmp_path / "list.yaml").write_text("- steps\n")
    for name, message in [("bad.yaml", ": unknown option(s) 'lrr'"), ("zero.yaml", "error: --beta must be > 0, got 0.0"),
                          ("list.yaml", ": expected a mapping of option: value, got list"), ("none.yaml", ": no such config file")]:
        with pytest.raises(SystemExit) as e:
            train.parse_args([str(tmp_path / name)])
        assert message in str(e.value) and len(str(e.value).splitlines()) == 1, e.value

@pytest.mark.parametrize("argv,message", [
    (["--method", "ppo"], "--method 'ppo'"), (["--beta", "0"], "--beta must be > 0"),
    (["--method", "mix", "--r", "0.5", "--p", "0.5", "--g", "0.5"], "--r + --p + --g must be <= 1"),
    (["--rho", "-1"], "--rho must be >= 0"),
    (["--model", "some/model", "--prompts", "p.jsonl", "--method", "sail-dp"], "--method sail-dp trains on offline pairs: give --pairs"),
    (["--task", "reviews"], "--task 'reviews': choose one of review, explore, offpolicy"),
    (["--task", "explore", "--pairs", "p.jsonl"], "--task explore brings its own prompts and pairs: drop --pairs, or use --task review"),
])
def test_bad_options_are_refused(argv, message):
    with pytest.raises(SystemExit) as refused:
        train.parse_args(argv)
    assert str(refused.value).startswith("error: ") and message in str(refused.value)

def numeric_cases():
    """For every numeric option: a value below its range, and NaN and inf for the float ones."""
    cases = []
    for test, what, names in options.RANGES:
        for name in names:
            kind = type(getattr(train.Config, name))
            low = {"> 0": 0, ">= 0": -1, ">= 1": 0, ">= 2": 1}.get(what.split(" (")[0], -2)
            cases.append((name, str(kind(low)), f"--{name} must be {what}"))
            if kind is float:
                cases += [(name, "nan", f"--{name} must be a finite number, got nan"),
                          (name, "inf", f"--{name} must be a finite number, got inf")]
    return cases

@pytest.mark.parametrize("name,value,message", numeric_cases())
def test_every_numeric_option_refuses_values_out_of_range(name, value, message):
    assert message in refusal([f"--{name}", value])

@pytest.mark.parametrize("argv,message", [
    (["--r", "1.5"], "--r must be between 0 and 1"), (["--holdout", "1"], "--holdout must be strictly between 0 and 1"),
    (["--batch_size", "4", "--grad_accum", "6"], "--grad_accum 6 must be <= --batch_size 4"),
    (["--label_mode", "soft"], "--label_mode 'soft'"),
    (["--device", "gpu"], "--device 'gpu': choose auto, cpu"), (["--device", "cuda:99"], "--device cuda:99: "),
    (["--lora_rank", "8", "--offload_reference", "true"], "--offload_reference with --lora_rank: the reference is the policy"),
    (["--steps", "ten"], None),  # argparse's own message: "argument --steps: invalid int value: 'ten'"
])
def test_other_bad_options_are_refused(argv, message, capsys):
    if message is None:  # a value that is not a number at all: argparse refuses it with usage, exit status 2
        with pytest.raises(SystemExit) as refused:
            train.cli(argv)
        assert refused.value.code == 2 and "argument --steps: invalid int value: 'ten'" in capsys.readouterr().err
    else:
        assert message in refusal(argv)

def test_a_device_the_machine_lacks_is_refused():
    missing = "mps" if torch.cuda.is_available() and not torch.backends.mps.is_available() else "cuda"
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        assert refusal(["--device", "cuda"]) == f"error: --device cuda: no CUDA GPU is available here (torch {torch.__version__}); use --device auto or cpu"
    assert refusal(["--device", missing]).startswith(f"error: --device {missing}")

@pytest.mark.parametrize("option", ["--model", "--reward_model"])
@pytest.mark.parametrize("name,message", [
    ("missing-model", "cannot be loaded"), ("a-file", "is a file; expected a directory written by save_pretrained"),
    ("no-config", "no config.json in this directory"), ("broken", "cannot be loaded"),
])
def test_models_that_cannot_be_loaded_are_refused(bad_files, cache, option, name, message):
    path = str(bad_files / name)
    got = refusal([option, path, "--out_dir", str(bad_files / "out"), "--cache_dir", cache, "--sft_steps", "40"])
    assert got.startswith(f"error: {option} {path}: {message}") and len(got.splitlines()) == 1, got

@pytest.mark.parametrize("option", ["--out_dir", "--cache_dir"])
@pytest.mark.parametrize("where", ["a-file", "a-file/below"])
def test_directories_that_cannot_be_written_are_refused(bad_files, option, where):
    argv = {"--out_dir": str(bad_files / "out"), "--cache_dir": str(bad_files / "cache"), option: str(bad_files / where)}
    message = refusal([x for k, v in argv.items() for x in (k, v)] + ["--sft_steps", "40"])
    assert message.startswith(f"error: {option} '{bad_files / where}' cannot be written: ")

def test_a_refused_command_leaves_an_existing_run_as_it_was(runs, bad_files):
    """Every kind of refusal, pointed at a finished run's --out_dir: not one byte of it changes."""
    out = str(runs.full)
    before = {p: p.read_bytes() for p in runs.full.rglob("*") if p.is_file()}
    stamps = {p: p.stat().st_mtime_ns for p in before}
    for argv in (["--lr", "nan"], ["--device", "cuda:99"], ["--prompts", str(bad_files / "latin1.jsonl")],
                 ["--model", str(bad_files / "broken")], ["--steps", "8", "--beta", "0.2"],  # other settings than the run's
                 ["--reward_model", str(bad_files / "no-config")], ["--cache_dir", str(bad_files / "a-file")]):
        refusal(argv + ["--out_dir", out])
    assert {p: p.read_bytes() for p in runs.full.rglob("*") if p.is_file()} == before
    assert {p: p.stat().st_mtime_ns for p in before} == stamps

def test_python_train_py_refuses_with_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--lr", "nan", "--temperature", "0", "--out_dir", str(tmp_path / "o")],
                            cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: --lr must be a finite number, got nan", "error: --temperature must be > 0, got 0.0"]

def test_lora_without_peft_is_refused_with_how_to_install_it(monkeypatch):
    real = options.importlib.util.find_spec
    monkeypatch.setattr(options.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert "--lora_rank needs the peft library: pip install peft" in refusal(["--lora_rank", "8"])


# ---------------------------------------------------------------------------------------------
# checkpoint.py: never lose a run: kill and resume, one root seed for every stream, non-finite values stop it

def test_killed_run_resumes_to_the_same_result(runs):
    """SIGKILL a real run between checkpoints, run the same command again: it resumes and ends with
    the same weights and the same metrics lines as a run that was never interrupted."""
    assert runs.killed, "the run finished before it could be killed"
    assert "resuming from" in runs.resumed
    assert_same_metrics(metrics_without_timing(runs.cut), metrics_without_timing(runs.full))
    a, b = weights(runs.full / "policy"), weights(runs.cut / "policy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def test_every_random_stream_has_its_own_numbers():
    """Every stream of a run is seeded from the root --seed through np.random.SeedSequence: no two
    streams of one run, of two ranks (those drawn per rank) or of seeds 0-4 (experiments.compare's replicates)
    share a seed, and the first numbers they draw differ (the label stream used to draw the same
    uniforms as the sampling stream, and seed + 1's sampling stream was seed's evaluation stream)."""
    seeds = [(s, rank, name, value) for s in range(5) for rank in (0, 1) for name, value in train.stream_seeds(s, rank).items()]
    assert len({v % 2 ** 32 for _, _, _, v in seeds}) == len({v for _, _, _, v in seeds})  # torch's CPU generator: the low 32 bits
    shared = {name for name, per_rank in checkpoint.STREAMS if not per_rank}
    distinct = {(s, rank if name not in shared else 0, name): v for s, rank, name, v in seeds}
    assert len(set(distinct.values())) == len(distinct) == 5 * (len(shared) + 2 * (len(checkpoint.STREAMS) - len(shared)))
    first = [torch.rand(4, generator=torch.Generator().manual_seed(v)) for v in distinct.values()]
    assert len({tuple(x.tolist()) for x in first}) == len(first)
    assert train.stream_seeds(3) == train.stream_seeds(3)  # a function of the seed alone: runs are repeatable

def test_each_seed_fits_its_own_proxy_from_its_own_stream(tmp_path, cache, monkeypatch):
    """--proxy fit: the proxy's start and batches are seeded from the run's root seed (its proxy_fit
    stream), so replicate seeds resample the labeller too; two seeds, two fits, two cache entries."""
    from transformers import AutoTokenizer
    tokenizer, seen = AutoTokenizer.from_pretrained(os.path.join(cache, "embedded-sft-task0-steps40")), []

    def fit_reward_model(path, pairs, held_out, *args, seed, **kwargs):
        seen.append((path, seed, len(pairs)))
        raise RuntimeError("fit")

    monkeypatch.setattr(reward, "fit_reward_model", fit_reward_model)
    for s in (0, 1):
        cfg = train.parse_args(["--proxy", "fit", "--proxy_pairs", "64", "--seed", str(s), "--cache_dir", str(tmp_path)])
        with pytest.raises(RuntimeError):
            models.proxy_labeller(cfg, data.load_inputs(cfg), tokenizer, torch.device("cpu"))
    assert [x[1:] for x in seen] == [(train.stream_seeds(0)["proxy_fit"], 64), (train.stream_seeds(1)["proxy_fit"], 64)]
    assert seen[0][0] != seen[1][0]


def test_the_gold_labels_under_a_proxy_charge_its_fit_pairs_and_the_offline_pairs_once():
    """label_totals by hand: dataset pairs 0-4 cost 1, 2, 1, 3, 1 labels; the proxy was fit on the
    first 2, and the run trained on pairs 1 and 3 offline after 10 proxy queries. oracle_queries
    counts every label (10 + 2 + 3 = 15); gold_labels the gold ones, pairs 0, 1 and 3 once each (1 + 2 + 3)."""
    import numpy as np
    state = SimpleNamespace(used_pairs={1, 3}, oracle_queries=10, ties=0)
    gold, proxy = object(), SimpleNamespace(fit_pairs=2)
    run = SimpleNamespace(pair_labels=np.array([1, 2, 1, 3, 1]), labeller=proxy, gold=gold)
    assert outputs.label_totals(run, state) == {"oracle_queries": 15, "ties": 3, "gold_labels": 6}
    assert outputs.label_totals(SimpleNamespace(pair_labels=run.pair_labels, labeller=gold, gold=gold), state) == {"oracle_queries": 15, "ties": 3}
    assert outputs.label_totals(run, SimpleNamespace(used_pairs=set(), oracle_queries=10, ties=0))["gold_labels"] == 3  # the fit alone
    # pair 2, the first one past the fit pairs, is charged when trained on (1 + 2 fit, + 1); pair 1, fit on, not again
    assert outputs.label_totals(run, SimpleNamespace(used_pairs={1, 2}, oracle_queries=0, ties=0))["gold_labels"] == 4


def test_same_seed_same_run(tmp_path, cache, few_eval_pairs):
    argv = ["--steps", "2", "--method", "mix", "--g", "0.5", "--p", "0.3", "--r", "0.2", "--cache_dir", cache, *FAST,
            "--eval_pairs", few_eval_pairs]
    for name in ("a", "b"):
        train.main(train.parse_args(argv + ["--out_dir", str(tmp_path / name)]))
    assert metrics_without_timing(tmp_path / "a") == metrics_without_timing(tmp_path / "b")

def test_xpo_with_sampled_labels_resumes_exactly(tmp_path, cache, no_eval):
    """Resuming restores every random stream, XPO's samples of the reference and the sampled oracle
    labels included: 1 step then 2 more equal 3 steps (bit for bit, weights and training figures)."""
    argv = ["--method", "xpo", "--label_mode", "sampled", "--cache_dir", cache, *SHORT]
    train.main(train.parse_args(argv + ["--steps", "1", "--out_dir", str(tmp_path / "cut")]))
    train.main(train.parse_args(argv + ["--steps", "3", "--out_dir", str(tmp_path / "cut")]))
    train.main(train.parse_args(argv + ["--steps", "3", "--out_dir", str(tmp_path / "full")]))
    training = [[{k: v for k, v in r.items() if not k.startswith("eval_")} for r in metrics_without_timing(tmp_path / d)]
                for d in ("cut", "full")]  # the cut run also evaluated at its end, step 1
    assert training[0] == training[1]
    a, b = weights(tmp_path / "cut" / "policy"), weights(tmp_path / "full" / "policy")
    assert all(torch.equal(a[k], b[k]) for k in a)

def test_non_finite_values_stop_the_run_and_keep_the_checkpoint(tmp_path, cache, monkeypatch):
    calls = {"n": 0}
    real_oracle = reward.GoldReward.__call__

    def oracle_breaks_at_step_2(self, prompts, responses):  # each step makes one labelling call
        calls["n"] += 1
        scores = real_oracle(self, prompts, responses)
        return scores * float("nan") if calls["n"] == 2 else scores

    monkeypatch.setattr(reward.GoldReward, "__call__", oracle_breaks_at_step_2)
    cfg = train.parse_args(["--steps", "4", "--g", "1", "--save_every", "1", "--out_dir", str(tmp_path), "--cache_dir", cache,
                            "--sft_steps", "40", "--eval_every", "100", "--sample_every", "100", "--eval_samples", "1"])
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: ({"eval_reward": 0.0}, None))  # keep the call count simple
    with pytest.raises(SystemExit, match=r"step 2: an oracle reward is nan; stopped before the update.*checkpoint is kept"):
        train.main(cfg)
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)["step"] == 1


NON_FINITE = ["--steps", "3", "--save_every", "1", "--eval_every", "100", "--sample_every", "100", "--eval_samples", "1",
              "--sft_steps", "40"]


@pytest.mark.parametrize("extended, calls", [([], 1), (["--response_term", "official", "--grad_accum", "2"], 2)])
def test_an_infinite_loss_stops_the_run_though_its_gradient_is_finite(tmp_path, cache, monkeypatch, extended, calls):
    """One pair's loss made +inf by a constant: its gradient stays finite, so only the loss's own
    check stops the run, before step 2's update, on the plain step and the extended one."""
    step = {"n": 0}  # calls: of the loss, per step (one per micro-batch)
    real = train.sail_loss, extensions.step.pair_losses

    def inf_at_step_2(losses):
        step["n"] += 1
        return losses + torch.tensor([float("inf")] + [0.0] * (len(losses) - 1)) if step["n"] == calls + 1 else losses

    if extended:  # its check is on the extended step's final losses, per micro-batch (the official term does not call sail_loss)
        monkeypatch.setattr(extensions.step, "pair_losses", lambda *a, **k: inf_at_step_2(real[1](*a, **k)))
    else:
        monkeypatch.setattr(train, "sail_loss", lambda *a, **k: (inf_at_step_2(real[0](*a, **k)[0]), None, None))
    argv = ["--g", "1", "--out_dir", str(tmp_path), "--cache_dir", cache, *NON_FINITE, *extended]
    with pytest.raises(SystemExit, match=r"^error: step 2: a pair's loss is inf; stopped before the update. The last good checkpoint is kept"):
        train.main(train.parse_args(argv))
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)["step"] == 1
    if not extended:  # a loss of inf everywhere, its gradient too
        monkeypatch.setattr(train, "sail_loss", lambda *a, **k: (real[0](*a, **k)[0] * float("inf"), None, None))
        with pytest.raises(SystemExit, match=r"step 1: a pair's loss is (nan|inf); stopped before the update. No checkpoint"):
            train.main(train.parse_args(["--g", "1", "--out_dir", str(tmp_path / "b"), "--cache_dir", cache, *NON_FINITE]))


def test_a_nan_delta_stops_the_run_before_it_is_self_labelled(tmp_path, cache, monkeypatch):
    """A NaN log-probability on one self-labelled row at step 2: the run stops with its message,
    not torch.bernoulli's error, before the self-label is drawn; step 1's checkpoint is kept."""
    step, drawn = {"n": 0}, []
    real_logps, real_label = train.sequence_logps_of, reward.self_label

    def nan_at_step_2(model, *batch):
        logps = real_logps(model, *batch)
        if model.training:  # the policy's forward of the step
            step["n"] += 1
            if step["n"] == 2:
                logps = logps.clone()
                logps[0] = float("nan")
        return logps

    monkeypatch.setattr(train, "sequence_logps_of", nan_at_step_2)
    monkeypatch.setattr(reward, "self_label", lambda *a, **k: drawn.append(1) or real_label(*a, **k))
    argv = ["--method", "sail-pp", "--p", "1", "--out_dir", str(tmp_path), "--cache_dir", cache, *NON_FINITE]
    with pytest.raises(SystemExit, match=r"^error: step 2: Delta \(a log-probability\) is nan; stopped before the update"):
        train.main(train.parse_args(argv))
    assert len(drawn) == 1 and torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)["step"] == 1


def test_a_nan_reward_in_an_evaluation_names_it_and_keeps_its_checkpoint(tmp_path, cache, monkeypatch):
    """The SFT model's evaluation is checked too (a NaN there would skew every win rate); a NaN in
    step 2's evaluation is reported as after step 2's update, and step 2's due checkpoint is written."""
    real_evaluate = train.evaluate
    for at, where, kept in ((0, "the SFT model's evaluation", None), (2, "step 2's evaluation", 2)):
        calls = {"n": 0}

        def broken_at(run, eval_set, sft_rewards, at=at):
            calls["n"] += 1
            if calls["n"] == 1 + at // 2:  # the SFT model's, then one every 2 steps
                gold = run.gold.reward
                monkeypatch.setattr(run.gold, "reward", lambda p, r: gold(p, r) * float("nan"))
            return real_evaluate(run, eval_set, sft_rewards)

        monkeypatch.setattr(train, "evaluate", broken_at)
        out = tmp_path / str(at)
        argv = ["--g", "1", "--out_dir", str(out), "--cache_dir", cache, *NON_FINITE, "--eval_every", "2", "--save_every", "2"]
        after = "after" if at else "before"
        with pytest.raises(SystemExit, match=rf"^error: {where}: an oracle reward is nan; stopped {after} the update. "
                                             + ("The last good" if kept else "No checkpoint")):
            train.main(train.parse_args(argv))
        if kept:  # step 2's line and checkpoint: a resumed run goes on from step 3 with every line before it
            assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == kept
            assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_run_continues_under_a_newer_option_only_at_its_default():
    """A checkpoint or compared run from before an option existed does not record it: it is the
    same run while the option is at its default (the old behaviour), another one otherwise."""
    cfg = train.parse_args([])
    saved = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "revkl"}
    checkpoint.refuse_changed_settings(saved, cfg, "advice")  # no refusal
    with pytest.raises(SystemExit) as refused:
        checkpoint.refuse_changed_settings(saved, dataclasses.replace(cfg, revkl=0.1), "advice")
    assert "--revkl not recorded there, 0.1 now" in str(refused.value)


# ---------------------------------------------------------------------------------------------
# models.py: bf16 and offloading live on the models (the step names neither)

@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_a_bf16_model_computes_as_under_autocast_and_its_copy_is_its_own(arch):
    """compute_in_bf16 (the CUDA path's arithmetic, forced here on the CPU) gives every forward pass,
    sampling's and the log-probs', exactly what `with torch.autocast(bf16)` around the call gives,
    and not fp32's; the model still takes logits_to_keep; a deepcopy computes with its own weights."""
    import copy

    model = tiny_causal_lm(arch)
    plain = copy.deepcopy(model)
    models.compute_in_bf16(model, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ids, attention = torch.randint(2, 30, (4, 10), generator=g), torch.ones(4, 10, dtype=torch.long)
    response = torch.zeros_like(ids)
    response[:, 5:] = 1
    with torch.no_grad():
        got = sail.sequence_logps_of(model, ids, attention, response)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = sail.sequence_logps_of(plain, ids, attention, response)
            want_sample = sail.sample(plain, ids[:, :5], attention[:, :5], max_new_tokens=6, temperature=1.0, eos_token_id=0,
                                      generator=torch.Generator().manual_seed(1))
        fp32 = sail.sequence_logps_of(plain, ids, attention, response)
        got_sample = sail.sample(model, ids[:, :5], attention[:, :5], max_new_tokens=6, temperature=1.0, eos_token_id=0,
                                 generator=torch.Generator().manual_seed(1))
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.add_(0.5)
        assert not torch.equal(sail.sequence_logps_of(twin, ids, attention, response), got)  # the copy's own weights
        assert torch.equal(sail.sequence_logps_of(model, ids, attention, response), got)
    assert torch.equal(got, want) and not torch.equal(got, fp32)
    assert all(torch.equal(a, b) for a, b in zip(got_sample, want_sample))
    assert sail.forward_takes(model, "logits_to_keep")


def test_bf16_is_set_on_the_runs_models_and_an_offloaded_reference_takes_gpu_inputs(cache, monkeypatch):
    """setup_run with bf16 (forced) wraps the policy's and the reference's forward; an offloaded
    reference's pre-hook moves a call's tensors to the CPU and L(y) comes back on the batch's device."""
    monkeypatch.setattr(models, "bf16_supported", lambda device: True)
    run, _ = perturbed_run(cache, ["--method", "selm"])
    assert all(hasattr(m.forward, "__wrapped__") for m in (run.policy, run.reference, run.train_reference))
    model = tiny_causal_lm("gpt2")
    models.inputs_to_cpu(model)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].device), with_kwargs=True)
    ids = torch.randint(2, 30, (2, 6))
    response = torch.zeros_like(ids)
    response[:, 3:] = 1
    out = sail.sequence_logps_of(model, ids, torch.ones_like(ids), response)
    assert seen == [torch.device("cpu")] and out.device == ids.device and out.shape == (2,)


# ---------------------------------------------------------------------------------------------
# microbatch.py: --grad_accum gives the update of one batch

def one_step_gradient(cache, method, grad_accum, monkeypatch):
    """The gradient of step 1 from a perturbed SFT policy, with the given micro-batches."""
    run, state = perturbed_run(cache, ["--method", *method.split(), "--grad_accum", str(grad_accum)])
    row, (pairs, labels) = train.train_step(run, state, 1)
    return row, gradient(run.policy), labels

@pytest.mark.parametrize("method, k", [("mix --r 0.25 --p 0.25 --g 0.5", 4), ("selm", 4), ("sail-pr --revkl 0.5", 4),
                                       ("mix --r 0.25 --p 0.25 --g 0.5", 3), ("xpo", 3)])
def test_micro_batches_give_the_update_of_one_batch(cache, method, k, monkeypatch, capsys):
    """--grad_accum k cuts the same 8 pairs (same samples, labels, self-labels, ties, baselines) into
    k micro-batches (k = 3: of 3, 3 and 2 pairs, which a mean per micro-batch would weigh wrongly):
    the gradient and every logged figure equal those of one batch of 8."""
    row1, grad1, labels1 = one_step_gradient(cache, method, 1, monkeypatch)
    row4, grad4, labels4 = one_step_gradient(cache, method, k, monkeypatch)
    assert torch.equal(labels1.y1_wins, labels4.y1_wins) and torch.equal(labels1.valid, labels4.valid)
    assert torch.allclose(grad1, grad4, rtol=1e-4, atol=1e-7) and grad1.abs().max() > 0
    figures = [k for k in row1 if not k.startswith(("dt", "t_"))]
    assert {k: row4[k] for k in figures} == pytest.approx({k: row1[k] for k in figures}, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# models.py: real checkpoints (GPT-2 and GPT-NeoX policies and a reward model with another tokenizer, all built and saved
# here with save_pretrained: no hub), given to train.py by path; LoRA (peft): adapters only are trained, the reference
# is the policy with its adapters off

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    root = tmp_path_factory.mktemp("checkpoints")
    task = data.make_task(0, n_sft=400, n_pairs=40, n_eval_pairs=8)
    texts = [p + y for p, y in task.sft]
    # GPT-2: byte-level BPE with EOS only (the pad token is added by data.prepare_tokenizer).
    tok = data.build_tokenizer(texts, vocab_size=300)
    model = tiny_causal_lm("gpt2", vocab=len(tok))
    model.config.eos_token_id = model.config.bos_token_id = tok.eos_token_id
    model.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    # GPT-NeoX (Pythia): its own special tokens, EOS id 0 and a separate pad token id 1.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>", "<|padding|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|padding|>")
    tiny_causal_lm("gpt_neox", vocab=len(tok)).save_pretrained(root / "neox")
    tok.save_pretrained(root / "neox")
    # The reward model: a word-level tokenizer, unlike either policy's.
    words = sorted({w for x in texts for w in x.replace(":", " :").replace("?", " ?").split()})
    rm_tok = word_tokenizer(words)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(rm_tok), n_positions=64, n_embd=8, n_layer=1, n_head=2, num_labels=1,
                                             pad_token_id=rm_tok.pad_token_id)).save_pretrained(root / "rm")
    rm_tok.save_pretrained(root / "rm")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in task.train_prompts[:40]])
    pairs = write_jsonl(root / "pairs.jsonl", task.pairs)
    return SimpleNamespace(root=root, prompts=prompts, pairs=pairs, rm_words=set(words))

@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_real_checkpoints_end_to_end(tmp_path, checkpoints, arch, monkeypatch):
    seen = []
    real_call = reward.HFRewardModel.__call__

    def spy(self, prompts, responses):  # record what the reward model is given and how it tokenizes it
        seen.append((list(prompts), list(responses), self.tokenizer([p + r for p, r in zip(prompts, responses)])["input_ids"]))
        return real_call(self, prompts, responses)

    monkeypatch.setattr(reward.HFRewardModel, "__call__", spy)
    out = tmp_path / "out"
    summary = train.main(train.parse_args([
        "--model", str(checkpoints.root / arch), "--reward_model", str(checkpoints.root / "rm"),
        "--prompts", checkpoints.prompts, "--pairs", checkpoints.pairs, "--method", "mix", "--r", "0.25", "--p", "0.25",
        "--g", "0.5", "--steps", "2", "--batch_size", "8", "--max_new_tokens", "8", "--eval_samples", "1",
        "--grad_accum", "2", "--reward_batch_size", "5", "--out_dir", str(out)]))
    assert SUMMARY_KEYS <= set(summary) and math.isfinite(summary["gold_reward_final"])
    # The reward model was given decoded text (prompt + response) and read it with its own tokenizer.
    prompt_texts = {json.loads(x)["prompt"] for x in open(checkpoints.prompts)}
    assert seen and all(isinstance(r, str) for _, rs, _ in seen for r in rs)
    assert all(p in prompt_texts for ps, _, _ in seen for p in ps)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rm_tok = AutoTokenizer.from_pretrained(checkpoints.root / "rm")
    policy_tok = AutoTokenizer.from_pretrained(checkpoints.root / arch)
    prompt, response, rm_ids = seen[0][0][0], seen[0][1][0], seen[0][2][0]
    assert rm_ids == rm_tok(prompt + response)["input_ids"] != policy_tok(prompt + response)["input_ids"]
    assert any(rm_tok.convert_ids_to_tokens(i) in checkpoints.rm_words for i in rm_ids)  # real words, not all [UNK]
    # The final policy loads back with from_pretrained and generates.
    policy = AutoModelForCausalLM.from_pretrained(out / "policy")
    tok = AutoTokenizer.from_pretrained(out / "policy")
    ids = tok("Review of the pizza:", return_tensors="pt")["input_ids"]
    assert policy.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                           pad_token_id=tok.pad_token_id).shape[1] > ids.shape[1]

def lora_run(argv):
    """A run set up as train.py does it, with LoRA, and its state; nothing trained yet."""
    cfg = train.parse_args(["--lora_rank", "4", "--batch_size", "4", "--max_new_tokens", "8", *argv])
    inputs = data.load_inputs(cfg)
    run = train.setup_run(cfg, inputs, torch.device("cpu"))
    return run, train.State.new(cfg, run, len(inputs.train_prompts), len(inputs.pairs or []), history=[]), inputs

def lora_argv(arch, cache, checkpoints):
    if arch == "embedded":  # GPT-2's Conv1D layers (fan_in_fan_out)
        return ["--cache_dir", cache, "--sft_steps", "40"]
    return ["--model", str(checkpoints.root / "neox"), "--prompts", checkpoints.prompts, "--pairs", checkpoints.pairs]

@pytest.mark.parametrize("arch", ["embedded", "neox"])
def test_lora_trains_the_adapters_only_and_its_reference_is_the_sft_model(cache, checkpoints, arch):
    run, state, inputs = lora_run(["--method", "mix", "--r", "0.25", "--p", "0.25", "--g", "0.5", "--lr", "1e-2",
                                   *lora_argv(arch, cache, checkpoints)])
    assert isinstance(run.reference, models.AdaptersOff) and run.reference.policy is run.policy  # no second copy
    pairs = inputs.pairs[:6]
    batch = data.encode_responses(run.tokenizer, [x["prompt"] for x in pairs] * 2,
                                  [x["chosen"] for x in pairs] + [x["rejected"] for x in pairs], 32, 8)
    sft = load_model(run.cfg.model if arch == "neox" else os.path.join(cache, "embedded-sft-task0-steps40"))[0]
    sft_logps = sail.sequence_logps_of(sft, *batch)  # (12,)
    # At the start B = 0: the policy, its reference and the SFT model give the same log-probs.
    assert torch.equal(train.reference_logps(run, batch), sft_logps)
    assert torch.equal(sail.sequence_logps_of(run.policy, *batch), sft_logps)
    frozen = {n: p.detach().clone() for n, p in run.policy.named_parameters() if not p.requires_grad}
    for step in (1, 2, 3):
        train.train_step(run, state, step)
    # Gradients reached the adapters, A and B of every target module, and nothing else.
    grads = {n: p.grad for n, p in run.policy.named_parameters() if p.grad is not None}
    targets = models.LORA_TARGETS["gpt2" if arch == "embedded" else "gpt_neox"]
    adapted = {n for n, _ in run.policy.named_modules() if n.rsplit(".", 1)[-1] in targets}  # every target module
    assert set(grads) == {f"{m}.lora_{ab}.default.weight" for m in adapted for ab in "AB"}
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert sum(p.numel() for g in run.optimizer.param_groups for p in g["params"]) == sum(g.numel() for g in grads.values())
    # The frozen weights did not move; the policy did; the reference is still exactly the SFT model.
    assert all(torch.equal(p, frozen[n]) for n, p in run.policy.named_parameters() if n in frozen)
    assert not torch.allclose(sail.sequence_logps_of(run.policy, *batch), sft_logps)
    assert torch.equal(train.reference_logps(run, batch), sft_logps)

def test_lora_with_gradient_checkpointing_gives_the_same_gradient(cache, checkpoints):
    grads = []
    for checkpointing in ("false", "true"):
        run, state, _ = lora_run(["--method", "dpo", "--gradient_checkpointing", checkpointing,
                                  *lora_argv("neox", cache, checkpoints)])
        with torch.no_grad():  # move B off 0, so that A's gradient is not 0 either
            for n, p in run.policy.named_parameters():
                if "lora_B" in n:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        train.train_step(run, state, 1)
        grads.append(torch.cat([p.grad.flatten() for p in run.policy.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)

@pytest.mark.parametrize("method", ["sail-pr", "selm --ref_update_every 2"])  # selm: and its moving reference
def test_a_killed_lora_run_resumes_exactly_and_saves_a_merged_policy(tmp_path, cache, checkpoints, method, monkeypatch):
    """A LoRA run stopped between checkpoints (after step 3, in this process; the end-to-end test
    kills `python train.py` with SIGKILL) and started again ends exactly as one that never
    stopped; the checkpoint holds the adapters only; policy/ is the merged model, which plain
    from_pretrained loads, gives the LoRA policy's log-probs and generates."""
    argv = ["--lora_rank", "4", "--method", *method.split(), "--steps", "6", "--save_every", "2", "--batch_size", "4", "--lr", "1e-2",
            "--max_new_tokens", "8", "--eval_samples", "1", "--eval_every", "3", *lora_argv("neox", cache, checkpoints)]
    train.main(train.parse_args(argv + ["--out_dir", str(tmp_path / "full")]))
    log_step = outputs.log_step

    def killed_after_step_3(metrics_file, row):  # the process dies there: the last checkpoint is step 2's
        log_step(metrics_file, row)
        if row["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "log_step", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.parse_args(argv + ["--out_dir", str(tmp_path / "cut")]))
    monkeypatch.undo()
    kept = type(tmp_path)(checkpoint.latest_checkpoint(str(tmp_path / "cut")))  # checkpoint/, or checkpoint.old/ mid-swap
    assert {"adapter_model.safetensors", "adapter_config.json", "state.pt"} <= {p.name for p in kept.iterdir()}
    assert not (kept / "model.safetensors").exists()
    assert all("lora_" in k for k in weights(kept, "adapter_model.safetensors"))
    if "selm" in method:  # SELM's reference after its update at step 2: the policy's adapters then
        assert weights(kept / "reference", "adapter_model.safetensors").keys() == \
            weights(kept, "adapter_model.safetensors").keys()
    train.main(train.parse_args(argv + ["--out_dir", str(tmp_path / "cut")]))  # the same command again: it resumes
    assert_same_metrics(metrics_without_timing(tmp_path / "cut"), metrics_without_timing(tmp_path / "full"))
    a, b = weights(tmp_path / "full" / "policy"), weights(tmp_path / "cut" / "policy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The merged policy: the plain model's keys, and the LoRA policy's log-probs (base + adapters).
    import peft
    sft, tok = load_model(checkpoints.root / "neox")
    assert a.keys() == weights(checkpoints.root / "neox").keys()
    lora = peft.PeftModel.from_pretrained(load_model(checkpoints.root / "neox")[0], tmp_path / "full" / "checkpoint")
    merged = load_model(tmp_path / "full" / "policy")[0]
    rows = data.encode_responses(data.prepare_tokenizer(tok), ["Review of the pizza:"] * 2, [" great", " awful"], 16, 8)
    lora_logps, merged_logps = sail.sequence_logps_of(lora, *rows), sail.sequence_logps_of(merged, *rows)
    assert torch.allclose(lora_logps, merged_logps, atol=1e-5) and not torch.allclose(merged_logps, sail.sequence_logps_of(sft, *rows))
    ids = tok("Review of the pizza:", return_tensors="pt")["input_ids"]
    assert merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                           pad_token_id=tok.pad_token_id).shape[1] > ids.shape[1]


# ---------------------------------------------------------------------------------------------
# distributed.py: torchrun, 2 processes on the CPU (gloo)

def torchrun(*argv):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--", "train.py", *argv]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # should a rank ever crash, its Python stack is in stderr
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

def test_two_ranks_of_half_the_batch_equal_one_rank_of_the_whole(tmp_path, checkpoints):
    """Offline DPO on 2 ranks x 4 pairs is the update of 1 rank x 8 pairs. What is invariant is
    checked, not the weights' largest difference: Adam divides by sqrt(v), so float-rounding noise
    in a near-zero gradient (the sum order differs with the split) moves a few coordinates by up to
    lr either way, by an amount that depends on the machine."""
    argv = ["--model", str(checkpoints.root / "gpt2"), "--pairs", checkpoints.pairs, "--prompts", checkpoints.prompts,
            "--method", "dpo", "--steps", "2", "--batch_size", "8", "--eval_samples", "1", "--max_new_tokens", "8",
            "--eval_every", "2"]
    torchrun(*argv, "--out_dir", str(tmp_path / "two"))
    train.main(train.parse_args([*argv, "--out_dir", str(tmp_path / "one")]))
    one, two = metrics_without_timing(tmp_path / "one"), metrics_without_timing(tmp_path / "two")
    # The same loss at every step (step 1: the same forward; step 2: the same update before it).
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], abs=1e-6)
    # The same gradient before the first update: its norm, averaged over ranks by DDP.
    assert one[0]["grad_norm"] == pytest.approx(two[0]["grad_norm"], rel=1e-5)
    # The weights: their mean difference is rounding noise next to the mean update (~1e-3 per step).
    sft, a, b = weights(checkpoints.root / "gpt2"), weights(tmp_path / "one" / "policy"), weights(tmp_path / "two" / "policy")
    update = torch.cat([(a[k] - sft[k]).abs().flatten() for k in a]).mean()
    noise = torch.cat([(a[k] - b[k]).abs().flatten() for k in a]).mean()
    assert update > 1e-4 and noise < 1e-3 * update, (noise, update)

def test_an_online_method_with_lora_under_two_ranks(tmp_path, checkpoints):
    """SAIL-PR with SAIL-RevKL's penalty on 2 ranks, DDP over a peft model: each rank samples and
    labels its own 4 pairs of a step (and its own samples of the reference); one process prints
    (rank 0); the oracle queries are summed over ranks (2 steps x 8 pairs); the run itself checks at
    its end that both ranks hold the same weights, adapters included (finish_ddp), and the adapters
    trained."""
    out = tmp_path / "out"
    result = torchrun("--model", str(checkpoints.root / "gpt2"), "--prompts", checkpoints.prompts, "--method", "sail-pr", "--g", "1",
                      "--lora_rank", "4", "--lr", "1e-2", "--revkl", "0.1", "--steps", "2", "--batch_size", "8", "--eval_samples", "1",
                      "--max_new_tokens", "8", "--sample_every", "1", "--out_dir", str(out))
    assert result.stdout.count("step 2 | loss") == 1 and result.stdout.count("prompt ") == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["oracle_queries"] == 16
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "config.json", "metrics.jsonl", "policy", "reward.png", "summary.json"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert all("lora_" in k for k in weights(out / "checkpoint", "adapter_model.safetensors"))
    sft, merged = weights(checkpoints.root / "gpt2"), weights(out / "policy")  # saved merged: W + (alpha / r) B A
    assert merged.keys() == sft.keys() and any(not torch.equal(merged[k], sft[k]) for k in sft)


# ---------------------------------------------------------------------------------------------
# evaluation.py: the held-out prompts' two halves never share a prompt

def test_the_evaluation_halves_split_by_prompt_with_several_samples_and_an_odd_count(cache):
    """With 3 samples per held-out prompt and 5 prompts, the first half is the first 2 prompts' 6 rows,
    the second the other 3 prompts' 9: no prompt's responses straddle the halves, so a checkpoint
    chosen on one half and read on the other (experiments/frontier.py) is read on prompts it never saw."""
    from plumbing.evaluation import halves, make_eval_set
    cfg = train.parse_args(["--eval_samples", "3", "--cache_dir", cache, "--sft_steps", "40", "--max_new_tokens", "4"])
    inputs = data.load_inputs(cfg)
    inputs.eval_prompts, inputs.eval_pairs = inputs.eval_prompts[:5], None
    run = train.setup_run(cfg, inputs, torch.device("cpu"))
    eval_set = make_eval_set(run, inputs, train.reference_logps)
    p = inputs.eval_prompts
    assert eval_set.prompts == [x for x in p for _ in range(3)] and eval_set.cut == 6
    assert not set(eval_set.prompts[:eval_set.cut]) & set(eval_set.prompts[eval_set.cut:])
    assert halves(eval_set, x=torch.arange(15.0)) == {"x_a": 2.5, "x_b": 10.0}  # rows 0-5, rows 6-14


def test_the_accuracy_on_unseen_texts_is_the_accuracy_on_those_held_out_pairs_alone(cache):
    """eval_acc_unseen: the implicit reward's accuracy on the held-out pairs whose texts are in no
    training pair (data.unseen_pairs), recomputed here pair by pair after a perturbation of the policy."""
    from plumbing.evaluation import make_eval_set
    cfg = train.parse_args(["--eval_samples", "1", "--cache_dir", cache, "--sft_steps", "40", "--max_new_tokens", "4"])
    inputs = data.load_inputs(cfg)
    inputs.eval_prompts, inputs.eval_pairs = inputs.eval_prompts[:4], inputs.eval_pairs[:40]
    run = train.setup_run(cfg, inputs, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for w in run.policy.parameters():
            w.add_(0.05 * torch.randn_like(w))
    eval_set = make_eval_set(run, inputs, train.reference_logps)
    unseen = data.unseen_pairs(inputs.pairs, inputs.eval_pairs)
    assert eval_set.unseen.tolist() == unseen and 0 < sum(unseen) < 40
    out = train.evaluate(run, eval_set, None)[0]
    right = []
    for x, new in zip(inputs.eval_pairs, unseen):
        if new:
            batch = data.encode_responses(run.tokenizer, [x["prompt"]] * 2, [x["chosen"], x["rejected"]], cfg.max_prompt_len, cfg.max_new_tokens)
            d = sail.sequence_logps_of(run.policy, *batch) - sail.sequence_logps_of(run.reference, *batch)  # (2,)
            right.append(float(d[0] > d[1]) + 0.5 * float(d[0] == d[1]))
    assert out["eval_acc_unseen"] == pytest.approx(sum(right) / len(right), abs=1e-6) and out["eval_acc_unseen"] != out["eval_acc"]


# ---------------------------------------------------------------------------------------------
# Units the mutation run found untested: ddp's shares of the draws, the checked rewards, the phase
# clock, the official term's baseline and size

def test_each_ranks_share_of_the_routes_and_streams_is_its_slice_of_one_draw(monkeypatch):
    """ShareOfRoutes: rank r's B routes are row r of one draw of N x B; ShareOfStream: ranks asking
    for 3 and 5 items take the first 3 and the next 5 of one draw of 8 (ranks asking unequal counts)."""
    import numpy as np
    from plumbing import distributed
    p = [0.4, 0.1, 0.2, 0.3]
    for seed in range(5):
        shares = [distributed.ShareOfRoutes(np.random.default_rng(seed), r, 2).choice(4, 4, p) for r in (0, 1)]
        assert np.concatenate(shares).tolist() == np.random.default_rng(seed).choice(4, size=8, p=p).tolist()
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda out, k: out.__setitem__(slice(None), [3, 5]))
    first = distributed.ShareOfStream(data.Stream(100, 7), 0, 2).next(3)
    second = distributed.ShareOfStream(data.Stream(100, 7), 1, 2).next(5)
    assert first + second == data.Stream(100, 7).next(8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_reward_of_either_kind_stops_the_run(tmp_path, bad):
    """FiniteRewards stops on NaN and on +-inf, for the oracle and for a separate labeller alike."""
    from plumbing import distributed
    good = lambda p, r: torch.ones(len(r))  # noqa: E731
    broken = lambda p, r: torch.tensor([1.0, bad])  # noqa: E731
    run = SimpleNamespace(labeller=good, gold=broken, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                          cfg=SimpleNamespace(out_dir=str(tmp_path)), world=1, device=torch.device("cpu"))
    distributed.stop_on_non_finite(run)
    assert run.labeller is not run.gold and torch.equal(run.labeller(["p"] * 2, ["a", "b"]), torch.ones(2))
    with pytest.raises(distributed.NonFinite) as stop:
        run.gold(["p"] * 2, ["a", "b"])
    assert stop.value.args[0] == "an oracle reward" and str(stop.value.args[1]) == str(bad)
    with pytest.raises(SystemExit, match=rf"^error: step 7: an oracle reward is {bad}; stopped before the update. No checkpoint"):
        with distributed.stop_at("step 7", tmp_path):
            run.gold(["p"] * 2, ["a", "b"])


def test_the_phase_clock_adds_up_each_phase_and_starts_empty():
    import time
    f = outputs.timed("x")(lambda: time.sleep(0.02))
    outputs.Clock()
    f()
    f()
    assert outputs.Clock().stop()[0] == {}  # a new step's clock starts empty
    clock = outputs.Clock()
    f()
    f()
    phases, seconds = clock.stop()
    assert phases["x"] >= 0.04 and seconds >= phases["x"]


def test_the_official_terms_baseline_and_size():
    """The official sizes have no baseline and a pair's weight summed over each rank's pairs
    (batch / ranks); official-sign keeps the exact term's baseline and --response_scale."""
    from extensions.official import RESPONSE_TERMS, has_baseline, response_scale
    cfg = lambda term: SimpleNamespace(response_term=term, batch_size=8, response_scale=0.1)  # noqa: E731
    assert [has_baseline(cfg(t)) for t in RESPONSE_TERMS] == [True, False, False, True]
    assert [response_scale(cfg(t), 2) for t in RESPONSE_TERMS] == [0.1, 4.0, 4.0, 0.1]


# ---------------------------------------------------------------------------------------------
# tasks.py: the embedded tasks beyond the review task, and --task

@pytest.mark.parametrize("response,expected", [
    (" the pizza is fresh .", 4.0),          # the key word of food (+3), on topic (+1)
    (" the pizza is red .", 1.0),            # on topic alone
    (" the pizza is wireless .", 1.0),       # a gadget's key word: a decoy, worth nothing
    (" it is fresh .", 3.0),                 # the key word without the subject
    (" the soup is fresh .", 3.0),           # another subject: off topic, the key word still counts
    (" fresh , fresh , fresh .", 2.0),       # +3, -0.5 per repeat, off topic
    (" the pizza is fresh", 3.0),            # unfinished: -1
    (" the taste is warm .", 1.0),           # an aspect of food is on topic
    (" the pizza and the soup are fresh .", 3.0),  # two subjects: off topic
    (" the pizza is fresh . ", 4.0),         # a trailing space: still finished
    ("", -2.0),
])
def test_explore_reward_by_hand(response, expected):
    assert tasks.explore_reward("Describe the pizza:", response) == expected


@pytest.mark.parametrize("name", ["explore", "offpolicy"])
def test_each_task_is_deterministic_held_out_and_labelled_by_its_gold_reward(name):
    a, b = tasks.TASKS[name](0), tasks.TASKS[name](0)
    assert a.pairs[:5] == b.pairs[:5] and a.sft[:5] == b.sft[:5] and a.eval_prompts == b.eval_prompts
    assert a.pairs[:5] != tasks.TASKS[name](1).pairs[:5]
    assert not set(a.train_prompts) & set(a.eval_prompts) and len(a.eval_prompts) == 64 and len(a.train_prompts) == 128
    assert {x["prompt"] for x in a.pairs} <= set(a.train_prompts) and {x["prompt"] for x in a.eval_pairs} <= set(a.eval_prompts)
    assert all(a.gold(x["prompt"], x["chosen"]) > a.gold(x["prompt"], x["rejected"]) for x in a.pairs + a.eval_pairs)
    assert min(x["labels"] for x in a.pairs) == 1 and len(a.pairs) == 4096 and len(a.eval_pairs) == 256
    assert a.gold is {"explore": tasks.explore_reward, "offpolicy": reward.gold_reward}[name]


TASK_DIGESTS = {  # sha256 (first 16 hex) of each task's texts, per field: hashed at 878d4e1, where the figures of docs/ were made
    ("review", 0): {"sft": "65916f783ab7ace4", "train_prompts": "79c9bd7fc44ef0ab", "eval_prompts": "5dff6d897193035f", "pairs": "5de9c6b3962c8553", "eval_pairs": "85110c0ca807f2ac"},
    ("review", 1): {"sft": "0f07813686019698", "train_prompts": "6020d41c97d3a550", "eval_prompts": "12d40a3fbc587709", "pairs": "8f912d9b7c61e4d5", "eval_pairs": "78574fb79b500e28"},
    ("explore", 0): {"sft": "05317eed38cc624e", "train_prompts": "b1679f931cb44f8a", "eval_prompts": "e5427e141ff47803", "pairs": "29721246bf96946d", "eval_pairs": "003fd6a5240bad6b"},
    ("explore", 1): {"sft": "68ef32269ef7d788", "train_prompts": "67af4015e543a3fa", "eval_prompts": "3e244d7b70bdf87d", "pairs": "1ed76981974ee594", "eval_pairs": "f130cd44065f6d92"},
    ("offpolicy", 0): {"sft": "65916f783ab7ace4", "train_prompts": "79c9bd7fc44ef0ab", "eval_prompts": "5dff6d897193035f", "pairs": "e2be71e5cd7215f7", "eval_pairs": "bf5ac12cc412454b"},
    ("offpolicy", 1): {"sft": "0f07813686019698", "train_prompts": "6020d41c97d3a550", "eval_prompts": "12d40a3fbc587709", "pairs": "58ffdf45eb34f4c8", "eval_pairs": "4efc336d496c87c8"},
}


@pytest.mark.parametrize("name, seed", sorted(TASK_DIGESTS))
def test_each_tasks_texts_are_the_ones_its_results_were_made_on(name, seed):
    """Every text of every task (its SFT corpus, prompts, offline and held-out pairs, at --task_seed 0
    and 1) hashes as when docs/tasks.md and docs/results.md were measured: a change to a task's
    templates, words, rates or random draws fails here, field by field."""
    import hashlib

    task = tasks.TASKS[name](seed)
    digests = {f: hashlib.sha256(json.dumps(getattr(task, f)).encode()).hexdigest()[:16] for f in TASK_DIGESTS[name, seed]}
    assert digests == TASK_DIGESTS[name, seed]


def test_the_tasks_draw_their_texts_from_streams_of_their_own():
    import random
    assert set(tasks.STREAM_ID) == set(tasks.TASKS) - {"review"} and len(set(tasks.STREAM_ID.values())) == len(tasks.STREAM_ID)
    firsts = [tuple(tasks.task_rng(0, name).random() for _ in range(3)) for name in tasks.STREAM_ID]
    firsts.append(tuple(random.Random(0).random() for _ in range(3)))  # the review task's stream (data.make_task)
    firsts += [tuple(tasks.task_rng(1, name).random() for _ in range(3)) for name in tasks.STREAM_ID]
    assert len(set(firsts)) == len(firsts)


def test_the_explore_tasks_best_responses_are_rare_in_its_sft_corpus():
    """The corpus says the subject's key word in 5% of its texts (the SFT model's samples: measured by
    experiments/tasks.py, about 2%); nothing scores above 4, which a short sentence reaches."""
    task = tasks.make_explore_task(0)
    rewards = [task.gold(p, y) for p, y in task.sft]
    top = sum(r >= 3 for r in rewards) / len(rewards)
    assert 0.03 < top < 0.06 and max(rewards) == 4.0 and sum(rewards) / len(rewards) < 1.0
    decoys = sum(any(w in y.split() for w in tasks.KEY_WORDS.values()) and task.gold(p, y) < 3 for p, y in task.sft) / len(task.sft)
    assert 0.03 < decoys < 0.06  # another category's key word, as often


@pytest.mark.parametrize("rate", [0.005, 0.01, 0.02, 0.2])
def test_the_explore_tasks_key_rate_is_a_dial_on_its_corpus_alone(rate):
    """--explore_key_rate: the share of SFT texts saying the subject's own key word is the rate, and as
    many say another category's (within 4 binomial standard deviations of 20000 texts, by hand); the
    gold reward is the same function at every rate and labels every pair (chosen scores at least the
    rejected); the prompts do not move; at 0.05 it is the task the digests above pin."""
    own = lambda p, y: tasks.KEY_WORDS[tasks.CATEGORY_OF[tasks.subject_of(p)]] in y.split()  # noqa: E731
    task, default = tasks.make_explore_task(0, explore_key_rate=rate), tasks.make_explore_task(0)
    n, sd = len(task.sft), (rate * (1 - rate) / len(task.sft)) ** 0.5
    share = sum(own(p, y) for p, y in task.sft) / n
    decoy = sum(any(w in y.split() for w in tasks.KEY_WORDS.values()) and not own(p, y) for p, y in task.sft) / n
    assert abs(share - rate) < 4 * sd and abs(decoy - rate) < 4 * sd
    assert task.gold is tasks.explore_reward is default.gold
    assert all(task.gold(x["prompt"], x["chosen"]) >= task.gold(x["prompt"], x["rejected"]) for x in task.pairs)
    assert (task.train_prompts, task.eval_prompts) == (default.train_prompts, default.eval_prompts)
    assert data.embedded_task(train.parse_args(["--task", "explore", "--explore_key_rate", str(rate)])).sft == task.sft
    assert data.embedded_task(train.parse_args(["--task", "explore"])).sft == default.sft


def test_the_key_rate_is_refused_outside_the_explore_task_and_its_range():
    for argv, message in ((["--explore_key_rate", "0.02"], "--explore_key_rate 0.02 sets the explore task's corpus: use it with --task explore"),
                          (["--task", "explore", "--explore_key_rate", "0.6"], "--explore_key_rate must be in (0, 0.5]"),
                          (["--task", "explore", "--explore_key_rate", "0"], "--explore_key_rate must be in (0, 0.5]")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            train.parse_args(argv)


def test_the_offpolicy_task_is_the_review_task_but_an_opener_on_each_offline_response():
    """Everything but the pairs is the review task's; each response of a pair (held-out pairs too) is
    an opener of OPENERS, drawn from the task's own stream, then the review pair's response: the gold
    reward, hence chosen and rejected, and each pair's label cost are the review pair's."""
    import random
    review, off = data.make_task(0), tasks.make_offpolicy_task(0)
    assert off.sft == review.sft and off.train_prompts == review.train_prompts and off.eval_prompts == review.eval_prompts
    rng, sft_words = tasks.task_rng(0, "offpolicy"), {w for _, y in review.sft for w in y.split()}
    for x, y in zip(off.pairs + off.eval_pairs, review.pairs + review.eval_pairs):
        assert x["prompt"] == y["prompt"] and x["labels"] == y.get("labels")
        for k in ("chosen", "rejected"):
            assert x[k] == " " + rng.choice(tasks.OPENERS) + y[k]
            assert reward.gold_reward(x["prompt"], x[k]) == reward.gold_reward(y["prompt"], y[k])
    assert all(set(o.split()) - {","} and not set(o.split()) & (sft_words - {","}) for o in tasks.OPENERS)  # words the corpus never uses
    assert rng.random() != random.Random(0).random()


def test_the_task_option_picks_the_prompts_pairs_gold_reward_and_sft_model(tmp_path, monkeypatch):
    for name in tasks.TASKS:
        cfg = train.parse_args(["--task", name, "--cache_dir", str(tmp_path)])
        inputs, task = data.load_inputs(cfg), tasks.TASKS[name](0)
        assert inputs.task.gold is task.gold and inputs.train_prompts == task.train_prompts and inputs.pairs == task.pairs
        assert inputs.eval_prompts == task.eval_prompts
    assert data.embedded_path(train.parse_args([])) == os.path.join(".cache", "embedded-sft-task0-steps600")  # the review task's, as before
    explore = os.path.basename(data.embedded_path(train.parse_args(["--task", "explore"])))
    assert explore.startswith("embedded-sft-explore-") and explore.endswith("-task0-steps600")  # and a digest of its SFT corpus:
    other = os.path.basename(data.embedded_path(train.parse_args(["--task", "explore", "--explore_key_rate", "0.1"])))
    assert other != explore and other.startswith("embedded-sft-explore-")  # another corpus, another model


def test_a_run_on_the_explore_task_is_scored_by_its_gold_reward(tmp_path, monkeypatch):
    task, scored, real = tasks.make_explore_task(0), [], tasks.explore_reward
    building = 2 * sum(x["labels"] for x in task.pairs + task.eval_pairs)  # the calls that label the task's pairs: 2 per candidate pair

    def spy(prompt, response):
        scored.append(prompt)
        return real(prompt, response)

    monkeypatch.setattr(tasks, "explore_reward", spy)  # the task built in the run takes it as its gold reward
    argv = ["--task", "explore", "--steps", "2", "--batch_size", "4", "--sft_steps", "20", "--sft_batch_size", "16",
            "--cache_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path / "o"), *FAST[2:]]
    train.main(train.parse_args(argv))
    assert len(scored) > building and set(scored) <= set(task.train_prompts + task.eval_prompts)  # its online pairs and evaluations too
    assert os.path.isdir(data.embedded_path(train.parse_args(argv)))


def test_labelled_pairs_by_hand():
    """A tie is dropped and its label charged to the next pair kept; the chosen response is the gold reward's."""
    import random
    texts = iter(["a", "b", "a", "c", "c", "a"])  # a tie (a, b: both 0), then (a, c) and (c, a)
    pairs = data.labelled_pairs(random.Random(0), ["P"], 2, lambda rng, p: next(texts), lambda p, y: float(y == "c"))
    assert [(x["chosen"], x["rejected"], x["labels"]) for x in pairs] == [("c", "a", 2), ("c", "a", 1)]


def test_an_explore_decoy_is_another_categorys_key_word_and_the_corpus_covers_every_prompt():
    first = SimpleNamespace(random=lambda: 0.07, choice=lambda xs: list(xs)[0])  # in the decoy band (0.05 to 0.1); the first of each choice
    assert tasks.make_description(first, "pizza") == " the pizza is classic ."  # film's key word, not food's "fresh"
    task = tasks.make_explore_task(0)
    assert {p for p, _ in task.sft} == set(task.train_prompts + task.eval_prompts)


def test_the_task_follows_task_seed_not_seed():
    assert data.embedded_task(train.parse_args(["--task", "explore", "--seed", "3"])).pairs[:5] == tasks.make_explore_task(0).pairs[:5]


def test_the_code_revision_is_a_digest_of_the_source_a_run_executes(tmp_path):
    """summary.json's "code": one digest for one source; a change to any file a run executes changes
    it, a test file or a file outside SOURCE does not; without git, no commit."""
    for f in outputs.SOURCE:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        if f.endswith(".py"):
            (tmp_path / f).write_text(f"# {f}\n")
        else:
            (tmp_path / f).mkdir(exist_ok=True)
            (tmp_path / f / "a.py").write_text("x = 1\n")
    first = outputs.code_revision(str(tmp_path))
    assert first["commit"] is None and first["dirty"] is None and len(first["digest"]) == 64
    (tmp_path / "plumbing" / "test_a.py").write_text("y = 2\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "b.py").write_text("y = 2\n")
    assert outputs.code_revision(str(tmp_path)) == first
    for changed in ("sail.py", "extensions/a.py"):
        text = (tmp_path / changed).read_text()
        (tmp_path / changed).write_text(text + " ")
        assert outputs.code_revision(str(tmp_path))["digest"] != first["digest"], changed
        (tmp_path / changed).write_text(text)
    assert outputs.code_revision(str(tmp_path)) == first
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(git + args, check=True)
    committed = outputs.code_revision(str(tmp_path))
    assert committed["digest"] == first["digest"] and len(committed["commit"]) == 40 and committed["dirty"] is False
    (tmp_path / "notes.txt").write_text("not source")
    assert outputs.code_revision(str(tmp_path))["dirty"] is False
    (tmp_path / "sail.py").write_text("changed")
    assert outputs.code_revision(str(tmp_path))["dirty"] is True
