"""
data.py: prompts, preference pairs, tokenisation and batching, and the embedded default task.

The embedded task ("write a short review") is built from a seed in about a second, with no
download: a corpus of (prompt, review) texts for supervised fine-tuning (SFT), training prompts,
held-out evaluation prompts, and offline preference pairs: two reviews from the SFT distribution
for one prompt, labelled by the gold reward of `reward.py`. A tied candidate pair (about 23% of
them) is dropped, and the label it cost is charged to the next pair kept (its "labels" field), so
offline pairs are counted in oracle labels the way online pairs are. Reviews are mixed on purpose
(positive, negative, neutral, off-topic, repetitive), so the SFT model samples good and bad
responses and leaves headroom for alignment.

Real data comes from JSONL files in the common format: `{"prompt": ...}` per line for prompts and
`{"prompt": ..., "chosen": ..., "rejected": ...}` for pairs (`load_prompts`, `load_pairs`). A
file does not say how many ties were dropped to make it, so each of its pairs counts one label.

Layout of every batch the models see (`encode_prompts`, `encode_responses`, `sail.sample`):
prompts left-padded, responses right after them, then right padding. Position ids are always
computed from the attention mask, so any padding pattern gives the same log-probs.

Try it: `python -c "import data; t = data.make_task(0); print(t.train_prompts[0], t.pairs[0])"`

Departures from the paper:
  1. The paper trains on PKU-SafeRLHF and UltraFeedback prompts with a 7B reward model; the
     embedded task is a small synthetic one so that the full loop runs on a laptop CPU.
"""
import functools
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from reward import ASPECTS, CATEGORY_OF, NEGATIVE, POSITIVE, gold_reward, subject_of

# ---------------------------------------------------------------------------------------------
# The embedded default task

NEUTRAL = ["okay", "fine", "average", "small", "big", "new", "old", "plain", "ordinary", "quiet"]
ADVERBS = ["very", "really", "quite", "so"]
PROMPT_TEMPLATES = [
    "Review of the {s}:", "My thoughts on the {s}:", "What I think of the {s}:", "A short review of the {s}:",
    "Rate the {s}:", "Opinion on the {s}:", "Tell me about the {s}:", "How was the {s}?",
]
REVIEW_TEMPLATES = [  # {s} subject, {o} another subject, {x} an aspect of the subject, {a} {b} adjectives
    "the {s} was {a} .", "the {s} was {v} {a} .", "the {s} was {a} and {b} .", "{a} {s} , but the {x} was {b} .",
    "the {x} was {a} and the {s} was {b} .", "i found the {s} {a} , the {x} was {b} .", "the {s} was not {a} .",
    "it was {a} .", "the {o} was {a} .", "{a} , {a} , {a} .", "the {x} was {a} .",
]


def make_review(rng, subject):
    """One review of `subject` drawn from the SFT distribution: each adjective is positive,
    negative or neutral with equal odds, and some templates are off-topic or repetitive."""
    a, b = (rng.choice(rng.choice([POSITIVE, NEGATIVE, NEUTRAL])) for _ in range(2))
    other = rng.choice([s for s in CATEGORY_OF if s != subject])
    aspect = rng.choice(ASPECTS[CATEGORY_OF[subject]])
    return " " + rng.choice(REVIEW_TEMPLATES).format(s=subject, o=other, x=aspect, a=a, b=b, v=rng.choice(ADVERBS))


@dataclass
class Task:
    sft: list           # [(prompt, response)] for supervised fine-tuning
    train_prompts: list  # [prompt] for online generation
    eval_prompts: list   # [prompt], held out: no training prompt or pair uses them
    pairs: list         # [{"prompt", "chosen", "rejected", "labels"}] offline preference pairs; labels:
                        # the oracle labels spent to get it (1 + the tied candidates dropped before it)
    eval_pairs: list    # the same, on the held-out prompts


@functools.lru_cache(maxsize=2)  # --compare and the tests build it many times; nothing mutates it
def make_task(seed=0, n_sft=20000, n_pairs=4096, n_eval_prompts=64, n_eval_pairs=256):
    """Build the embedded task deterministically from `seed` (under a second, no download)."""
    rng = random.Random(seed)
    prompts = [t.format(s=s) for t in PROMPT_TEMPLATES for s in CATEGORY_OF]  # 8 x 24 = 192
    rng.shuffle(prompts)
    eval_prompts, train_prompts = prompts[:n_eval_prompts], prompts[n_eval_prompts:]

    def review_of(prompt):
        return make_review(rng, subject_of(prompt))

    def labelled_pairs(prompt_list, n):
        pairs, spent = [], 0
        while len(pairs) < n:
            prompt = rng.choice(prompt_list)
            y1, y2 = review_of(prompt), review_of(prompt)
            r1, r2 = gold_reward(prompt, y1), gold_reward(prompt, y2)
            spent += 1  # one oracle label, a tie too (as online)
            if r1 != r2:  # a tie carries no preference: dropped, its label charged to the next pair kept
                chosen, rejected = (y1, y2) if r1 > r2 else (y2, y1)
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "labels": spent})
                spent = 0
        return pairs

    # SFT text covers every prompt, the held-out ones included: the model should know how to
    # review every subject; what alignment must learn is *which* reviews the oracle prefers.
    sft = [(p, review_of(p)) for p in (rng.choice(prompts) for _ in range(n_sft))]
    return Task(sft, train_prompts, eval_prompts, labelled_pairs(train_prompts, n_pairs),
                labelled_pairs(eval_prompts, n_eval_pairs))


def build_tokenizer(texts, vocab_size=512):
    """Train a byte-level BPE tokenizer (GPT-2's scheme) on `texts` and wrap it as a transformers
    fast tokenizer, so the embedded model goes through the same code path as real GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # Like GPT-2: one special token serving as BOS and EOS, and no pad token (prepare_tokenizer adds it).
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------------
# Tokenisation and batching

def prepare_tokenizer(tokenizer):
    """Prompts are left-padded (generation appends on the right); a tokenizer without a pad
    token (GPT-2) pads with EOS. Padding is always masked, so its id never matters."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def encode_prompts(tokenizer, prompts, max_len):
    """Left-padded prompt ids and mask, each (B, Tp). Longer prompts keep their last `max_len`
    tokens (the end of a prompt is what the response continues; train.py reports how many)."""
    rows = [r[-max_len:] for r in tokenizer(list(prompts))["input_ids"]]  # with the tokenizer's own BOS, if any
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, Tp)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, Tp)
    for i, r in enumerate(rows):
        if r:
            ids[i, -len(r):], mask[i, -len(r):] = torch.tensor(r), 1
    return ids, mask


def encode_responses(tokenizer, prompts, responses, max_prompt_len, max_response_len):
    """Prompt + response + EOS in the batch layout above: returns ids, attention_mask and
    response_mask, each (B, Tp + Tr). A response longer than `max_response_len` is cut (and has
    no EOS, like a sampled response that hit the length limit)."""
    p_ids, p_mask = encode_prompts(tokenizer, prompts, max_prompt_len)
    rows = [(r + [tokenizer.eos_token_id])[:max_response_len]
            for r in tokenizer(list(responses), add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    r_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, Tr)
    r_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, Tr)
    for i, r in enumerate(rows):
        r_ids[i, :len(r)], r_mask[i, :len(r)] = torch.tensor(r), 1
    ids = torch.cat([p_ids, r_ids], 1)  # (B, T)
    return ids, torch.cat([p_mask, r_mask], 1), torch.cat([torch.zeros_like(p_mask), r_mask], 1)


def pad_cat(batches, pad_id):
    """Concatenate batches of (ids, attention_mask, response_mask) along the batch dimension,
    right-padding each to the longest (safe: position ids come from the attention mask)."""
    width = max(b[0].shape[1] for b in batches)
    out = []
    for k, fill in enumerate([pad_id, 0, 0]):
        out.append(torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1]), value=fill)
                              for b in batches]))
    return tuple(out)


class Stream:
    """An endless shuffled stream over n items: every item once per epoch, a fresh order each
    epoch from (seed, epoch). Its state is two integers, so a run can be resumed exactly."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def next(self, k):
        out = []
        while len(out) < k:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            take = order[self.pos:self.pos + k - len(out)]
            out.extend(int(i) for i in take)
            self.pos += len(take)
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out


# ---------------------------------------------------------------------------------------------
# JSONL files

class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


def load_jsonl(path, fields):
    """Read a JSONL file whose every line is an object with non-empty string `fields`."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; expected a JSONL file")
    try:
        with open(path, "rb") as f:  # bytes, so a bad encoding is reported with its line number
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e.strerror or e}") from None
    rows = []
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            "expected a JSONL file") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for field in fields:
            if field not in row:
                raise DataError(f"{path}:{lineno}: field '{field}' is missing")
            if not isinstance(row[field], str):
                raise DataError(f"{path}:{lineno}: field '{field}' must be a string, got {type(row[field]).__name__}")
            if not row[field].strip():
                raise DataError(f"{path}:{lineno}: field '{field}' is empty")
        rows.append({k: row[k] for k in fields})
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def load_split(path, held_out_path, loader, fraction, seed):
    """(training rows, held-out rows): from two files, or from one file whose held-out part is a
    random but reproducible `fraction` of its rows (at least one)."""
    rows = loader(path)
    if held_out_path:
        return rows, loader(held_out_path)
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} record; too few to hold some out for evaluation: give a held-out file too")
    order = np.random.default_rng(seed).permutation(len(rows))
    n = max(1, int(round(fraction * len(rows))))
    return [rows[i] for i in sorted(order[n:])], [rows[i] for i in sorted(order[:n])]


def load_prompts(path):
    return [r["prompt"] for r in load_jsonl(path, ("prompt",))]


def load_pairs(path):
    return load_jsonl(path, ("prompt", "chosen", "rejected"))
