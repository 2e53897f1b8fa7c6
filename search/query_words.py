"""The student's word list and the query clean-up built on it, shared by evaluation (torch) and search (stdlib only).

A character-level student knows only the words its training texts used. A word it never saw cannot tell it
anything about a person, yet every character of it moves the pooled embedding: on a fresh validation gallery
(bench/wording_val.py, the stop-5 full-bench student) four unseen words in a keyword query took R@1 from 79.7 to
42.2, a made-up lead ("mater triangular man, ...") to 54.5. So a query drops its Latin-script words that are
neither in the list nor one edit (a typo: an extra, a missing, a changed or two swapped letters) away from a
word of it, before it is encoded; everything else -- punctuation, digits, Chinese and any other script -- is
kept as typed. A query that would lose every word is kept whole. Before that, a field-by-field query loses
its labels ("Sex - male. Top: red shirt" -> "male, red shirt"; strip_labels). prepare_query does both; training
never does either.

This module is THE one definition of the format (main.py builds it, the checkpoint's model_cfg carries it as
"query_vocab", export_model.py writes it, search/ reads it):
  query_vocab.txt   UTF-8, one lower-case word per line ([a-z] and inner ' or -), sorted, no duplicates;
                    model_info.json's "query_vocab" names the file (absent: no filtering, as before).

    qv = QueryVocab(["a", "man", "in", "red", "shirt"])
    qv.filter("looking for a man in a red shrit!")   # -> "a man in a red shrit!" (one-edit typo kept)
"""
import re

_WORD = re.compile(r"[A-Za-z\u00C0-\u024F]+(?:['\-][A-Za-z\u00C0-\u024F]+)*")
_VALID = re.compile(r"[a-z\u00C0-\u024F]+(?:['\-][a-z\u00C0-\u024F]+)*")
MAX_WORDS = 2_000_000
MAX_BYTES = 64 << 20
QUERY_VOCAB_FILE = "query_vocab.txt"


# "Sex - male", "top: red shirt", "bag = none": a label of one to three Latin words, then ':' / '=' or a dash
# with spaces round it (so "t-shirt" and "light-blue" are never split)
_LABELLED = re.compile(r"\s*([A-Za-z\u00C0-\u024F][A-Za-z\u00C0-\u024F']*(?:\s+[A-Za-z\u00C0-\u024F']+){0,2})"
                       r"\s*(?::|=|\s[-\u2013\u2014]\s)\s*(.*)", re.S)
# segment breaks of a field list: ; | newline anywhere, '.' and ',' only before a space or the end ("1.8m" stays)
_SEGMENT = re.compile(r"\s*(?:[;|\n]|[.,](?=\s|$))\s*")
_EMPTY_VALUES = frozenset({"none", "no", "n/a", "na", "-", "unknown", "nothing", "null"})
# a label that is itself the person ("woman: red coat") is kept as a word, not dropped
PERSON_WORDS = frozenset("man men woman women person people male female guy lady gentleman girl boy child kid "
                         "pedestrian someone somebody".split())
_GENDER_LABELS = frozenset({"sex", "gender"})  # "sex: female" stays "female", not "female sex"


def strip_labels(text):
    """A field-by-field query without its field labels: 'Sex - male. Upper garment - red shirt.' ->
    'male, red shirt'. The student learnt people from descriptions, and on a fresh gallery (bench/wording_val.py,
    the stop-5 full student) labels of any wording -- even the training's own -- took R@1 from 72.4 (the same
    values as a comma list) to 16-31: every label's characters pull the pooled embedding toward the same point.
    A segment (split at ; | newlines, and at . or , before a space) whose start is a one-to-three-word label
    followed by ':' '=' or a spaced dash keeps its value only ('bag: none' goes), a one-word value its label
    after it ('hair: long' -> 'long hair'); the text is returned unchanged when no segment is labelled."""
    segs = [s for s in _SEGMENT.split(text) if s.strip()]
    out, labelled = [], False
    for s in segs:
        m = _LABELLED.fullmatch(s)
        if m is None:
            out.append(s.strip())
            continue
        labelled = True
        label, value = m.group(1), " ".join(m.group(2).split())
        label_words = set(label.lower().split())
        if label_words & PERSON_WORDS:
            out.append(label)
        if not value or value.lower() in _EMPTY_VALUES:
            continue
        if not label_words & (PERSON_WORDS | _GENDER_LABELS) and value.lower() not in PERSON_WORDS \
                and _WORD.fullmatch(value):  # one word: _WORD has no spaces
            value = f"{value} {label}"  # a bare adjective needs its noun: 'hair: long' -> 'long hair'
        out.append(value)
    return ", ".join(out) if labelled and out else text


def prepare_query(text, vocab=None):
    """The text the student reads: labels stripped (strip_labels), then the words `vocab` (a QueryVocab or None)
    does not know dropped. One function, so evaluation and search/ read a query the same way."""
    text = strip_labels(text)
    return vocab.filter(text) if vocab is not None else text


class QueryVocabError(ValueError):
    pass


def is_vocab_word(w):
    """A lower-case word as the list stores it ([a-z] and Latin letters, inner ' or -)."""
    return bool(_VALID.fullmatch(w))


def _deletes(w):
    return {w[:i] + w[i + 1:] for i in range(len(w))}


class QueryVocab:
    """A set of words plus their one-deletion variants (so one-edit typos are matched in O(len(word)))."""

    def __init__(self, words):
        words = sorted({str(w).lower() for w in words})
        bad = next((w for w in words if not is_vocab_word(w)), None)
        if bad is not None:
            raise QueryVocabError(f"query vocabulary entry {bad!r:.40} is not a lower-case word")
        if len(words) > MAX_WORDS:
            raise QueryVocabError(f"query vocabulary has {len(words)} words (at most {MAX_WORDS})")
        self.words = tuple(words)
        self._set = frozenset(words)
        self._del = frozenset(d for w in words if len(w) >= 4 for d in _deletes(w))

    def __len__(self):
        return len(self.words)

    def knows(self, word):
        w = word.lower()
        if w in self._set:
            return True
        parts = re.split(r"['\-]", w)
        if len(parts) > 1 and all(p in self._set for p in parts if p):
            return True  # "t-shirt" / "light-blue" from known parts
        if len(w) < 4:  # short words: exact only (one edit from "a", "in", "on" is half the alphabet)
            return False
        d = _deletes(w)
        # an extra letter (d in set), a missing one (w in the deletion set), a changed or swapped one (d & del)
        return bool(d & self._set) or w in self._del or bool(d & self._del)

    def filter(self, text):
        """`text` without its Latin words this vocabulary does not know (see the module docstring)."""
        kept = dropped = False
        out, pos = [], 0
        for m in _WORD.finditer(text):
            out.append(text[pos:m.start()])
            if self.knows(m.group(0)):
                out.append(m.group(0))
                kept = True
            else:
                dropped = True
            pos = m.end()
        out.append(text[pos:])
        if not dropped:
            return text
        if not kept and not re.search(r"[^\W\d_A-Za-z\u00C0-\u024F]", text):
            return text  # nothing the student knows, and no other script either: the query as typed
        return " ".join("".join(out).split())

    def to_text(self):
        return "".join(w + "\n" for w in self.words)

    @classmethod
    def from_text(cls, s, where="query vocabulary"):
        try:
            return cls(line.strip() for line in s.splitlines() if line.strip())
        except QueryVocabError as e:
            raise QueryVocabError(f"{where}: {e}") from None


def words_of(text):
    """The lower-case words of a text as the vocabulary stores them ('t-shirt' -> 't', 'shirt')."""
    return [p for m in _WORD.finditer(text) for p in re.split(r"['\-]", m.group(0).lower()) if p]


def load_query_vocab(path):
    """QueryVocab of a query_vocab.txt; QueryVocabError (one line) for an unreadable or malformed file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:  # a list this big is not a word list: refuse it rather than read a cut-off one
            raise QueryVocabError(f"{path}: larger than {MAX_BYTES >> 20} MiB; not a query vocabulary")
        s = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QueryVocabError(f"{path}: cannot read the query vocabulary ({e})") from None
    return QueryVocab.from_text(s, str(path))
