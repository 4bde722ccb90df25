"""
The batch loader: random windows of a memory-mapped token stream (train.bin / val.bin from
training/prepare.py), as in nanoGPT's get_batch, but reproducible.

Which windows a batch holds depends only on (seed, step, rank, micro_step), never on how many batches
were drawn before: a resumed run, or the same run on a different number of ranks, sees the same data
for the same coordinates. Diffusion objectives use x alone; AR uses (x, y), y = x shifted by one.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val")
REQUIRED_META_KEYS = ("tokenizer", "vocab_size", "mask_id", "eot_id", "dtype", "train_tokens", "val_tokens")
# the tokenizer names of models/tokenizer.py that produce the same ids
_SAME_IDS = {"gpt2-online": "gpt2"}


class CorruptData(ValueError):
    """The token files disagree with meta.json: ids outside the vocabulary, or another sha256."""


# training.prepare's defaults, left out of a suggested command (prepare.DEFAULT_VAL_FRACTION, OWT_VAL_FRACTION)
_DEFAULT_VAL_FRACTION = {"openwebtext": 0.0005}


def prepare_command(data_dir, meta: dict | None = None) -> str:
    """The command that (re-)creates data_dir: what its meta.json says it was prepared from, when it has one;
    with --overwrite where a meta.json is there (training.prepare keeps a prepared --out otherwise)."""
    overwrite = " --overwrite" if (Path(data_dir) / "meta.json").exists() else ""
    if not meta:
        return f"python -m training.prepare --source shakespeare --tokenizer gpt2 --out {data_dir}{overwrite}"
    source = meta.get("source", "shakespeare")
    parts = ["python -m training.prepare", f"--source {source}", f"--tokenizer {meta.get('tokenizer', 'gpt2')}"]
    if meta.get("dataset_path") not in (None, "openwebtext"):
        parts.append(f"--dataset_path {meta['dataset_path']}")
    if meta.get("max_docs") is not None:
        parts.append(f"--max_docs {meta['max_docs']}")
    if meta.get("val_fraction") is not None and meta["val_fraction"] != _DEFAULT_VAL_FRACTION.get(source, 0.1):
        parts.append(f"--val_fraction {meta['val_fraction']}")
    return " ".join(parts + [f"--out {data_dir}"]) + overwrite


def _prepare_hint(data_dir) -> str:
    return (
        f"Prepare it with:\n    {prepare_command(data_dir)}\n"
        f"(--tokenizer char for a tiny fast run; --source openwebtext or --source PATH for other text; "
        f"python -m training.prepare --help lists every option)"
    )


def load_meta(data_dir) -> dict:
    """meta.json of a prepared dataset, after checking the .bin files are there and as long as it says.
    The returned dict also carries "data_dir" (the directory it was read from), for error messages."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist. {_prepare_hint(data_dir)}")
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{data_dir} holds no prepared dataset (meta.json is missing; training.prepare writes it last, so "
            f"a run that was interrupted leaves none). {_prepare_hint(data_dir)}"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not readable JSON ({e}). Re-create the dataset: {prepare_command(data_dir)}") from None
    missing = [k for k in REQUIRED_META_KEYS if k not in meta] if isinstance(meta, dict) else list(REQUIRED_META_KEYS)
    if missing:
        raise ValueError(f"{meta_path} lacks {', '.join(missing)}: it was not written by training.prepare. {_prepare_hint(data_dir)}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing. Re-create the dataset: {prepare_command(data_dir, meta)}")
        expected = meta[f"{split}_tokens"] * itemsize
        if path.stat().st_size != expected:
            raise ValueError(
                f"{path} has {path.stat().st_size:,} bytes but meta.json says {meta[f'{split}_tokens']:,} "
                f"{meta['dtype']} tokens ({expected:,} bytes): the file is truncated or belongs to another "
                f"dataset. Re-create it: {prepare_command(data_dir, meta)}"
            )
    meta["data_dir"] = str(data_dir)
    for split in SPLITS:  # cheap: whole files up to FULL_SCAN_TOKENS, evenly spread samples of larger ones
        check_token_range(meta, split, full=meta[f"{split}_tokens"] <= FULL_SCAN_TOKENS)
    return meta


FULL_SCAN_TOKENS = 64 << 20  # a split this small is scanned whole on every load (~0.1 s); larger ones sampled
_SAMPLES, _SAMPLE_TOKENS = 64, 1 << 16
_CHUNK_TOKENS = 16 << 20


def _corrupt(meta: dict, what: str) -> CorruptData:
    data_dir = meta["data_dir"]
    return CorruptData(f"{what}: the dataset is damaged or was changed after it was prepared. Re-create it: "
                       f"{prepare_command(data_dir, meta)} (python -m training.prepare --verify --out {data_dir} "
                       f"checks it in full)")


def _check_ids(meta: dict, split: str, ids: np.ndarray, offset: int) -> None:
    vocab = meta["vocab_size"]
    if ids.size and int(ids.max()) >= vocab:
        bad = int(np.argmax(ids >= vocab))
        raise _corrupt(meta, f"{Path(meta['data_dir']) / f'{split}.bin'} holds token id {int(ids[bad])} at position "
                             f"{offset + bad:,}, outside the vocabulary of {vocab} ids ({meta['tokenizer']} tokenizer, "
                             f"meta.json)")


def check_token_range(meta: dict, split: str, full: bool = True) -> None:
    """CorruptData when a split holds an id >= vocab_size (the mask id or beyond: an embedding row that is
    no token, or an IndexError deep in the model). full=False reads evenly spread samples only."""
    tokens = np.memmap(Path(meta["data_dir"]) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    n = len(tokens)
    if full:
        starts = range(0, n, _CHUNK_TOKENS)
        size = _CHUNK_TOKENS
    else:
        starts = sorted({int(s) for s in np.linspace(0, max(n - _SAMPLE_TOKENS, 0), _SAMPLES)})
        size = _SAMPLE_TOKENS
    for start in starts:
        _check_ids(meta, split, np.asarray(tokens[start:start + size]), start)


def verify_dataset(meta: dict) -> None:
    """The full check (--verify_data, prepare --verify): every id in range and each file's sha256 equal to
    the one meta.json recorded when it was prepared."""
    for split in SPLITS:
        check_token_range(meta, split, full=True)
        path = Path(meta["data_dir"]) / f"{split}.bin"
        expected = (meta.get("sha256") or {}).get(f"{split}.bin")
        if expected is None:
            continue  # prepared before hashes were recorded
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        if h.hexdigest() != expected:
            raise _corrupt(meta, f"{path} has sha256 {h.hexdigest()[:16]}..., meta.json recorded {expected[:16]}...")


def read_split(data_dir, split: str, meta: dict | None = None) -> np.memmap:
    """The whole token stream of one split, memory-mapped read-only. `meta` is load_meta(data_dir) (read and
    checked here when not given)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = load_meta(data_dir) if meta is None else meta
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


def check_compatible(meta: dict, tokenizer_name: str, padded_vocab_size: int, block_size: int, mask_token: bool = True) -> None:
    """Fail early, with the fix, when a model cannot train on this data: another tokenizer's ids, an
    embedding table too small for the ids (plus the MASK id, when the model needs it), or a split shorter
    than one training window of block_size + 1 tokens. mask_token=False is for models without a MASK row
    (e.g. OpenAI's GPT-2 checkpoints, 50257 rows) used autoregressively."""
    where = meta.get("data_dir", "the dataset")
    data_tok = _SAME_IDS.get(meta["tokenizer"], meta["tokenizer"])
    model_tok = _SAME_IDS.get(tokenizer_name, tokenizer_name)
    if data_tok != model_tok:
        raise ValueError(
            f"tokenizer mismatch: {where} was prepared with tokenizer '{data_tok}' but the model uses "
            f"'{model_tok}'. Either re-prepare the data (python -m training.prepare --tokenizer {model_tok} "
            f"--out NEW_DIR) or set the model's tokenizer to '{data_tok}'."
        )
    needed = meta["mask_id"] + 1 if mask_token else meta["vocab_size"]
    if padded_vocab_size < needed:
        what = f"{meta['vocab_size']} token ids plus the MASK id {meta['mask_id']}" if mask_token else f"{meta['vocab_size']} token ids"
        raise ValueError(
            f"vocab mismatch: the model's embedding has {padded_vocab_size} rows but {where} needs {needed} "
            f"({what}); set padded_vocab_size to {meta.get('padded_vocab_size', needed)}."
        )
    for split in SPLITS:
        if meta[f"{split}_tokens"] < block_size + 1:
            raise ValueError(
                f"the {split} split of {where} has {meta[f'{split}_tokens']:,} tokens, fewer than one training "
                f"window (block_size + 1 = {block_size + 1}). Use a smaller block_size, or prepare more text "
                f"(or a larger --val_fraction for the val split)."
            )


def _to_tensors(windows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.from_numpy(windows.astype(np.int64))  # (B, T+1)
    x, y = windows[:, :-1], windows[:, 1:]  # (B, T) each: y[t] is the token after x[t]
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


class TokenDataset:
    """One split (train or val) of a prepared dataset, read through np.memmap."""

    def __init__(self, data_dir, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.meta = load_meta(data_dir)
        self.split = split
        self.path = Path(data_dir) / f"{split}.bin"
        self.dtype = np.dtype(self.meta["dtype"])
        self.num_tokens = self.meta[f"{split}_tokens"]

    def __len__(self) -> int:
        return self.num_tokens

    def _tokens(self) -> np.memmap:
        # a fresh memmap per batch, as nanoGPT does, so the pages read do not pile up in memory
        return read_split(self.meta["data_dir"], self.split, self.meta)

    def _windows(self, starts: np.ndarray, block_size: int) -> np.ndarray:
        tokens = self._tokens()
        windows = np.stack([tokens[i : i + block_size + 1] for i in starts])  # (B, T+1)
        if int(windows.max()) >= self.meta["vocab_size"]:  # a sampled load check can miss a damaged stretch
            row = int(np.argmax((windows >= self.meta["vocab_size"]).any(axis=1)))
            _check_ids(self.meta, self.split, windows[row], int(starts[row]))
        return windows

    def _num_starts(self, block_size: int) -> int:
        num_starts = self.num_tokens - block_size  # windows of block_size + 1 tokens that fit
        if num_starts < 1:
            raise ValueError(
                f"the {self.split} split of {self.meta['data_dir']} has {self.num_tokens:,} tokens, fewer than "
                f"one window of block_size + 1 = {block_size + 1}; use a smaller block_size or more data"
            )
        return num_starts

    def get_batch(self, batch_size: int, block_size: int, *, seed: int, step: int, part: int = 0,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """batch_size random windows: x (B, block_size) and y = x shifted left by one, int64.
        `part` is this micro batch's place in the step's global batch (rank * accumulation + micro step):
        the same (seed, step, part) always gives the same batch, on any number of ranks."""
        # SeedSequence mixes them; the trailing 0 keeps the batches that runs saved before this signature resume on
        rng = np.random.default_rng([seed, step, part, 0])
        starts = rng.integers(0, self._num_starts(block_size), size=batch_size)
        return _to_tensors(self._windows(starts, block_size), device)

    def val_batches(self, batch_size: int, block_size: int, num_batches: int, rank: int = 0,
                    world_size: int = 1, device="cpu"):
        """The same num_batches evaluation batches on every call: windows spread evenly over the whole
        split (not random), so an estimate covers all of it. With world_size > 1 each rank yields its
        share (batches rank, rank + world_size, ...)."""
        starts = np.linspace(0, self._num_starts(block_size) - 1, num_batches * batch_size).round().astype(np.int64)
        for b in range(rank, num_batches, world_size):
            yield _to_tensors(self._windows(starts[b * batch_size : (b + 1) * batch_size], block_size), device)

    def __repr__(self) -> str:
        return f"TokenDataset({self.meta['data_dir']!r}, {self.split!r}, {self.num_tokens:,} {self.meta['tokenizer']} tokens)"
