"""A tiny causal LM, tokenizer, prompts and reward built in code: a GRPO run on the CPU in
seconds with nothing downloaded (tests, examples, smoke tests of a trainer set-up).

    path = save_tiny_lm(folder)            # a Qwen2 checkpoint + character tokenizer on disk
    model = AutoModelForCausalLM.from_pretrained(path)

Needs transformers, tokenizers and datasets (``pip install tike_cuda[trl]``).
"""
from __future__ import annotations

import os

import torch

__all__ = ["OFFLINE_ENV", "char_tokenizer", "tiny_qwen2", "save_tiny_lm", "perturb_",
           "prompt_dataset", "vowel_reward"]

# What keeps the Hugging Face libraries from reaching the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
               "WANDB_DISABLED": "true"}

SPECIAL_TOKENS = ("<pad>", "<eos>")
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?.,:"  # one token each


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: ids 0, 1 are <pad>, <eos>; then one id
    per character of CHARACTERS (V = 45). Decoding concatenates the characters."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    # BPE without merges splits every word into its characters; no pre-tokenizer keeps spaces.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_qwen2(vocab_size: int = len(SPECIAL_TOKENS) + len(CHARACTERS), *, seed: int = 0,
               hidden_size: int = 32, num_layers: int = 2, initializer_range: float = 0.2):
    """A randomly initialised float32 Qwen2 causal LM (about 30 k parameters by default)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         initializer_range=initializer_range,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def save_tiny_lm(folder: str | os.PathLike, *, seed: int = 0, **model_kwargs) -> str:
    """Save :func:`tiny_qwen2` and :func:`char_tokenizer` to ``folder``; returns its path.

    TRL rebuilds the reference model from ``config._name_or_path``, so a model that only
    lives in memory must be saved first; loading it back from the returned path sets that.
    """
    folder = os.fspath(folder)
    tokenizer = char_tokenizer()
    model = tiny_qwen2(len(tokenizer), seed=seed, **model_kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def perturb_(model, scale: float = 0.3, *, seed: int = 1):
    """Add ``scale * std(W) * N(0, 1)`` noise to every weight matrix of ``model`` in place: a
    policy that starts away from its reference (KL ~ 0.7 nats per token for the defaults),
    as one does after many RL steps. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() > 1:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (scale * p.std()))
    return model


def prompt_dataset(n: int = 16, *, seed: int = 0):
    """``datasets.Dataset`` with a "prompt" column of ``n`` short character prompts."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        prompts.append(f"{a}+{b}=")
    return Dataset.from_dict({"prompt": prompts})


def vowel_reward(completions, **kwargs):
    """Fraction of vowels in each completion (a reward that varies within a group)."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]
