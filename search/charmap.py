"""The character -> input-embedding-row mapping, shared by training (torch) and search (numpy only).

This module is the ONE definition of how text becomes rows of the input-embedding table
(`input_embeddings.pt.npy`, float32 [V, E]). It must stay numpy + stdlib only because `search/` ships it
next to the ONNX models on devices without torch. Changing anything below changes every trained model's
meaning of its table, so bump CHARMAP_VERSION (stored in checkpoints and model_info.json) if you do.

Mapping "cp-hash-v1":
  1. normalize_text(s):  NFKC  ->  str.lower()  ->  every whitespace char (str.isspace: space, tab, newline,
     U+3000, ...) becomes " "  ->  other control/format chars (Unicode categories Cc, Cf: NUL, DEL, U+200B
     zero-width space, U+FEFF BOM, ...) are dropped  ->  runs of spaces collapse to one  ->  strip.
     Everything else is kept: CJK, emoji, combining marks that NFKC could not compose, lone surrogates,
     private-use and unassigned code points.
  2. Reserved rows: PAD=0 (padding), CLS=1 (first token of every text), UNK=2 (reserved, currently unused:
     no character is ever unknown, see 3).
  3. char_row(cp): code points 0x20..0x24F (ASCII printable, Latin-1, Latin Extended-A/B: every character
     of English and most European text) map one-to-one to row 3 + cp, i.e. rows 0x23..0x252.
     Any other code point (CJK, emoji, Cyrillic, ...) hashes into the remaining rows [0x253, V):
         0x253 + ((cp * 2654435761) mod 2**32) mod (V - 0x253)
     (Knuth's multiplicative hash: spreads consecutive CJK code points across the table). Collisions are
     possible for rare characters and are simply shared rows; nothing ever fails.
  4. encode_batch(texts, max_len, V): ids = [CLS] + rows of the normalised characters, truncated to max_len
     tokens (so at most max_len - 1 characters), padded with PAD to exactly max_len; mask marks real tokens.
     An empty / whitespace-only text is just [CLS].

The character table file (THE one definition of its format; export_model.py writes it through table_bytes,
search/ reads it through load_table; model_info.json's "input_embeddings" names the file):
  input_embeddings.pt.npy    float32 [V, E]  (every export; the only format before int8/fp16 tables existed)
  input_embeddings.fp16.npy  float16 [V, E]  (--fp16 exports; half the size)
  input_embeddings.int8.npz  "int8": int8 [V, E] and "scale": float32 [V]; row r = int8[r] * scale[r]
                             (symmetric per row, scale = max|row| / 127; --int8 exports; a quarter of the size)
  load_table() returns float32 [V, E] for any of them; a .npy of another dtype or an .npz without exactly these
  arrays is refused.

Usage (search side):
    ids, mask = encode_batch(["a man in a red coat", "穿红色外套的女人"], max_len=64)
    x = lookup(load_table("input_embeddings.pt.npy"), ids)   # float32 [B, 64, 256] -> model_text.onnx
"""
import io
import unicodedata

import numpy as np

CHARMAP_VERSION = "cp-hash-v1"
DEFAULT_VOCAB_SIZE = 8192
PAD, CLS, UNK = 0, 1, 2

_DIRECT_LO, _DIRECT_HI = 0x20, 0x24F  # inclusive range mapped one-to-one
_HASH_BASE = 3 + _DIRECT_HI + 1  # 0x253: first row of the hashed region
_HASH_MULT = 2654435761


def normalize_text(s: str) -> str:
    """NFKC, lowercase, whitespace -> " ", drop Cc/Cf, collapse spaces, strip."""
    s = unicodedata.normalize("NFKC", s).lower()
    if not s.isprintable():  # per-char slow path only when there is something besides printables and " "
        # keep whitespace controls (tab, newline are Cc) so split() below turns them into word breaks
        s = "".join(c for c in s if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
    return " ".join(s.split())  # split() with no argument splits on every str.isspace() char


def _check_vocab(vocab_size: int) -> None:
    if vocab_size <= _HASH_BASE:
        raise ValueError(f"vocab_size must be > {_HASH_BASE} (3 reserved + {_DIRECT_HI - _DIRECT_LO + 1} "
                         f"direct rows + a hashed region), got {vocab_size}")


def char_rows(cps: np.ndarray, vocab_size: int = DEFAULT_VOCAB_SIZE) -> np.ndarray:
    """Vectorised char_row over an integer array of code points -> int64 array of table rows."""
    _check_vocab(vocab_size)
    cps = np.asarray(cps, dtype=np.uint64)
    # uint64 is wide enough: cp < 2**21 and the multiplier < 2**32, so the product < 2**53
    hashed = (cps * np.uint64(_HASH_MULT)) % np.uint64(2**32) % np.uint64(vocab_size - _HASH_BASE)
    direct = (cps >= _DIRECT_LO) & (cps <= _DIRECT_HI)
    return np.where(direct, cps + np.uint64(3), hashed + np.uint64(_HASH_BASE)).astype(np.int64)


def char_row(cp: int, vocab_size: int = DEFAULT_VOCAB_SIZE) -> int:
    """Row of the input-embedding table for one Unicode code point (see the module docstring)."""
    return int(char_rows(np.array([cp]), vocab_size)[0])


def encode_batch(texts, max_len: int = 64, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """texts (list of str, or one str) -> (ids int64[B, max_len], mask bool[B, max_len]). Never fails on a str."""
    if isinstance(texts, str):
        texts = [texts]
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1 (room for CLS), got {max_len}")
    _check_vocab(vocab_size)
    norm = [normalize_text(t)[: max_len - 1] for t in texts]
    lens = np.array([len(t) for t in norm], dtype=np.int64)
    # one C-level encode for the whole batch; surrogatepass keeps lone surrogates as their code points
    cps = np.frombuffer("".join(norm).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    B = len(norm)
    ids = np.full((B, max_len), PAD, dtype=np.int64)
    mask = np.zeros((B, max_len), dtype=bool)
    ids[:, 0] = CLS
    mask[:, 0] = True
    if cps.size:
        rows = np.repeat(np.arange(B), lens)
        cols = 1 + np.arange(cps.size) - np.repeat(np.cumsum(lens) - lens, lens)  # position within each text
        ids[rows, cols] = char_rows(cps, vocab_size)
        mask[rows, cols] = True
    return ids, mask


def lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Input-embedding lookup done outside the ONNX graph (NPU runtimes lack Gather): [V,E] x [B,L] -> [B,L,E]."""
    return np.take(np.asarray(table, dtype=np.float32), ids, axis=0)


TABLE_FILES = {"fp32": "input_embeddings.pt.npy", "fp16": "input_embeddings.fp16.npy",
               "int8": "input_embeddings.int8.npz"}


def _int8_rows(table):
    t = np.asarray(table, dtype=np.float32)
    scale = np.abs(t).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(t / scale[:, None]), -127, 127).astype(np.int8), scale


def stored_table(table, kind):
    """What load_table returns after storing `table` as `kind` (fp32 | fp16 | int8): float32 [V, E]."""
    if kind == "fp32":
        return np.asarray(table, dtype=np.float32)
    if kind == "fp16":
        return np.asarray(table, dtype=np.float16).astype(np.float32)
    q, scale = _int8_rows(table)
    return q.astype(np.float32) * scale[:, None]


def table_bytes(table, kind):
    """The file contents of `table` [V, E] stored as kind (fp32 | fp16 | int8); name it TABLE_FILES[kind]."""
    buf = io.BytesIO()
    if kind == "int8":
        q, scale = _int8_rows(table)
        np.savez(buf, int8=q, scale=scale)
    else:
        np.save(buf, np.asarray(table, dtype={"fp32": np.float32, "fp16": np.float16}[kind]), allow_pickle=False)
    return buf.getvalue()


def load_table(path):
    """Read a character table file of any TABLE_FILES format -> float32 [V, E]. ValueError/OSError if unusable."""
    try:
        arr = np.load(path, allow_pickle=False)
    except EOFError:  # an empty file
        raise ValueError(f"{path}: empty file") from None
    if not isinstance(arr, np.ndarray):  # .npz
        with arr as z:
            if sorted(z.files) != ["int8", "scale"]:
                raise ValueError(f"{path}: an .npz table must hold exactly the arrays 'int8' and 'scale'")
            q, scale = z["int8"], z["scale"]
        if q.dtype != np.int8 or q.ndim != 2 or scale.shape != (q.shape[0],) or scale.dtype != np.float32:
            raise ValueError(f"{path}: int8 table needs int8 [V,E] and float32 scale [V]")
        return q.astype(np.float32) * scale[:, None]
    if arr.dtype not in (np.float32, np.float16) or arr.ndim != 2:
        raise ValueError(f"{path}: table must be float32 or float16 [V,E], got {arr.dtype} {list(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def printable(s) -> str:
    """`s` safe to print on a terminal: non-printable characters (ANSI escapes, newlines, bidi controls) are shown
    as Python escapes (\\x1b, \\n, \\u202e), so names read from files cannot move the cursor or fake output lines."""
    s = str(s)
    return s if s.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)
