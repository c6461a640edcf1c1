"""
data.py: prompts, preference pairs, tokenisation and batching, and the embedded default task
with its SFT model.

The embedded task ("write a short review") is built from a seed in about a second, with no
download: a corpus of (prompt, review) texts for supervised fine-tuning (SFT), training prompts,
held-out evaluation prompts, and offline preference pairs: two reviews from the SFT distribution
for one prompt, labelled by the gold reward of `reward.py`. A tied candidate pair (about 23% of
them) is dropped, and the label it cost is charged to the next pair kept (its "labels" field), so
offline pairs are counted in oracle labels the way online pairs are. Reviews are mixed on purpose
(positive, negative, neutral, off-topic, repetitive), so the SFT model samples good and bad
responses and leaves headroom for alignment. `embedded_policy` gives the policy every embedded
run starts from: a tiny GPT-2 with a BPE tokenizer trained on the task, fine-tuned on its corpus
once (about a minute on a CPU) and cached in --cache_dir.

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
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

from reward import ASPECTS, CATEGORY_OF, NEGATIVE, POSITIVE, gold_reward, load_pretrained, subject_of
from sail import disable_dropout, sequence_logps_of

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
    gold: object = gold_reward  # (prompt, response) -> float: the task's gold reward (reward.py's, here)


@functools.lru_cache(maxsize=2)  # --compare and the tests build it many times; nothing mutates it
def make_task(seed=0, n_sft=20000, n_pairs=4096, n_eval_prompts=64, n_eval_pairs=256):
    """Build the embedded task deterministically from `seed` (under a second, no download)."""
    rng = random.Random(seed)
    prompts = [t.format(s=s) for t in PROMPT_TEMPLATES for s in CATEGORY_OF]  # 8 x 24 = 192
    rng.shuffle(prompts)
    eval_prompts, train_prompts = prompts[:n_eval_prompts], prompts[n_eval_prompts:]

    def review_of(rng, prompt):
        return make_review(rng, subject_of(prompt))

    # SFT text covers every prompt, the held-out ones included: the model should know how to
    # review every subject; what alignment must learn is *which* reviews the oracle prefers.
    sft = [(p, review_of(rng, p)) for p in (rng.choice(prompts) for _ in range(n_sft))]
    return Task(sft, train_prompts, eval_prompts, labelled_pairs(rng, train_prompts, n_pairs, review_of, gold_reward),
                labelled_pairs(rng, eval_prompts, n_eval_pairs, review_of, gold_reward))


def labelled_pairs(rng, prompts, n, respond, gold):
    """n offline pairs on `prompts`: two responses `respond(rng, prompt)`, the chosen one by the gold
    reward. Each candidate pair costs one oracle label, a tie too (as online); a tie carries no
    preference, so it is dropped and its label charged to the next pair kept (its "labels")."""
    pairs, spent = [], 0
    while len(pairs) < n:
        prompt = rng.choice(prompts)
        y1, y2 = respond(rng, prompt), respond(rng, prompt)
        r1, r2 = gold(prompt, y1), gold(prompt, y2)
        spent += 1
        if r1 != r2:
            chosen, rejected = (y1, y2) if r1 > r2 else (y2, y1)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "labels": spent})
            spent = 0
    return pairs


TASKS = {"review": make_task}  # --task NAME -> its builder; plumbing/tasks.py adds explore and offpolicy


def embedded_task(cfg):
    """The embedded task that --task names: this file's review task (the default), or one of
    plumbing/tasks.py's, which are built to probe exploration and off-policy pairs; a builder's
    `options` name the options it also takes (explore: --explore_key_rate)."""
    build = TASKS[cfg.task]
    return build(cfg.task_seed, **{name: getattr(cfg, name) for name in getattr(build, "options", ())})


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
# The embedded task's SFT model: the policy every embedded run starts from (trained once, cached)

EMBEDDED_POSITIONS = 64  # the embedded model's context: prompt + response tokens


def embedded_path(cfg, task=None):
    """Where the embedded SFT model of these settings is cached: the review task's by its seed and SFT
    steps; another task's (--task) by a digest of its SFT corpus too, so that a changed corpus gets a
    new model. task: cfg's task, if already built."""
    if cfg.task == "review":
        return os.path.join(cfg.cache_dir, f"embedded-sft-task{cfg.task_seed}-steps{cfg.sft_steps}")
    corpus = hashlib.sha1(json.dumps((task or embedded_task(cfg)).sft).encode()).hexdigest()[:10]
    return os.path.join(cfg.cache_dir, f"embedded-sft-{cfg.task}-{corpus}-task{cfg.task_seed}-steps{cfg.sft_steps}")


def embedded_policy(cfg, task, device):
    """(model, tokenizer, seconds SFT took): the embedded SFT model, loaded from --cache_dir, or a
    tiny GPT-2 built, fine-tuned on task.sft and saved there. cfg: the run's Config (its sft_*, task,
    task_seed, cache_dir, max_prompt_len and max_new_tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = embedded_path(cfg, task)
    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"sft: loading the cached SFT model from {path}")
        what = "--cache_dir holds a broken SFT model (delete it to train it again):"
        return load_pretrained(AutoModelForCausalLM, path, what), load_pretrained(AutoTokenizer, path, what), 0.0
    check_writable_dir(cfg.cache_dir, "--cache_dir")  # before the SFT run, not after it
    check_context(cfg, EMBEDDED_POSITIONS)
    if cfg.sft_batch_size > len(task.sft):
        raise SystemExit(f"error: --sft_batch_size {cfg.sft_batch_size} is larger than the SFT corpus ({len(task.sft)} texts)")
    t0 = time.perf_counter()
    tokenizer = build_tokenizer([p + y for p, y in task.sft])
    tokenizer.model_max_length = EMBEDDED_POSITIONS
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=EMBEDDED_POSITIONS, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.task_seed)
    model = GPT2LMHeadModel(config).to(device)
    disable_dropout(model)
    supervised_finetune(model, prepare_tokenizer(tokenizer), task, cfg, device)
    os.makedirs(path + ".tmp", exist_ok=True)
    model.save_pretrained(path + ".tmp")
    tokenizer.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)  # a half-written cache is never mistaken for a finished one
    print(f"sft: trained and saved to {path} in {time.perf_counter() - t0:.1f}s")
    return model.cpu(), tokenizer, time.perf_counter() - t0


def supervised_finetune(model, tokenizer, task, cfg, device):
    """Maximum likelihood of the task's reviews given their prompts (the SFT phase): AdamW, cosine decay."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.sft_steps)))
    rng = random.Random(cfg.task_seed)
    model.train()
    bar = tqdm(range(cfg.sft_steps), desc="sft", dynamic_ncols=True)
    for _ in bar:
        prompts, responses = zip(*rng.sample(task.sft, cfg.sft_batch_size))
        batch = [t.to(device) for t in encode_responses(tokenizer, prompts, responses, cfg.max_prompt_len, cfg.max_new_tokens)]
        logps = sequence_logps_of(model, *batch)  # (B,)
        loss = -logps.sum() / batch[2].sum()  # mean negative log-likelihood per response token
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(nll=f"{loss.item():.3f}")


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


@dataclass
class Pairs:
    """The B preference pairs of one training step (train.build_pairs). `batch` holds their responses
    as rows, in this order (row i and row B + i are pair i's two):

        rows 0 .. B-1     y1 of every pair: the dataset pairs first (y1 their chosen response), then the online ones
        rows B .. 2B-1    y2 of every pair, in the same order (a dataset pair's rejected response)
        rows 2B .. 3B-1   SELM and XPO only (extensions/): y~, a response of the reference to each pair's prompt

    Each row is its prompt (left-padded), its response, then padding: docs/usage.md draws a batch."""
    route: np.ndarray  # (B,) sail.OFFLINE, DP, PP or PR, sorted: dataset pairs first, then online pairs
    prompts: list      # (B,) the prompt of each pair
    texts: list        # (2B,) y1 of every pair, then y2
    batch: tuple       # (ids, attention_mask, response_mask), each (2B [+ B], T)
    generated: int     # tokens sampled for it
    pair_ids: list     # the dataset pairs' ids (each costs its dataset's labels: plumbing/outputs.label_totals)
    extension: dict = field(default_factory=dict)  # what an extension keeps of the step (SAIL-RevKL's samples and penalty)


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


def decode(tokenizer, ids, response_mask):
    """Response texts of a batch, without the prompt, EOS or padding."""
    return tokenizer.batch_decode(torch.where(response_mask.bool(), ids, tokenizer.eos_token_id), skip_special_tokens=True)


def check_context(cfg, positions):
    """A prompt and its response must fit the model's positions (None: the model has no limit)."""
    if positions and cfg.max_prompt_len + cfg.max_new_tokens > positions:
        raise SystemExit(f"error: --max_prompt_len {cfg.max_prompt_len} + --max_new_tokens {cfg.max_new_tokens} = "
                         f"{cfg.max_prompt_len + cfg.max_new_tokens} tokens, more than the model's {positions} positions")


def check_lengths(cfg, inputs, positions, tokenizer):
    """Prompt + response must fit the model's `positions`; longer texts are cut, never silently:
    how many of each kind is printed."""
    check_context(cfg, positions)
    pairs = (inputs.pairs or []) + (inputs.eval_pairs or [])
    prompt = ("--max_prompt_len", cfg.max_prompt_len, "last", 0)
    for what, texts, (option, limit, kept, eos) in [
            ("training prompts", inputs.train_prompts, prompt), ("held-out prompts", inputs.eval_prompts, prompt),
            ("pair prompts", [x["prompt"] for x in pairs], prompt),
            ("pair responses", [x[k] for x in pairs for k in ("chosen", "rejected")],
             ("--max_new_tokens (EOS included)", cfg.max_new_tokens, "first", 1))]:  # a response ends with its EOS
        texts = texts or []
        unique = list(dict.fromkeys(texts))  # pair files repeat their prompts: each is tokenized once
        length = dict(zip(unique, map(len, tokenizer(unique, add_special_tokens=not eos)["input_ids"]))) if unique else {}
        n = sum(length[x] + eos > limit for x in texts)
        if n:
            print(f"note: {n} of {len(texts)} {what} are longer than {option} {limit} tokens and keep their {kept} {limit}")


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


def held_out_prompts(candidates, fraction, seed, cover=()):
    """A reproducible `fraction` (at least two) of the distinct prompts `candidates`, drawn in a
    random order fixed by `seed`; if a list of prompts in `cover` would have none of its own held
    out, its first prompt in that order is held out too (so every file split here gives some)."""
    distinct = list(dict.fromkeys(candidates))  # in order of first appearance
    order = [distinct[i] for i in np.random.default_rng(seed).permutation(len(distinct))]
    held = set(order[:max(2, int(round(fraction * len(distinct))))])  # two at least: evaluation's two halves
    for prompts in map(set, cover):
        if not held & prompts:
            held.add(next(p for p in order if p in prompts))
    return held


def load_prompts(path):
    return [r["prompt"] for r in load_jsonl(path, ("prompt",))]


def load_pairs(path):
    return load_jsonl(path, ("prompt", "chosen", "rejected"))


def load_inputs(cfg):
    """Prompts and pairs for training and held out (task, train_prompts, eval_prompts, pairs,
    eval_pairs): the embedded task's, or JSONL files. Held out means held out: the split is made by
    prompt, so a held-out prompt reaches no training prompt, training pair or proxy-fit pair.
      * A training file without its held-out file (--prompts without --eval_prompts, --pairs
        without --eval_pairs) gives up a --holdout fraction of the distinct prompts, drawn once over
        both, with every row of those prompts: the prompt split and the pair split agree.
      * Rows of the training files whose prompt is held out by a held-out file (or by the embedded
        task) are dropped, and counted in the line printed.
    The split's sizes, and each file's exact-duplicate rows (kept; a held-out prompt is evaluated
    once), are printed."""
    task = embedded_task(cfg) if cfg.model == "embedded" or not cfg.prompts else None
    prompts = load_prompts(cfg.prompts) if cfg.prompts else task.train_prompts
    pairs = load_pairs(cfg.pairs) if cfg.pairs else (task and task.pairs)
    eval_prompts = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else (None if cfg.prompts else task.eval_prompts)
    eval_pairs = load_pairs(cfg.eval_pairs) if cfg.eval_pairs else (None if cfg.pairs else (task and task.eval_pairs))
    for path, rows in ((cfg.prompts, prompts), (cfg.pairs, pairs), (cfg.eval_prompts, eval_prompts), (cfg.eval_pairs, eval_pairs)):
        repeats = len(rows) - len({json.dumps(r, sort_keys=True) for r in rows}) if path else 0
        if repeats:  # kept: a repeated pair is a weight the data chose (held-out prompts are evaluated once, below)
            print(f"data: {path} holds {repeats} exact duplicate rows")
    held = set(eval_prompts or ()) | {x["prompt"] for x in eval_pairs or ()}  # held out by a file or by the embedded task
    to_split = [kept for rows, fixed in ((prompts, eval_prompts), ([x["prompt"] for x in pairs or ()], eval_pairs))
                if fixed is None and (kept := [p for p in rows if p not in held])]  # the prompts of each training file to split
    if to_split:
        held |= held_out_prompts([p for rows in to_split for p in rows], cfg.holdout, cfg.task_seed, to_split)
    dropped = (sum(p in held for p in prompts) if eval_prompts is not None else 0,
               sum(x["prompt"] in held for x in pairs or ()) if eval_pairs is not None else 0)
    if eval_prompts is None:
        eval_prompts = [p for p in prompts if p in held]
    eval_prompts = list(dict.fromkeys(eval_prompts))  # each held-out prompt once: evaluation halves them by prompt
    if eval_pairs is None and pairs:
        eval_pairs = [q for q in pairs if q["prompt"] in held]
    x = SimpleNamespace(task=task, train_prompts=[p for p in prompts if p not in held], eval_prompts=eval_prompts,
                        pairs=pairs and [q for q in pairs if q["prompt"] not in held], eval_pairs=eval_pairs)
    if not x.train_prompts:
        raise DataError(f"{cfg.prompts or 'the training prompts'}: every prompt is held out; give more prompts, a held-out file, or a smaller --holdout")
    if pairs and not x.pairs:
        raise DataError(f"{cfg.pairs or 'the pairs'}: every pair's prompt is held out; give more pairs, a held-out file, or a smaller --holdout")
    if len(x.eval_prompts) < 2:
        raise DataError(f"{cfg.eval_prompts or cfg.prompts}: {len(x.eval_prompts)} distinct held-out prompt; evaluation needs two at least "
                        "(it reports each figure on both halves of them)")
    print(f"data: training {len(x.train_prompts)} prompts and {len(x.pairs or [])} pairs | held out {len(x.eval_prompts)} prompts and "
          f"{len(x.eval_pairs or [])} pairs" + (f" ({sum(unseen_pairs(x.pairs, x.eval_pairs))} with texts in no training pair)" if x.eval_pairs else "")
          + ", split by prompt"
          + (f" | dropped {dropped[0]} training prompts and {dropped[1]} training pairs whose prompt is held out" if any(dropped) else ""))
    return x


def unseen_pairs(pairs, eval_pairs):
    """[bool] per held-out pair: neither of its responses is a training pair's text. Held-out prompts
    are never trained on, but they share their subjects (and so their responses) with training
    prompts: held-out pair accuracy on these alone is accuracy on texts never trained on."""
    seen = {text for x in pairs or [] for text in (x["chosen"], x["rejected"])}
    return [x["chosen"] not in seen and x["rejected"] not in seen for x in eval_pairs]


def check_writable_dir(path, option="--out_dir"):
    """Fail at once, before any training, if a directory the run writes to cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")  # one per process (ranks check at once)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: {option} {path!r} cannot be written: {e.strerror or e}") from None
