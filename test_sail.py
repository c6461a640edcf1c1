"""
test_sail.py: the tests of the four modules (sail.py, reward.py, data.py, train.py); they pin numbers.
Run: `python -m pytest -q test_sail.py` (under a minute on 2 CPU cores); `python -m pytest -q` runs it
with plumbing/test_plumbing.py and experiments/test_experiments.py.

  * losses: DPO and SAIL values and gradients computed by hand
  * masks: log-prob masks and sampled-response masks against literal tensors
  * padding: a sequence's log-probs and greedy continuation do not depend on its batch or padding
  * the exact-gradient check for SAIL-PR, SAIL-PP and SAIL-DP (and SELM, XPO) on a tabular policy
  * labellers, the gold reward, the HF reward-model wrapper, JSONL errors
  * one step of train.py recomputed by hand: each route's loss and self-labels, the RevKL penalty,
    the logged figures, the evaluation and the summary; bad data files refused with file, line, field
  * end to end: `python train.py` for a few steps changes the policy and writes a full summary
"""
import contextlib
import copy
import functools
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import reward
import train
from extensions import step as extended
from plumbing import models
import sail
from extensions import revkl as ext_revkl
from extensions.official import RESPONSE_TERMS, official_sail_loss
from extensions.official import response_scale as official_response_scale
from extensions.selm import selm_loss
from extensions.xpo import xpo_loss
from sail import dpo_loss, leave_one_out_mean, sail_loss, sample, sample_token, sequence_logps

HERE = os.path.dirname(os.path.abspath(__file__))
t = torch.tensor


# ---------------------------------------------------------------------------------------------
# Losses, by hand

# One pair: pi(y_w) = -1, pi(y_l) = -2, ref(y_w) = ref(y_l) = -1.5, beta = 0.5
# => h = (-1 + 1.5) - (-2 + 1.5) = 1, l = log sigmoid(0.5) = -0.4740769841801067.
PAIR = dict(policy_chosen_logps=t([-1.0]), policy_rejected_logps=t([-2.0]),
            reference_chosen_logps=t([-1.5]), reference_rejected_logps=t([-1.5]), beta=0.5)


def test_dpo_loss_by_hand():
    losses, chosen_rewards, rejected_rewards = dpo_loss(**PAIR)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(0.4740769841801067, abs=1e-6)  # log(1 + e^-0.5)
    assert chosen_rewards.item() == pytest.approx(0.25) and rejected_rewards.item() == pytest.approx(-0.25)


def test_sail_loss_by_hand_value_and_gradient():
    pair = {k: (v.clone().double().requires_grad_() if torch.is_tensor(v) else v) for k, v in PAIR.items()}
    losses, _, _ = sail_loss(**pair, label_coef=0.2, response_coef=0.3, baseline=0.1)
    # -l - 0.5 * 0.2 * l^2 + 0.3 * (-l - 0.1) * (-1 - 2) = 0.474077 - 0.022475 - 0.336669
    assert losses.item() == pytest.approx(0.11493279972508014, abs=1e-12)
    losses.sum().backward()
    # d/d pi(y_w) = -beta sigmoid(-beta h) (1 + 0.2 l) + 0.3 (-l - 0.1): the stop-gradient keeps
    # the response term's weight constant; d/d ref(y_w) has only the DPO and label parts.
    assert pair["policy_chosen_logps"].grad.item() == pytest.approx(-0.05864890497812417, abs=1e-12)
    assert pair["policy_rejected_logps"].grad.item() == pytest.approx(0.28309509548618816, abs=1e-12)
    assert pair["reference_chosen_logps"].grad.item() == pytest.approx(0.17087200023215618, abs=1e-12)


def test_sail_loss_without_extra_terms_is_dpo():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(8, generator=g) * 5 for _ in range(4)]
    assert torch.equal(sail_loss(*args, 0.1)[0], dpo_loss(*args, 0.1)[0])


def test_selm_and_xpo_losses_by_hand():
    # The pair above (-l = 0.4740769841801067) and a reference response y~ with log pi(y~) = -3,
    # log ref(y~) = -4: SELM adds alpha * beta * (-3 + 4), XPO adds alpha * (-3).
    selm, _, _ = selm_loss(**PAIR, policy_explore_logps=t([-3.0]), reference_explore_logps=t([-4.0]), alpha=0.2)
    assert selm.item() == pytest.approx(0.4740769841801067 + 0.2 * 0.5 * 1.0, abs=1e-6)
    xpo, _, _ = xpo_loss(**PAIR, policy_explore_logps=t([-3.0]), alpha=0.01)
    assert xpo.item() == pytest.approx(0.4740769841801067 - 0.03, abs=1e-6)


@pytest.mark.parametrize("method", ["SELM", "XPO"])
def test_selm_and_xpo_gradients_on_a_tabular_policy(method):
    """Pairs from a fixed distribution mu, y~ the reference's greedy response (SELM) or a sample of
    it (XPO): the expected surrogate gradient is minus the gradient of
    J = E_mu[l] - alpha beta Delta(y~_greedy) (SELM), J = E_mu[l] - alpha E_ref[log pi(y~)] (XPO)."""
    K, beta, alpha = 5, 0.7, 0.3
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
    L_ref = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    mu = torch.softmax(torch.randn(K * K, generator=g, dtype=torch.float64), 0).view(K, K)  # P(y_w = i, y_l = j)
    greedy = int(L_ref.argmax())

    def grad(f):
        return torch.autograd.grad(f(torch.log_softmax(theta, 0)), theta)[0]

    def J(L):
        dpo = sum(mu[i, j] * F.logsigmoid(beta * ((L[i] - L_ref[i]) - (L[j] - L_ref[j]))) for i in range(K) for j in range(K))
        if method == "SELM":
            return dpo - alpha * beta * (L[greedy] - L_ref[greedy])
        return dpo - alpha * (L_ref.exp() * L).sum()

    def expected_surrogate(L):
        total = 0.0
        explore = [(greedy, 1.0)] if method == "SELM" else [(k, L_ref[k].exp()) for k in range(K)]
        for i in range(K):
            for j in range(K):
                for y, q in explore:
                    pair = (L[i:i + 1], L[j:j + 1], L_ref[i:i + 1], L_ref[j:j + 1], beta)
                    if method == "SELM":
                        loss = selm_loss(*pair, policy_explore_logps=L[y:y + 1], reference_explore_logps=L_ref[y:y + 1], alpha=alpha)[0]
                    else:
                        loss = xpo_loss(*pair, policy_explore_logps=L[y:y + 1], alpha=alpha)[0]
                    total = total + mu[i, j] * q * loss.sum()
        return total

    assert torch.allclose(grad(expected_surrogate), -grad(J), rtol=1e-10, atol=1e-13)


def test_the_official_response_term_has_the_gradient_of_the_official_hook():
    """The official code registers a hook on each response's log-prob that adds -coef * l / L(y)
    to its gradient (whatever the loss's mean). official_sail_loss(variant="official") with the
    coefficient times the batch size, averaged, gives the parameters the same gradient."""
    B, beta, coef = 3, 0.5, 0.3
    g = torch.Generator().manual_seed(4)
    theta0 = torch.randn(B, 2, generator=g, dtype=torch.float64)
    ref_w, ref_l = (-F.softplus(torch.randn(B, generator=g, dtype=torch.float64)) - 2 for _ in range(2))

    def logps(theta):  # (B,) each: the policy's log-probs of y_w and y_l, functions of the parameters
        return -F.softplus(theta[:, 0]) - 1.0, -F.softplus(theta[:, 1]) - 3.0

    hooked = theta0.clone().requires_grad_()
    L_w, L_l = logps(hooked)
    ell = F.logsigmoid(beta * ((L_w - ref_w) - (L_l - ref_l))).detach()
    for L in (L_w, L_l):
        L.register_hook(lambda grad, L=L: grad - coef * ell / L.detach())  # the official code's hook
    dpo_loss(L_w, L_l, ref_w, ref_l, beta)[0].mean().backward()

    ours = theta0.clone().requires_grad_()
    official_sail_loss(*logps(ours), ref_w, ref_l, beta, response_coef=coef * B, variant="official")[0].mean().backward()
    assert torch.allclose(ours.grad, hooked.grad, rtol=1e-12, atol=1e-15)
    # ... and it is not the exact term: that one pushes both log-probs the other way
    exact = theta0.clone().requires_grad_()
    sail_loss(*logps(exact), ref_w, ref_l, beta, response_coef=coef)[0].mean().backward()
    plain = theta0.clone().requires_grad_()
    dpo_loss(*logps(plain), ref_w, ref_l, beta)[0].mean().backward()
    assert ((ours.grad - plain.grad) * (exact.grad - plain.grad) < 0).all()


@pytest.mark.parametrize("term,sign,per_response", [
    ("exact", 1, lambda cost, b, L: cost - b), ("official", -1, lambda cost, b, L: cost / abs(L)),
    ("official-size", 1, lambda cost, b, L: cost / abs(L)), ("official-sign", -1, lambda cost, b, L: cost - b)])
def test_each_response_terms_gradient_per_pair_by_hand(term, sign, per_response):
    """What each response term adds to the gradient of L(y_w) and L(y_l) of one pair (PAIR: L(y_w) = -1,
    L(y_l) = -2, -l = 0.4740769841801067), beyond DPO's: the exact term +c (-l - b); the official hook
    -c (-l) / |L(y)| (no baseline); official-size its size at the exact sign; official-sign its sign
    at the exact size."""
    c, b, cost = 0.3, 0.1, 0.4740769841801067
    pair = {k: (v.clone().double().requires_grad_() if torch.is_tensor(v) else v) for k, v in PAIR.items()}
    loss = sail_loss if term == "exact" else functools.partial(official_sail_loss, variant=term)
    loss(**pair, response_coef=c, baseline=b)[0].sum().backward()
    dpo = {k: (v.clone().double().requires_grad_() if torch.is_tensor(v) else v) for k, v in PAIR.items()}
    dpo_loss(**dpo)[0].sum().backward()
    for name, L in (("policy_chosen_logps", -1.0), ("policy_rejected_logps", -2.0)):
        added = pair[name].grad.item() - dpo[name].grad.item()
        assert added == pytest.approx(sign * c * per_response(cost, b, L), abs=1e-12), name


def test_official_ties_keep_the_sample_order_and_get_the_hook():
    """A tied SAIL-PR pair under --ties first (the -official rows): y1 stays chosen and the pair is a
    preference, as the official trainer's strict `<` swap leaves it, so the official hook and the DPO
    term act on (y1, y2); under --ties average it is marked a tie (the fair coin). Either way it is a
    query and a tie. The gradient of the official term's pair losses (extensions/step.py) then equals the official code's hook's."""
    prompts, texts = ["p0", "p1"], ["a", "b", "c", "d"]  # pair 0: (a, c), a tie; pair 1: (b, d), d better
    pairs = SimpleNamespace(route=np.array([sail.PR, sail.PR]), prompts=prompts, texts=texts)
    oracle = lambda p, y: t([1.0, 0.0, 1.0, 2.0])  # noqa: E731  scores of a, b, c, d
    labels = {}
    for ties in ("average", "first"):
        run = SimpleNamespace(cfg=SimpleNamespace(label_mode="hard", ties=ties), labeller=oracle)
        labels[ties] = train.oracle_labels(run, SimpleNamespace(label_gen=None), pairs)
        assert (labels[ties].queries, labels[ties].ties) == (2, 1)
    assert labels["average"].y1_wins.tolist() == [False, False] and labels["average"].valid.tolist() == [False, True]
    assert labels["first"].y1_wins.tolist() == [True, False] and labels["first"].valid.tolist() == [True, True]

    beta, coef, B = 0.5, 0.25, 2  # coef exact in float32, as train.coefficients makes it
    run = SimpleNamespace(cfg=SimpleNamespace(method="sail-pr", beta=beta, response_term="official", rho=0.0, pi=0.0, gamma=coef,
                                              response_scale=0.1, batch_size=B), device=torch.device("cpu"), world=1)
    theta0 = t([0.3, -0.8, 1.1, 0.4], dtype=torch.float64)  # rows y1 of both pairs, then y2
    ref = t([-2.5, -3.0, -2.0, -4.0], dtype=torch.float64)

    def logps(theta):
        return -F.softplus(theta) - 1.5  # (4,) log-probs < 0, functions of the parameters

    ours = theta0.clone().requires_grad_()
    idx, pairs.extension = torch.arange(2), {}
    extended.pair_losses(run, train, pairs, labels["first"], None, idx, logps(ours), ref).mean().backward()
    hooked = theta0.clone().requires_grad_()
    L = logps(hooked)
    L_w, L_l = torch.stack([L[0], L[3]]), torch.stack([L[2], L[1]])  # pair 0: y1 chosen (the tie); pair 1: y2 chosen
    r_w, r_l = torch.stack([ref[0], ref[3]]), torch.stack([ref[2], ref[1]])
    ell = F.logsigmoid(beta * ((L_w - r_w) - (L_l - r_l))).detach()
    for x in (L_w, L_l):
        x.register_hook(lambda grad, x=x: grad - coef * ell / x.detach())  # the official code's hook
    dpo_loss(L_w, L_l, r_w, r_l, beta)[0].mean().backward()
    assert torch.allclose(ours.grad, hooked.grad, rtol=1e-12, atol=1e-15)


def test_leave_one_out_mean():
    assert torch.allclose(leave_one_out_mean(t([1.0, 2.0, 6.0])), t([4.0, 3.5, 1.5]))
    assert torch.equal(leave_one_out_mean(t([5.0])), t([0.0]))  # no other entry: 0, as the docstring says (not 0/0)
    assert torch.equal(leave_one_out_mean(t([5.0]), t([True])), t([0.0]))


# ---------------------------------------------------------------------------------------------
# Log-prob masks and the sampler's masks, against literal tensors

def naive_logps(logits, labels, mask):
    """The same quantity with loops: sum over t >= 1 with mask[t] of log softmax(logits[t-1])[labels[t]]."""
    out = []
    for b in range(labels.shape[0]):
        total = 0.0
        for i in range(1, labels.shape[1]):
            if mask[b, i]:
                total += torch.log_softmax(logits[b, i - 1].double(), -1)[labels[b, i]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_sequence_logps_matches_naive_loop_and_masks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = t([[5, 6, 7, 8, 0, 0],   # prompt 5 6, response 7 8 + EOS(0), then padding
                [1, 1, 5, 7, 0, 3],   # two left pads (id 1), prompt 5, response 7 + EOS, an after-EOS token 3
                [5, 6, 7, 8, 9, 10]])  # prompt 5 6 7, response 8 9 10 cut by the length limit (no EOS)
    mask = t([[0, 0, 1, 1, 1, 0],
              [0, 0, 0, 1, 1, 0],
              [0, 0, 0, 1, 1, 1]])
    got = sequence_logps(logits, labels, mask)
    assert torch.allclose(got.double(), naive_logps(logits, labels, mask), atol=1e-5)
    # Whatever sits at masked positions (prompt, padding, after EOS) must not matter.
    other = labels.clone()
    other[mask == 0] = 2
    assert torch.allclose(sequence_logps(logits, other, mask), got)


class CountingModel(torch.nn.Module):
    """A stand-in causal LM with a scripted greedy continuation: after token k it prefers k + 1.
    It has the transformers call signature that `sample` uses (and ignores the cache)."""

    def __init__(self, vocab=8):
        super().__init__()
        self.vocab, self.calls = vocab, 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        self.calls += 1
        logits = 10.0 * F.one_hot((input_ids + 1) % self.vocab, self.vocab).float()  # (B, T, V)
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_sample_masks_first_eos_and_stops_early():
    eos = 7
    model = CountingModel()
    prompt_ids = t([[0, 0, 5],    # left-padded prompt ending in 5: responds 6, 7=EOS
                    [0, 2, 3]])   # prompt ending in 3: responds 4 5 6 7=EOS
    prompt_mask = t([[0, 0, 1], [0, 1, 1]])
    ids, attention, response = sample(model, prompt_ids, prompt_mask, max_new_tokens=10, temperature=0, eos_token_id=eos)
    assert ids.tolist() == [[0, 0, 5, 6, 7, 7, 7],   # row 0 ends at step 2; later tokens are EOS filler
                            [0, 2, 3, 4, 5, 6, 7]]   # row 1 ends at step 4: sampling stops there, not at 10
    assert response.tolist() == [[0, 0, 0, 1, 1, 0, 0],   # response 6 + EOS; the filler is masked
                                 [0, 0, 0, 1, 1, 1, 1]]   # response 4 5 6 + EOS
    assert attention.tolist() == [[0, 0, 1, 1, 1, 0, 0],   # left pad and filler masked
                                  [0, 1, 1, 1, 1, 1, 1]]
    assert model.calls == 4  # the prompt pass + 3 cached steps (the 4th token ends the last row)


def test_sample_token_draws_from_the_softmax():
    g = torch.Generator().manual_seed(0)
    logits = t([[2.0, 0.0, -1.0, 1.0, -30.0]]).repeat(200_000, 1)  # the last token has probability ~1e-14
    for temperature in (1.0, 0.5):
        draws = sample_token(logits, temperature, g)
        freq = torch.bincount(draws, minlength=5).double() / len(draws)
        assert torch.allclose(freq, torch.softmax(logits[0].double() / temperature, 0), atol=4e-3)
        assert freq[4] == 0


class FixedModel(torch.nn.Module):
    """A stand-in causal LM whose next-token logits are the same at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), past_key_values=None)


def test_sample_draws_at_its_temperature():
    """`sample` at temperature 0.5 draws from softmax(logits / 0.5): once, not twice, divided."""
    logits = t([2.0, 0.0, -1.0, 1.0])
    n = 100_000
    ids, _, response = sample(FixedModel(logits), torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                              max_new_tokens=1, temperature=0.5, eos_token_id=3, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids[:, 1], minlength=4).double() / n
    assert torch.allclose(freq, torch.softmax(logits.double() / 0.5, 0), atol=5e-3)  # (0.705, 0.013, 0.002, 0.260)
    assert response[:, 1].all()  # the first token is always part of the response, EOS (3) included


def tiny_causal_lm(arch, vocab=32, seed=0):
    """A randomly initialised GPT-2 or GPT-NeoX (Pythia's architecture: rotary positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                          bos_token_id=vocab - 1, eos_token_id=vocab - 1)).eval()
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=64,
                                            bos_token_id=0, eos_token_id=0, pad_token_id=1)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_logps_from_the_response_positions_alone_equal_those_from_every_position(arch):
    """sequence_logps_of asks the model for the logits from the position before the first response
    token on (logits_to_keep); the sum runs over the same width as with every position's logits,
    so the log-probs are the same bit for bit, and so are their gradients."""
    model = tiny_causal_lm(arch)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 30, (6, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[:2, :3] = 0  # left padding
    response = torch.zeros_like(ids)
    response[:, 7:11], response[4, 5:] = 1, 1  # responses from column 5 on: logits from position 4
    assert sail.forward_takes(model, "logits_to_keep")
    grads = []
    for logps in (lambda: sail.sequence_logps(sail.logits_of(model, ids, attention), ids, response),
                  lambda: sail.sequence_logps_of(model, ids, attention, response)):
        model.zero_grad()
        value = logps()
        value.sum().backward()
        grads.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0]) and all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
    assert sail.logits_of(model, ids, attention, keep=8).shape == (6, 8, 32)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_padding_invariance_of_logps_and_sampling(arch):
    """A sequence's log-prob must not change with its neighbours or its padding."""
    model = tiny_causal_lm(arch)
    alone = (t([[3, 4, 5, 6, 7]]), t([[1, 1, 1, 1, 1]]), t([[0, 0, 1, 1, 1]]))
    # The same sequence, left-padded by 3 and right-padded by 2, beside a longer neighbour.
    ids = t([[0, 0, 0, 3, 4, 5, 6, 7, 0, 0], [9, 8, 7, 6, 5, 4, 3, 2, 1, 2]])
    attention = t([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0], [1] * 10])
    response = t([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = sail.sequence_logps_of(model, *alone)
        b = sail.sequence_logps_of(model, ids, attention, response)
    assert a.item() == pytest.approx(b[0].item(), abs=1e-5)
    # Greedy continuation of a left-padded prompt equals that of the unpadded prompt.
    out_alone = sample(model, t([[3, 4, 5]]), t([[1, 1, 1]]), max_new_tokens=6, temperature=0, eos_token_id=30)
    out_batch = sample(model, t([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]]), t([[0, 0, 1, 1, 1], [1] * 5]),
                       max_new_tokens=6, temperature=0, eos_token_id=30)
    n = out_alone[0].shape[1] - 3
    assert out_batch[0][0, 5:5 + n].tolist() == out_alone[0][0, 3:].tolist()


# ---------------------------------------------------------------------------------------------
# The exact-gradient check: tabular softmax policy over K responses, float64

@pytest.mark.parametrize("variant", ["SAIL-PR", "SAIL-PP", "SAIL-DP"])
def test_expected_surrogate_gradient_equals_minus_grad_J(variant):
    K, beta = 4, 0.7
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
    L_ref = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    oracle_r = torch.randn(K, generator=g, dtype=torch.float64)  # oracle BT: P(w > l) = sigmoid(r_w - r_l)
    dataset = torch.softmax(torch.randn(K, K, generator=g, dtype=torch.float64).flatten(), 0).view(K, K)
    coefs = {"SAIL-PR": (0.0, 1.0), "SAIL-PP": (1.0, 1.0), "SAIL-DP": (1.0, 0.0)}[variant]  # (label, response)

    def expectation(L, surrogate, baseline=None, coef=coefs):
        """Enumerate responses (y1, y2) and labels: J if not surrogate, else E[surrogate loss]."""
        pi = L.exp()
        total = 0.0
        for i in range(K):
            for j in range(K):
                q = dataset[i, j] if variant == "SAIL-DP" else pi[i] * pi[j]  # P(y1 = i, y2 = j)
                for w, l in [(i, j), (j, i)]:  # both possible labels
                    h = (L[w] - L_ref[w]) - (L[l] - L_ref[l])
                    p_label = torch.sigmoid(oracle_r[w] - oracle_r[l]) if variant == "SAIL-PR" else torch.sigmoid(beta * h)
                    if surrogate:  # sampling probabilities are constants for the surrogate
                        loss, _, _ = sail_loss(L[w:w + 1], L[l:l + 1], L_ref[w:w + 1], L_ref[l:l + 1], beta,
                                               label_coef=coef[0], response_coef=coef[1], baseline=baseline)
                        total = total + (q * p_label).detach() * loss.sum()
                    else:
                        total = total + q * p_label * F.logsigmoid(beta * h)
        return total

    def grad(f):
        return torch.autograd.grad(f(torch.log_softmax(theta, 0)), theta)[0]

    grad_J = grad(lambda L: expectation(L, surrogate=False))
    grad_surrogate = grad(lambda L: expectation(L, surrogate=True))
    assert torch.allclose(grad_surrogate, -grad_J, rtol=1e-10, atol=1e-13), (grad_surrogate, -grad_J)
    # A constant baseline changes no expected gradient; dropping the extra terms does.
    assert torch.allclose(grad(lambda L: expectation(L, True, baseline=0.37)), -grad_J, rtol=1e-10, atol=1e-13)
    dpo_only = grad(lambda L: expectation(L, True, coef=(0.0, 0.0)))
    assert (dpo_only + grad_J).abs().max() > 1e-3


def tabular(seed=1, K=4):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
    L_ref = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    return theta, L_ref


def old_pair_value(h, beta, valid=None):
    """The valuation this project used before: a tie worth 0 = sup l (what the tests below must reject)."""
    ell = F.logsigmoid(beta * h)
    return ell if valid is None else torch.where(valid, ell, 0.0)


def test_expected_gradient_is_exact_with_tied_hard_labels(monkeypatch):
    """Hard oracle labels with ties (responses 2 and 3 score the same, and y1 = y2 always ties):
    J = E[v], v = l for a preference and 1/2 [l(h) + l(-h)] for a tie (Bradley-Terry's fair coin).
    The expected surrogate gradient is -grad J for any baseline, and with the official tie handling
    (y1 chosen) too, by the exchangeability of y1 and y2. It is not the gradient of the old J (a tie
    worth 0), and the surrogate written with the old valuation is not exact for the fair-coin J."""
    K, beta, b = 4, 0.7, 0.37
    theta, L_ref = tabular()
    r = t([0.3, -1.2, 0.8, 0.8], dtype=torch.float64)  # the oracle's rewards: 2 and 3 tie

    def expectation(L, surrogate, baseline=0.0, ties="average", value=sail.pair_value):
        pi, total = L.exp(), 0.0
        for i in range(K):
            for j in range(K):
                w, l = (i, j) if r[i] > r[j] or (r[i] == r[j] and ties == "first") else (j, i)
                valid = t([bool(r[i] != r[j]) or ties == "first"])
                if surrogate:
                    loss = sail_loss(L[w:w + 1], L[l:l + 1], L_ref[w:w + 1], L_ref[l:l + 1], beta, response_coef=1.0,
                                     baseline=baseline, valid=valid)[0]
                    total = total + (pi[i] * pi[j]).detach() * loss.sum()
                else:
                    h = (L[w:w + 1] - L_ref[w]) - (L[l:l + 1] - L_ref[l])
                    total = total + pi[i] * pi[j] * value(h, beta, valid).sum()
        return total

    def grad(f):
        return torch.autograd.grad(f(torch.log_softmax(theta, 0)), theta)[0]

    grad_J = grad(lambda L: expectation(L, False))
    for baseline in (0.0, b):
        for ties in ("average", "first"):
            assert torch.allclose(grad(lambda L: expectation(L, True, baseline, ties)), -grad_J, rtol=1e-10, atol=1e-13)
    grad_old_J = grad(lambda L: expectation(L, False, value=old_pair_value))
    assert (grad_old_J - grad_J).abs().max() > 1e-2 * grad_J.abs().max()  # the two objectives differ
    monkeypatch.setattr(sail, "pair_value", old_pair_value)  # the surrogate as it was: a tie's l counted as 0
    old = grad(lambda L: expectation(L, True, b))
    assert (old + grad_J).abs().max() > 1e-2 * grad_J.abs().max()  # not exact for the Bradley-Terry J


# ---------------------------------------------------------------------------------------------
# The objective is sensible, not only exact: gradient ascent on the enumerated J of a tabular policy

REWARDS = t([0.0, 1.0, 1.0, 3.0], dtype=torch.float64)  # the oracle: response 0 worst, 3 best, 1 and 2 tie
# (offline, SAIL-DP, SAIL-PP, SAIL-PR) routing of each objective; the paper's routing where offline pairs are mixed in
ROUTINGS = {"online DPO": (0, 0, 0, 1), "SAIL-PR": (0, 0, 0, 1), "SAIL-PR g=0.3": (0.7, 0, 0, 0.3),
            "SAIL-PP p=0.3": (0.7, 0, 0.3, 0), "SAIL-DP r=0.4": (0.6, 0.4, 0, 0), "mix r=0.2 p=0.2 g=0.3": (0.3, 0.2, 0.2, 0.3),
            "SAIL-PP p=1": (0, 0, 1, 0), "SAIL-DP r=1": (0, 1, 0, 0)}


def tabular_expected_loss(theta, routing, beta=0.3, extra_terms=True, rewards=REWARDS, revkl=0.0):
    """The expected surrogate loss of sail_loss over every pair (y1, y2) of a tabular policy
    softmax(theta) (N, K) and every label: hard oracle labels from `rewards` (ties included) on
    SAIL-PR pairs, self-labels z ~ Bernoulli(sigmoid(beta h)) on SAIL-DP and -PP pairs, and the
    dataset's own on offline pairs (every pair i > j of the oracle, equally likely; SAIL-DP draws
    its responses from them too). With extra_terms its gradient is -grad J (the exactness tests);
    without, it is online DPO's expected update (no response term). routing: (N, 4). revkl: the
    coefficient of SAIL-RevKL's penalty, extensions/revkl.reverse_kl of the one-token responses: exactly
    KL(pi_ref || pi_theta) here, pi_ref uniform."""
    N, K = theta.shape
    L = torch.log_softmax(theta, -1)  # (N, K)
    L_ref = torch.full((K,), -math.log(K), dtype=torch.float64)
    i, j = (x.flatten() for x in torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij"))  # (K^2,) every (y1, y2)
    dataset = (rewards[i] > rewards[j]).double()
    dataset = dataset / dataset.sum()  # (K^2,) P(pair) of the offline data
    on_policy = (L.exp()[:, i] * L.exp()[:, j]).detach()  # (N, K^2) P(y1, y2) under pi_theta, a constant
    h = (L[:, i] - L_ref[i]) - (L[:, j] - L_ref[j])  # (N, K^2) with y1 as the chosen response
    coef = 1.0 if extra_terms else 0.0

    def loss(w, l, **kw):  # sail_loss of the pairs (chosen w, rejected l), (N, K^2)
        return sail_loss(L[:, w], L[:, l], L_ref[w].expand(N, -1), L_ref[l].expand(N, -1), beta, **kw)[0]

    y1_first = torch.sigmoid(beta * h).detach()  # (N, K^2) P(z: y1 chosen) of a self-label
    self_labelled = y1_first * loss(i, j, label_coef=coef) + (1 - y1_first) * loss(j, i, label_coef=coef)
    pp = y1_first * loss(i, j, label_coef=coef, response_coef=coef) + (1 - y1_first) * loss(j, i, label_coef=coef, response_coef=coef)
    wins = rewards[i] >= rewards[j]
    w, l = torch.where(wins, i, j), torch.where(wins, j, i)
    pr = loss(w, l, response_coef=coef, valid=(rewards[i] != rewards[j]).expand(N, -1))
    per_route = torch.stack([(dataset * loss(i, j)).sum(-1), (dataset * self_labelled).sum(-1),
                             (on_policy * pp).sum(-1), (on_policy * pr).sum(-1)], -1)  # (N, 4)
    penalty = ext_revkl.reverse_kl(torch.stack([theta, theta], 1), torch.zeros(N, 2, K, dtype=theta.dtype), t([[0, 1]] * N))  # (N,)
    return (routing * per_route).sum() + revkl * penalty.sum()


def ascend(starts, routing, steps=200, lr=0.3, **kw):
    """Gradient ascent on J (descent on the expected surrogate loss), Adam, from each start (N, K)."""
    theta = starts.clone().requires_grad_()
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        tabular_expected_loss(theta, routing, **kw).backward()
        optimizer.step()
    return torch.softmax(theta.detach(), -1)


UNIFORM, NEAR_WORST = [0.0, 0, 0, 0], [2.0, 0, 0, 0]  # the second: 71% of the mass on the worst response


def sensible_runs(names, starts):
    rows = [(n, s) for n in names for s in starts]
    routing = t([ROUTINGS[n] for n, _ in rows], dtype=torch.float64)
    return rows, routing, t([s for _, s in rows], dtype=torch.float64)


def test_sails_objective_puts_most_mass_on_the_best_response_from_a_start_near_the_worst(monkeypatch):
    """SAIL-PR (every pair online) and SAIL-PR, -PP, -DP and the mixture at their paper-style
    routing with offline pairs mixed in, and online DPO's expected update: from a uniform start and
    from one with 71% of the mass on the worst response, ascent ends with most of the mass on the
    best (not from every start: see the local maximum of pure SAIL-PR below).
    The old valuation of a tie (0 = sup l) fails: pure SAIL-PR collapses onto the worst response,
    whose pairs then always tie."""
    names = [n for n in ROUTINGS if not n.endswith("=1")]
    rows, routing, starts = sensible_runs([n for n in names if n != "online DPO"], (UNIFORM, NEAR_WORST))
    pi = ascend(starts, routing)
    dpo_rows, dpo_routing, dpo_starts = sensible_runs(["online DPO"], (UNIFORM, NEAR_WORST))
    pi_dpo = ascend(dpo_starts, dpo_routing, extra_terms=False)
    for (name, start), p in list(zip(rows, pi)) + list(zip(dpo_rows, pi_dpo)):
        assert p[3] > 0.5 and p.argmax() == 3, (name, start, p)
    # pure SAIL-PR keeps some spread: two equal samples tie, worth -log 2, less than a won pair
    assert 0.55 < pi[rows.index(("SAIL-PR", UNIFORM))][3] < 0.9
    monkeypatch.setattr(sail, "pair_value", old_pair_value)
    _, routing, starts = sensible_runs(["SAIL-PR"], (NEAR_WORST,))
    assert ascend(starts, routing)[0, 0] > 0.99  # collapsed onto the worst response: J = 0, its maximum, with E[r] = 0


def test_a_purely_self_labelled_objective_amplifies_what_the_policy_prefers():
    """p = 1 or r = 1: no oracle label and no offline pair. J = E[-H(sigmoid(beta h))] rewards sure
    preferences, whichever way: from a start that prefers the worst response it ends on the worst,
    and its ascent does not change when the oracle's rewards are reversed (the oracle never enters;
    for SAIL-DP only the set of dataset pairs does, and it is the same set)."""
    for name in ("SAIL-PP p=1", "SAIL-DP r=1"):
        _, routing, starts = sensible_runs([name], (NEAR_WORST,))
        pi = ascend(starts, routing, steps=100)
        assert pi[0].argmax() == 0 and pi[0, 0] > 0.5, (name, pi)
        if name == "SAIL-PP p=1":
            assert torch.equal(pi, ascend(starts, routing, steps=100, rewards=-REWARDS))
    # the default mix (r, p, g = 0.4, 0.3, 0.3: no offline pair) follows its start too
    pi = ascend(torch.tensor([UNIFORM, NEAR_WORST], dtype=torch.float64), torch.tensor([[0, 0.4, 0.3, 0.3]] * 2, dtype=torch.float64))
    assert pi[0].argmax() == 3 and pi[1].argmax() == 0


def test_pure_sail_pr_has_a_local_maximum_at_the_worst_response_that_online_dpo_escapes():
    """J is not concave: with 95% of the mass on the worst response, pure SAIL-PR's ascent stays
    there (each better response is rare, so its implicit reward is low and its pairs are lost),
    while online DPO's expected update, which has no response term, moves to the best response."""
    _, routing, starts = sensible_runs(["SAIL-PR"], ([4.0, 0, 0, 0],))
    assert ascend(starts, routing)[0, 0] > 0.99
    assert ascend(starts, routing, extra_terms=False)[0, 3] > 0.5


# ---------------------------------------------------------------------------------------------
# SAIL-RevKL: KL(pi_ref || pi_theta), exact on a tabular policy of two-token responses; the authors' proxy by hand

def two_token_logits(first, second, noise):
    """Logits (K^2, 5, K) of every response y = (a, b) of a tabular two-token policy, laid out as a
    batch row [0, P, a, b, pad] with response mask [0, 0, 1, 1, 0]: position 1 predicts a (logits
    `first` (K,)), position 2 predicts b given a (`second` (K, K)); positions 0 and 3 (predicting
    the prompt token P and the padding) get `noise` (2, K), which the mask must leave out; position
    4 predicts nothing. Returns (logits, ids, response_mask)."""
    K = len(first)
    a, b = (x.flatten() for x in torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij"))
    n = K * K
    logits = torch.stack([noise[0].expand(n, K), first.expand(n, K), second[a], noise[1].expand(n, K), torch.zeros(n, K, dtype=first.dtype)], 1)
    ids = torch.stack([torch.zeros_like(a), torch.ones_like(a), a, b, torch.zeros_like(a)], 1)
    return logits, ids, t([[0, 0, 1, 1, 0]] * n)


def test_reverse_kl_is_unbiased_for_the_kl_and_its_gradient_on_samples_of_the_reference():
    """E_{y ~ pi_ref}[extensions/revkl.reverse_kl] is the enumerated sequence-level KL(pi_ref || pi_theta) of
    the responses, and so is the gradient's expectation (float64), whatever the positions outside
    the response mask hold (a prompt token and padding where the two models differ). In this
    example a sample's estimate varies less than the plain log-ratio's (usual, not guaranteed).
    On samples of the policy its expectation is another quantity."""
    K, g = 3, torch.Generator().manual_seed(3)
    theta = [torch.randn(K, generator=g, dtype=torch.float64).requires_grad_(), torch.randn(K, K, generator=g, dtype=torch.float64).requires_grad_()]
    phi = [torch.randn(K, generator=g, dtype=torch.float64), torch.randn(K, K, generator=g, dtype=torch.float64)]
    policy, ids, mask = two_token_logits(*theta, noise=torch.randn(2, K, generator=g, dtype=torch.float64))
    reference, _, _ = two_token_logits(*phi, noise=torch.randn(2, K, generator=g, dtype=torch.float64))
    log_pi, log_ref = sequence_logps(policy, ids, mask), sequence_logps(reference, ids, mask)  # (K^2,) every y
    assert log_ref.exp().sum().item() == pytest.approx(1.0)  # the responses' distribution, prompt and padding left out
    kl = (log_ref.exp() * (log_ref - log_pi)).sum()  # enumerated KL(pi_ref || pi_theta)
    estimate = ext_revkl.reverse_kl(policy, reference, mask)  # (K^2,) per response
    expected = (log_ref.exp() * estimate).sum()  # y ~ pi_ref
    assert expected.item() == pytest.approx(kl.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(expected, theta, retain_graph=True), torch.autograd.grad(kl, theta, retain_graph=True)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    weights = log_ref.exp().detach()
    variance = [(weights * (x.detach() - kl.detach()) ** 2).sum() for x in (estimate, log_ref - log_pi)]
    assert variance[0] < variance[1]
    on_policy = (log_pi.exp() * estimate).sum()  # prefixes from pi_theta: not this KL
    assert abs(on_policy.item() - kl.item()) > 1e-2
    assert ext_revkl.reverse_kl(reference, reference, mask).abs().max() < 1e-12  # pi_theta = pi_ref: 0


def test_revkl_proxy_by_hand():
    """The authors' proxy: log pi_ref(y_t) - log pi_theta(y_t) averaged over every response token
    of the batch (pooled), scoring token t with the logits at position t, as their code does;
    aligned, with the logits at t - 1, which predict it. Two tokens, log-probabilities of log 1/2,
    log 1/4 and log 3/4 (logits [0, 0], [0, log 3], [log 3, 0])."""
    l3 = math.log(3)
    policy = t([[[0.0, 0.0], [l3, 0.0], [0.0, l3]], [[0.0, 0.0], [l3, 0.0], [0.0, l3]]])  # (2, 3, 2)
    reference = t([[[l3, 0.0], [0.0, 0.0], [0.0, 0.0]], [[l3, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    ids, response = t([[0, 1, 0], [0, 0, 1]]), t([[0, 1, 1], [0, 0, 1]])
    # row 1: token 1 at position 1: log 1/2 - log 1/4 = log 2; token 0 at position 2: log 1/2 - log 1/4 = log 2
    # row 2: token 1 at position 2: log 1/2 - log 3/4 = log 2/3; pooled over the 3 tokens
    assert ext_revkl.revkl_proxy(policy, reference, ids, response).item() == pytest.approx((2 * math.log(2) + math.log(2 / 3)) / 3)
    # aligned, row 1: token 1 from position 0: log 1/4 - log 1/2; token 0 from position 1: log 1/2 - log 3/4
    # row 2: token 1 from position 1: log 1/2 - log 1/4
    aligned = (math.log(1 / 2) + math.log(2 / 3) + math.log(2)) / 3
    assert ext_revkl.revkl_proxy(policy, reference, ids, response, aligned=True).item() == pytest.approx(aligned)
    assert ext_revkl.revkl_proxy(policy, policy, ids, response).item() == 0.0


def test_sails_objective_with_the_revkl_penalty_ends_on_the_best_response_and_escapes_the_local_maximum():
    """SAIL-RevKL on the tabular policy (pi_ref uniform): at coefficient 0.1 every routing above
    still ends with most of the mass on the best response from both starts, and pure SAIL-PR now
    leaves the local maximum at the worst response (95% of the mass) that it keeps without the
    penalty; at 10 the penalty dominates and the policy stays near pi_ref."""
    names = [n for n in ROUTINGS if not n.endswith("=1")]
    rows, routing, starts = sensible_runs([n for n in names if n != "online DPO"], (UNIFORM, NEAR_WORST))
    for (name, start), p in zip(rows, ascend(starts, routing, revkl=0.1)):
        assert p[3] > 0.5 and p.argmax() == 3, (name, start, p)
    _, routing, starts = sensible_runs(["SAIL-PR"], ([4.0, 0, 0, 0],))
    assert ascend(starts, routing, revkl=0.1)[0, 3] > 0.5
    _, routing, starts = sensible_runs(names, (NEAR_WORST,))
    assert (ascend(starts, routing, revkl=10.0) - 0.25).abs().max() < 0.05


@pytest.mark.parametrize("pool", ["loo", "loo-all"])
def test_leave_one_out_baselines_of_train_py_keep_the_gradient_exact(pool):
    """A batch of two SAIL-PR pairs (hard labels, ties) and one offline pair, the baseline made by
    train.response_baselines: enumerating both pairs' responses, the expected gradient of the
    batch's mean loss is minus the gradient of the batch's mean J."""
    K, beta = 4, 0.7
    theta, L_ref = tabular(seed=3)
    r = t([0.3, -1.2, 0.8, 0.8], dtype=torch.float64)
    route = np.array([sail.OFFLINE, sail.PR, sail.PR])
    run = SimpleNamespace(cfg=SimpleNamespace(baseline=pool, method="sail-pr", beta=beta, response_term="exact", rho=0.0, pi=1.0,
                                              gamma=1.0, response_scale=1.0), device=torch.device("cpu"))
    response_coefs = train.coefficients(run.cfg)[1].double()  # (0, 0, 1, 1)

    def batch(L, i1, j1, i2, j2):
        """(y1, y2) of the three pairs: the offline pair is (0, 1), labelled 0 > 1."""
        y1, y2 = [0, i1, i2], [1, j1, j2]
        wins = t([True, bool(r[i1] >= r[j1]), bool(r[i2] >= r[j2])])
        valid = t([True, bool(r[i1] != r[j1]), bool(r[i2] != r[j2])])
        return y1, y2, wins, valid

    def expectation(L, surrogate):
        pi, total = L.exp(), 0.0
        for i1, j1, i2, j2 in ((a, b, c, d) for a in range(K) for b in range(K) for c in range(K) for d in range(K)):
            y1, y2, wins, valid = batch(L, i1, j1, i2, j2)
            q = pi[i1] * pi[j1] * pi[i2] * pi[j2]
            rows = t(y1 + y2)
            w, l = train.order_pairs(wins, L[rows]), train.order_pairs(wins, L_ref[rows])
            if surrogate:
                labels = SimpleNamespace(y1_wins=wins, valid=valid)
                b = train.response_baselines(run, SimpleNamespace(route=route), labels, (L[rows] - L_ref[rows]).detach())
                loss = sail_loss(w[0], w[1], l[0], l[1], beta, response_coef=response_coefs[t(route)], baseline=b,
                                 valid=valid)[0]
                total = total + q.detach() * loss.mean()
            else:
                total = total + q * sail.pair_value((w[0] - l[0]) - (w[1] - l[1]), beta, valid).mean()
        return total

    grad_J = torch.autograd.grad(expectation(torch.log_softmax(theta, 0), False), theta)[0]
    grad_surrogate = torch.autograd.grad(expectation(torch.log_softmax(theta, 0), True), theta)[0]
    assert torch.allclose(grad_surrogate, -grad_J, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Labellers and the gold reward

def test_bradley_terry_hard_labels_and_ties():
    y1_wins, valid = reward.bradley_terry_label(t([2.0, 0.0, 1.0]), t([1.0, 3.0, 1.0]))
    assert y1_wins.tolist() == [True, False, False] and valid.tolist() == [True, True, False]  # tie is invalid
    y1_wins, valid = reward.bradley_terry_label(t([2.0, 0.0, 1.0]), t([1.0, 3.0, 1.0]), ties="first")
    assert y1_wins.tolist() == [True, False, True] and valid.tolist() == [True, True, True]  # the official order: y1 chosen


def test_sampled_labels_follow_their_probabilities():
    g = torch.Generator().manual_seed(0)
    n = 20000
    y1_wins, valid = reward.bradley_terry_label(torch.full((n,), 1.0), torch.zeros(n), "sampled", g)
    assert valid.all() and y1_wins.float().mean().item() == pytest.approx(1 / (1 + math.exp(-1)), abs=0.01)
    z = reward.self_label(torch.full((n,), -5.0), beta=0.2, generator=g)  # sigmoid(-1) = 0.269
    assert z.float().mean().item() == pytest.approx(1 / (1 + math.exp(1)), abs=0.01)


@pytest.mark.parametrize("response,expected", [
    (" the pizza was great and lovely .", 3.0),   # +2 sentiment, +1 on topic
    (" the taste was awful .", 0.0),              # an aspect of food is on topic: -1 + 1
    (" the burger was great .", 1.0),             # another subject: off topic
    (" great , great , great .", 0.0),            # counted once, -0.5 per repeat, off topic
    (" the pizza was not bad .", 2.0),            # negation flips
    (" the pizza was great", 1.0),                # unfinished: -1
    ("", -2.0),
])
def test_gold_reward(response, expected):
    assert reward.gold_reward("Review of the pizza:", response) == expected


def test_embedded_task_is_deterministic_and_has_headroom():
    a, b = data.make_task(3), data.make_task(3)
    assert a.pairs[:5] == b.pairs[:5] and a.eval_prompts == b.eval_prompts
    assert not set(a.train_prompts) & set(a.eval_prompts)
    assert {x["prompt"] for x in a.pairs} <= set(a.train_prompts) and {x["prompt"] for x in a.eval_pairs} <= set(a.eval_prompts)
    rewards = [reward.gold_reward(p, y) for p, y in a.sft[:2000]]
    assert sum(rewards) / len(rewards) < 1.0 and max(rewards) >= 3.0 and min(rewards) < 0  # good and bad responses
    assert all(reward.gold_reward(x["prompt"], x["chosen"]) > reward.gold_reward(x["prompt"], x["rejected"]) for x in a.pairs)
    # each pair's label cost: itself and the tied candidates dropped before it (about 23% of candidates tie)
    labels = [x["labels"] for x in a.pairs]
    assert min(labels) == 1 and 1.2 < sum(labels) / len(labels) < 1.4


def test_distinct_bigrams_by_hand():
    """The repetition figure of evaluation: per response, its distinct word bigrams over its bigrams."""
    from plumbing.evaluation import distinct_2
    assert distinct_2([" a b a b", "a b c", "x"]) == pytest.approx((2 / 3 + 1 + 1) / 3)  # (a b), (b a), (a b): 2 of 3


def test_stream_visits_every_item_once_per_epoch():
    s = data.Stream(10, seed=0)
    first, second = s.next(7) + s.next(3), s.next(10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10)) and first != second


def own_data(tmp_path, n_prompts=50, per_prompt=4):
    """A user's JSONL data in the usual shape of preference data: n_prompts prompts (one of them
    twice, an exact duplicate row) and per_prompt pairs for each."""
    prompts = [{"prompt": f"Review of thing {i}:"} for i in range(n_prompts)]
    pairs = [{"prompt": x["prompt"], "chosen": f" good {k} .", "rejected": f" bad {k} ."} for x in prompts for k in range(per_prompt)]
    return write_jsonl(tmp_path / "p.jsonl", prompts + prompts[:1]), write_jsonl(tmp_path / "q.jsonl", pairs)


def assert_held_out(x):
    """No held-out prompt (an evaluation prompt, or the prompt of a held-out pair) reaches a training prompt or pair."""
    held = set(x.eval_prompts) | {q["prompt"] for q in x.eval_pairs or ()}
    assert not held & set(x.train_prompts) and not held & {q["prompt"] for q in x.pairs}


def test_one_file_of_prompts_and_one_of_pairs_split_by_prompt(tmp_path, capsys):
    """--prompts and --pairs without held-out files: a --holdout fraction of the distinct prompts,
    drawn once over both files, goes to evaluation with every row of those prompts, so the prompt
    and pair splits agree; the same seed gives the same split, another seed another."""
    p, q = own_data(tmp_path)
    cfg = train.parse_args(["--prompts", p, "--pairs", q])
    x = data.load_inputs(cfg)
    assert_held_out(x)
    assert len(set(x.eval_prompts)) == 5 and len(x.train_prompts) == 46  # 45 prompts, one twice
    assert {q["prompt"] for q in x.eval_pairs} == set(x.eval_prompts) and len(x.eval_pairs) == 20 and len(x.pairs) == 180
    out = capsys.readouterr().out
    assert "data: training 46 prompts and 180 pairs | held out 5 prompts and 20 pairs (0 with texts in no training pair), split by prompt" in out
    assert f"data: {p} holds 1 exact duplicate rows" in out
    assert data.load_inputs(cfg).eval_prompts == x.eval_prompts
    assert data.load_inputs(train.parse_args(["--prompts", p, "--pairs", q, "--task_seed", "1"])).eval_prompts != x.eval_prompts


def test_held_out_files_drop_the_training_rows_of_their_prompts(tmp_path, capsys):
    """With held-out files, the rows of the training files whose prompt they hold out are dropped,
    and counted: here the held-out prompts name prompts 0 and 1 and a new one, the held-out pairs
    prompt 2; a pair file without its held-out file still gives up a fraction of its own prompts."""
    p, q = own_data(tmp_path)
    ep = write_jsonl(tmp_path / "ep.jsonl", [{"prompt": "Review of thing 0:"}, {"prompt": "Review of thing 1:"}, {"prompt": "new:"}])
    eq = write_jsonl(tmp_path / "eq.jsonl", [{"prompt": "Review of thing 2:", "chosen": " a .", "rejected": " b ."}])
    x = data.load_inputs(train.parse_args(["--prompts", p, "--pairs", q, "--eval_prompts", ep, "--eval_pairs", eq]))
    assert_held_out(x)
    assert len(x.train_prompts) == 51 - 4 and len(x.pairs) == 200 - 3 * 4  # 51 rows: prompt 0 is there twice
    assert "dropped 4 training prompts and 12 training pairs whose prompt is held out" in capsys.readouterr().out
    x = data.load_inputs(train.parse_args(["--prompts", p, "--pairs", q, "--eval_prompts", ep]))
    assert_held_out(x)
    assert x.eval_prompts == ["Review of thing 0:", "Review of thing 1:", "new:"] and len(x.eval_pairs) == 4 * (2 + 5)


def test_a_split_that_leaves_nothing_to_train_on_is_refused(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "only one:"}] * 3)
    with pytest.raises(data.DataError, match="every prompt is held out"):
        data.load_inputs(train.parse_args(["--prompts", p]))
    ep = write_jsonl(tmp_path / "ep.jsonl", [{"prompt": "x:"}, {"prompt": "x:"}])  # evaluation halves its prompts: two at least
    with pytest.raises(data.DataError, match="1 distinct held-out prompt; evaluation needs two at least"):
        data.load_inputs(train.parse_args(["--eval_prompts", ep]))


def test_held_out_prompts_are_distinct_and_a_held_out_file_may_cover_a_whole_training_file(tmp_path):
    """A prompts file written twice gives each held-out prompt once (evaluation halves them by
    prompt, so no prompt is on both halves); a held-out pair file naming every prompt of the
    prompts file leaves it nothing to train on: refused with one line, not a crash."""
    prompts = [{"prompt": f"p{i}:"} for i in range(40)]
    x = data.load_inputs(train.parse_args(["--prompts", write_jsonl(tmp_path / "p.jsonl", prompts * 2)]))
    assert len(x.eval_prompts) == len(set(x.eval_prompts)) == 4 and len(x.train_prompts) == 72
    two = write_jsonl(tmp_path / "two.jsonl", prompts[:2])
    eq = write_jsonl(tmp_path / "eq.jsonl", [{"prompt": x["prompt"], "chosen": " a", "rejected": " b"} for x in prompts[:2]])
    with pytest.raises(data.DataError, match="every prompt is held out"):
        data.load_inputs(train.parse_args(["--prompts", two, "--eval_pairs", eq]))


def test_the_embedded_task_splits_are_disjoint_and_nothing_is_dropped(capsys):
    x, task = data.load_inputs(train.parse_args([])), data.make_task(0)
    assert_held_out(x)
    assert (x.train_prompts, x.pairs, x.eval_prompts, x.eval_pairs) == (task.train_prompts, task.pairs, task.eval_prompts, task.eval_pairs)
    assert "dropped" not in capsys.readouterr().out


def test_held_out_pairs_with_unseen_texts_by_hand(capsys):
    """eval_acc_unseen's pairs: neither response is a training pair's text (chosen or rejected);
    the embedded task has 60 of its 256, which `load_inputs` says."""
    train_pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    held = [{"prompt": "x", "chosen": c, "rejected": r} for c, r in (("a", "e"), ("e", "d"), ("e", "f"), ("b", "c"), ("f", "g"))]
    assert data.unseen_pairs(train_pairs, held) == [False, False, True, False, True]
    assert data.unseen_pairs(None, held) == [True] * 5
    x = data.load_inputs(train.parse_args([]))
    assert sum(data.unseen_pairs(x.pairs, x.eval_pairs)) == 60 and "256 pairs (60 with texts in no training pair)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Tokenisation and batching, against literal tensors. One token per word, so every id can be
# read off by hand: [PAD] 0, [UNK] 1, <eos> 2, a 3, b 4, c 5, d 6, e 7.

def literal_tokenizer():
    tokenizer = word_tokenizer(["<eos>", "a", "b", "c", "d", "e"])
    tokenizer.eos_token = "<eos>"
    return data.prepare_tokenizer(tokenizer)


def test_encode_prompts_pads_on_the_left_and_keeps_the_end():
    ids, mask = data.encode_prompts(literal_tokenizer(), ["a b c", "d"], max_len=2)
    assert ids.tolist() == [[4, 5],    # "a b c" keeps its last 2 tokens: b c
                            [0, 6]]    # "d", padded on the left, so the response follows it directly
    assert mask.tolist() == [[1, 1],
                             [0, 1]]


def test_encode_responses_masks_the_response_and_its_eos_only():
    ids, attention, response = data.encode_responses(literal_tokenizer(), ["a", "b c"], ["c", "e e e e"],
                                                     max_prompt_len=4, max_response_len=3)
    assert ids.tolist() == [[0, 3, 5, 2, 0],    # pad | prompt a | response c <eos> | right pad
                            [4, 5, 7, 7, 7]]    # prompt b c | response e e e, cut at 3 tokens: no <eos>
    assert attention.tolist() == [[0, 1, 1, 1, 0],
                                  [1, 1, 1, 1, 1]]
    assert response.tolist() == [[0, 0, 1, 1, 0],   # the response and its EOS; not the prompt, not padding
                                 [0, 0, 1, 1, 1]]


def test_pad_cat_pads_each_batch_on_the_right_with_masked_padding():
    a = (t([[3, 4]]), t([[1, 1]]), t([[0, 1]]))
    b = (t([[5, 6, 7]]), t([[1, 1, 1]]), t([[0, 1, 1]]))
    ids, attention, response = data.pad_cat([a, b], pad_id=9)
    assert ids.tolist() == [[3, 4, 9], [5, 6, 7]]  # row of a, padded with pad_id; row of b
    assert attention.tolist() == [[1, 1, 0], [1, 1, 1]] and response.tolist() == [[0, 1, 0], [0, 1, 1]]


# ---------------------------------------------------------------------------------------------
# A Hugging Face reward model with its own tokenizer (built and saved here: no hub)

def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_hf_reward_model_scores_text_with_its_own_tokenizer(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    tokenizer = word_tokenizer(["review", "of", "the", "pizza", ":", "was", "great", "awful", "."])
    torch.manual_seed(0)
    config = lambda labels: GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=8, n_layer=1, n_head=2,  # noqa: E731
                                       num_labels=labels, pad_token_id=tokenizer.pad_token_id)
    model = GPT2ForSequenceClassification(config(1))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    rm = reward.HFRewardModel(str(tmp_path / "rm"), batch_size=2)
    scores = rm(["review of the pizza :"] * 3, [" the pizza was great .", " awful .", " the pizza was awful ."])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    # Scoring one text alone with its own tokenizer gives the same number (batching and padding do not matter).
    enc = tokenizer(["review of the pizza : awful ."], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == [2, 3, 4, 5, 6, 9, 10]  # its own word ids, not the policy's
    with torch.no_grad():
        alone = model.eval()(**enc).logits[0, 0]
    assert scores[1].item() == pytest.approx(alone.item(), abs=1e-5)
    # A classifier's named output, and (prompt, response) given as a text pair.
    GPT2ForSequenceClassification(config(2)).save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    clf = reward.HFRewardModel(str(tmp_path / "clf"), label="LABEL_1", text_pair=True)
    with torch.no_grad():
        pair = clf.model(**tokenizer(["review of the pizza :"], [" awful ."], return_tensors="pt")).logits[0, 1]
    assert clf(["review of the pizza :"], [" awful ."]).item() == pytest.approx(pair.item(), abs=1e-5)

    GPT2ForSequenceClassification(config(2)).save_pretrained(tmp_path / "rm2")  # a classifier, not a reward model
    tokenizer.save_pretrained(tmp_path / "rm2")
    with pytest.raises(reward.ModelError, match="one score per text"):
        reward.HFRewardModel(str(tmp_path / "rm2"))
    with pytest.raises(SystemExit, match="error: --reward_model .*rm2: expected one score per text"):  # before training
        train.cli(["--reward_model", str(tmp_path / "rm2"), "--out_dir", str(tmp_path / "o"), "--sft_steps", "40",
                   "--cache_dir", str(tmp_path / "cache")])


# ---------------------------------------------------------------------------------------------
# JSONL errors name the file, the line and the field

@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b"'], r":2: not valid JSON"),
    (['{"prompt": "a", "chosen": "b"}'], r":1: field 'rejected' is missing"),
    (['{"prompt": "a", "chosen": 3, "rejected": "c"}'], r":1: field 'chosen' must be a string, got int"),
    (['', '{"prompt": " ", "chosen": "b", "rejected": "c"}'], r":2: field 'prompt' is empty"),
    (['["prompt"]'], r":1: expected a JSON object"),
])
def test_pair_file_errors(tmp_path, lines, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=str(path).replace(".", r"\.") + message):
        data.load_pairs(str(path))


def test_missing_file_error(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.load_prompts(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------------------------
# A learned labeller: a Bradley-Terry reward model, the proxy of the gold reward

def test_bradley_terry_loss_and_gradient_by_hand():
    """-log sigmoid(r_w - r_l): margins 1 and -2 give log(1 + e^-1) and log(1 + e^2); the gradient
    on r_w is -sigmoid(-(r_w - r_l)), on r_l its opposite."""
    chosen, rejected = t([1.0, 0.0], dtype=torch.float64).requires_grad_(), t([0.0, 2.0], dtype=torch.float64).requires_grad_()
    losses = reward.bradley_terry_loss(chosen, rejected)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.exp(2))])
    losses.sum().backward()
    expected = [-1 / (1 + math.exp(1)), -1 / (1 + math.exp(-2))]  # -sigmoid(-1), -sigmoid(2)
    assert chosen.grad.tolist() == pytest.approx(expected) and rejected.grad.tolist() == pytest.approx([-x for x in expected])


def test_a_reward_model_fit_on_the_embedded_pairs_beats_chance_in_seconds(tmp_path, cache):
    """fit_reward_model: a tiny GPT-2 classifier, 60 steps on 1024 of the embedded task's pairs, is
    right on most of 128 held-out pairs (their labels are the gold reward's); it is saved with
    save_pretrained, loads as an HFRewardModel and fit.json holds the accuracy it gets."""
    from transformers import AutoTokenizer
    task, path = data.make_task(0), str(tmp_path / "proxy")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(cache, "embedded-sft-task0-steps40"))
    start = time.perf_counter()
    accuracy = reward.fit_reward_model(path, task.pairs[:1024], task.eval_pairs[:128], tokenizer, width=32, steps=60)
    assert time.perf_counter() - start < 30 and 0.6 < accuracy <= 1.0
    assert reward.pair_accuracy(reward.HFRewardModel(path), task.eval_pairs[:128]) == accuracy
    assert json.loads((tmp_path / "proxy" / "fit.json").read_text())["held_out_accuracy"] == accuracy


def test_a_reward_models_score_does_not_depend_on_its_batch(tmp_path, cache):
    """HFRewardModel pads on the right, so a GPT-2 reward model (learned absolute positions) gives a
    text the same score alone and beside a longer text, whatever padding side its tokenizer was
    saved with (the policy's tokenizer pads on the left)."""
    from transformers import AutoTokenizer
    task, path = data.make_task(0), str(tmp_path / "proxy")
    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(os.path.join(cache, "embedded-sft-task0-steps40")))
    assert tokenizer.padding_side == "left"  # as the policy's, which train.py gives the proxy it fits
    reward.fit_reward_model(path, task.pairs[:64], None, tokenizer, width=16, steps=3)
    proxy = reward.HFRewardModel(path)
    short, long = ("Rate the soup:", " good ."), ("Review of the pizza:", " the pizza was great and the taste was lovely .")
    alone = proxy([short[0]], [short[1]])
    beside = proxy([short[0], long[0]], [short[1], long[1]])
    assert alone[0].item() == pytest.approx(beside[0].item(), abs=1e-5)


PROXY = ["--proxy", "fit", "--proxy_pairs", "512", "--proxy_width", "16", "--proxy_steps", "30"]


def test_the_proxy_labels_the_online_pairs_and_the_gold_reward_stays_the_yardstick(tmp_path, cache):
    """--proxy fit: the online pairs' labels come from the proxy (an HFRewardModel, fit once and
    cached), evaluation scores with both (recomputed by hand: rewards, and win rates against the
    SFT model's scores by each), and metrics.jsonl, summary.json and the table say both."""
    argv = ["--method", "online-dpo", "--steps", "2", "--eval_every", "2", "--cache_dir", cache, "--out_dir", str(tmp_path / "o"),
            *PROXY, *SHORT]
    cfg = train.parse_args(argv)
    inputs = data.load_inputs(cfg)
    run = train.setup_run(cfg, inputs, torch.device("cpu"))
    assert isinstance(run.labeller, reward.HFRewardModel) and isinstance(run.gold, reward.GoldReward)
    state = train.State.new(cfg, run, len(inputs.train_prompts), len(inputs.pairs), history=[])
    pairs = train.build_pairs(run, state, 4)
    labels = train.oracle_labels(run, state, pairs)
    assert torch.equal(labels.scores, run.labeller(pairs.prompts * 2, pairs.texts))  # the proxy's scores, not the gold reward's
    assert [p.name for p in Path(cache).iterdir() if p.name.startswith("proxy-")] != []  # cached: the run below does not fit again
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train.main(train.parse_args(argv))
    assert "proxy: fit on" not in out.getvalue() and "held-out pair accuracy" in out.getvalue()
    assert "proxy reward (the labeller)" in out.getvalue()
    row, task = rows_of(tmp_path / "o")[-1], data.make_task(0)
    sft, tokenizer = load_model(os.path.join(cache, "embedded-sft-task0-steps40"))
    expected = evaluate_by_hand(load_model(tmp_path / "o" / "policy")[0], sft, tokenizer, task.eval_prompts, task.eval_pairs, 1.0, 0,
                                0.1, proxy=run.labeller)
    assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert row["eval_proxy_reward"] != row["eval_reward"] and 0 < row["eval_proxy_win"] < 1
    assert (summary["proxy_reward_final"], summary["proxy_win_rate_vs_sft"], summary["gold_reward_final"]) == \
        (row["eval_proxy_reward"], row["eval_proxy_win"], row["eval_reward"])
    assert summary["proxy_accuracy"] == reward.pair_accuracy(run.labeller, inputs.eval_pairs) and summary["proxy_fit_pairs"] == 512
    assert summary["gold_labels"] == row["gold_labels"] == int(run.pair_labels[:512].sum())  # online DPO: the proxy's fit pairs alone


class Fitted(Exception):
    pass


def test_the_proxy_is_fit_on_training_pairs_only(tmp_path, cache, monkeypatch):
    """--proxy fit on a user's own data: the pairs it is fit on hold no held-out prompt (an
    evaluation prompt, or a held-out pair's); the held-out pairs only measure it."""
    from transformers import AutoTokenizer
    p, q = own_data(tmp_path)
    cfg = train.parse_args(["--prompts", p, "--pairs", q, "--proxy", "fit", "--cache_dir", str(tmp_path / "c")])
    x, fit = data.load_inputs(cfg), {}

    def fit_reward_model(path, pairs, held_out, *args, **kwargs):
        fit.update(pairs=pairs, held_out=held_out)
        raise Fitted

    monkeypatch.setattr(reward, "fit_reward_model", fit_reward_model)
    with pytest.raises(Fitted):
        models.proxy_labeller(cfg, x, AutoTokenizer.from_pretrained(os.path.join(cache, "embedded-sft-task0-steps40")), torch.device("cpu"))
    held = set(x.eval_prompts) | {q["prompt"] for q in x.eval_pairs}
    assert len(fit["pairs"]) == 180 and not {q["prompt"] for q in fit["pairs"]} & held and fit["held_out"] == x.eval_pairs


def test_a_fitted_proxy_ranks_its_own_training_pairs_through_the_path_that_labels(tmp_path, cache):
    """The proxy that --proxy fit makes, loaded and called as it labels online pairs (an
    HFRewardModel, padding on the right), ranks the 128 pairs it was fit on right: a fit that saw
    its texts padded otherwise than they are scored would not."""
    from transformers import AutoTokenizer
    cfg = train.parse_args(["--proxy", "fit", "--proxy_pairs", "128", "--proxy_steps", "200", "--cache_dir", str(tmp_path)])
    inputs = data.load_inputs(cfg)
    labeller = models.proxy_labeller(cfg, inputs, AutoTokenizer.from_pretrained(os.path.join(cache, "embedded-sft-task0-steps40")),
                                     torch.device("cpu"))
    assert reward.pair_accuracy(labeller, inputs.pairs[:128]) >= 0.95


def test_a_proxy_that_is_not_a_reward_model_or_not_there_is_refused(tmp_path, cache):
    causal_lm = os.path.join(cache, "embedded-sft-task0-steps40")
    message = refusal(["--proxy", causal_lm, "--cache_dir", cache, "--sft_steps", "40", "--out_dir", str(tmp_path / "o")])
    assert message == f"error: --proxy {causal_lm}: is a GPT2LMHeadModel, not a sequence classifier (a reward model)"
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
    message = refusal(["--proxy", str(tmp_path / "missing")])
    assert message == f"error: --proxy {tmp_path / 'missing'}: no such directory; give fit, or a directory written by save_pretrained"


# ---------------------------------------------------------------------------------------------
# End to end

SUMMARY_KEYS = {"method", "gold_reward_sft", "gold_reward_final", "win_rate_vs_sft", "kl", "oracle_queries", "seconds"}
FAST = ["--sft_steps", "40", "--eval_samples", "1", "--eval_every", "2", "--sample_every", "2", "--max_new_tokens", "12"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding the embedded SFT model (40 steps of 16 texts), built once: every run below loads it the
    same way, whichever test runs first."""
    path = str(tmp_path_factory.mktemp("cache"))
    data.embedded_policy(train.parse_args(["--sft_steps", "40", "--sft_batch_size", "16", "--cache_dir", path]), data.make_task(0),
                         torch.device("cpu"))
    return path


@pytest.fixture(scope="module")
def few_eval_pairs(tmp_path_factory):
    """16 of the embedded task's 256 held-out pairs: evaluation is most of a short run's time."""
    return write_jsonl(tmp_path_factory.mktemp("eval") / "pairs.jsonl", data.make_task(0).eval_pairs[:16])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache, few_eval_pairs):
    """One short mixed run (offline, SAIL-DP, -PP and -PR pairs) three ways: uninterrupted; as
    `python train.py` killed with SIGKILL between checkpoints; and the same command again, which
    resumes (in this process, with its output captured: the code path of `python train.py`)."""
    root = tmp_path_factory.mktemp("runs")
    argv = ["--steps", "8", "--save_every", "2", "--batch_size", "8", "--method", "mix", "--r", "0.2", "--p", "0.3",
            "--g", "0.5", "--max_new_tokens", "10", "--eval_every", "4", "--sample_every", "4", "--eval_samples", "1",
            "--sft_steps", "40", "--cache_dir", cache, "--eval_pairs", few_eval_pairs]
    full, cut = root / "full", root / "cut"
    train.main(train.parse_args(argv + ["--out_dir", str(full)]))
    proc = subprocess.Popen([sys.executable, "train.py", *argv, "--out_dir", str(cut)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = cut / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.002)  # the kill must land mid-run, after step 3 (the last checkpoint is step 2)
    proc.kill()
    killed = proc.wait() == -9
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.cli(argv + ["--out_dir", str(cut)])  # the same command again
    return SimpleNamespace(full=full, cut=cut, killed=killed, resumed=out.getvalue())


def test_train_py_end_to_end(runs, cache):
    """`python train.py` as a user runs it: SFT, SAIL-PR steps, evaluation, outputs."""
    out = runs.cut
    assert "step 8 | loss" in runs.resumed and "win rate vs SFT" in runs.resumed
    assert "chosen " in runs.resumed and "rejected " in runs.resumed  # the sample display
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9)) and "eval_win" in lines[3]
    assert SUMMARY_KEYS <= set(summary) and 0 < summary["oracle_queries"] < 8 * 8  # self-labelled pairs cost none
    assert 0 <= summary["pair_accuracy_unseen_final"] <= 1 and len(summary["code"]["digest"]) == 64
    # The policy's parameters changed, and the saved policy loads back and generates.
    from transformers import AutoModelForCausalLM
    sft = AutoModelForCausalLM.from_pretrained(os.path.join(cache, "embedded-sft-task0-steps40"))
    policy = AutoModelForCausalLM.from_pretrained(out / "policy")
    changed = [n for (n, a), b in zip(sft.named_parameters(), policy.parameters()) if not torch.equal(a, b)]
    assert len(changed) == len(list(sft.parameters()))
    assert policy.generate(t([[1, 2]]), max_new_tokens=3, do_sample=False).shape[1] >= 3


# ---------------------------------------------------------------------------------------------
# A run's metrics and weights, as the tests here and in plumbing/test_plumbing.py compare them

TIMING = ("dt", "t_")


def metrics_without_timing(out_dir):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows_of(out_dir)]


def weights(path, file="model.safetensors"):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, file))


# What a resumed run guarantees (docs/reliability.md): the training itself is bit-identical
# (weights, every per-step training figure, the oracle-query and tie counts); so are the
# evaluation figures that come from sampled text (gold reward, win rate) or from a sign (pair
# accuracy). The two that are float sums over hundreds of held-out log-probs, eval_kl and
# eval_margin, are promised to 1e-6 relative: nothing in training depends on them, and their last
# bits rest on CPU math kernels that do not promise bitwise-equal results across processes.
EVAL_TOLERANT = ("eval_kl", "eval_margin")


def assert_same_metrics(a, b):
    assert len(a) == len(b) and [r.keys() for r in a] == [r.keys() for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in EVAL_TOLERANT} == {k: v for k, v in y.items() if k not in EVAL_TOLERANT}
        for k in EVAL_TOLERANT:
            if k in x:  # evaluation steps only
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), (x["step"], k)


# ---------------------------------------------------------------------------------------------
# What a run reports, recomputed here from its saved models with the project's small functions:
# a figure computed a little differently, a count that includes what it should leave out, or a
# random stream a resume forgets, makes one of these fail.

SHORT = ["--batch_size", "4", "--eval_samples", "1", "--eval_every", "100", "--sample_every", "100", "--sft_steps", "40"]


@pytest.fixture
def no_eval(monkeypatch):
    """For tests of the training step: skip the held-out evaluation (a second each run)."""
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: ({"eval_reward": 0.0, "eval_kl": 0.0, "eval_revkl": 0.0, "eval_win": 0.5}, None))


def load_model(path):
    """A saved policy as train.py sets it up: dropout off, the tokenizer padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    sail.disable_dropout(model)
    return model, data.prepare_tokenizer(AutoTokenizer.from_pretrained(path))


def rows_of(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_offline_step_recomputed_by_hand(tmp_path, cache, no_eval):
    """Offline DPO's step 2 from the step-1 policy: loss, accuracy, margin, log-ratio, tokens,
    gradient norm and label count, from the pairs the documented order gives (Stream, the pair stream's seed)."""
    argv = ["--method", "dpo", "--cache_dir", cache, "--out_dir", str(tmp_path / "run"), *SHORT]
    train.main(train.parse_args(argv + ["--steps", "1"]))
    step1 = tmp_path / "step1"
    (tmp_path / "run" / "policy").rename(step1)
    train.main(train.parse_args(argv + ["--steps", "2"]))  # resumes at step 2
    row = rows_of(tmp_path / "run")[1]

    task = data.make_task(0)
    policy, tokenizer = load_model(step1)
    reference, _ = load_model(os.path.join(cache, "embedded-sft-task0-steps40"))
    pairs = [task.pairs[i] for i in data.Stream(len(task.pairs), seed=train.stream_seeds(0)["pair"]).next(8)[4:]]  # step 2's 4 pairs
    batch = data.encode_responses(tokenizer, [x["prompt"] for x in pairs] * 2,
                                  [x["chosen"] for x in pairs] + [x["rejected"] for x in pairs], 32, 24)
    with torch.no_grad():
        ref = sail.sequence_logps_of(reference, *batch)  # (8,) chosen rows, then rejected rows
    logps = sail.sequence_logps_of(policy.train(), *batch)  # (8,)
    delta = (logps - ref).detach()  # (8,)
    h = delta[:4] - delta[4:]  # (4,)
    loss = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=0.1)[0].mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), float("inf"))  # the norm before clipping
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert row["acc"] == ((h > 0).float() + 0.5 * (h == 0).float()).mean().item()
    assert row["margin"] == pytest.approx((0.1 * h).mean().item(), rel=1e-5, abs=1e-7)
    assert row["kl"] is None  # no response was sampled: dataset rows say nothing of the policy's KL
    assert row["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-5)
    assert row["trained_tokens"] == int(batch[1].sum()) and row["generated_tokens"] == 0
    # 8 distinct dataset pairs, each costing the labels its dataset spent on it (the ties dropped before it too)
    spent = sum(task.pairs[i]["labels"] for i in data.Stream(len(task.pairs), seed=train.stream_seeds(0)["pair"]).next(8))
    assert row["oracle_queries"] == spent and row["ties"] == spent - 8 and row["oracle_reward"] is None


def test_an_online_step_recomputed_by_hand(tmp_path, cache, no_eval):
    """Online DPO's step 1 at temperature 0.7: the same samples from the same generator (the sampling
    stream's seed), so the same oracle scores, ties, tokens and queries; policy = reference, so h = 0
    exactly; the log-ratio of samples at 0.7 is not a KL estimate, so it is logged as log_ratio."""
    out = tmp_path / "run"
    train.main(train.parse_args(["--method", "online-dpo", "--temperature", "0.7", "--steps", "1", "--cache_dir", cache,
                                 "--out_dir", str(out), *SHORT]))
    row = rows_of(out)[0]
    task = data.make_task(0)
    sft, tokenizer = load_model(os.path.join(cache, "embedded-sft-task0-steps40"))
    prompts = [task.train_prompts[i] for i in data.Stream(len(task.train_prompts), seed=train.stream_seeds(0)["prompt"]).next(4)]
    ids, attention, response = sample(sft, *data.encode_prompts(tokenizer, prompts * 2, 32), max_new_tokens=24, temperature=0.7,
                                      eos_token_id=tokenizer.eos_token_id,
                                      generator=torch.Generator().manual_seed(train.stream_seeds(0)["sampling"]))
    scores = reward.GoldReward()(prompts * 2, data.decode(tokenizer, ids, response))  # (8,) y1 rows, then y2 rows
    assert row["oracle_reward"] == pytest.approx(scores.mean().item(), rel=1e-6)
    assert row["ties"] == int((scores[:4] == scores[4:]).sum()) and row["oracle_queries"] == 4
    assert row["tie_rate"] == row["ties"] / 4
    assert row["generated_tokens"] == int(response.sum()) and row["trained_tokens"] == int(attention.sum())
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6) and row["acc"] == 0.5  # h = 0: a tie of the implicit reward
    assert row["margin"] == 0 and row["log_ratio"] == 0 and "kl" not in row


def evaluate_by_hand(model, sft, tokenizer, prompts, pairs, temperature, seed, beta, proxy=None):
    """train.py's evaluation from its definition: one response per held-out prompt from a generator
    seeded with the evaluation stream's seed; the mean gold reward (and a proxy's); the mean
    log-ratio to the SFT model of responses drawn at temperature 1 (those, or at another
    temperature others, from the evaluation's KL stream: a KL estimate); KL(SFT || policy), extensions/revkl.reverse_kl on responses of the SFT model drawn at
    temperature 1 from its own stream; the win rates against the SFT model's responses drawn with
    the same noise (a tie is half a win); the implicit-reward accuracy and margin on the held-out pairs."""
    def draw(m, temperature, stream):
        return sample(m, *data.encode_prompts(tokenizer, prompts, 32), max_new_tokens=24, temperature=temperature,
                      eos_token_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(train.stream_seeds(seed)[stream]))

    def scores(m):
        texts = data.decode(tokenizer, *draw(m, temperature, "eval")[::2])
        return {"eval_": reward.GoldReward()(prompts, texts), **({"eval_proxy_": proxy(prompts, texts)} if proxy else {})}, texts

    with torch.no_grad():
        (mine, texts), (theirs, _) = scores(model), scores(sft)
        batch = draw(model, temperature, "eval") if temperature == 1 else draw(model, 1.0, "eval_kl")
        kl = sail.sequence_logps_of(model, *batch) - sail.sequence_logps_of(sft, *batch)
        ids, attention, response = draw(sft, 1.0, "eval_revkl")
        revkl = ext_revkl.reverse_kl(sail.logits_of(model, ids, attention), sail.logits_of(sft, ids, attention), response)
        rows = data.encode_responses(tokenizer, [x["prompt"] for x in pairs] * 2,
                                     [x["chosen"] for x in pairs] + [x["rejected"] for x in pairs], 32, 24)
        delta = sail.sequence_logps_of(model, *rows) - sail.sequence_logps_of(sft, *rows)
    h = delta[:len(pairs)] - delta[len(pairs):]
    out = {"eval_kl": kl.mean().item(), "eval_revkl": revkl.mean().item(),
           "eval_acc": ((h > 0).float() + 0.5 * (h == 0).float()).mean().item(), "eval_margin": (beta * h).mean().item()}
    for prefix, r in mine.items():
        out[prefix + "reward"] = r.mean().item()
        out[prefix + "win"] = ((r > theirs[prefix]).float() + 0.5 * (r == theirs[prefix]).float()).mean().item()
    bigrams = [list(zip(y.split(), y.split()[1:])) for y in texts]
    out["eval_distinct2"] = sum(len(set(b)) / len(b) if b else 1.0 for b in bigrams) / len(texts)
    half = len(prompts) // 2  # one response per prompt here: the first half of the prompts, then the second
    for name, v in (("eval_reward", mine["eval_"]), ("eval_kl", kl)):
        out[name + "_a"], out[name + "_b"] = v[:half].mean().item(), v[half:].mean().item()
    return out


def test_evaluation_and_summary_recomputed_by_hand(tmp_path, cache, few_eval_pairs):
    out, task = tmp_path / "run", data.make_task(0)
    prompts, pairs = task.eval_prompts[:16], task.eval_pairs[:16]  # few_eval_pairs holds these 16 pairs
    eval_prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": x} for x in prompts])
    train.main(train.parse_args(["--method", "sail-pr", "--g", "1", "--steps", "2", "--temperature", "0.8", "--beta", "0.2",
                                 "--eval_prompts", eval_prompts, "--eval_pairs", few_eval_pairs, "--cache_dir", cache,
                                 "--out_dir", str(out), *SHORT]))
    sft, tokenizer = load_model(os.path.join(cache, "embedded-sft-task0-steps40"))
    policy, _ = load_model(out / "policy")
    expected = evaluate_by_hand(policy, sft, tokenizer, prompts, pairs, 0.8, 0, 0.2)
    row, summary = rows_of(out)[-1], json.loads((out / "summary.json").read_text())
    assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert expected["eval_win"] not in (0.0, 1.0) and 0 < expected["eval_acc"] < 1  # not a degenerate check
    assert summary["gold_reward_sft"] == pytest.approx(evaluate_by_hand(sft, sft, tokenizer, prompts, pairs, 0.8, 0, 0.2)["eval_reward"])
    assert (summary["gold_reward_final"], summary["win_rate_vs_sft"], summary["kl"], summary["margin_final"],
            summary["pair_accuracy_final"]) == (row["eval_reward"], row["eval_win"], row["eval_kl"], row["eval_margin"], row["eval_acc"])
    assert summary["oracle_queries"] == row["oracle_queries"] == 8 and summary["ties"] == row["ties"]


def test_the_reference_is_frozen_and_never_trained(tmp_path, cache, no_eval, monkeypatch):
    """Every model that only ever runs without gradients is a reference: eval mode, no parameter
    requiring a gradient; and at the end of the run it still holds the SFT weights."""
    seen = {}  # id -> (model, ran with gradients at least once)
    real = train.sequence_logps_of

    def spy(model, *args):
        model = getattr(model, "module", model)
        seen[id(model)] = (model, seen.get(id(model), (None, False))[1] or torch.is_grad_enabled())
        return real(model, *args)

    monkeypatch.setattr(train, "sequence_logps_of", spy)
    train.main(train.parse_args(["--method", "mix", "--steps", "2", "--cache_dir", cache, "--out_dir", str(tmp_path), *SHORT]))
    references = [m for m, trained in seen.values() if not trained]
    assert len(seen) == 2 and len(references) == 1  # the policy and one frozen copy
    assert not references[0].training and not any(p.requires_grad for p in references[0].parameters())
    sft = weights(os.path.join(cache, "embedded-sft-task0-steps40"))
    assert all(torch.equal(p, sft[n]) for n, p in references[0].state_dict().items() if n in sft)


def test_response_coefficients_of_each_term(cache):
    """Per route (offline, SAIL-DP, SAIL-PP, SAIL-PR), with distinct coefficients: the label term's
    are (0, rho, pi, 0); the exact term's (0, 0, pi, gamma) times --response_scale, as is the
    official sign's; the official sizes' are summed over the batch, so they carry its size."""
    common = ["--method", "mix", "--batch_size", "8", "--cache_dir", cache, "--sft_steps", "40",
              "--rho", "0.11", "--pi", "0.23", "--gamma", "0.37", "--response_scale", "0.5"]
    for term in RESPONSE_TERMS:
        cfg = train.parse_args(common + ["--response_term", term])
        label, response = train.coefficients(cfg, official_response_scale(cfg, 1))
        assert label.tolist() == pytest.approx([0, 0.11, 0.23, 0])
        scale = 8 if term in ("official", "official-size") else 0.5
        assert response.tolist() == pytest.approx([0, 0, scale * 0.23, scale * 0.37]), term


@pytest.mark.parametrize("method", ["dpo", "online-dpo", "sail-pr", "sail-pp", "sail-dp", "mix", "selm", "xpo"])
def test_every_methods_routes_and_coefficients(method):
    """Each method's route probabilities (OFFLINE, DP, PP, PR) and each route's label- and
    response-term coefficients, at distinct option values: online DPO, SELM and XPO have no
    response term (gamma 0), every other method the paper's terms on its own routes."""
    cfg = train.parse_args(["--method", method, "--r", "0.125", "--p", "0.25", "--g", "0.375", "--rho", "0.11", "--pi", "0.23",
                            "--gamma", "0.37", "--response_scale", "0.5"])
    routes = {"dpo": [1, 0, 0, 0], "online-dpo": [0, 0, 0, 1], "sail-pr": [0.625, 0, 0, 0.375], "sail-pp": [0.75, 0, 0.25, 0],
              "sail-dp": [0.875, 0.125, 0, 0], "mix": [0.25, 0.125, 0.25, 0.375], "selm": [0, 0, 0, 1], "xpo": [0, 0, 0, 1]}
    assert list(train.METHODS[method](cfg)) == pytest.approx(routes[method])
    label, response = train.coefficients(cfg, cfg.response_scale)
    assert label.tolist() == pytest.approx([0, 0.11, 0.23, 0])
    gamma = 0.0 if method in ("online-dpo", "selm", "xpo") else 0.37
    assert response.tolist() == pytest.approx([0, 0, 0.5 * 0.23, 0.5 * gamma])


@pytest.mark.parametrize("method", ["mix --r 0.25 --p 0.25 --g 0.5", "dpo"])  # the mixture: every route
def test_the_extended_step_is_the_sail_step_on_a_plain_run(cache, method):
    """extensions/step.py's step with nothing to add (one device, one micro-batch, no extension) gives
    train.alignment_step's bits: the same pairs, labels, Delta, gradient and updated weights."""
    out = []
    for step in (train.alignment_step, lambda run, state: extended.alignment_step(run, state, sail_step=train.SAIL_STEP)):
        run, state = perturbed_run(cache, ["--method", *method.split()])
        assert train.is_plain(run)
        pairs, labels, delta, grad_norm = step(run, state)
        out.append((pairs.batch, labels.y1_wins, labels.valid, delta, grad_norm, gradient(run.policy),
                    torch.cat([p.detach().flatten() for p in run.policy.parameters()])))
    assert all(torch.equal(x, y) for x, y in zip(out[0][0], out[1][0]))  # the rows
    assert all(torch.equal(x, y) for x, y in zip(out[0][1:], out[1][1:]))  # labels, Delta, gradient, weights
    assert out[0][5].abs().max() > 0


@pytest.mark.parametrize("method", ["sail-pr --g 0.5", "mix --r 0.25 --p 0.25 --g 0.5", "online-dpo", "sail-pp --p 0.75",
                                    "sail-pr --g 0.5 --baseline loo-all", "mix --r 0.25 --p 0.25 --g 0.5 --baseline none"])
def test_one_alignment_step_by_hand(cache, method):
    """train.alignment_step checked against the README's pseudocode from what it returns, whatever
    order it draws its random numbers in (docs/exercises.md, 8: write the step): each dataset pair's
    rows are its dataset texts; each online pair's two rows are samples that end in EOS or at the
    length limit; SAIL-PR labels are the gold reward's (hard; a tie marked); Delta is
    L_theta - L_ref at the policy before the step; the gradient is that of the mean of the loss
    written out here from the README (not sail_loss), with the leave-one-out baseline over the
    pairs with a response term; the update is one AdamW step on it."""
    run, state = perturbed_run(cache, ["--method", *method.split(), "--lr", "1e-3"])
    cfg, B = run.cfg, run.cfg.batch_size
    before = copy.deepcopy(run.policy)
    pairs, labels, delta, grad_norm, samples = step_recording_samples(run, state)
    route, (ids, attention, response) = pairs.route, pairs.batch
    # 1. routes and responses
    assert len(route) == B and ids.shape[0] == 2 * B and len(pairs.texts) == 2 * B
    dataset = np.flatnonzero(route <= sail.DP)
    assert list(dataset) == list(range(len(dataset))) and len(pairs.pair_ids) == len(dataset)  # the dataset pairs first
    for i, x in zip(dataset, [run.pairs[j] for j in pairs.pair_ids]):
        assert (pairs.prompts[i], pairs.texts[i], pairs.texts[B + i]) == (x["prompt"], x["chosen"], x["rejected"])
    online = np.flatnonzero(route >= sail.PP)
    rows = np.r_[online, B + online]  # their y1 rows, then their y2 rows
    assert [pairs.texts[i] for i in rows] == data.decode(run.tokenizer, ids[rows], response[rows])
    check_online_responses(run, state, pairs, samples)
    for i in online:
        assert pairs.prompts[i] in run.train_prompts
        for row in (i, B + i):
            n = int(response[row].sum())
            last = ids[row][response[row].bool()][-1]
            assert 0 < n <= cfg.max_new_tokens and (last == run.tokenizer.eos_token_id or n == cfg.max_new_tokens)
    # 2. oracle labels of the SAIL-PR pairs: hard, a tie marked invalid
    for i in np.flatnonzero(route == sail.PR):
        r1, r2 = reward.GoldReward()([pairs.prompts[i]] * 2, [pairs.texts[i], pairs.texts[B + i]]).tolist()
        assert (bool(labels.y1_wins[i]), bool(labels.valid[i])) == (r1 > r2, r1 != r2)
    assert labels.valid[route != sail.PR].all()
    # 3. Delta at the policy before the step
    with torch.no_grad():
        ref = sail.sequence_logps_of(run.reference, ids, attention, response)
    logps = sail.sequence_logps_of(before, ids, attention, response)  # (2B,) with its graph
    assert torch.allclose(delta, (logps - ref).detach(), rtol=1e-5, atol=1e-5)
    # 4. + 5. each pair's loss written out (the self-labels are the step's own draws), the mean's gradient
    w = labels.y1_wins
    L_w, L_l = torch.where(w, logps[:B], logps[B:]), torch.where(w, logps[B:], logps[:B])
    h = (L_w - torch.where(w, ref[:B], ref[B:])) - (L_l - torch.where(w, ref[B:], ref[:B]))
    ell = F.logsigmoid(cfg.beta * h)
    v = torch.where(labels.valid, ell, 0.5 * (ell + F.logsigmoid(-cfg.beta * h)))  # a tie: the fair coin's value
    label_coef = t([0.0, cfg.rho, cfg.pi, 0.0])[route]
    gamma = 0.0 if cfg.method == "online-dpo" else cfg.gamma
    response_coef = cfg.response_scale * t([0.0, 0.0, cfg.pi, gamma])[route]
    cost = (-v).detach()
    pool = response_coef > 0 if cfg.baseline == "loo" else torch.ones(B, dtype=torch.bool)  # loo-all: every other pair
    b = t([cost[pool & (torch.arange(B) != i)].mean().item() if (pool & (torch.arange(B) != i)).any() else 0.0 for i in range(B)])
    b = b if cfg.baseline != "none" else torch.zeros(B)
    loss = -v - 0.5 * label_coef * torch.where(labels.valid, v, 0.0) ** 2 + response_coef * (cost - b) * (L_w + L_l)
    loss.mean().backward()
    assert torch.allclose(gradient(run.policy), gradient(before), rtol=1e-4, atol=1e-6)
    assert grad_norm.item() == pytest.approx(gradient(before).norm().item(), rel=1e-4)
    # 6. one AdamW step on the step's gradient (no clipping here: --grad_clip 0)
    for p, q in zip(before.parameters(), run.policy.parameters()):
        p.grad = q.grad.clone()
    torch.optim.AdamW(before.parameters(), lr=1e-3, weight_decay=0.0).step()
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(run.policy.parameters(), before.parameters()))


def step_recording_samples(run, state):
    """train.alignment_step, recording each call of sail.sample that build_pairs makes (its model,
    temperature, generator and the rows it returned)."""
    samples, sample = [], train.sample

    def recorded(model, *args, **kwargs):
        out = sample(model, *args, **kwargs)
        samples.append((model, kwargs.get("temperature"), kwargs.get("generator"), out))
        return out
    train.sample = recorded
    try:
        return (*train.alignment_step(run, state), samples)
    finally:
        train.sample = sample


def check_online_responses(run, state, pairs, samples):
    """The online pairs' responses, whatever order the step draws them in: two per pair, sampled
    from the policy itself (not the reference, not greedily: at --temperature with the sampling
    stream), each row after its own pair's prompt, and y1, y2 two samples, not one twice."""
    B, tok, (ids, attention, response) = len(pairs.route), run.tokenizer, pairs.batch
    online = np.flatnonzero(pairs.route >= sail.PP)
    if not len(online):
        return
    assert samples and all(m is run.policy and temp == run.cfg.temperature and gen is state.sampling_gen for m, temp, gen, _ in samples)
    drawn = {tuple(row[mask.bool()].tolist()) for *_, (ids_, _, response_) in samples for row, mask in zip(ids_, response_)}  # each sample's tokens
    for i in online:
        prompt = [x for x, m in zip(*(t[0].tolist() for t in data.encode_prompts(tok, [pairs.prompts[i]], run.cfg.max_prompt_len))) if m]
        for row in (i, B + i):
            assert tuple(ids[row][response[row].bool()].tolist()) in drawn  # a sample of the policy's
            assert ids[row][attention[row].bool() & ~response[row].bool()].tolist() == prompt  # after its own pair's prompt
    assert sum(pairs.texts[i] != pairs.texts[B + i] for i in online) > len(online) // 2  # two samples per prompt, not one twice


@pytest.mark.parametrize("method", ["sail-pp --p 0.5", "sail-dp --r 0.5", "mix --r 0.3 --p 0.3 --g 0.4"])
def test_self_labels_of_one_step_by_hand(cache, method):
    """The step's self-labels (docs/exercises.md, 8), whatever order it draws its random numbers in:
    at beta = 1e4 a SAIL-DP or SAIL-PP pair's label z ~ Bernoulli(sigmoid(beta h)), h = Delta(y1) -
    Delta(y2) at the policy before the update, is 1 exactly when h > 0 (|beta h| > 40: sigmoid is 0
    or 1 in float32), so skipping the self-labels, labelling with the oracle, with -h or without
    beta fails; the SAIL-PR pairs keep the oracle's labels, and the offline pairs y1 (their chosen)."""
    run, state = perturbed_run(cache, ["--method", *method.split(), "--beta", "1e4"])
    B = run.cfg.batch_size
    pairs, labels, delta, _, samples = step_recording_samples(run, state)
    check_online_responses(run, state, pairs, samples)
    h = delta[:B] - delta[B:]  # (B,)
    mine = np.flatnonzero((pairs.route == sail.DP) | (pairs.route == sail.PP))
    sure = [i for i in mine if abs(run.cfg.beta * h[i].item()) > 40]
    assert len(sure) >= 3  # the perturbed policy separates these pairs' responses
    assert [bool(labels.y1_wins[i]) for i in sure] == [bool(h[i] > 0) for i in sure]
    assert any(not labels.y1_wins[i] for i in sure) and any(labels.y1_wins[i] for i in sure)  # both ways: not y1 always
    assert labels.y1_wins[pairs.route == sail.OFFLINE].all() and labels.valid[pairs.route != sail.PR].all()
    for i in np.flatnonzero(pairs.route == sail.PR):
        r1, r2 = reward.GoldReward()([pairs.prompts[i]] * 2, [pairs.texts[i], pairs.texts[B + i]]).tolist()
        assert (bool(labels.y1_wins[i]), bool(labels.valid[i])) == (r1 > r2, r1 != r2)


def test_routes_are_drawn_when_the_offline_share_rounds_below_zero():
    """--method mix --r 0.3 --p 0.3 --g 0.4: 1 - r - p - g is -5.6e-17 in floating point; the routes
    are still drawn (clipped to 0), none of them offline."""
    run = SimpleNamespace(cfg=train.parse_args(["--method", "mix", "--r", "0.3", "--p", "0.3", "--g", "0.4"]))
    state = SimpleNamespace(route_rng=np.random.default_rng(0), pair_stream=data.Stream(100, 1), prompt_stream=data.Stream(100, 2))
    route, pair_ids, prompt_ids = train.draw_routes(run, state, 64)
    assert (route != sail.OFFLINE).all() and len(pair_ids) == int((route == sail.DP).sum()) and len(pair_ids) + len(prompt_ids) == 64


def test_self_labels_are_drawn_with_beta():
    """The self-labels of SAIL-DP pairs with h = 2 at beta 0.1 are reward.self_label's draws from the
    same generator: probability sigmoid(0.2) each, not sigmoid(2)."""
    B = 4000
    pairs, labels = SimpleNamespace(route=np.full(B, sail.DP)), SimpleNamespace(y1_wins=torch.ones(B, dtype=torch.bool))
    train.self_labels(SimpleNamespace(cfg=SimpleNamespace(beta=0.1)), SimpleNamespace(label_gen=torch.Generator().manual_seed(0)),
                      pairs, labels, t([2.0] * B + [0.0] * B))
    assert torch.equal(labels.y1_wins, reward.self_label(t([2.0] * B), 0.1, torch.Generator().manual_seed(0)))
    assert labels.y1_wins.float().mean().item() == pytest.approx(torch.sigmoid(t(0.2)).item(), abs=0.03)


@pytest.mark.parametrize("mode,ties", [("hard", 2), ("sampled", 0)])
def test_oracle_ties_are_counted_for_hard_labels_only(mode, ties):
    """Four SAIL-PR pairs and one offline, two of the four tied: hard labels count 2 ties in 4 queries;
    sampled labels give every pair a label (a tie a fair coin), so none is counted as a tie."""
    B = 5
    pairs = SimpleNamespace(route=np.array([sail.OFFLINE] + [sail.PR] * 4), prompts=["x"] * B, texts=[f"y{i}" for i in range(2 * B)])
    rewards = {"y1": 1.0, "y2": 0.0, "y3": 2.0, "y4": 3.0, "y6": 1.0, "y7": 1.0, "y8": 2.0, "y9": 0.0}  # pair i: y_i, y_(5+i); 1, 3 tied

    run = SimpleNamespace(cfg=SimpleNamespace(label_mode=mode, ties="average"),
                          labeller=lambda prompts, texts: t([rewards[y] for y in texts]))
    labels = train.oracle_labels(run, SimpleNamespace(label_gen=torch.Generator().manual_seed(0)), pairs)
    assert labels.queries == 4 and labels.ties == ties
    assert labels.valid.tolist() == ([True, False, True, False, True] if mode == "hard" else [True] * 5)


def test_the_logged_margin_orders_each_pair_by_its_labels(monkeypatch):
    """train_step hands the metrics line h = Delta(y_w) - Delta(y_l) by the labels: pair 0 keeps y1 as
    chosen (1 - 3 = -2), pair 1's label picks y2 (5 - 2 = 3), not Delta(y1) - Delta(y2) (-3)."""
    labels = SimpleNamespace(y1_wins=torch.tensor([True, False]))
    monkeypatch.setattr(train, "alignment_step", lambda run, state: ("pairs", labels, t([1.0, 2.0, 3.0, 5.0]), t(0.0)))
    seen = {}
    monkeypatch.setattr(train.outputs, "step_metrics", lambda run, state, step, pairs, labels, h, *rest: seen.setdefault("h", h))
    run = SimpleNamespace(world=1, ref_every=0, cfg=SimpleNamespace(grad_accum=1, method="online-dpo", revkl=0.0, response_term="exact"))
    train.train_step(run, SimpleNamespace(), 1)
    assert seen["h"].tolist() == [-2.0, 3.0]


def test_the_step_clips_the_gradient_to_grad_clip(cache):
    """--grad_clip c: the update is made with the gradient scaled to norm c; the step returns the norm before."""
    run, state = perturbed_run(cache, ["--method", "mix", "--grad_clip", "0.001"])
    grad_norm = train.alignment_step(run, state)[3]
    assert grad_norm > 0.01 and gradient(run.policy).norm().item() == pytest.approx(0.001, rel=1e-4)


def test_the_extended_step_is_taken_exactly_when_a_run_needs_it(cache):
    """extensions/step.py's step for micro-batches, SELM, XPO, SAIL-RevKL, the official term and a
    moving reference; train.alignment_step for the SAIL family on one device."""
    for argv, needed in ((["--method", "mix"], False), (["--method", "dpo"], False), (["--g", "1"], False),
                         (["--grad_accum", "2"], True), (["--method", "selm"], True), (["--method", "xpo"], True),
                         (["--revkl", "0.1"], True), (["--response_term", "official-sign"], True)):
        run = SimpleNamespace(cfg=train.parse_args(argv), world=1, ref_every=0)
        assert train.is_plain(run) != needed, argv
    assert not train.is_plain(SimpleNamespace(cfg=train.parse_args([]), world=2, ref_every=0))  # torchrun
    run, _ = perturbed_run(cache, ["--ref_update_every", "5"])  # a moving reference (train.setup_run sets ref_every)
    assert run.ref_every == 5 and not train.is_plain(run)
    # SELM's default is steps // 3; --ref_update_every 0 is "never", not "unset"
    assert perturbed_run(cache, ["--method", "selm"])[0].ref_every == 50
    assert perturbed_run(cache, ["--method", "selm", "--ref_update_every", "0"])[0].ref_every == 0


def test_selms_loss_reference_is_its_last_iterate(cache):
    """SELM (--ref_update_every 1): after each update the policy is copied into the loss's reference,
    so step 2's Delta is the policy's log-ratio to step 1's policy, not to the SFT model, which stays
    the yardstick (run.reference)."""
    run, state = perturbed_run(cache, ["--method", "selm", "--ref_update_every", "1"])
    sft = copy.deepcopy(run.reference)
    train.train_step(run, state, 1)
    state.step = 1
    assert all(torch.equal(p, q) for p, q in zip(run.train_reference.parameters(), run.policy.parameters()))
    last = copy.deepcopy(run.policy)
    pairs, labels, delta, _ = extended.alignment_step(run, state, sail_step=train.SAIL_STEP)
    B = len(pairs.route)
    with torch.no_grad():
        rows = tuple(x[:2 * B] for x in pairs.batch)
        own = sail.sequence_logps_of(last, *rows) - sail.sequence_logps_of(last, *rows)  # the policy before step 2, against itself
        to_sft = sail.sequence_logps_of(last, *rows) - sail.sequence_logps_of(sft, *rows)
    assert torch.allclose(delta, own, atol=1e-5) and not torch.allclose(delta, to_sft, atol=1e-3)
    assert all(torch.equal(p, q) for p, q in zip(run.reference.parameters(), sft.parameters()))  # the yardstick never moves


def test_selms_reference_is_refreshed_after_every_ref_update_every_th_update(cache):
    """--ref_update_every 2: the loss's reference stays the SFT model after update 1 and becomes the
    policy after update 2 (state.step is the last step done while a step runs)."""
    run, state = perturbed_run(cache, ["--method", "selm", "--ref_update_every", "2"])
    state.step = 0
    train.train_step(run, state, 1)
    assert all(torch.equal(p, q) for p, q in zip(run.train_reference.parameters(), run.reference.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(run.train_reference.parameters(), run.policy.parameters()))
    state.step = 1
    train.train_step(run, state, 2)
    assert all(torch.equal(p, q) for p, q in zip(run.train_reference.parameters(), run.policy.parameters()))


def test_each_routes_loss_and_self_labels_by_hand():
    """train.self_labels and train.pair_losses on a literal batch of four pairs, one per route, with
    distinct coefficients, against the losses written out by hand: offline -l; SAIL-DP
    -l - rho l^2 / 2; SAIL-PP -l - pi l^2 / 2 + s pi (-l - b)(L_w + L_l); SAIL-PR
    -l + s gamma (-l - b)(L_w + L_l), with l = log sigmoid(beta h) of the labelled order."""
    beta, rho, pi, gamma, s = 0.5, 0.11, 0.23, 0.37, 0.5
    run = SimpleNamespace(cfg=SimpleNamespace(method="mix", beta=beta, response_term="exact", rho=rho, pi=pi, gamma=gamma,
                                              response_scale=s), device=torch.device("cpu"))
    route = np.array([sail.OFFLINE, sail.DP, sail.PP, sail.PR])
    pairs = SimpleNamespace(route=route)
    logps = t([-3.0, -4.0, -5.0, -6.0, -7.0, -2.0, -9.0, -4.5])  # y1 of the 4 pairs, then y2
    ref = t([-3.5, -3.0, -5.5, -6.5, -6.0, -2.5, -8.0, -5.0])
    delta = logps - ref  # (8,) y1: 0.5, -1, 0.5, 0.5; y2: -1, 0.5, -1, 0.5
    # self-labels from a Delta of the rows whose h (y1 - y2) is -100 for the DP pair and +100 for the PP
    # pair: z is sure (y2 chosen, then y1), and only those two pairs may get one
    labels = SimpleNamespace(y1_wins=t([True, True, False, True]), valid=t([True, True, True, False]))
    sure = t([0.0, -100.0, 100.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    train.self_labels(SimpleNamespace(cfg=SimpleNamespace(beta=beta)), SimpleNamespace(label_gen=torch.Generator().manual_seed(0)),
                      pairs, labels, sure)
    assert labels.y1_wins.tolist() == [True, False, True, True]  # offline and SAIL-PR untouched; DP: y2, PP: y1
    b = t([0.0, 0.0, 0.3, 0.2])
    losses = train.pair_losses(run, route, labels.y1_wins, labels.valid, b, logps, ref)
    L = logps.tolist()

    def ell(h):
        return -math.log1p(math.exp(-beta * h))

    # chosen, rejected per pair: (y1, y2), (y2, y1), (y1, y2), (y1, y2) (the SAIL-PR pair is a tie: the fair coin)
    h = [delta[0] - delta[4], delta[5] - delta[1], delta[2] - delta[6], delta[3] - delta[7]]
    h = [float(x) for x in h]
    tie = 0.5 * (ell(h[3]) + ell(-h[3]))
    expected = [-ell(h[0]),
                -ell(h[1]) - 0.5 * rho * ell(h[1]) ** 2,
                -ell(h[2]) - 0.5 * pi * ell(h[2]) ** 2 + s * pi * (-ell(h[2]) - 0.3) * (L[2] + L[6]),
                -tie + s * gamma * (-tie - 0.2) * (L[3] + L[7])]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def perturbed_run(cache, argv):
    """A run set up as train.py does it (batch 8, no clipping) from a perturbed SFT policy (so h != 0), and its state."""
    cfg = train.parse_args(["--batch_size", "8", "--grad_clip", "0", "--cache_dir", cache, "--sft_steps", "40", *argv])
    inputs = data.load_inputs(cfg)
    run = train.setup_run(cfg, inputs, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return run, train.State.new(cfg, run, len(inputs.train_prompts), len(inputs.pairs), history=[])


def gradient(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_the_loo_baseline_pools_only_the_pairs_with_a_response_term():
    """--baseline loo on a batch of the four routes (two SAIL-PR pairs): each pair's b is the mean
    cost -l of the step's *other* SAIL-PP and SAIL-PR pairs, whatever its own route; loo-all: of
    all its other pairs."""
    beta, route = 0.5, np.array([sail.OFFLINE, sail.DP, sail.PP, sail.PR, sail.PR])
    delta = t([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 1.0, -2.0, 0.5])  # y1 rows, then y2 rows
    labels = SimpleNamespace(y1_wins=t([True] * 5), valid=t([True] * 5))
    cost = [math.log1p(math.exp(-beta * (delta[i] - delta[5 + i]).item())) for i in range(5)]  # -l = log(1 + e^(-beta h))
    for pool, members in (("loo", [2, 3, 4]), ("loo-all", [0, 1, 2, 3, 4])):
        run = SimpleNamespace(cfg=SimpleNamespace(baseline=pool, beta=beta, response_term="exact", method="mix", rho=0.2, pi=0.2,
                                                  gamma=0.3, response_scale=0.1), device=torch.device("cpu"))
        b = train.response_baselines(run, SimpleNamespace(route=route), labels, delta)
        expected = [sum(cost[j] for j in members if j != i) / len([j for j in members if j != i]) for i in range(5)]
        assert b.tolist() == pytest.approx(expected, abs=1e-6), pool


def test_a_sail_pp_steps_logged_kl_is_the_mean_log_ratio_of_its_sampled_rows(cache):
    """The step's logged kl: the mean of Delta(y) = L_theta(y) - L_ref(y), before the update, over
    every row sampled from the policy (here SAIL-PP's; the offline pairs' rows are left out)."""
    run, state = perturbed_run(cache, ["--method", "sail-pp", "--p", "0.5"])
    before = copy.deepcopy(run.policy)
    row, (pairs, labels) = train.train_step(run, state, 1)
    sampled = torch.from_numpy(np.concatenate([pairs.route == sail.PP] * 2))  # (2B,)
    assert 0 < sampled.sum() < len(sampled)
    with torch.no_grad():
        delta = sail.sequence_logps_of(before, *pairs.batch) - sail.sequence_logps_of(run.reference, *pairs.batch)
    assert row["kl"] == pytest.approx(delta[sampled].mean().item(), rel=1e-5, abs=1e-7)


def test_the_revkl_proxy_takes_a_tied_pairs_y1_as_chosen_as_the_authors_code_does(cache, monkeypatch):
    """With every oracle label a tie (--ties average: the fair coin), the authors' proxy still
    calls y1 each pair's chosen response, as their code's strict comparison leaves it."""
    monkeypatch.setattr(reward.GoldReward, "__call__", lambda self, prompts, responses: torch.zeros(len(responses)))
    run, state = perturbed_run(cache, ["--method", "sail-pr", "--g", "1", "--revkl", "0.1", "--revkl_estimate", "proxy"])
    seen, real = [], ext_revkl.revkl_proxy_of_pairs
    monkeypatch.setattr(ext_revkl, "revkl_proxy_of_pairs", lambda *args: seen.append(args[4]) or real(*args))
    row, (pairs, labels) = train.train_step(run, state, 1)
    assert not labels.valid.any() and not labels.y1_wins.any()  # ties: the loss's order is the fair coin's
    assert len(seen) == 1 and seen[0].all()


@pytest.mark.parametrize("estimate", ["exact", "proxy", "proxy-aligned"])
def test_revkl_adds_its_penalty_to_the_step_as_computed_by_hand(cache, estimate):
    """--revkl c changes nothing else in a step (the same pairs, labels and losses: the reference's
    samples have a stream of their own) and adds c times the gradient of the mean penalty over the
    step's pairs, recomputed here: exact, extensions/revkl.reverse_kl on one sample of the reference per pair,
    drawn at temperature 1 (the policy samples at 0.7 here) from the revkl stream; proxy, the mean
    of extensions/revkl.revkl_proxy on the chosen rows and on the rejected rows (--revkl_on both; a SAIL-DP
    pair's chosen row is its dataset's, as in the authors' code)."""
    c, argv = 0.5, ["--method", "mix", "--r", "0.25", "--p", "0.25", "--g", "0.5", "--temperature", "0.7"]
    run, state = perturbed_run(cache, argv)
    row_off = train.train_step(run, state, 1)[0]
    grad_off = gradient(run.policy)
    run, state = perturbed_run(cache, argv + ["--revkl", str(c), "--revkl_estimate", estimate])
    before = copy.deepcopy(run.policy)
    row, (pairs, labels) = train.train_step(run, state, 1)
    assert {k: row[k] for k in row_off if k not in ("revkl", "grad_norm") and not k.startswith(("dt", "t_", "generated"))} == \
        {k: row_off[k] for k in row_off if k not in ("grad_norm",) and not k.startswith(("dt", "t_", "generated"))}
    if estimate == "exact":
        ids, attention, response = pairs.extension["revkl_samples"]  # (8, T) one y ~ pi_ref per pair
        prompts = data.encode_prompts(run.tokenizer, pairs.prompts, 32)
        drawn = sample(run.reference, *prompts, max_new_tokens=24, temperature=1.0, eos_token_id=run.tokenizer.eos_token_id,
                       generator=torch.Generator().manual_seed(train.stream_seeds(0)["revkl"]))
        assert all(torch.equal(a, b) for a, b in zip(drawn, pairs.extension["revkl_samples"])) and response.sum() > 0
        with torch.no_grad():
            reference = sail.logits_of(run.reference, ids, attention)
        penalty = ext_revkl.reverse_kl(sail.logits_of(before, ids, attention), reference, response).mean()
    else:
        ids, attention, response = pairs.batch  # (16, T): y1 rows, then y2 rows
        with torch.no_grad():
            reference = sail.logits_of(run.reference, ids, attention)
        policy = sail.logits_of(before, ids, attention)
        first = labels.y1_wins | torch.from_numpy(pairs.route == sail.DP)  # (8,)
        assert not torch.equal(first, labels.y1_wins)  # a SAIL-DP pair whose self-label chose y2: it counts as chosen
        chosen = torch.cat([first, ~first])  # (16,)
        penalty = sum(ext_revkl.revkl_proxy(policy, reference, ids, response * rows[:, None], estimate == "proxy-aligned")
                      for rows in (chosen, ~chosen)) / 2
    (c * penalty).backward()
    assert row["revkl"] == pytest.approx(penalty.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(gradient(run.policy), grad_off + gradient(before), rtol=1e-4, atol=1e-7)
    assert gradient(before).abs().max() > 1e-4  # the penalty does move the policy


@pytest.mark.parametrize("method", ["sail-pp --p 1", "sail-dp --r 1"])
def test_self_labelled_pairs_cost_no_online_query(tmp_path, cache, no_eval, method):
    """Every pair self-labelled: not one online query, not one tie, no oracle score logged. SAIL-PP's
    pairs cost nothing; SAIL-DP's are dataset pairs, each costing the labels its dataset spent on it
    (its ties dropped included), as an offline pair does (the offline and online oracle-labelled
    counts are checked in the two recomputed steps above)."""
    train.main(train.parse_args(["--method", *method.split(), "--steps", "2", "--cache_dir", cache, "--out_dir", str(tmp_path), *SHORT]))
    rows = rows_of(tmp_path)
    assert [(r["oracle_reward"], r["tie_rate"]) for r in rows] == [(None, None)] * 2
    expected = [(0, 0), (0, 0)]
    if method.startswith("sail-dp"):
        stream, pairs = data.Stream(4096, seed=train.stream_seeds(0)["pair"]), data.make_task(0).pairs
        spent = [sum(pairs[i]["labels"] for i in stream.next(4)) for _ in range(2)]  # steps 1 and 2: 4 new pairs each
        expected = [(spent[0], spent[0] - 4), (spent[0] + spent[1], spent[0] + spent[1] - 8)]
    assert [(r["oracle_queries"], r["ties"]) for r in rows] == expected


def test_ties_are_counted_left_out_and_scored_rows_only_are_averaged(tmp_path, cache, no_eval, monkeypatch):
    """An oracle that scores every response 1.5 ties every SAIL-PR pair: each is a query and a
    tie, none is in the logged loss, and the logged reward is 1.5 (the offline rows are not scored)."""
    monkeypatch.setattr(reward.GoldReward, "__call__", lambda self, prompts, responses: torch.full((len(responses),), 1.5))
    train.main(train.parse_args(["--method", "sail-pr", "--g", "0.5", "--steps", "4", "--cache_dir", cache,
                                 "--out_dir", str(tmp_path), *SHORT]))
    rows = rows_of(tmp_path)
    assert all(r["oracle_reward"] in (None, 1.5) for r in rows) and all(r["tie_rate"] in (None, 1.0) for r in rows)
    # 16 = 4 steps x 4 pairs. An online pair costs one label, a tie; an offline pair the labels its dataset
    # spent on it, all ties but the last: so queries - ties counts the offline pairs.
    n_offline = rows[-1]["oracle_queries"] - rows[-1]["ties"]
    spent = sum(x["labels"] for x in (data.make_task(0).pairs[i]
                                      for i in data.Stream(4096, seed=train.stream_seeds(0)["pair"]).next(n_offline)))
    assert 0 < n_offline < 16 and rows[-1]["oracle_queries"] == (16 - n_offline) + spent
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: only offline pairs, h = 0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_data_file_fails_before_training_with_file_line_field(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Review of the pizza:"}, {"prompt": ""}])
    with pytest.raises(SystemExit, match=f"error: {prompts}:2: field 'prompt' is empty"):
        train.cli(["--prompts", prompts, "--out_dir", str(tmp_path / "o")])  # what `python train.py` runs
    assert not (tmp_path / "o").exists()  # failed before anything was written


def test_long_prompts_are_cut_and_reported(tmp_path, cache, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Review of the pizza:"}, {"prompt": "very " * 40 + "the cake:"}])
    held_out = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Rate the soup:"}, {"prompt": "How was the tea?"}])
    train.main(train.parse_args(["--prompts", prompts, "--eval_prompts", held_out, "--g", "1", "--steps", "1", "--max_prompt_len", "8",
                                 "--out_dir", str(tmp_path / "o"), "--cache_dir", cache, *FAST]))
    assert "note: 1 of 2 training prompts are longer than --max_prompt_len 8 tokens and keep their last 8" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--max_prompt_len", "60", "--max_new_tokens", "24"], "more than the model's 64 positions"),
    (["--out_dir", "{tmp}/a-file/out"], "cannot be written"),
])
def test_bad_settings_fail_before_training(tmp_path, cache, argv, message):
    (tmp_path / "a-file").write_text("not a directory")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    argv = (["--out_dir", str(tmp_path / "o")] if "--out_dir" not in argv else []) + argv
    with pytest.raises(SystemExit, match=message):
        train.main(train.parse_args(argv + ["--cache_dir", cache, "--sft_steps", "40"]))


# ---------------------------------------------------------------------------------------------
# Bad input, every kind a user can type: one `error:` line naming the option or file, before any
# training, and an existing run in --out_dir left exactly as it was

def refusal(argv):
    """What `python train.py ARGV` says when it refuses: the SystemExit message, checked to be
    `error:` lines (one per problem) and no traceback."""
    with pytest.raises(SystemExit) as refused:
        train.cli(argv)
    message = str(refused.value)
    assert all(line.startswith("error: ") for line in message.splitlines()), message
    return message


def unreadable(tmp_path):
    """A file that exists and cannot be read: chmod 000, or for root (who reads anything, as in
    CI) /proc/self/mem, whose first page is unmapped, so reading it fails with EIO."""
    path = tmp_path / "unreadable.jsonl"
    path.write_text('{"prompt": "a"}\n')
    path.chmod(0)
    try:
        path.read_bytes()
        return "/proc/self/mem"
    except PermissionError:
        return str(path)


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))  # line 2: not UTF-8
    (tmp_path / "array.json").write_text('[{"prompt": "a"}, {"prompt": "b"}]')  # JSON, but not one object per line
    (tmp_path / "table.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "no-config").mkdir()  # a directory, but not a saved model
    (tmp_path / "broken").mkdir()  # a config, then weights that are not safetensors
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x00" * 100)
    return tmp_path


DATA_CASES = [  # (file, what the error says after "error: {path}")
    ("missing.jsonl", ": no such file"), ("a-dir", ": is a directory; expected a JSONL file"),
    ("UNREADABLE", ": cannot be read: "), ("latin1.jsonl", ":2: not UTF-8 text (byte 0xe9 at column 16)"),
    ("array.json", ":1: expected a JSON object, got list"), ("table.csv", ":1: not valid JSON"),
]


@pytest.mark.parametrize("option", ["--prompts", "--eval_prompts", "--pairs", "--eval_pairs"])
@pytest.mark.parametrize("name,message", DATA_CASES)
def test_bad_data_files_are_refused(bad_files, option, name, message):
    path = unreadable(bad_files) if name == "UNREADABLE" else str(bad_files / name)
    assert refusal([option, path, "--out_dir", str(bad_files / "out")]).startswith(f"error: {path}{message}")
    assert not (bad_files / "out").exists()  # refused before anything was written


def test_a_context_longer_than_the_model_is_refused_before_sft_trains(tmp_path):
    with pytest.raises(SystemExit, match="60 \\+ --max_new_tokens 24 = 84 tokens, more than the model's 64 positions"):
        train.main(train.parse_args(["--max_prompt_len", "60", "--cache_dir", str(tmp_path / "c"), "--out_dir", str(tmp_path / "o")]))
    assert not any((tmp_path / "c").iterdir())  # refused before any SFT step


@pytest.mark.parametrize("method,revkl,estimate,expected", [
    ("selm", 0.0, "exact", [("train_reference", 0.0, "explore_gen")]),   # SELM: the last iterate's greedy y~
    ("xpo", 0.0, "exact", [("train_reference", 0.7, "explore_gen")]),    # XPO: a sample at the run's temperature
    ("sail-pr", 0.1, "exact", [("reference", 1.0, "revkl_gen")]),        # SAIL-RevKL exact: the SFT model's sample at temperature 1
    ("sail-pr", 0.1, "proxy-aligned", []),                               # the proxies read the pairs' own responses: no sample
    ("sail-pr", 0.1, "proxy", []),
])
def test_the_references_responses_and_their_count(monkeypatch, method, revkl, estimate, expected):
    """extensions/step.reference_samples: which model samples, at which temperature, from which stream,
    and every sampled token counted in pairs.generated (3 + 4 here, per call)."""
    calls = []
    y = (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]))

    def sampled(run, model, ids, mask, temperature, generator):
        calls.append((model, temperature, generator))
        return y

    monkeypatch.setattr(extended, "sample_responses", sampled)
    monkeypatch.setattr(extended.data, "encode_prompts", lambda tok, prompts, n: (torch.zeros(2, 3, dtype=torch.long),) * 2)
    run = SimpleNamespace(cfg=SimpleNamespace(method=method, revkl=revkl, revkl_estimate=estimate, max_prompt_len=3, temperature=0.7),
                          tokenizer=SimpleNamespace(pad_token_id=0), ref_device="cpu", device="cpu",
                          train_reference="train_reference", reference="reference")
    state = SimpleNamespace(explore_gen="explore_gen", revkl_gen="revkl_gen")
    pairs = SimpleNamespace(prompts=["a", "b"], batch=(torch.zeros(4, 3, dtype=torch.long),) * 3, generated=10, extension={})
    extended.reference_samples(run, state, pairs)
    assert calls == expected and pairs.generated == 10 + 7 * len(expected)
    assert pairs.batch[0].shape[0] == (6 if method in extended.EXPLORE else 4)  # SELM/XPO: y~ as rows 2B..3B-1
    assert ("revkl_samples" in pairs.extension) == (estimate == "exact" and revkl > 0)


def test_the_tutorial_notebook_runs_top_to_bottom():
    """docs/tutorial.ipynb, executed as a reader runs it (an error in any cell fails the test): one
    SAIL step cell by cell, the tabular check, two short runs (about a minute with the SFT model cached)."""
    import nbclient
    import nbformat

    notebook = nbformat.read(os.path.join(HERE, "docs", "tutorial.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Delta(y1):        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]" in outputs  # the first step: the policy is the reference
    assert "largest difference with both terms:" in outputs and "gold reward" in outputs
