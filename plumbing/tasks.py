"""
plumbing/tasks.py: the embedded tasks beyond the default one, each built to probe one mechanism
SAIL claims, and the registry that `--task` names.

    python train.py --task explore        # or offpolicy; the default, review, is data.make_task
    python -m experiments.tasks           # each task's measured properties, and its comparison

A task is a data.Task: training and held-out prompts, an SFT corpus, offline pairs labelled by its
gold reward (data.labelled_pairs: ties dropped and charged), and that gold reward (Task.gold).
The step's code does not know which task runs; a learner who reads the review task need not read
this file.

  * review (data.make_task): short reviews, scored for sentiment, topic, repetition and a finished
    sentence. It probes neither mechanism below.
  * explore: a reward flat below its top band, with a one-word jump to it. Each category of
    subject has one key word (KEY_WORDS) worth 3 of the reward's 4 points, and the SFT corpus
    uses the subject's own key word in EXPLORE_KEY_RATE (5%) of its texts (and another
    category's, worth nothing, as often): --explore_key_rate dials that share, and with it how
    often the SFT model samples a key word (docs/tasks.md measures it).
    `explore_reward` is written out below and tested by hand.
  * offpolicy: the review task (its prompts, SFT corpus and gold reward, data.make_task's, bit for
    bit) with each response of its offline pairs, and of its held-out pairs, opened by a phrase its
    SFT corpus never uses ("honestly ,", "in short ,": OPENERS). The gold reward ignores the
    opener, so every pair keeps its texts after it, its label and its label cost: the one change is
    that offline DPO trains on texts its policy would rarely write.

experiments/tasks.py measures what each task is built to have (the share of SFT samples in the
explore task's top band, the SFT model's log-likelihood of each task's offline responses against
its own samples); docs/tasks.md has the figures.

Departures from the paper:
  1. The paper's tasks are real datasets (PKU-SafeRLHF, UltraFeedback) scored by 7B reward models;
     these are small synthetic tasks with exact gold rewards, so that each mechanism can be
     isolated and every run is minutes on a CPU.
"""
import random
import re

import numpy as np

import data
from data import Task, labelled_pairs, make_task
from reward import ASPECTS, CATEGORY_OF, STOPWORDS, gold_reward, subject_of

STREAM_ID = {"explore": 1, "offpolicy": 2}  # each task's spawn key for its random stream: never renumber (it would change the texts)

# ---------------------------------------------------------------------------------------------
# explore: a flat reward, a one-word jump to its top band, and a dial on how often the corpus says the word

KEY_WORDS = {"food": "fresh", "film": "classic", "place": "hidden", "gadget": "wireless"}  # worth 3 points each
EXPLORE_KEY_RATE = 0.05  # the share of SFT texts with the subject's own key word (and, as often, another category's)
DESCRIPTIONS = ["red", "blue", "green", "small", "large", "round", "heavy", "light", "soft", "warm", "cold", "dark", "bright",
                "simple", "modern", "busy", "long", "short"]  # words worth nothing to explore_reward
EXPLORE_PROMPTS = ["Describe the {s}:", "A few words on the {s}:", "Say something about the {s}:", "Tell me about the {s}:",
                   "What is the {s} like?", "The {s} in a sentence:", "Describe this {s}:", "Picture the {s}:"]
EXPLORE_TEMPLATES = ["the {s} is {a} .", "the {s} is {a} and {b} .", "a {a} {s} .", "the {s} has a {a} {x} .",
                     "it is {a} .", "the {o} is {a} .", "the {s} is {a} , the {x} is {b} .", "{a} , {a} , {a} ."]
_WORD = re.compile(r"[a-z]+")


def explore_reward(prompt, response):
    """Score one description; at most 4, the SFT model's responses average ~0.6.

    key        +3 if it holds the key word of the subject's category (KEY_WORDS[category]).
    on topic   +1 if it names the subject or one of its category's aspects and no other subject.
    repetition -0.5 for each repeated content word (anything outside reward.STOPWORDS).
    finished   -1 unless the text ends with "." (a response cut off by the length limit).
    An empty response scores -2.
    """
    words = _WORD.findall(response.lower())
    if not words:
        return -2.0
    subject = subject_of(prompt)
    category = CATEGORY_OF.get(subject)
    key = category is not None and KEY_WORDS[category] in words
    named = {w for w in words if w in CATEGORY_OF}
    on_topic = bool(({subject} | set(ASPECTS.get(category, []))) & set(words)) and named <= {subject}
    content = [w for w in words if w not in STOPWORDS]
    repeats = len(content) - len(set(content))
    finished = response.rstrip().endswith(".")
    return float(3 * key + on_topic - 0.5 * repeats - (not finished))


def task_rng(seed, task):
    """A Python random stream for `task`'s texts: drawn from the root seed with np.random.SeedSequence,
    its spawn key STREAM_ID[task], so that no two tasks (nor the review task's random.Random(seed))
    share numbers."""
    return random.Random(int(np.random.SeedSequence(seed, spawn_key=(STREAM_ID[task],)).generate_state(1)[0]))


def make_description(rng, subject, key_rate=EXPLORE_KEY_RATE):
    """One description of `subject` from the explore task's SFT distribution."""
    category = CATEGORY_OF[subject]
    u = rng.random()
    if u < key_rate:  # the subject's own key word, in the first adjective's place
        a = KEY_WORDS[category]
    elif u < 2 * key_rate:  # a decoy: another category's key word, worth nothing (a key word pays only for its own category)
        a = KEY_WORDS[rng.choice([c for c in KEY_WORDS if c != category])]
    else:
        a = rng.choice(DESCRIPTIONS)
    other = rng.choice([s for s in CATEGORY_OF if s != subject])
    return " " + rng.choice(EXPLORE_TEMPLATES).format(s=subject, o=other, x=rng.choice(ASPECTS[category]), a=a,
                                                      b=rng.choice(DESCRIPTIONS))


def make_explore_task(seed=0, n_sft=20000, n_pairs=4096, n_eval_prompts=64, n_eval_pairs=256, explore_key_rate=EXPLORE_KEY_RATE):
    """The explore task, deterministically from `seed`, laid out as data.make_task's; the share of
    its texts saying the subject's key word is explore_key_rate (--explore_key_rate: the difficulty
    dial; the gold reward is the same at every rate)."""
    rng = task_rng(seed, "explore")
    prompts = [t.format(s=s) for t in EXPLORE_PROMPTS for s in CATEGORY_OF]  # 8 x 24 = 192
    rng.shuffle(prompts)
    eval_prompts, train_prompts = prompts[:n_eval_prompts], prompts[n_eval_prompts:]

    def respond(rng, prompt):
        return make_description(rng, subject_of(prompt), explore_key_rate)

    # as data.make_task: the SFT text covers every prompt (unlabelled); held-out prompts get no training pair
    sft = [(p, respond(rng, p)) for p in (rng.choice(prompts) for _ in range(n_sft))]
    return Task(sft, train_prompts, eval_prompts, labelled_pairs(rng, train_prompts, n_pairs, respond, explore_reward),
                labelled_pairs(rng, eval_prompts, n_eval_pairs, respond, explore_reward), gold=explore_reward)


# ---------------------------------------------------------------------------------------------
# offpolicy: the review task with its offline pairs' responses opened by phrases its SFT model never writes

OPENERS = ["honestly ,", "frankly ,", "overall ,", "all in all ,", "in short ,"]  # no word of the SFT corpus or of the gold reward


def make_offpolicy_task(seed=0):
    """The review task of `seed`, each response of its offline and held-out pairs opened by one of
    OPENERS, drawn for each response from the task's own stream. The gold reward ignores the opener
    (tested), so chosen stays chosen and every pair keeps the labels it cost."""
    review = make_task(seed)
    rng = task_rng(seed, "offpolicy")

    def restyled(pairs):
        return [{**x, "chosen": " " + rng.choice(OPENERS) + x["chosen"], "rejected": " " + rng.choice(OPENERS) + x["rejected"]}
                for x in pairs]

    return Task(review.sft, review.train_prompts, review.eval_prompts, restyled(review.pairs), restyled(review.eval_pairs),
                gold=gold_reward)


TASKS = data.TASKS  # --task NAME: the review task's registry (data.py), with these two added
TASKS.update(explore=make_explore_task, offpolicy=make_offpolicy_task)
make_explore_task.options = ("explore_key_rate",)  # the options data.embedded_task hands it
