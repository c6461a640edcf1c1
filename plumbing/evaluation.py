"""
plumbing/evaluation.py: the held-out set a run is evaluated on, fixed for the run, its sampling,
its two halves, and the chunked pass that KL(pi_ref || pi_theta) needs. What the evaluation
measures is train.evaluate.
"""
from types import SimpleNamespace

import torch

import data
from plumbing.checkpoint import stream_seeds
from plumbing.models import sample_responses
from sail import logits_of, sample


def make_eval_set(run, inputs, reference_logps):
    """The held-out batches: eval_samples prompts per held-out prompt; the held-out pairs with their
    reference log-probs (computed once, by train.reference_logps: the reference is frozen) and which
    of them have texts no training pair has (`unseen`); and
    responses of the reference at temperature 1, for KL(pi_ref || pi_theta), drawn once."""
    cfg = run.cfg
    prompts = [p for p in inputs.eval_prompts for _ in range(cfg.eval_samples)]
    batch = tuple(t.to(run.device) for t in data.encode_prompts(run.tokenizer, prompts, cfg.max_prompt_len))
    pair_batch = unseen = None
    if inputs.eval_pairs:
        pairs = inputs.eval_pairs
        unseen = torch.tensor(data.unseen_pairs(inputs.pairs, pairs))  # (M,) texts in no training pair: eval_acc_unseen
        pair_batch = tuple(t.to(run.device) for t in data.encode_responses(
            run.tokenizer, [x["prompt"] for x in pairs] * 2, [x["chosen"] for x in pairs] + [x["rejected"] for x in pairs],
            cfg.max_prompt_len, cfg.max_new_tokens))
        pair_batch += (reference_logps(run, pair_batch),)
    generator = torch.Generator(run.ref_device).manual_seed(stream_seeds(cfg.seed)["eval_revkl"])
    ref_samples = sample_responses(run, run.reference, *(t.to(run.ref_device) for t in batch), 1.0, generator)
    return SimpleNamespace(prompts=prompts, batch=batch, pair_batch=pair_batch, unseen=unseen, ref_samples=tuple(t.to(run.device) for t in ref_samples),
                           cut=len(inputs.eval_prompts) // 2 * cfg.eval_samples)  # the rows of the first half of the prompts


def halves(eval_set, **figures):
    """Each per-row figure (N,) averaged over the rows of the first half of the held-out prompts
    (name_a) and of the second half (name_b): a checkpoint chosen on one half and read on the other
    is not biased upward by the choice (experiments/frontier.py)."""
    cut = eval_set.cut
    return {f"{name}_{half}": v[rows].mean().item() for name, v in figures.items() for half, rows in (("a", slice(None, cut)), ("b", slice(cut, None)))}


def distinct_2(texts):
    """Repetition of the evaluated responses: per response, the share of its word bigrams that are
    distinct (1: no bigram repeats; a response of fewer than two words counts 1), averaged."""
    shares = []
    for text in texts:
        words = text.split()
        bigrams = list(zip(words, words[1:]))
        shares.append(len(set(bigrams)) / len(bigrams) if bigrams else 1.0)
    return sum(shares) / max(len(shares), 1)


def eval_samples(run, eval_set, temperature, stream):
    """One response of the policy per row of the held-out batch, (ids, attention_mask, response_mask)
    each (N, T), from a generator seeded afresh from `stream` at every evaluation: the same noise as
    the SFT baseline's (common random numbers make the comparison less noisy)."""
    generator = torch.Generator(eval_set.batch[0].device).manual_seed(stream_seeds(run.cfg.seed)[stream])
    return sample(run.policy, *eval_set.batch, max_new_tokens=run.cfg.max_new_tokens, temperature=temperature,
                  eos_token_id=run.tokenizer.eos_token_id, generator=generator)


def reverse_kl(policy_logits, reference_logits, response_mask):
    """SAIL-RevKL's penalty (Wu et al. 2026, arXiv 2606.31524): KL(pi_ref || pi_theta) of each row,
    for rows y ~ pi_ref (sampled at temperature 1), as the sum over its response positions of the
    full-vocabulary KL between the next-token distributions,

        sum_t KL(pi_ref(. | x, y<t) || pi_theta(. | x, y<t)).

    Its expectation over y ~ pi_ref is the sequence-level KL(pi_ref || pi_theta) (the chain rule of
    KL: each position's log-ratio averaged over its token given the prefix), and since y's
    distribution does not depend on theta, its gradient's expectation is that KL's gradient,
    -E_{y ~ pi_ref}[grad log pi_theta(y)]: unbiased for both. Each position's term is averaged over
    its next token exactly, which usually gives less variance than the plain log-ratio
    log pi_ref(y) - log pi_theta(y), though not always (a later position's KL depends on the
    earlier tokens). On samples of the policy it would estimate neither: the prefixes must come
    from pi_ref.
    policy_logits, reference_logits: (B, T, V) on the rows; response_mask: (B, T), as in
    sequence_logps (position t predicts token t + 1). Returns (B,)."""
    float_type = torch.promote_types(policy_logits.dtype, torch.float32)
    log_p = policy_logits[:, :-1].to(float_type).log_softmax(-1)  # (B, T-1, V)
    log_r = reference_logits[:, :-1].to(float_type).log_softmax(-1)  # (B, T-1, V)
    kl = torch.where(log_r > -torch.inf, log_r.exp() * (log_r - log_p), 0.0).sum(-1)  # (B, T-1) each next token's KL (0 log 0 = 0)
    return torch.where(response_mask[:, 1:].bool(), kl, 0.0).sum(-1)  # (B,)


def eval_reverse_kl(run, rows, chunk=32):
    """KL(pi_ref || pi_theta) on held-out prompts: reverse_kl on responses of the reference
    (rows: (ids, attention_mask, response_mask), each (N, T)), averaged; `chunk` rows at a time,
    since it needs the full logits of both models."""
    kl = []
    for i in range(0, len(rows[0]), chunk):
        ids, attention, response = (t[i:i + chunk] for t in rows)
        policy = logits_of(run.policy, ids, attention)  # (chunk, T, V)
        reference = logits_of(run.reference, ids, attention).to(run.device)  # --offload_reference: computed on the CPU
        kl.append(reverse_kl(policy, reference, response))
    return torch.cat(kl).mean().item()
