"""
sail.py: the math of SAIL (Ding et al., "SAIL: Self-Improving Efficient Online Alignment of
Large Language Models", arXiv 2406.15567), as short pure functions on tensors.

  sequence_logps      L(y) = log pi(y | x), summed over the response tokens
  pair_value          what a pair is worth in J: l = log sigmoid(beta h), or a tie's fair-coin value
  sail_loss           SAIL's surrogate: DPO + the label term + the response term (below)
  leave_one_out_mean  the response term's baseline
  sample              policy sampling with the model's KV cache, in plain PyTorch
  dpo_loss            the DPO loss alone (Rafailov et al. 2023, eq. 7), after the step's functions

With Delta(y) = L_theta(y) - L_ref(y), a pair's margin h = Delta(y_w) - Delta(y_l) and
l = log sigmoid(beta h), SAIL maximises J(theta) = E_{x, y1, y2 ~ pi_theta, (y_w, y_l) ~ labeller}[l].
The responses (and, when the policy labels its own pairs, the labels) are drawn from pi_theta, so

    grad J = E[grad l]                              DPO's gradient on these pairs
           + E[l * (grad L(y1) + grad L(y2))]       response term  (responses from pi_theta)
           + E[l * grad l]                          label term     (labels from sigmoid(beta h))

SAIL-PR: policy responses, oracle labels (response term); SAIL-PP: policy responses, self-labels
(both terms); SAIL-DP: dataset responses, self-labels (label term). docs/method.md says what J
rewards (tested on a tabular policy) and how ties are valued. The methods beyond the SAIL family
(SELM, XPO, SAIL-RevKL, the official code's response term) have their math in extensions/.
Tests: `python -m pytest -q test_sail.py`.

Departures from the paper and the official code:
  1. The extra terms are a surrogate loss with stop-gradients, checked exactly against autograd of
     the enumerated J (the official code's gradient hook, opposite in sign and divided by
     |log pi(y)|, is kept for comparison as extensions/official.py).
  2. An optional baseline b, independent of the pair's own responses, is subtracted in the response
     term: the expected gradient is unchanged and its variance lower. The paper has none.
  3. A tie is worth its expectation over Bradley-Terry's fair coin (`pair_value`) in DPO's term and
     the response term (it has no label drawn, so no label term): the gradient is exact for the
     Bradley-Terry J.
  4. Log-probs are the untempered policy's (temperature 1): with another sampling temperature the
     response term is an approximation (the paper samples at 0.9).
"""
import inspect

import torch
import torch.nn.functional as F


def sequence_logps(logits, labels, mask):
    """L(y) = log pi(y | x) = sum_t log pi(y_t | x, y_<t): each row's log-probabilities of its
    response tokens, summed.

    logits: (B, T, V) the model's outputs at every position of labels (B, T), the input ids (or at
    the last K of them only, (B, K, V): sequence_logps_of computes no logit that predicts no
    response token); mask: (B, T), 1 on response tokens (0 on prompt, padding, after EOS).
    Returns (B,), float32 (float64 for float64 logits).
    """
    T, K = labels.shape[1], logits.shape[1]
    # Position t predicts token t+1. bf16/fp16 logits go to fp32 before log_softmax (float64 stays).
    logits = logits[:, :-1, :].to(torch.promote_types(logits.dtype, torch.float32))  # (B, K-1, V)
    logps = logits.log_softmax(-1).gather(2, labels[:, T - K + 1:].unsqueeze(2)).squeeze(2)  # (B, K-1)
    logps = F.pad(logps, (T - K, 0))  # (B, T-1): 0 where no logits were computed (K < T)
    # Sum, not mean: log pi(y|x) of a whole response is the sum of its token log-probs, and the
    # DPO/SAIL implicit reward beta * log pi(y|x) / ref(y|x) is defined on that sequence log-prob.
    # torch.where rather than multiplying by the mask, so a non-finite value at a masked position
    # can never leak into the sum or its gradient.
    return torch.where(mask[:, 1:].bool(), logps, 0.0).sum(-1)  # (B,)


def sequence_logps_of(model, ids, attention_mask, response_mask):
    """L(y) (B,) of each row of a batch through a model: one forward pass, then sequence_logps.
    ids, attention_mask, response_mask: (B, T), a batch of data.encode_responses or sample."""
    logits = logits_of(model, ids, attention_mask, keep=response_positions(response_mask))  # (B, K, V)
    on = logits.device  # a model may compute on another device (--offload_reference: the CPU); L(y) comes back
    return sequence_logps(logits, ids.to(on), response_mask.to(on)).to(ids.device)  # (B,)


OFFLINE, DP, PP, PR = range(4)  # the routes a pair can take: offline DPO, SAIL-DP, SAIL-PP, SAIL-PR


def pair_value(h, beta, valid=None):
    """The value of each pair in J (B,): l = log sigmoid(beta h) for a preference, and for a tie
    (valid False: the oracle scored both responses the same) the expectation over Bradley-Terry's
    fair coin, 1/2 [log sigmoid(beta h) + log sigmoid(-beta h)], which is -log 2 when the two
    responses are the same text (h = 0) and lower the more the policy separates them.

    Why not 0 for a tie: 0 is the supremum of l, so a policy whose two samples always tie (any
    deterministic policy) would maximise J whatever its reward (the README's "What SAIL is", its paragraph on ties).
    h: (B,); beta: KL strength; valid: None or (B,) bool."""
    ell = F.logsigmoid(beta * h)  # (B,) the Bradley-Terry log-likelihood of the label
    if valid is None:
        return ell
    return torch.where(valid, ell, 0.5 * (ell + F.logsigmoid(-beta * h)))  # (B,) a tie: the mean over its two labels


def sail_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
              label_coef=0.0, response_coef=0.0, baseline=None, valid=None):
    """SAIL's surrogate loss per pair: minus the three terms of grad J (module docstring),
    E[grad l] + label_coef * E[l grad l] + response_coef * E[l grad(L(y1) + L(y2))], written so that
    autograd gives them. With each coefficient 1 where its draw depends on theta (label: self-labels;
    response: responses sampled from pi_theta) and 0 elsewhere, its expected gradient is -grad J;
    with other coefficients, minus a weighted sum of the three terms, DPO's with weight 1; with both
    0 it is DPO.

    Each *_logps argument: (B,) summed response log-probs. beta: KL strength.
    label_coef: float or (B,), weight of the label term (self-labelled pairs: SAIL-PP, SAIL-DP).
    response_coef: float or (B,), weight of the response term (policy-sampled pairs: SAIL-PR, -PP).
    baseline: None, float or (B,), an estimate of E[-v] (v = pair_value) independent of each pair's
      own responses; it leaves the expected gradient unchanged and lowers its variance.
    valid: None or (B,) bool, False for a tied hard label: the pair is worth its expectation over
      Bradley-Terry's fair coin (pair_value) in DPO's term and the response term, so the gradient
      stays exact for that J (a tie has no label drawn from sigmoid(beta h), so no label term).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)  # (B,)
    v = pair_value(h, beta, valid)  # (B,) l = log sigmoid(beta h), or a tie's value
    v_label = v if valid is None else torch.where(valid, v, 0.0)  # (B,) v of the pairs with a label (a tie has none to draw)
    cost = (-v).detach()  # (B,) sg(-v): the response term's weight, a constant for autograd
    response = (cost - (0.0 if baseline is None else baseline)) * (policy_chosen_logps + policy_rejected_logps)  # (B,)
    losses = (-v  # E[grad l]: DPO's term, DPO eq. 7
              - 0.5 * label_coef * v_label ** 2  # E[l grad l]: grad(l^2 / 2) = l grad l, the label's score term
              + response_coef * response)  # E[l grad(L(y1) + L(y2))]: sg(-l - b) grad L, the responses' score term
    return (losses, *_implicit_rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                       reference_rejected_logps, beta))


def _implicit_rewards(pc, pr, rc, rr, beta):
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def leave_one_out_mean(x, pool=None):
    """For each i, the mean of x over the *other* entries j of the pool (pool[j] True; all entries
    when pool is None), 0 where there is no other: a baseline for pair i that does not depend on
    pair i, so it keeps the response term unbiased. x: (B,); pool: None or (B,) bool."""
    x = x.detach()
    if pool is None:
        return (x.sum() - x) / (x.numel() - 1) if x.numel() > 1 else torch.zeros_like(x)  # (B,)
    x = torch.where(pool, x, 0.0)  # (B,)
    others = pool.sum() - pool.long()  # (B,) pool members other than i
    return torch.where(others > 0, (x.sum() - x) / others.clamp(min=1), 0.0)  # (B,)


def sample_token(logits, temperature, generator=None):
    """One token per row from softmax(logits / temperature), (B, V) -> (B,), by inverting the CDF
    with one uniform number per row: exact, and several times faster on a CPU than
    torch.multinomial, which draws randomness for the whole vocabulary."""
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # (B, 1) in [0, total)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)  # (B,) first cdf > u


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, *, max_new_tokens, temperature, eos_token_id, generator=None):
    """Sample one response per row from a causal LM, token by token with its KV cache, the model in
    eval mode meanwhile (its mode restored after: with gradient checkpointing, train mode has no cache).

    prompt_ids, prompt_mask: (B, Tp) left-padded prompts (for two responses per prompt, repeat
    the rows). temperature 0 means greedy. Each response ends at its first EOS, which is kept;
    later tokens are filled with EOS and masked; sampling stops once every row has ended.
    Returns (ids, attention_mask, response_mask), each (B, Tp + n) with n <= max_new_tokens,
    ready for `sequence_logps(model(ids, ...).logits, ids, response_mask)`.
    """
    was_training, B = model.training, prompt_ids.shape[0]
    model.eval()
    # transformers 5 renamed the KV cache (argument and output) from past_key_values to cache.
    cache = "cache" if forward_takes(model, "cache") else "past_key_values"
    last = keep_only(model, 1)  # the prompt's last logits are all we need
    # Left padding shifts where each prompt starts; position ids must count real tokens only,
    # or GPT-2-style models (learned absolute positions) see every padded prompt "late".
    position = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, Tp)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position, use_cache=True, **last)
    next_position = position[:, -1:] + 1  # (B, 1)
    Tp = prompt_ids.shape[1]
    attention = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], 1)  # (B, Tp + max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)  # (B,) has this row emitted EOS?
    tokens, alive = [], []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()  # (B, V)
        token = sample_token(logits, temperature, generator) if temperature > 0 else logits.argmax(-1)  # (B,)
        token = torch.where(done, eos_token_id, token)  # finished rows emit EOS as padding
        tokens.append(token)
        alive.append(~done)  # this token is part of the response (the first EOS included)
        done = done | (token == eos_token_id)
        if bool(done.all()):
            break
        out = model(input_ids=token[:, None], attention_mask=attention[:, :Tp + t + 1], position_ids=next_position,
                    use_cache=True, **{cache: getattr(out, cache)})
        next_position = next_position + 1
    response_mask = torch.stack(alive, 1).long()  # (B, n)
    ids = torch.cat([prompt_ids, torch.stack(tokens, 1)], 1)  # (B, Tp + n)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)  # (B, Tp + n) after-EOS padding masked
    model.train(was_training)
    return ids, attention_mask, torch.cat([torch.zeros_like(prompt_mask), response_mask], 1)


# ---------------------------------------------------------------------------------------------
# Off the step's path: DPO's loss on its own (sail_loss with both coefficients 0 is DPO), and
# helpers of the evaluation and the set-up

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
             valid=None):
    """DPO loss per pair.

    Each *_logps argument: (B,) summed response log-probs (sequence_logps). beta: KL strength.
    valid: None or (B,) bool, False for a tied label: its loss is minus its pair_value (the fair coin).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards are the implicit
    rewards beta * Delta(y), detached.
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)  # (B,)
    losses = -pair_value(h, beta, valid)  # DPO eq. 7: -log sigmoid(beta * h)
    return (losses, *_implicit_rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                       reference_rejected_logps, beta))


def accuracy(h):
    """Per pair: 1 if the implicit reward prefers the chosen response (h > 0), 0.5 on a tie (h = 0)."""
    return (h > 0).float() + 0.5 * (h == 0).float()


def disable_dropout(model):
    """Dropout off: with it, the policy's and the reference's log-probs of the same text would
    disagree at initialisation and h would be noisy; DPO implementations switch it off."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0



# ---------------------------------------------------------------------------------------------
# The forward pass under the log-probs, and transformers-version shims (off the learner's path)

def logits_of(model, ids, attention_mask, keep=0):
    """The logits (B, T, V) of ids, attention_mask (B, T), in one forward pass with position ids
    counted over real tokens, so that left padding never shifts a prompt (GPT-2's positions are
    learned); keep > 0: those of the last `keep` positions only (B, keep, V)."""
    position = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    # use_cache=False: a single pass keeps no KV cache; keep_only: the model computes the last `keep` alone where it can
    logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position, use_cache=False, **keep_only(model, keep)).logits
    return logits[:, -keep:] if keep else logits  # (B, keep or T, V)


def response_positions(response_mask):
    """How many last positions' logits sequence_logps needs (a saving of memory and time): those
    from the position before the batch's first response token on. response_mask: (B, T)."""
    T, first = response_mask.shape[1], int(response_mask.any(0).int().argmax())  # the first column holding a response token
    return min(T, T - first + 1)


# transformers-version shims

def forward_takes(model, name):
    """Does the Hugging Face model inside `model` (ddp's .module, LoRA's base model, the LoRA
    reference's policy) take the keyword `name` in its forward?"""
    for attr in ("module", "policy"):
        inner = getattr(model, attr, None)
        model = model if inner is None else inner
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(model.forward).parameters


def keep_only(model, keep):
    """{"logits_to_keep": keep} where the model takes it (transformers >= 4.50), else {}: then it
    computes every position's logits, and logits_of keeps the last `keep`."""
    return {"logits_to_keep": keep} if keep and forward_takes(model, "logits_to_keep") else {}
