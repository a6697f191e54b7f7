"""Image files: conversion to 8-bit RGB as the model sees it, and a fast per-file soundness check.

Kept free of torch so that the check's worker processes start quickly.

``to_rgb`` composites alpha (and palette or greyscale transparency) on white, and scales 16-bit greyscale
to 8 bits.

``plain_format`` says whether a file's bytes are a JPEG or PNG that a plain 8-bit RGB decoder (torchvision's
``decode_jpeg`` / ``decode_image``) turns into what ``to_rgb`` makes of it; the data path decodes the
others with PIL and ``to_rgb``.

``inspect_image`` says whether one file will load. It checks that the file exists and is a non-empty
regular file. In header mode it then asks what PIL's ``Image.open``, with size and mode read, would
answer, without PIL's per-file cost for JPEG and PNG. Those headers are parsed from the first 2 KB (one
more read when a long block such as EXIF or ICC pushes them further). The parse mirrors what Pillow's
openers read and refuse: JPEG markers up to the start of scan, quantization tables, the frame header;
PNG's IHDR and every chunk up to the first IDAT, with CRCs. The file's last bytes must also be JPEG's
end-of-image marker or PNG's IEND chunk, which catches truncation that a header alone cannot show.
- header sound and the end present: accepted without PIL.
- a header feature the parse leaves to PIL (EXIF without JFIF dpi, Photoshop or MPF blocks, iCCP or text
  chunks, rare markers), or another format (GIF, BMP, WebP, ...): PIL opens it and reads size and mode.
- a broken structure or no proper end: PIL decodes it in full, and its verdict counts. Trailing bytes
  after the end marker are harmless, for instance.
So the check never refuses a file that PIL decodes. In full mode every file is decoded and converted with
``to_rgb``.
"""
from __future__ import annotations

import os
import stat
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["to_rgb", "plain_format", "inspect_image", "inspect_images"]

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_WHITE = (255, 255, 255, 255)


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image over opaque white; RGB result."""
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """A new 8-bit RGB copy of ``im`` as the model should see it.

    - alpha (RGBA, LA, PA, premultiplied RGBa/La) is composited on white. PIL's ``convert("RGB")``
      drops alpha and leaves the hidden colour, mostly black, in transparent areas.
    - palette, greyscale or RGB images with a ``transparency`` entry (PNG tRNS, GIF) are made RGBA first,
      then composited on white.
    - 16-bit greyscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and 32-bit ``I``, which is how PNG
      16-bit greys may load, are read as 0..65535, clipped to that range and scaled to 0..255 by
      round(v / 257). PIL clips them at 255, so they come out white. Transparency given as a grey value
      is kept.
    - every other mode (1, L, CMYK, YCbCr, ...) goes through PIL's ``convert("RGB")``.
    """
    if im.mode in _WIDE_GREY_MODES:
        wide = np.asarray(im).astype(np.int64)
        grey = Image.fromarray(((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8), "L")
        key = im.info.get("transparency")
        if isinstance(key, int):
            alpha = Image.fromarray(np.where(wide == key, 0, 255).astype(np.uint8), "L")
            return _on_white(Image.merge("RGBA", (grey, grey, grey, alpha)))
        return grey.convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _on_white((im.convert("LA") if im.mode == "La" else im).convert("RGBA"))
    return im.convert("RGB")


def plain_format(buf: bytes | memoryview) -> str | None:
    """"JPEG" or "PNG" when a plain 8-bit RGB decode of the file's bytes equals ``to_rgb`` of it, else None.

    - JPEG: an 8-bit Huffman frame header (SOF0-2) with 1 (grey) or 3 components before the scan.
      CMYK/YCCK (4 components), 12-bit, lossless or arithmetic-coded frames are left to PIL.
    - PNG: 8-bit grey or RGB, or a palette, with no tRNS chunk before the image data. Alpha, transparency,
      16-bit and sub-8-bit grey are left to PIL (``to_rgb`` composites and scales them).
    """
    mv = memoryview(buf)
    size = len(mv)
    if mv[:3] == b"\xff\xd8\xff":
        pos = 2
        for _ in range(_MAX_SEGMENTS):
            if pos + 4 > size or mv[pos] != 0xFF:
                return None
            marker = mv[pos + 1]
            if marker == 0xFF:
                pos += 1
            elif 0xD0 <= marker <= 0xD8:
                pos += 2
            elif marker in _JPEG_SOF:               # Huffman baseline, extended or progressive only
                ok = marker <= 0xC2 and pos + 10 <= size and mv[pos + 4] == 8 and mv[pos + 9] in (1, 3)
                return "JPEG" if ok else None
            elif marker in (0xD9, 0xDA):        # end of image or start of scan before any frame header
                return None
            else:
                pos += 2 + ((mv[pos + 2] << 8) | mv[pos + 3])
        return None
    if mv[:8] == _PNG_SIGNATURE and size >= 33 and mv[12:16] == b"IHDR":
        depth, colour = mv[24], mv[25]
        if (colour, depth) not in ((0, 8), (2, 8)) and colour != 3:
            return None
        pos = 33
        for _ in range(_MAX_SEGMENTS):
            if pos + 8 > size:
                return None
            cid = bytes(mv[pos + 4:pos + 8])
            if cid == b"IDAT":
                return "PNG"
            if cid == b"tRNS":
                return None
            pos += 12 + int.from_bytes(mv[pos:pos + 4], "big")
    return None


# ---------------------------------------------------------------------------------------------- checks

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}  # colour type: depths
_PNG_PIL_PARSES = frozenset({b"iCCP", b"zTXt", b"iTXt", b"eXIf", b"acTL", b"fcTL", b"fdAT", b"IEND"})
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_SKIPPED = frozenset({0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xFE})  # DHT DAC DNL DRI EXP COM: PIL skips them
_HEAD = 2048         # bytes read first; a PIL-written JPEG's markers up to the scan fit in ~600
_MAX_SEGMENTS = 256  # more segments than this before the image data: leave the verdict to PIL

# The fast parsers below answer "ok", "pil" or "bad" for a file's header.
# ok:  it is sound, and Image.open would accept it. The parsers mirror what Pillow's JPEG and PNG
#      openers read and refuse.
# pil: it holds something they do not mirror (EXIF that PIL parses for dpi, Photoshop or MPF blocks,
#      iCCP/zTXt/iTXt chunks, rare markers, huge sizes), so PIL's own header check decides.
# bad: the structure is broken (lengths past the end, bad CRC, no frame header), so PIL decodes it in full.


class _Reader:
    """Bytes of an open file by offset, served from the first read when possible (one pread otherwise)."""

    __slots__ = ("fd", "buf", "base")

    def __init__(self, fd: int, head: bytes):
        self.fd, self.buf, self.base = fd, head, 0

    def get(self, off: int, n: int) -> bytes:
        i = off - self.base
        if i >= 0 and i + n <= len(self.buf):
            return self.buf[i:i + n]
        self.buf, self.base = os.pread(self.fd, max(n, _HEAD), off), off
        return self.buf[:n]


def _too_big(width: int, height: int) -> bool:
    """PIL warns above MAX_IMAGE_PIXELS and refuses above twice that: let PIL say which."""
    return Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS


def _png_header(r: _Reader, size: int) -> str:
    """IHDR (CRC, size, legal depth, filter 0), then each chunk up to the first IDAT: CRC, and for the
    chunks Pillow parses, the lengths it requires."""
    head = r.get(0, 33)
    if len(head) < 33 or head[8:16] != b"\x00\x00\x00\x0dIHDR" or zlib.crc32(head[12:29]) != int.from_bytes(head[29:33]):
        return "bad"
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if not width or not height or depth not in _PNG_DEPTHS.get(colour, ()) or compression or filtering or interlace > 1:
        return "bad"
    if _too_big(width, height):
        return "pil"
    pos = 33
    for _ in range(_MAX_SEGMENTS):
        b = r.get(pos, 8)
        if len(b) < 8:
            return "bad"
        length, cid = int.from_bytes(b[:4]), b[4:]
        if length >= 1 << 31 or pos + 12 + length > size or not (cid.isalnum() and cid.isascii()):
            return "bad"
        if cid == b"IDAT":
            return "ok"
        if cid in _PNG_PIL_PARSES:
            return "pil"
        need = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9,
                b"tRNS": 6 if colour == 2 else 2 if colour == 0 else 0}.get(cid, 0)
        if length < need or (cid == b"PLTE" and (length % 3 or not 0 < length <= 768)):
            return "bad"
        if length > 1 << 20:
            return "pil"
        data = r.get(pos + 8, length + 4)
        if len(data) < length + 4 or zlib.crc32(data[:length], zlib.crc32(cid)) != int.from_bytes(data[length:]):
            return "bad"
        pos += 12 + length
    return "pil"


def _jpeg_header(r: _Reader, size: int) -> str:
    """Markers from SOI to SOS: lengths within the file, 8-bit frame header (SOFn) with 1, 3 or 4
    components and non-zero size before the scan, well-formed quantization tables, and the APP blocks
    that Pillow reads long enough for it."""
    pos, frame, exif, dpi = 2, False, False, False
    for _ in range(_MAX_SEGMENTS):
        b = r.get(pos, 4)
        if len(b) < 2 or b[0] != 0xFF:
            return "bad"
        marker = b[1]
        if marker == 0xFF:                      # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD8:              # RSTn, SOI: no length
            pos += 2
            continue
        if marker == 0xD9 or len(b) < 4:        # end of image before the scan
            return "bad"
        length = (b[2] << 8) | b[3]
        if length < 2 or pos + 2 + length > size:
            return "bad"
        if marker in _JPEG_SOF:
            seg = r.get(pos + 4, length - 2)
            if len(seg) < 6 or seg[0] != 8 or seg[5] not in (1, 3, 4):
                return "pil"                    # PIL refuses these; let it say so
            height, width = (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4]
            if not height or not width or length != 8 + 3 * seg[5]:
                return "bad"
            if _too_big(width, height):
                return "pil"
            frame = True
        elif marker == 0xDB:                    # DQT: tables of 1 + 64 bytes (8-bit) or 1 + 128 (16-bit)
            seg = r.get(pos + 4, length - 2)
            i = 0
            while i < len(seg):
                i += 1 + (64 if seg[i] < 16 else 128)
            if i != len(seg):
                return "pil"
        elif 0xE0 <= marker <= 0xEF:            # APPn
            seg = r.get(pos + 4, min(length - 2, 16))
            if marker == 0xE0 and seg.startswith(b"JFIF"):
                if len(seg) < 7:
                    return "pil"
                dpi = dpi or (len(seg) >= 12 and seg[7] in (1, 2))
            elif marker == 0xE1 and seg.startswith(b"Exif\0\0"):
                exif = True
            elif marker == 0xE2 and seg.startswith(b"ICC_PROFILE\0"):
                if len(seg) < 14:
                    return "pil"
            elif (marker == 0xE2 and seg.startswith(b"MPF\0")) or (marker == 0xED and seg.startswith(b"Photoshop 3.0\0")):
                return "pil"
            elif marker == 0xEE and seg.startswith(b"Adobe") and len(seg) < 7:
                return "pil"
        elif marker == 0xDA:                    # start of scan: the header is complete
            if not frame:
                return "bad"
            return "pil" if exif and not dpi else "ok"   # PIL reads the dpi from EXIF then
        elif marker not in _JPEG_SKIPPED:
            return "pil"
        pos += 2 + length
    return "pil"


def _pil_verdict(path: str, full: bool, signature: str | None) -> tuple[str | None, str]:
    """(problem or None, format) from PIL: open and read size/mode, or with ``full`` decode and convert.

    ``signature`` is the format the first bytes announce (JPEG, PNG), if any.
    """
    try:
        with Image.open(path) as im:
            fmt = im.format or "?"
            im.size, im.mode  # noqa: B018 - the header check proper
            if full:
                im.load()
                to_rgb(im)
        return None, fmt
    except UnidentifiedImageError:
        if signature:
            return f"is a damaged {signature} (PIL cannot identify it)", "?"
        with open(path, "rb") as f:
            start = f.read(8)
        return f"is not an image (PIL cannot identify it; it starts with {start!r})", "?"
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's problem, reported in one line
        detail = " ".join(str(e).split()) or "no message"
        return f"cannot be decoded ({type(e).__name__}: {detail})", "?"


def inspect_image(path: str, full: bool = False) -> tuple[str | None, str]:
    """Check one image file. Returns ``(problem, format)``.

    ``problem`` is None when the file is sound, or a phrase to follow the file's name, e.g.
    ``"does not exist"`` or ``"cannot be decoded (OSError: image file is truncated)"``. ``format``
    is e.g. ``"JPEG"``, or ``"?"`` if unknown.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist", "?"
    except PermissionError:
        return "is not readable (permission denied)", "?"
    except IsADirectoryError:
        return "is not a regular file", "?"
    except ValueError:
        return "is not a valid path (it contains a NUL byte)", "?"
    except OSError as e:
        return f"cannot be opened ({e.strerror or e})", "?"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file", "?"
        if st.st_size == 0:
            return "is empty (0 bytes)", "?"
        head = os.pread(fd, _HEAD, 0)
        fmt = "PNG" if head.startswith(_PNG_SIGNATURE) else "JPEG" if head.startswith(b"\xff\xd8\xff") else None
        if fmt and not full:
            size = st.st_size
            try:
                header = (_png_header if fmt == "PNG" else _jpeg_header)(_Reader(fd, head), size)
            except (IndexError, struct.error):   # the file changed under us, or a parse corner: ask PIL
                header = "bad"
            tail = head[-12:] if size <= len(head) else os.pread(fd, 12, size - 12)
            ends = tail == _PNG_IEND if fmt == "PNG" else tail.endswith(b"\xff\xd9")
            if header == "ok" and ends:
                return None, fmt
            full = header == "bad" or not ends     # maybe truncated: only a full decode can tell
    except OSError as e:
        return f"cannot be read ({e.strerror or e})", "?"
    finally:
        os.close(fd)
    # Other formats, and JPEG/PNG with a header feature the fast parsers leave to PIL, get PIL's header
    # check. A JPEG/PNG with a broken structure or no proper end is decoded in full: it may be truncated,
    # or just unusual.
    return _pil_verdict(path, full, fmt)


def inspect_images(root: str, paths: Sequence[str], full: bool = False) -> list[tuple[str | None, str]]:
    """``inspect_image`` for each path relative to ``root``, in order; a process-pool work unit."""
    prefix = root.rstrip(os.sep) + os.sep
    return [inspect_image(prefix + p, full) for p in paths]
