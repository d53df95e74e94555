"""WikiText-2 (word level) from ``wiki.{train,valid,test}.tokens``.

Tokenization as in PyTorch's word_language_model example: every line is split on
whitespace and ``<eos>`` is appended at its end (empty lines give a lone
``<eos>``). The vocabulary is built from the training split only, in order of
first appearance; words of valid/test not in it map to ``<unk>`` (which
WikiText-2's training text already contains; it is appended if absent).

(The PowerGossip code tokenized with spaCy and lower-cased; the raw WikiText-2
files are already tokenized, so whitespace splitting is the standard choice.)

WikiText-2's original archive is no longer served: ``fetch`` takes the URL of an
archive of the files and its SHA-256 from the user.
"""

import os

import torch

from .downloads import fetch_and_extract

SPLITS = ("train", "valid", "test")
FOLDER = "wikitext-2"
DEFAULT_DIR = "./data"
EOS = "<eos>"
UNK = "<unk>"

HOW_TO_GET = (
    "Get WikiText-2 (word level; its original archive, wikitext-2-v1.zip, is no longer "
    "served) and pass data_dir=<folder holding wiki.train.tokens, wiki.valid.tokens, "
    f"wiki.test.tokens> (or its parent, with the files in {FOLDER}/), or fetch an archive "
    "of them with download=true download_url=<its URL> download_sha256=<its SHA-256>."
)


def find_folder(data_dir: str | None = None) -> str:
    """``data_dir`` or ``data_dir/wikitext-2``, whichever holds the three files
    (default data_dir: ./data). FileNotFoundError naming both otherwise."""
    data_dir = DEFAULT_DIR if data_dir is None else data_dir
    candidates = [data_dir, os.path.join(data_dir, FOLDER)]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, f"wiki.{s}.tokens")) for s in SPLITS):
            return folder
    raise FileNotFoundError(
        f"WikiText-2 not found: looked for wiki.train.tokens, wiki.valid.tokens, "
        f"wiki.test.tokens in {', '.join(candidates)}. {HOW_TO_GET}"
    )


def holds_files(folder: str) -> bool:
    """Whether ``find_folder(folder)`` finds the three files."""
    try:
        find_folder(folder)
    except FileNotFoundError:
        return False
    return True


def fetch(data_dir: str | None, url: str, sha256: str) -> None:
    """Fetch the archive (zip or tar) at ``url``, check its SHA-256 and extract it into
    ``data_dir`` (default ``./data``), unless the files are there (downloads.py beside this
    file). The archive must hold the three files at its top or in ``wikitext-2/``."""
    fetch_and_extract(url, DEFAULT_DIR if data_dir is None else data_dir, ("sha256", sha256), holds_files,
                      "download_sha256")


def tokenize(path: str) -> list[str]:
    """Words of a file, ``<eos>`` after every line."""
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words.extend(line.split())
            words.append(EOS)
    return words


def load_wikitext2(data_dir: str | None = None):
    """Return ``(train_ids, valid_ids, test_ids, vocab)``: int64 token-id tensors
    on CPU and the vocabulary (list of words; ``vocab[id]`` is the word)."""
    folder = find_folder(data_dir)
    words = {s: tokenize(os.path.join(folder, f"wiki.{s}.tokens")) for s in SPLITS}
    word_to_id = {}
    for word in words["train"]:
        if word not in word_to_id:
            word_to_id[word] = len(word_to_id)
    if UNK not in word_to_id:
        word_to_id[UNK] = len(word_to_id)
    unk = word_to_id[UNK]
    ids = [
        torch.tensor([word_to_id.get(w, unk) for w in words[s]], dtype=torch.int64) for s in SPLITS
    ]
    return (*ids, list(word_to_id))
