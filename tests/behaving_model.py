"""A tiny language model that behaves: every token it writes depends on the two before it.

The random test model's next-token distribution is nearly uniform, so greedy decoding repeats the
prompt's last token whatever the model can see, and a generator that loses the query passes every
test. This model is trained in seconds on a synthetic language, lines of numbers in which each
number follows from the two before it:

    " 3 5 1 6\\n"   next = (a + b) mod 7 with probability 3/4, else (a + 2b) mod 7; a line ends
                    where the number would be 0, or after 24 numbers

so its greedy continuation of " 3 5" is " 1 6\\n", its sampled continuations vary, and a decoder
that drops a token from the model's view writes something else. Its byte-level BPE tokenizer reads
any text; its pad token differs from its end-of-sequence token.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch

MODULUS = 7
PAD, EOS = "<pad>", "<|endoftext|>"


def chain_line(rng: random.Random) -> str:
    a, b = rng.randrange(1, MODULUS), rng.randrange(1, MODULUS)
    numbers = [a, b]
    while len(numbers) < 24:
        c = (a + b) % MODULUS if rng.random() < 0.75 else (a + 2 * b) % MODULUS
        if c == 0:
            break
        numbers.append(c)
        a, b = b, c
    return " " + " ".join(map(str, numbers)) + "\n"


def greedy_line(a: int, b: int) -> str:
    """The most likely continuation of a line that ends with ``a b``, up to its end."""
    text = ""
    while (c := (a + b) % MODULUS) != 0 and len(text) < 48:
        text += f" {c}"
        a, b = b, c
    return text + "\n"


def code_version() -> str:
    """Identifies this file's training recipe and the libraries that run it (the key of a cached model)."""
    import transformers

    payload = Path(__file__).read_bytes() + f"{torch.__version__} {transformers.__version__}".encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def train(directory: Path, steps: int = 800, seed: int = 0) -> Path:
    """Train the model and save it with its tokenizer as a transformers checkpoint in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)

    def document() -> str:
        return "".join(chain_line(rng) for _ in range(8))

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [document() for _ in range(50)],
        trainers.BpeTrainer(
            vocab_size=280,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        batch = tokenizer([document() for _ in range(16)], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def follows_its_language(model, tokenizer, queries: int = 40, seed: int = 1) -> float:
    """The share of random line starts whose greedy continuation (3 tokens) is the language's."""
    rng = random.Random(seed)
    starts = [(rng.randrange(1, MODULUS), rng.randrange(1, MODULUS)) for _ in range(queries)]
    tokenizer.padding_side = "left"
    batch = tokenizer([f" 2 4 6 3 2\n {a} {b}" for a, b in starts], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :])
    expected = [greedy_line(a, b) for a, b in starts]
    return sum(e.startswith(t) or t.startswith(e) for t, e in zip(texts, expected)) / queries
