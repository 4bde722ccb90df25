"""Loads the Shakespeare tasks' local data files (beside this file), so the tasks run offline from any
working directory. lm-eval imports this file by path (`!function utils.load_cloze` in the YAMLs)."""
import json
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_cloze(**_metadata) -> datasets.DatasetDict:
    return _load("cloze.jsonl")


def load_ppl(**_metadata) -> datasets.DatasetDict:
    return _load("ppl.jsonl")
