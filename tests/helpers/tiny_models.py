"""A tiny random Llama with a word-level tokenizer, and a small generated corpus.

Everything is built from configs and seeded generators: no hub download, seconds to build.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EOS = "<|endoftext|>"
_WORDS = {
    "det": "the a this that every some no each".split(),
    "adj": (
        "old new small large quiet bright dark early late happy strange simple green cold warm "
        "heavy quick slow careful open"
    ).split(),
    "noun": (
        "man woman child city house river road market school church letter story song garden "
        "window doctor teacher farmer soldier ship train horse dog book paper table door "
        "question answer morning evening"
    ).split(),
    "verb": (
        "saw found took gave made heard wrote read built opened closed carried followed "
        "watched knew wanted left kept brought sent"
    ).split(),
    "adv": "slowly quickly quietly again often never always soon later today".split(),
    "prep": "in on near under behind across through after before with".split(),
    "name": "John Mary Robert Helen James Alice Thomas Ruth".split(),
}
PUNCT = [".", "?", "!"]


def generated_text(rng: random.Random, n_sentences: int) -> str:
    """English-like sentences over a small closed vocabulary."""
    w = _WORDS
    sentences = []
    for _ in range(n_sentences):
        subject = rng.choice(
            [
                f"{rng.choice(w['det'])} {rng.choice(w['adj'])} {rng.choice(w['noun'])}",
                rng.choice(w["name"]),
            ]
        )
        obj = f"{rng.choice(w['det'])} {rng.choice(w['noun'])}"
        tail = (
            f" {rng.choice(w['prep'])} {rng.choice(w['det'])} {rng.choice(w['noun'])}"
            if rng.random() < 0.6
            else ""
        )
        adv = f" {rng.choice(w['adv'])}" if rng.random() < 0.4 else ""
        sentence = f"{subject} {rng.choice(w['verb'])} {obj}{tail}{adv}"
        sentences.append(
            sentence[0].upper() + sentence[1:] + " " + rng.choices(PUNCT, weights=[6, 1, 1])[0]
        )
    return " ".join(sentences)


def write_corpus(folder: Path, n_docs: int = 60, n_files: int = 3, seed: int = 0) -> list[str]:
    """`n_docs` jsonl documents {doc_id, genre, text} over `n_files` files (~300 tokens each)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genres = ["news", "fiction", "science"]
    handles = [open(folder / f"part-{i}.jsonl", "w") for i in range(n_files)]
    try:
        for d in range(n_docs):
            doc = {"doc_id": f"doc{d:03d}", "genre": genres[d % 3], "text": generated_text(rng, 40)}
            handles[d % n_files].write(json.dumps(doc) + "\n")
    finally:
        for h in handles:
            h.close()
    return [str(folder / f"part-{i}.jsonl") for i in range(n_files)]


def build_tokenizer():
    """A word-level fast tokenizer over the generated vocabulary, EOS = <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[UNK]", EOS, *PUNCT]
    for words in _WORDS.values():
        for word in words:
            vocab += [word, word.capitalize()]
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]", model_max_length=100_000
    )


def build_tiny_llama(vocab_size: int = 512, eos_token_id: int = 1, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build_tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=64,
        n_layer=4,
        n_head=4,
        vocab_size=512,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def build_tiny_neox():
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=512,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM(cfg).eval()


BUILDERS = {"llama": build_tiny_llama, "gpt2": build_tiny_gpt2, "neox": build_tiny_neox}
