"""A small byte-level BPE tokenizer built offline, for the built-in model and test checkpoints.

Byte-level BPE means every string round-trips through encode/decode, so the built-in
model behaves like a real one end to end without downloading a tokenizer from the hub.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"

# Qwen-style chat markup, so chat renderers have a template to apply.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Cap that keeps the vocabulary, with the 3 special tokens, within 1024 entries. The text below
# supports only ~200 merges seen at least twice, so the real size is 464 (256 bytes + merges + 3).
_BPE_VOCAB_SIZE = 1024 - 3

# Original English text the merges are learned from: common words get their own tokens,
# so ordinary prompts encode to plausibly few tokens.
_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and
predicts the next one. It learns this by looking at a great deal of text, one token after another,
and by adjusting its weights whenever the prediction is wrong. After pretraining, the model knows
a lot about words, sentences and the world, but it does not yet follow instructions well.

Fine-tuning continues the training on a smaller set of examples that show the behaviour we want.
Instead of changing every weight, a low-rank adapter adds two thin matrices next to each large
projection. Only the adapter is trained, so the base model can be shared by many users at once,
and each user keeps a small file with their own changes. The learning rate is usually small, and
the loss should go down slowly as the adapter learns the task.

Hello! How are you today? I am fine, thank you, and how are you? What is the capital of France?
The capital of France is Paris. What is two plus two? Two plus two is four. Please write a short
poem about the sea. The sea is wide and the sea is deep, and the waves go on while the sailors sleep.
Can you help me with my homework? Of course, I would be happy to help. Let us start with the first
question and then move on to the next one when you are ready.

When the server starts without a configuration file, it builds this tiny model with random weights.
The model is too small to say anything useful, but every part of the system works with it: training,
sampling, saving and loading checkpoints, and computing the log probabilities of a prompt. This makes
it easy to try the service on a laptop before moving to a large machine with real models.

Numbers and dates appear in text too: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 50% $20.
Code has its own patterns: def main(): return 0 if x == 1 else None, for i in range(10): print(i).
"""


def build_tiny_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE (deterministic) and wrap it as a transformers fast tokenizer.

    Special tokens are appended after the BPE vocabulary, as in Qwen: `<|endoftext|>` is both
    eos and pad, and `<|im_start|>` / `<|im_end|>` delimit chat turns.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
