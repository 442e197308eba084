"""The built-in tiny example the end-to-end demo runs on, built offline in seconds and the same on every machine.

:func:`build_example` writes:

- ``llama/``: a tiny randomly initialised Llama causal LM (an HF folder, ``save_pretrained``) with its tokenizer;
- ``bert/``: a tiny randomly initialised BERT encoder, the base for a sentiment classifier, with its tokenizer;
- ``support_formal.jsonl`` / ``support_casual.jsonl``: support replies in two styles, one LoRA each;
- ``sentiment_train.jsonl`` / ``sentiment_eval.jsonl``: short reviews labelled ``positive`` / ``negative``.

The texts come from small templates filled in a fixed order, and the tokenizer is a word-level vocabulary built from
them with the ``tokenizers`` library, so nothing is downloaded. Dropout is off in both models, which makes a training
run reproducible across process counts (see :mod:`adapterkit.train.loop`).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

import torch

from adapterkit.io.outputs import output

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

ISSUES = ["order", "refund", "invoice", "password", "delivery", "account", "subscription", "package"]
ACTIONS = ["look into it", "fix it", "send an update", "process it", "check it", "sort it out"]
TIMES = ["today", "tomorrow", "within a day", "this week", "within an hour"]
FORMAL = [
    "dear customer , thank you for contacting us about your {issue} . we will {action} {time} . kind regards .",
    "good afternoon . we apologise for the trouble with your {issue} and we will {action} {time} . sincerely .",
]
CASUAL = [
    "hey ! sorry about the {issue} , we will {action} {time} . cheers !",
    "hi there ! ugh , that {issue} thing again . we will {action} {time} , promise !",
]
SUBJECTS = ["the movie", "the film", "the plot", "the acting", "the ending", "the soundtrack", "the story", "the cast"]
POSITIVE = ["great", "wonderful", "moving", "brilliant", "charming", "delightful", "superb", "fun"]
NEGATIVE = ["boring", "awful", "dull", "terrible", "clumsy", "tedious", "bland", "painful"]
REVIEW = ["{subject} was {word} .", "honestly , {subject} was {word} and i {verb} it .", "{subject} felt {word} ."]
VERB = {"positive": "loved", "negative": "hated"}
SEED = 0


def support_replies(templates: list[str]) -> list[dict]:
    return [
        {"text": template.format(issue=issue, action=action, time=time)}
        for template, issue, action, time in itertools.product(templates, ISSUES, ACTIONS, TIMES)
    ]


def reviews() -> list[dict]:
    records = []
    for label, words in (("positive", POSITIVE), ("negative", NEGATIVE)):
        for template, subject, word in itertools.product(REVIEW, SUBJECTS, words):
            records.append({"text": template.format(subject=subject, word=word, verb=VERB[label]), "label": label})
    random.Random(SEED).shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def word_tokenizer(texts: list[str], classifier: bool):
    """A word-level tokenizer over ``texts``; for a classifier it wraps every text as ``[CLS] text [SEP]`` (BERT)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    if classifier:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")),
                                                     ("[SEP]", tokenizer.token_to_id("[SEP]"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=128,
    )


def tiny_llama(vocab_size: int, pad_token_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=pad_token_id,
        bos_token_id=None, eos_token_id=None,
    )
    return LlamaForCausalLM(config)


def tiny_bert(vocab_size: int, pad_token_id: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=pad_token_id, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
    )
    return BertModel(config)


def build_example(out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Write the example into ``out_dir`` (through the output discipline: all at once, or nothing) and return
    ``{name: path}`` of what it wrote."""
    out = Path(out_dir)
    formal, casual, sentiment = support_replies(FORMAL), support_replies(CASUAL), reviews()
    held_out = len(sentiment) // 4
    files = {"support_formal": "support_formal.jsonl", "support_casual": "support_casual.jsonl",
             "sentiment_train": "sentiment_train.jsonl", "sentiment_eval": "sentiment_eval.jsonl",
             "llama": "llama", "bert": "bert"}
    with output(out, folder=True, overwrite=overwrite, owned=[files["support_formal"]]) as folder:
        write_jsonl(folder / files["support_formal"], formal)
        write_jsonl(folder / files["support_casual"], casual)
        write_jsonl(folder / files["sentiment_train"], sentiment[held_out:])
        write_jsonl(folder / files["sentiment_eval"], sentiment[:held_out])
        for name, texts, classifier, build in (
            ("llama", [r["text"] for r in formal + casual], False, tiny_llama),
            ("bert", [r["text"] for r in sentiment], True, tiny_bert),
        ):
            tokenizer = word_tokenizer(texts, classifier)
            model = build(len(tokenizer), tokenizer.pad_token_id)
            model.save_pretrained(folder / files[name])
            tokenizer.save_pretrained(folder / files[name])
    return {name: out / file for name, file in files.items()}
