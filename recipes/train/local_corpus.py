"""English prose from files already on this machine, for training a language-model dictionary offline.

    python -m recipes.train.local_corpus --out runs/corpus.txt

No data set can be downloaded here, so the corpus is what the machine holds: the long descriptions of
the installed Python distributions (their README text), the docstrings of Python's standard library
and of the installed packages, and the licence texts under /usr/share/common-licenses. Each is cut into paragraphs; a paragraph is
kept when it has at least 20 words and is mostly letters and spaces (not code, tables or markup),
and exact repeats are dropped. The paragraphs are shuffled with `--seed` and written one passage per
blank-line-separated block, the format `lesion train-dictionary --text` reads. What the corpus holds
depends on what is installed; the last line printed is one JSON object with its sources and sizes.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
from importlib import metadata
from pathlib import Path

from interventions.core.atomic import atomic_write

LICENSES = Path("/usr/share/common-licenses")


#: Longer paragraphs are cut into pieces of at most this many words (a passage is read as one text).
MAX_WORDS = 150


def prose(text: str, min_words: int = 20) -> list[str]:
    """The paragraphs of `text` that read as prose (see the module docstring), whitespace collapsed, cut
    into pieces of at most `MAX_WORDS` words."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para.split()) < min_words:
            continue
        letters = sum(c.isalpha() or c == " " for c in para)
        if letters / len(para) >= 0.85 and not para.startswith(("$", ">>>", "|", "#", "..", "-", "*", "=")):
            words = para.split()
            out += [" ".join(words[i:i + MAX_WORDS]) for i in range(0, len(words), MAX_WORDS)]
    return out


def descriptions() -> list[str]:
    """Each installed distribution's long description (its README), one document each."""
    docs = {}
    for dist in metadata.distributions():
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        name = dist.metadata.get("Name", "")
        if body and name not in docs:
            docs[name] = body
    return [docs[k] for k in sorted(docs)]


def python_files() -> list[Path]:
    """Python's standard library and the installed packages' sources, tests left out, in a fixed order."""
    stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    roots = [stdlib] + sorted({Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()})
    files = []
    for root in roots:
        pattern = "*.py" if root == stdlib else "**/*.py"
        files += sorted(f for f in root.glob(pattern) if not any(part.startswith("test") for part in f.parts[-3:]))
        if root == stdlib:
            files += sorted(f for f in root.glob("*/*.py") if "site-packages" not in f.parts
                            and not any(part.startswith("test") for part in f.parts[-2:]))
    return files


def docstrings() -> list[str]:
    """The module, class and function docstrings of Python's standard library and of the installed packages,
    one document per module."""
    docs = []
    for path in python_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
        docs.append("\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d))
    return docs


def licences() -> list[str]:
    if not LICENSES.is_dir():
        return []
    return [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(LICENSES.iterdir()) if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-words", type=int, default=None, help="keep shuffled paragraphs up to this many words")
    args = p.parse_args(argv)
    sources = {"package descriptions": descriptions(), "docstrings": docstrings(),
               "licences": licences()}
    seen, passages, counts = set(), [], {}
    for name, docs in sources.items():
        kept = [para for doc in docs for para in prose(doc) if not (para in seen or seen.add(para))]
        counts[name] = {"documents": len(docs), "paragraphs": len(kept), "words": sum(len(x.split()) for x in kept)}
        passages += kept
    random.Random(args.seed).shuffle(passages)
    if args.max_words:
        total = 0
        for i, para in enumerate(passages):
            total += len(para.split())
            if total > args.max_words:
                passages = passages[:i]
                break
    atomic_write(args.out, "\n\n".join(passages).encode())
    print(f"wrote {args.out}: {len(passages)} paragraphs")
    print(json.dumps({"corpus": args.out, "paragraphs": len(passages), "words": sum(len(x.split()) for x in passages),
                      "sources": counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
