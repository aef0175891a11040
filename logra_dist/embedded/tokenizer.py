"""Byte-level tokenizer for the embedded model, built in code (no download).

It is a genuine Hugging Face fast tokenizer, so it saves and reloads through
``AutoTokenizer`` exactly as a real checkpoint's tokenizer would.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-unicode map (the ByteLevel alphabet), in byte order."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def build_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: ids 0..255 are bytes, then ``<s>``, ``</s>``, ``<pad>``.

    Like a Llama tokenizer, ``tokenizer(text)`` prepends ``<s>`` (no ``</s>``);
    pass ``add_special_tokens=False`` to get the raw bytes only. Special-token
    strings inside text are split into bytes, so every string round-trips.
    """
    byte_map = _bytes_to_unicode()
    alphabet = [byte_map[b] for b in range(256)]
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({BOS: 256, EOS: 257, PAD: 258})

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, 256)],
    )
    tok.add_special_tokens([BOS, EOS, PAD])

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )
