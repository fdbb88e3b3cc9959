"""Reading the files a user names (side files, request files, images, checkpoints): every reader
checks that the path is a regular file before opening it (a pipe would block, a device never
ends), reads at most a bounded number of bytes, and turns every failure into one `SpecError` that
names the field, the value and what is allowed.

>>> existing_file("/no/such/file"), existing_file("x" * 5000)
(False, False)
>>> read_json("/no/such/file.json", "sequential.heldout", "a JSON fact set")
Traceback (most recent call last):
...
interventions.core.errors.SpecError: `sequential.heldout`: got '/no/such/file.json'; expected an existing file, a JSON fact set

A file whose name ends in ``.gz`` is read as gzip (one stream): the limit then holds for the bytes it
decompresses to, read no further than one byte past it (an archive that would inflate beyond it is refused
before it is), and a cut or damaged archive is refused like any unreadable file.

The bounds, one table (`LIMITS`, bytes by kind of file), plus:
- JSON nests at most `MAX_DEPTH` levels (the spec file's bound) and holds no NaN or Infinity;
- an image decodes to at most `MAX_PIXELS` pixels, and must decode whole (a truncated file is refused).
"""

from __future__ import annotations

import io
import json
import os
import stat
import zlib
from pathlib import Path
from typing import Any

from interventions.core.errors import SpecError, short

#: The most bytes read from one file, by kind: spec files are small; request and fact files may hold
#: tens of thousands of records; corpora and held-out texts are long; images are single pictures.
LIMITS = {"spec": 1_000_000, "json": 256_000_000, "text": 1_000_000_000, "image": 64_000_000}
MAX_DEPTH = 32
MAX_PIXELS = 40_000_000
#: Image formats a picture may come in (what Pillow identifies the bytes as, not the file's suffix).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")


def existing_file(path) -> bool:
    """Whether `path` is an existing file; a path the file system cannot even look up (too long, a NUL
    byte) is simply not one."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def regular_file(path: str | Path, field: str, what: str) -> Path:
    """`path` as a `Path` when it names an existing regular file (links followed); else a `SpecError`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SpecError(field, str(path), f"an existing file, {what}") from None
    except PermissionError:
        raise SpecError(field, str(path), f"a file you may read, {what} (permission denied)") from None
    except (OSError, ValueError) as err:      # a name too long, a NUL byte, a loop of links
        raise SpecError(field, str(path), f"a readable path to {what} ({getattr(err, 'strerror', None) or err})") \
            from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a pipe, socket or device"
        raise SpecError(field, str(path), f"a regular file, {what}; this is {kind}")
    return Path(path)


def read_bytes(path: str | Path, field: str, what: str, kind: str = "json") -> bytes:
    """The bytes of a regular file of at most ``LIMITS[kind]`` bytes."""
    limit = LIMITS[kind]
    regular_file(path, field, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise SpecError(field, str(path), f"a file you may read, {what} ({err.strerror or err})") from None
    if len(data) > limit:
        raise SpecError(field, str(path), f"{what} of at most {limit:,} bytes (this one is larger)")
    return gunzip(data, limit, field, str(path), what) if str(path).endswith(".gz") else data


def gunzip(data: bytes, limit: int, field: str, shown: str, what: str) -> bytes:
    """The bytes one gzip stream `data` decompresses to, at most `limit` of them; anything else (a larger
    content, a cut or damaged stream, bytes after its end) is one `SpecError`."""
    allowed = f"{what}, gzip-compressed (the name ends in .gz)"
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)          # 16+: a gzip header and trailer
    try:
        out = inflate.decompress(data, limit + 1)
    except zlib.error as err:
        raise SpecError(field, shown, f"{allowed}, intact ({err})") from None
    if len(out) > limit:
        raise SpecError(field, shown, f"{allowed}, of at most {limit:,} bytes once decompressed (this one is larger)")
    if not inflate.eof:
        raise SpecError(field, shown, f"{allowed}, complete (the stream is cut short)")
    if inflate.unused_data:
        raise SpecError(field, shown, f"{allowed}, one stream with nothing after it "
                        f"({len(inflate.unused_data):,} bytes follow it)")
    return out


def read_text(path: str | Path, field: str, what: str, kind: str = "text") -> str:
    """The UTF-8 text (a byte-order mark allowed) of a regular file of at most ``LIMITS[kind]`` bytes."""
    data = read_bytes(path, field, what, kind)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError(field, str(path), f"{what} in UTF-8 (byte {err.start} is not UTF-8; save the file as "
                        "UTF-8)") from None


def parse_json(text: str | bytes, field: str, shown: str, what: str) -> Any:
    """JSON text within `MAX_DEPTH`, without NaN or Infinity, as Python values."""
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as err:
        raise SpecError(field, shown, f"{what} in valid JSON (line {err.lineno}: {err.msg})") from None
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else short(str(err))
        raise SpecError(field, shown, f"{what} in valid JSON ({reason})") from None
    if depth(value) > MAX_DEPTH:
        raise SpecError(field, shown, f"{what} nested at most {MAX_DEPTH} levels deep")
    return value


def read_json(path: str | Path, field: str, what: str, kind: str = "json") -> Any:
    """A regular file's JSON (see `parse_json`), at most ``LIMITS[kind]`` bytes."""
    return parse_json(read_text(path, field, what, kind), field, str(path), what)


def depth(value: Any) -> int:
    """How deeply lists and mappings nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:
            stack.extend((c, level + 1) for c in children)
    return deepest


def read_safetensors(path: str | Path, field: str, what: str) -> tuple[dict[str, str], dict]:
    """``(metadata, tensors)`` of a regular safetensors file; a damaged one is one `SpecError`."""
    from safetensors import safe_open

    regular_file(path, field, what)
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:   # noqa: BLE001 - safetensors raises several types for damaged files
        raise SpecError(field, str(path), f"{what}, readable ({short(str(err))})") from None


def read_image(path: str | Path, field: str, what: str = "an image file"):
    """A Pillow RGB image from a regular file: a known format, at most `MAX_PIXELS`, decoded whole."""
    from PIL import Image

    data = read_bytes(path, field, what, "image")
    allowed = f"an image file ({', '.join(IMAGE_FORMATS)}) of at most {MAX_PIXELS:,} pixels, complete"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format not in IMAGE_FORMATS:
                raise SpecError(field, str(path), f"{allowed}; Pillow reads it as {probe.format}")
            width, height = probe.size
            if width < 1 or height < 1 or width * height > MAX_PIXELS:
                raise SpecError(field, str(path), f"{allowed}; it declares {width} × {height} pixels")
            probe.verify()                      # checksums and the end of the stream (a cut file fails)
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")         # decodes every pixel; a truncated stream raises here
    except SpecError:
        raise
    except Exception as err:   # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise SpecError(field, str(path), f"{allowed} ({short(str(err)) or type(err).__name__})") from None
