"""A tiny random Llama with a locally trained byte-level BPE tokenizer.

For tests and quick presets: built in seconds, no downloads, and the same seed gives the
same weights and the same tokenizer. Byte-level BPE means any unicode text encodes.
"""

from __future__ import annotations

import random
from pathlib import Path

from fedpal.common.files import staged_folder

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the a an and or but so because if when while how what why which who please you your i me my "
    "we our they it is are was be can could would should will do does did not no yes short long "
    "answer reply explain list step steps example examples simple detail details summary brief "
    "friendly formal casual warm polite clear question questions idea ideas help helpful thanks "
    "python code recipe travel plan trip budget email letter meeting write describe compare "
    "morning evening week weekend day time money health sleep food cook garden book music movie "
    "learn study work team project data model user users preference prefer like love great good "
    "bad better best first second third finally also however therefore for example in on at to of"
).split()


def _corpus(seed: int, lines: int = 1500) -> list[str]:
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":"])
        if rng.random() < 0.2:
            sentence = "- " + sentence
        if rng.random() < 0.1:
            sentence = f"{rng.randint(1, 9)}. " + sentence
        text.append(sentence)
    return text


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    """Write a tiny Llama + tokenizer Hugging Face folder at ``target`` (atomically); a built one is found without
    importing torch."""
    if (target / "config.json").is_file():
        return target
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar on stderr is noise in a command's output
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with staged_folder(target, keep_existing=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
