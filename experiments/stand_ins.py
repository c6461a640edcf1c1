"""
experiments/stand_ins.py: random-weight stand-ins of the recipes' models (docs/scaling.md), at their real
sizes, and JSONL files of their data's shapes, built locally (no download). A random-weight model
costs the time and memory of the trained one, so a recipe run on them measures what it would cost.

    python -m experiments.stand_ins --stand_ins stand_ins    # then run a recipe with its paths swapped in

Its --stand_ins option names the directory; the embedded task's --task_seed picks the text.
"""
import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import NamedTuple

import torch

import data
from data import check_writable_dir
from train import arg, cli


@dataclass
class StandInOptions:
    stand_ins: str = arg("stand_ins", "the directory to write the stand-ins and their JSONL files to")

    def problems(self):
        return [] if self.stand_ins else ["--stand_ins: name a directory"]


class StandIn(NamedTuple):
    hub_id: str   # the checkpoint it stands in for
    arch: str     # its config's model_type
    vocab: int
    sizes: dict   # the config's sizes, as published
    labels: list  # a classifier's outputs (None: a causal LM)


STAND_INS = {
    "gpt2": StandIn("gpt2", "gpt2", 50257, dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024), None),
    "gpt2-medium": StandIn("gpt2-medium", "gpt2", 50257, dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024), None),
    "pythia-160m": StandIn("EleutherAI/pythia-160m", "gpt_neox", 50304, dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=2048,
        rotary_pct=0.25), None),
    "pythia-410m": StandIn("EleutherAI/pythia-410m", "gpt_neox", 50304, dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, max_position_embeddings=2048,
        rotary_pct=0.25), None),
    "distilbert-imdb": StandIn("lvwerra/distilbert-imdb", "distilbert", 30522, dict(
        dim=768, n_layers=6, n_heads=12, hidden_dim=3072, max_position_embeddings=512), ["NEGATIVE", "POSITIVE"]),
    "reward-model-deberta-v3-large-v2": StandIn("OpenAssistant/reward-model-deberta-v3-large-v2", "deberta-v2", 128100, dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, pooler_hidden_size=1024,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
        type_vocab_size=0, layer_norm_eps=1e-7), ["reward"]),
}
TINY = {  # the same architectures, a few thousand times smaller (and a vocabulary of 1000), for the tests
    "gpt2": dict(n_embd=16, n_layer=2, n_head=2), "gpt_neox": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                                    intermediate_size=32),
    "distilbert": dict(dim=16, n_layers=1, n_heads=2, hidden_dim=32),
    "deberta-v2": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, pooler_hidden_size=16),
}


def write_stand_in(path, name, tiny=False, task_seed=0):
    """Save the stand-in `name` to `path` with save_pretrained (loaded back with from_pretrained,
    as a real checkpoint). A causal LM gets the embedded task's tokenizer, its vocabulary filled up
    to the model's with placeholder tokens <unusedN>, so that every sampled id decodes; a reward
    model gets a word-level tokenizer that reads each of those (and each word) as one token, so it
    sees about as many tokens as the policy wrote."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer, config = stand_in_config(name, tiny, task_seed)
    with torch.random.fork_rng(devices=[]):  # the same random weights every time, the caller's stream untouched
        torch.manual_seed(0)
        model = (AutoModelForSequenceClassification if STAND_INS[name].labels else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(path + ".tmp")
    tokenizer.save_pretrained(path + ".tmp")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".tmp", path)
    return path


def stand_in_config(name, tiny=False, task_seed=0):
    """The stand-in's tokenizer and transformers config (tiny: TINY's sizes, a vocabulary of 1000)."""
    from transformers import AutoConfig

    _, arch, vocab, sizes, labels = STAND_INS[name]
    vocab, sizes = (1000, {**sizes, **TINY[arch]}) if tiny else (vocab, sizes)
    texts = [p + y for p, y in data.make_task(task_seed).sft[:2000]]
    if labels:
        tokenizer = word_level_tokenizer(sorted({w for x in texts for w in x.split()}), vocab)
        return tokenizer, AutoConfig.for_model(arch, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, num_labels=len(labels),
                                               id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}, **sizes)
    tokenizer = data.build_tokenizer(texts)
    tokenizer.add_tokens([f"<unused{i}>" for i in range(len(tokenizer), vocab)])
    return tokenizer, AutoConfig.for_model(arch, vocab_size=vocab, bos_token_id=tokenizer.eos_token_id,
                                           eos_token_id=tokenizer.eos_token_id, **sizes)


def word_level_tokenizer(words, vocab):
    """[CLS] text [SEP] (text pairs: [CLS] a [SEP] b [SEP]), one token per word or <unusedN>
    placeholder, [UNK] for those beyond the vocabulary; at most 512 tokens, as BERT's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]
    names = (specials + words)[:vocab] + [f"<unused{i}>" for i in range(vocab - len(specials) - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"<unused\d+>"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=512, model_input_names=["input_ids", "attention_mask"])


def write_stand_ins(out, tiny=False, task_seed=0):
    """`--stand_ins DIR`: the recipes' models (docs/scaling.md) (random weights, real sizes) and JSONL files
    of the shapes of theirs (IMDB prompts of 8 words; HH dialogues of 50-400 words, answers of
    20-150), from the embedded task's sentences. Returns {hub id or file name: local path}."""
    check_writable_dir(out, "--stand_ins")
    rng = random.Random(task_seed)
    words = " ".join(y for _, y in data.make_task(task_seed).sft).split()

    def text(n):  # n words of the embedded task's text, from a random place
        i = rng.randrange(len(words) - n)
        return " ".join(words[i:i + n])

    paths = {}
    for name in ("gpt2", "pythia-410m", "distilbert-imdb", "reward-model-deberta-v3-large-v2"):
        paths[STAND_INS[name].hub_id] = write_stand_in(os.path.join(out, name), name, tiny, task_seed)
    dialogues = [f"\n\nHuman: {text(rng.randint(50, 400))}\n\nAssistant:" for _ in range(100)]
    files = {"imdb_prompts.jsonl": [{"prompt": text(8)} for _ in range(200)],
             "hh_prompts.jsonl": [{"prompt": p} for p in dialogues],
             "hh_pairs.jsonl": [{"prompt": p, "chosen": " " + text(rng.randint(20, 150)), "rejected": " " + text(rng.randint(20, 150))}
                                for p in dialogues]}
    for name, rows in files.items():
        paths[name] = os.path.join(out, name)
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in rows)
    print(f"stand-ins in {out}/: " + ", ".join(f"{os.path.basename(p)} (for {k})" for k, p in paths.items()))
    return paths


if __name__ == "__main__":
    cli(run=lambda cfg, opts: write_stand_ins(opts.stand_ins, task_seed=cfg.task_seed), extra=StandInOptions,
        description="write the recipes' stand-ins (experiments/stand_ins.py)")
