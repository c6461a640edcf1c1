"""
reward.py: the preference side of SAIL. Who says which response is better?

  * `gold_reward` / `GoldReward`: the embedded task's oracle. A short review scores well when
    it is positive, names what it reviews, is a finished sentence and does not repeat itself.
    It is programmatic, deterministic and cheap, and it plays two roles that are kept apart in
    the code: the labeller that answers oracle queries during training, and the yardstick for
    evaluation (`train.py` calls it for both, but counts only the labelling calls as queries).
    `GoldReward` batches any embedded task's score (`--task`: plumbing/tasks.py has two more).
  * `HFRewardModel`: any Hugging Face sequence-classification reward model with its own
    tokenizer. It scores *decoded text*, never the policy's token ids.
  * `fit_reward_model`: a learned labeller, as in real RLHF: a small GPT-2 sequence classifier
    fit by Bradley-Terry's likelihood (`bradley_terry_loss`) on preference pairs and saved with
    save_pretrained, so that it is used like any `HFRewardModel`. It is a *proxy* of the reward
    that labelled its pairs; train.py --proxy makes it the labeller while the oracle stays the
    yardstick, so that a policy's exploiting it (over-optimisation) can be measured.
  * `bradley_terry_label`: a pairwise label from two rewards (hard by default, sampled optional).
  * `self_label`: SAIL's self-labelling, z ~ Bernoulli(sigmoid(beta * h)) from the policy's
    own implicit reward; it costs no oracle query.

Run `python -c "import reward; print(reward.gold_reward('Review of the pizza:', ' the pizza was great .'))"`
to try the oracle.

Departures from the paper:
  1. The paper's oracles are 7B reward models (beaver-7b, Eurus-RM-7b). The default task uses a
     programmatic gold reward so that the whole loop runs on a laptop in minutes and so that
     the evaluation reward is exact, not another model's opinion.
  2. Hard labels leave a tie (equal rewards) undefined; under Bradley-Terry it is a fair coin.
     `bradley_terry_label` marks it invalid and the loss values it at the coin's expectation
     (`sail.pair_value`), or, with ties="first", keeps y1 as the chosen response, as the official
     trainer does (the same coin in distribution). Either way it counts as an oracle query.
"""
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# The gold reward of the embedded task: the lexicon it knows and the score it gives.

SUBJECTS = {  # category -> things one can review; each category has its own aspects
    "food": ["pizza", "soup", "pasta", "burger", "salad", "coffee"],
    "film": ["movie", "show", "album", "book", "concert", "play"],
    "place": ["hotel", "park", "museum", "beach", "cafe", "gym"],
    "gadget": ["phone", "laptop", "camera", "headphones", "watch", "bike"],
}
ASPECTS = {
    "food": ["taste", "service", "smell", "portion"],
    "film": ["story", "acting", "music", "ending"],
    "place": ["staff", "view", "location", "crowd"],
    "gadget": ["battery", "screen", "design", "sound"],
}
POSITIVE = ["great", "good", "lovely", "excellent", "amazing", "wonderful", "fantastic", "perfect", "nice", "superb"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor", "horrible", "bland", "dull", "broken", "disappointing"]
NEGATIONS = {"not", "never", "no"}
STOPWORDS = {"the", "a", "it", "was", "is", "and", "but", "i", "this", "so", "very", "really", "quite", "at", "all"}

CATEGORY_OF = {s: c for c, subjects in SUBJECTS.items() for s in subjects}
_POLARITY = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}
_WORD = re.compile(r"[a-z]+")


def subject_of(prompt):
    """The thing a prompt asks to review: the last known subject named in it (None if none)."""
    found = [w for w in _WORD.findall(prompt.lower()) if w in CATEGORY_OF]
    return found[-1] if found else None


def gold_reward(prompt, response):
    """Score one review. Roughly in [-4, 4]; the responses of the default SFT model average ~0.6.

    sentiment  +1 per distinct positive word, -1 per distinct negative word, a negation ("not
               great") flips the word after it; clipped to [-3, 3]. Counting distinct words
               is the guard against "great great great".
    on topic   +1 if it names the subject or one of its category's aspects and no other subject.
    repetition -0.5 for each repeated content word (anything outside STOPWORDS).
    finished   -1 unless the text ends with "." (a response cut off by the length limit).
    An empty response scores -2.
    """
    words = _WORD.findall(response.lower())
    if not words:
        return -2.0
    positive, negative = set(), set()
    for prev, word in zip([""] + words[:-1], words):
        sign = _POLARITY.get(word, 0) * (-1 if prev in NEGATIONS else 1)
        if sign > 0:
            positive.add(word)
        elif sign < 0:
            negative.add(word)
    sentiment = max(-3, min(3, len(positive) - len(negative)))

    subject = subject_of(prompt)
    named = {w for w in words if w in CATEGORY_OF}
    own = {subject} | set(ASPECTS.get(CATEGORY_OF.get(subject), []))
    on_topic = bool(own & set(words)) and named <= {subject}

    content = [w for w in words if w not in STOPWORDS]
    repeats = len(content) - len(set(content))
    finished = response.rstrip().endswith(".")
    return float(sentiment + on_topic - 0.5 * repeats - (not finished))


class GoldReward:
    """The oracle of an embedded task as a batch scorer: (prompts, responses) -> (B,) float32.
    score: the task's (prompt, response) -> float (data.Task.gold; gold_reward above by default)."""

    def __init__(self, score=gold_reward):
        self.score = score

    def __call__(self, prompts, responses):
        return torch.tensor([self.score(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# A Hugging Face reward model with its own tokenizer.

class ModelError(ValueError):
    """A model or reward model that cannot be loaded, or a reward model without one score per text."""


def load_pretrained(auto_class, path, what):
    """`auto_class.from_pretrained(path)`, or ModelError with one line naming `what` (an option) and
    the path: a file or a directory that is not a saved model, broken weights, an unknown hub id."""
    if os.path.isfile(path):
        raise ModelError(f"{what} {path}: is a file; expected a directory written by save_pretrained, or a hub id")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{what} {path}: no config.json in this directory; expected a directory written by save_pretrained")
    try:
        return auto_class.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  transformers raises OSError, ValueError, KeyError, ... by cause
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"{what} {path}: cannot be loaded ({type(e).__name__}: {first})") from None


class HFRewardModel:
    """Wrap an `AutoModelForSequenceClassification` as a reward: (prompts, responses) -> (B,).

    It scores decoded text `prompt + response` with its *own* tokenizer, in batches, under
    `no_grad`, truncated to its own max length; it stays in eval mode with no gradients. A reward
    model has one output (num_labels=1); for a classifier, `label` names the output whose logit
    is the reward (a label name such as "POSITIVE", or an index). With `text_pair`, prompt and
    response go in as a text pair (as OpenAssistant's reward models expect) instead of one text.
    """

    def __init__(self, name_or_path, device="cpu", batch_size=32, max_length=None, label="", dtype=None, text_pair=False,
                 what="reward model"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = load_pretrained(AutoModelForSequenceClassification, name_or_path, what)
        self.tokenizer = load_pretrained(AutoTokenizer, name_or_path, what)
        kinds = getattr(self.model.config, "architectures", None) or []
        if kinds and not any(k.endswith("ForSequenceClassification") for k in kinds):  # it would load with a random head
            raise ModelError(f"{what} {name_or_path}: is a {', '.join(kinds)}, not a sequence classifier (a reward model)")
        n_outputs, names = self.model.config.num_labels, {v: int(k) for k, v in self.model.config.id2label.items()}
        if label:
            self.column = names.get(label, int(label) if label.isdigit() else -1)
            if not 0 <= self.column < n_outputs:
                raise ModelError(f"{what} {name_or_path}: no output label {label!r}; its labels are {sorted(names, key=names.get)}")
        elif n_outputs != 1:
            raise ModelError(f"{what} {name_or_path}: expected one score per text (num_labels=1), got num_labels="
                             f"{n_outputs}; for a classifier, name the output to use (--reward_label, one of {sorted(names, key=names.get)})")
        else:
            self.column = 0
        if self.tokenizer.pad_token is None:  # GPT-2-style tokenizers have no pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right padding: a model with learned absolute positions (GPT-2) would give a left-padded
        # text positions that depend on the longest text of its batch, and so another score.
        self.tokenizer.padding_side = "right"
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.batch_size, self.text_pair = device, batch_size, text_pair
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length, max_length]
        self.max_length = min(n for n in limits if n)  # model_max_length is huge when unknown

    @torch.no_grad()
    def __call__(self, prompts, responses):
        prompts, responses = list(prompts), list(responses)
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            p, r = prompts[i:i + self.batch_size], responses[i:i + self.batch_size]
            text = (p, r) if self.text_pair else ([a + b for a, b in zip(p, r)],)
            enc = self.tokenizer(*text, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits  # (b, num_labels)
            if logits.dim() != 2 or logits.shape[0] != enc["input_ids"].shape[0]:
                raise ModelError(f"reward model output has shape {tuple(logits.shape)}; expected one score per text")
            scores.append(logits[:, self.column].float().cpu())
        return torch.cat(scores)  # (B,)


# ---------------------------------------------------------------------------------------------
# A learned labeller: a Bradley-Terry reward model fit on preference pairs

def bradley_terry_loss(chosen_scores, rejected_scores):
    """Each pair's negative log-likelihood under Bradley-Terry, -log sigmoid(r_w - r_l) (B,): the
    reward-model loss of RLHF (Ouyang et al. 2022, eq. 1). chosen_scores, rejected_scores: (B,)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def pair_accuracy(reward, pairs):
    """The share of `pairs` ({prompt, chosen, rejected}) whose chosen response `reward` scores
    higher (a tie is half)."""
    prompts = [x["prompt"] for x in pairs]
    chosen, rejected = reward(prompts, [x["chosen"] for x in pairs]), reward(prompts, [x["rejected"] for x in pairs])
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()


def fit_reward_model(path, pairs, held_out, tokenizer, width=64, layers=2, steps=300, batch_size=64, lr=1e-3, seed=0, device="cpu"):
    """Fit a `layers`-layer, `width`-wide GPT2ForSequenceClassification (one output, built here, no
    download) by Bradley-Terry on `pairs`, scoring `prompt + response` with `tokenizer` (as
    HFRewardModel does), AdamW with cosine decay; save it and its tokenizer to `path` (atomically:
    a half-written one is never found) with fit.json, which holds its accuracy on the `held_out`
    pairs. Its random start and batches depend on `seed` alone. Returns that accuracy."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # as HFRewardModel scores: positions that do not depend on the batch
    positions = min(tokenizer.model_max_length, 1024)  # (model_max_length is huge when a tokenizer does not know it)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=width, n_layer=layers, n_head=4, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):  # the run's own streams are left as they were
        torch.manual_seed(seed)
        model = GPT2ForSequenceClassification(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng, model = random.Random(seed), model.train()
    for _ in range(steps):
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        texts = [x["prompt"] + x[k] for k in ("chosen", "rejected") for x in batch]  # chosen rows, then rejected rows
        enc = tokenizer(texts, padding=True, truncation=True, max_length=positions, return_tensors="pt").to(device)
        scores = model(**enc).logits.squeeze(-1)  # (2b,)
        loss = bradley_terry_loss(scores[:len(batch)], scores[len(batch):]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    tmp = f"{path}.tmp{os.getpid()}"  # one per process: two runs fitting the same proxy never write into one another
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    accuracy = pair_accuracy(HFRewardModel(tmp, device), held_out) if held_out else None
    with open(os.path.join(tmp, "fit.json"), "w") as f:
        json.dump({"pairs": len(pairs), "held_out_pairs": len(held_out or []), "held_out_accuracy": accuracy, "width": width,
                   "layers": layers, "steps": steps, "last_loss": loss.item()}, f, indent=1)
    try:
        os.replace(tmp, path)  # atomic: a half-written proxy is never found
    except OSError:  # another process saved the same proxy first: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
    return accuracy


# ---------------------------------------------------------------------------------------------
# Turning scores into pairwise labels.

@dataclass
class Labels:
    """Who won each pair: y1 until a label says otherwise (the oracle's for SAIL-PR pairs, the
    policy's own for SAIL-DP and SAIL-PP pairs)."""
    y1_wins: torch.Tensor  # (B,) bool
    valid: torch.Tensor    # (B,) bool: False for a tied oracle label, which still trains, worth its fair-coin value (sail.pair_value)
    scores: torch.Tensor   # (2B,) the oracle's rewards of the rows it labelled, NaN elsewhere
    queries: int = 0
    ties: int = 0


def bradley_terry_label(r1, r2, mode="hard", generator=None, ties="average"):
    """Label pairs (y1, y2) from their rewards r1, r2, each (B,).

    Returns (y1_wins, valid), both (B,) bool. Bradley-Terry: P(y1 > y2) = sigmoid(r1 - r2).
    mode="hard":    y1 wins iff r1 > r2. A tie (r1 = r2) is Bradley-Terry's fair coin: with
                    ties="average" it is marked invalid (the loss takes the coin's expectation,
                    sail.pair_value); with ties="first" y1 is chosen and the pair is valid, as the
                    official trainer leaves it (it swaps only if r1 < r2).
    mode="sampled": y1 wins with probability sigmoid(r1 - r2) (a tie: the coin, drawn); every pair is valid.
    """
    if mode == "hard":
        return (r1 >= r2, torch.ones_like(r1, dtype=torch.bool)) if ties == "first" else (r1 > r2, r1 != r2)
    if mode == "sampled":
        y1_wins = torch.bernoulli(torch.sigmoid(r1 - r2), generator=generator).bool()
        return y1_wins, torch.ones_like(y1_wins)
    raise ValueError(f"label mode must be 'hard' or 'sampled', got {mode!r}")


def self_label(h, beta, generator=None):
    """SAIL's self-labelling: the policy's own Bradley-Terry preference between y1 and y2.

    h (B,) = [log pi(y1) - log ref(y1)] - [log pi(y2) - log ref(y2)], so that beta * h is the
    implicit reward margin. Returns y1_wins (B,) bool with z ~ Bernoulli(sigmoid(beta * h)).
    """
    p = torch.sigmoid(beta * h.detach().float().cpu())  # on the CPU, where the label generator lives
    return torch.bernoulli(p, generator=generator).bool()
