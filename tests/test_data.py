"""Data preparation (training/prepare.py) and the batch loader (training/data.py): text becomes
train.bin/val.bin + meta.json, the loader reads them back reproducibly, and bad input fails with a
message that says what to do."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.tokenizer import EOT_TEXT, tokenizer_from_meta
from training import prepare
from training.data import TokenDataset, check_compatible, load_meta

REPO_ROOT = Path(__file__).resolve().parents[1]

# three small documents in nested folders, with paragraphs (the val split starts at a paragraph break)
DOCS = {
    "a.txt": "ALICE:\nThe first document.\n\n" * 12 + "The end of the first document.\n",
    "sub/b.md": "BOB:\nZweites Dokument, mit Umlauten: äöü ß.\n\n" * 12,
    "sub/deeper/c.txt": "CAROL:\n第三个文件 — with emoji 🚀 and math ∑.\n\n" * 12,
}


def write_docs(folder: Path, docs: dict) -> Path:
    for name, text in docs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def decode_split(data_dir: Path, split: str) -> str:
    meta = load_meta(data_dir)
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])
    return tokenizer_from_meta(meta).decode(ids)


def write_token_dataset(data_dir: Path, train_ids, val_ids, tokenizer="char", vocab_size=1000) -> Path:
    """A dataset as training.prepare lays it out, with token ids chosen by the test."""
    data_dir.mkdir(parents=True, exist_ok=True)
    np.asarray(train_ids, dtype=np.uint16).tofile(data_dir / "train.bin")
    np.asarray(val_ids, dtype=np.uint16).tofile(data_dir / "val.bin")
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot_id": vocab_size - 1, "mask_id": vocab_size,
            "padded_vocab_size": (vocab_size + 64) // 64 * 64, "dtype": "uint16",
            "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return data_dir


@pytest.fixture
def counting_dataset(tmp_path):
    """train.bin holds 0, 1, 2, ..., 999: a window's first token is its offset."""
    return write_token_dataset(tmp_path / "counting", np.arange(1000), np.arange(500))


# -----------------------------------------------------------------------------
# prepare: local text files


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_prepare_local_folder_round_trips_every_document(tmp_path, tokenizer):
    corpus = write_docs(tmp_path / "corpus", DOCS)
    prepare.main(["--source", str(corpus), "--tokenizer", tokenizer, "--out", str(tmp_path / "data")])

    # each split is one stream with EOT after every document piece; files in sorted path order;
    # every document is split into a train head and a val tail that concatenate back to it
    heads = decode_split(tmp_path / "data", "train").split(EOT_TEXT)
    tails = decode_split(tmp_path / "data", "val").split(EOT_TEXT)
    assert heads[-1] == tails[-1] == ""  # the stream ends with EOT
    assert [h + t for h, t in zip(heads[:-1], tails[:-1])] == [DOCS[k] for k in sorted(DOCS)]
    assert all(h.endswith("\n\n") and t for h, t in zip(heads[:-1], tails[:-1]))  # cut at a paragraph break


def test_meta_json_describes_the_dataset(tmp_path):
    corpus = write_docs(tmp_path / "corpus", DOCS)
    meta = prepare.main(["--source", str(corpus), "--tokenizer", "gpt2", "--out", str(tmp_path / "data")])
    on_disk = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert on_disk == meta
    assert {"tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256, "mask_id": 50257,
            "padded_vocab_size": 50304, "dtype": "uint16", "source": str(corpus.resolve())}.items() <= meta.items()
    for split in ("train", "val"):
        data = (tmp_path / "data" / f"{split}.bin").read_bytes()
        assert len(data) == 2 * meta[f"{split}_tokens"]
        assert meta["sha256"][f"{split}.bin"] == hashlib.sha256(data).hexdigest()
    assert meta["train_documents"] == meta["val_documents"] == len(DOCS)
    assert not list((tmp_path / "data").glob("*.tmp"))


def test_prepare_is_deterministic(tmp_path):
    corpus = write_docs(tmp_path / "corpus", DOCS)
    first = prepare.main(["--source", str(corpus), "--tokenizer", "char", "--out", str(tmp_path / "a")])
    second = prepare.main(["--source", str(corpus), "--tokenizer", "char", "--out", str(tmp_path / "b")])
    assert first["sha256"] == second["sha256"]


def test_prepare_uses_uint32_when_ids_do_not_fit_uint16(tmp_path):
    # 70,000 distinct characters: the char vocabulary has ids up to 70,000
    text = "".join(chr(0x10000 + i) for i in range(70_000))
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    meta = prepare.main(["--source", str(tmp_path / "wide.txt"), "--tokenizer", "char", "--out", str(tmp_path / "data")])
    assert meta["dtype"] == "uint32"
    assert meta["vocab_size"] == 70_001
    assert decode_split(tmp_path / "data", "train") + decode_split(tmp_path / "data", "val") == (
        text[:63_000] + EOT_TEXT + text[63_000:] + EOT_TEXT
    )


# -----------------------------------------------------------------------------
# prepare: the bundled Shakespeare


def test_clean_play_markdown_keeps_speakers_and_lines():
    markdown = (
        "# Macbeth\n\n## ACT I\n\n### SCENE II. A camp near Forres.\n\n"
        "_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,\nmeeting a bleeding Sergeant_\n\n"
        "**DUNCAN**  \nWhat bloody man is that? He can report,  \nAs seemeth by his plight\n\n"
        "**PAGE**  \n[Within]_  \nWho's there?\n\n*[He draws his sword.]*\n\n\\--odours savours sweet:\n"
    )
    assert prepare.clean_play_markdown(markdown) == (
        "Macbeth\n\nACT I\n\nSCENE II. A camp near Forres.\n\n"
        "[Alarum within. Enter DUNCAN, MALCOLM, with Attendants, meeting a bleeding Sergeant]\n\n"
        "DUNCAN:\nWhat bloody man is that? He can report,\nAs seemeth by his plight\n\n"
        "PAGE:\n[Within]\nWho's there?\n\n[He draws his sword.]\n\n--odours savours sweet:\n"
    )


def test_shakespeare_is_the_default_source(tmp_path):
    meta = prepare.main(["--tokenizer", "char", "--max_docs", "2", "--out", str(tmp_path / "data")])
    assert meta["source"] == "shakespeare"
    assert meta["train_documents"] == meta["val_documents"] == 2
    assert meta["val_tokens"] > 10_000
    text = decode_split(tmp_path / "data", "val")
    assert ":\n" in text  # "SPEAKER:" then the line
    assert not set("*_#\\") & set(text)  # no markdown left


def test_full_shakespeare_with_gpt2_splits_about_90_10(tmp_path):
    meta = prepare.main(["--source", "shakespeare", "--tokenizer", "gpt2", "--out", str(tmp_path / "data")])
    assert meta["train_documents"] == 38  # every play
    assert 0.08 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.12
    assert meta["val_tokens"] > 100_000


# -----------------------------------------------------------------------------
# prepare: the openwebtext code path, offline on a tiny local dataset

OWT_DOCS = [f"Document number {i}. It has a little text, and a number: {i * i}." for i in range(20)]


def run_owt(tmp_path, dataset_path, *extra):
    return prepare.main(["--source", "openwebtext", "--dataset_path", str(dataset_path), "--tokenizer", "gpt2",
                         "--val_fraction", "0.25", "--num_proc", "1", "--cache_dir", str(tmp_path / "hf_cache"),
                         "--out", str(tmp_path / "data"), *extra])


def decoded_documents(data_dir: Path, split: str) -> list[str]:
    pieces = decode_split(data_dir, split).split(EOT_TEXT)
    assert pieces[-1] == ""  # nanoGPT appends EOT after every document
    return pieces[:-1]


def test_openwebtext_path_on_a_local_json_folder(tmp_path):
    folder = tmp_path / "owt"
    folder.mkdir()
    for part in range(2):  # two jsonl files, like a sharded download
        rows = OWT_DOCS[part * 10 : (part + 1) * 10]
        (folder / f"part{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    meta = run_owt(tmp_path, folder)

    assert (meta["source"], meta["train_documents"], meta["val_documents"]) == ("openwebtext", 15, 5)
    train, val = decoded_documents(tmp_path / "data", "train"), decoded_documents(tmp_path / "data", "val")
    assert sorted(train + val) == sorted(OWT_DOCS)  # whole documents, each in exactly one split
    assert run_owt(tmp_path, folder, "--overwrite")["sha256"] == meta["sha256"]  # the split is seeded (2357)


def test_openwebtext_path_on_a_save_to_disk_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": OWT_DOCS, "url": ["x"] * 20}).save_to_disk(str(tmp_path / "saved"))
    meta = run_owt(tmp_path, tmp_path / "saved", "--max_docs", "8")
    assert (meta["train_documents"], meta["val_documents"]) == (6, 2)
    assert set(decoded_documents(tmp_path / "data", "val")) <= set(OWT_DOCS[:8])


def test_openwebtext_val_fraction_below_one_document_is_a_clear_error(tmp_path):
    folder = tmp_path / "owt"
    folder.mkdir()
    (folder / "tiny.jsonl").write_text(json.dumps({"text": "only one document"}) + "\n")
    with pytest.raises(ValueError, match="larger --val_fraction"):
        run_owt(tmp_path, folder)


# -----------------------------------------------------------------------------
# prepare: bad input and interruptions


def test_empty_folder_is_an_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus: no .txt or .md files"):
        prepare.main(["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "data")])


def test_whitespace_only_files_are_an_empty_corpus(tmp_path):
    write_docs(tmp_path / "blank", {"a.txt": "   \n\n", "b.md": ""})
    with pytest.raises(ValueError, match="empty corpus"):
        prepare.main(["--source", str(tmp_path / "blank"), "--out", str(tmp_path / "data")])


def test_unknown_source_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown --source .*'shakespeare', 'openwebtext'"):
        prepare.main(["--source", str(tmp_path / "no_such_dir"), "--out", str(tmp_path / "data")])


@pytest.mark.parametrize("fraction", ["0", "1", "-0.1"])
def test_val_fraction_must_be_a_proper_fraction(tmp_path, fraction):
    with pytest.raises(ValueError, match="--val_fraction"):
        prepare.main(["--val_fraction", fraction, "--out", str(tmp_path / "data")])


def test_a_prepared_out_dir_is_refused_and_kept_unless_overwrite(tmp_path, capsys):
    corpus = write_docs(tmp_path / "corpus", DOCS)
    out = tmp_path / "data"
    first = prepare.main(["--source", str(corpus), "--tokenizer", "char", "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=rf"--out {out} holds a prepared dataset \(char ids, train .* tokens, from "
                                         rf".*\); .*--out NEW_DIR.*--verify.*--overwrite"):
        prepare.main(["--source", str(corpus), "--tokenizer", "gpt2", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = prepare.main(["--source", str(corpus), "--tokenizer", "gpt2", "--out", str(out), "--overwrite"])
    assert first["tokenizer"] == "char" and again["tokenizer"] == "gpt2" and load_meta(out)["tokenizer"] == "gpt2"


def test_interrupted_prepare_never_looks_complete(tmp_path, monkeypatch):
    corpus = write_docs(tmp_path / "corpus", DOCS)
    out = tmp_path / "data"
    prepare.main(["--source", str(corpus), "--tokenizer", "char", "--out", str(out)])  # an older, complete dataset

    def write_then_die(docs, tokenizer, val_fraction, writers):
        writers["train"].write([1, 2, 3])
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_write_documents", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(["--source", str(corpus), "--tokenizer", "gpt2", "--out", str(out), "--overwrite"])
    assert not (out / "meta.json").exists()
    assert not list(out.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_meta(out)


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--source", "--tokenizer", "--out", "--val_fraction", "--num_proc", "--max_docs", "--dataset_path"):
        assert flag in out


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    """The one bad input run as a process: the message, and no traceback."""
    result = subprocess.run([sys.executable, "-m", "training.prepare", "--source", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "data")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "unknown --source" in result.stderr and "Traceback" not in result.stderr


# -----------------------------------------------------------------------------
# the loader


def test_batch_is_windows_of_the_stream_with_targets_shifted_by_one(counting_dataset):
    x, y = TokenDataset(counting_dataset, "train").get_batch(4, 16, seed=0, step=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert torch.equal(row_x, torch.arange(start, start + 16))
        assert torch.equal(row_y, torch.arange(start + 1, start + 17))


def test_batch_depends_only_on_seed_step_part(counting_dataset):
    data = TokenDataset(counting_dataset, "train")
    batch = lambda **k: data.get_batch(8, 16, **{"seed": 1, "step": 5, "part": 0, **k})[0]
    first = batch()
    batch(step=6), batch(part=3)  # drawing other batches in between changes nothing
    assert torch.equal(first, batch())
    assert torch.equal(first, TokenDataset(counting_dataset, "train").get_batch(8, 16, seed=1, step=5)[0])
    for changed in ({"part": 1}, {"step": 6}, {"seed": 2}):
        assert not torch.equal(first, batch(**changed)), changed


def test_val_batches_are_the_same_on_every_call_and_cover_the_split(counting_dataset):
    val = TokenDataset(counting_dataset, "val")
    first, again = list(val.val_batches(4, 16, num_batches=3)), list(val.val_batches(4, 16, num_batches=3))
    assert len(first) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    starts = torch.cat([x[:, 0] for x, _ in first])
    assert starts[0] == 0 and starts[-1] == 500 - 17  # first and last window that fit
    # with two ranks, each rank evaluates its share of the same batches
    shares = [list(val.val_batches(4, 16, num_batches=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [torch.equal(a[0], b[0]) for a, b in zip(shares[0] + shares[1], first[0::2] + first[1::2])] == [True] * 3


def test_loader_reads_what_prepare_wrote(tmp_path):
    corpus = write_docs(tmp_path / "corpus", DOCS)
    prepare.main(["--source", str(corpus), "--tokenizer", "gpt2", "--out", str(tmp_path / "data")])
    data = TokenDataset(tmp_path / "data", "train")
    x, y = data.get_batch(4, 8, seed=0, step=0)
    windows = np.lib.stride_tricks.sliding_window_view(np.fromfile(tmp_path / "data" / "train.bin", np.uint16), 9)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        window = np.concatenate([row_x, row_y[-1:]])
        assert (windows == window).all(axis=1).any()  # a real stretch of the token stream


# -----------------------------------------------------------------------------
# the loader: bad input


def test_missing_data_dir_names_the_prepare_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*python -m training\.prepare .*--out " + str(tmp_path / "nope")):
        load_meta(tmp_path / "nope")


def test_missing_bin_file_names_the_prepare_command(counting_dataset):
    (counting_dataset / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)val\.bin is missing.*python -m training\.prepare"):
        load_meta(counting_dataset)


def test_bin_size_disagreeing_with_meta_is_an_error(counting_dataset):
    with open(counting_dataset / "train.bin", "r+b") as f:
        f.truncate(1000)  # 500 tokens instead of 1000
    with pytest.raises(ValueError, match="train.bin has 1,000 bytes but meta.json says 1,000 uint16 tokens"):
        load_meta(counting_dataset)


def test_unreadable_meta_json_is_an_error(counting_dataset):
    (counting_dataset / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_meta(counting_dataset)


def test_tokenizer_mismatch_says_which_two_differ(counting_dataset):
    meta = load_meta(counting_dataset)  # prepared with "char"
    with pytest.raises(ValueError, match="prepared with tokenizer 'char' but the model uses 'gpt2'.*--tokenizer gpt2"):
        check_compatible(meta, "gpt2", padded_vocab_size=50304, block_size=16)


def test_embedding_too_small_for_the_ids_and_mask_is_an_error(counting_dataset):
    meta = load_meta(counting_dataset)  # vocab 1000, mask id 1000
    check_compatible(meta, "char", padded_vocab_size=1024, block_size=16)
    with pytest.raises(ValueError, match="has 1000 rows but .* needs 1001"):
        check_compatible(meta, "char", padded_vocab_size=1000, block_size=16)
    check_compatible(meta, "char", padded_vocab_size=1000, block_size=16, mask_token=False)  # AR only


def test_gpt2_online_data_works_with_gpt2_models():
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "mask_id": 50257, "train_tokens": 100, "val_tokens": 100}
    check_compatible(meta, "gpt2-online", padded_vocab_size=50304, block_size=16)


def test_split_shorter_than_one_context_is_an_error(counting_dataset):
    meta = load_meta(counting_dataset)  # 1000 train, 500 val tokens
    check_compatible(meta, "char", padded_vocab_size=1024, block_size=499)
    with pytest.raises(ValueError, match=r"val split .* has 500 tokens, fewer than one training window \(block_size \+ 1 = 501\)"):
        check_compatible(meta, "char", padded_vocab_size=1024, block_size=500)
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenDataset(counting_dataset, "val").get_batch(1, 500, seed=0, step=0)
