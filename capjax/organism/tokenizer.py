"""The organism's word-level tokenizer, built with the `tokenizers` library and wrapped as a
transformers PreTrainedTokenizerFast (so save_pretrained / AutoTokenizer round-trip it).

Text is split on whitespace and punctuation is isolated ("Answer:" -> "Answer", ":"); every word of
the word problems (`capjax.data.organism.vocabulary`, numbers included, one token each) is in the
vocabulary, then the `text_words` most frequent words of the training text; any other word is
"<unk>" (WikiText-2's own unknown-word token). Decoding joins tokens with single spaces, which
gives the problems' text back exactly.
"""

from __future__ import annotations

from collections import Counter

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def build_vocab(text: str | None, text_words: int) -> dict[str, int]:
    """{word: id}: the special tokens, the problems' words, then the most frequent text words
    (ties by the word itself, so the vocabulary is a pure function of the text)."""
    from capjax.data.organism import vocabulary

    words = list(SPECIAL) + vocabulary()
    if text and text_words > 0:
        pre = _pre_tokenizer()
        counts = Counter(w for line in text.split("\n") if line.strip() for w, _ in pre.pre_tokenize_str(line))
        known = set(words)
        ranked = sorted((w for w in counts if w not in known), key=lambda w: (-counts[w], w))
        words += ranked[:text_words]
    return {w: i for i, w in enumerate(words)}


def build_tokenizer(text: str | None = None, text_words: int = 2000):
    """A PreTrainedTokenizerFast over `build_vocab(text, text_words)`; no special tokens are added
    when encoding (pad <pad>, eos </s>, bos <s>, unk <unk>)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(build_vocab(text, text_words), unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
