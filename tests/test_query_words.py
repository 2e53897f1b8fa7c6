"""search/query_words.py: the student's word list and the query filter (stdlib only, like the rest of search/)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.query_words import (QueryVocab, QueryVocabError, load_query_vocab, prepare_query,  # noqa: E402
                                strip_labels, words_of)

WORDS = ["a", "man", "woman", "in", "red", "shirt", "t", "blue", "jeans", "with", "black", "backpack", "hair"]


def test_unknown_words_go_known_words_and_everything_else_stay():
    qv = QueryVocab(WORDS)
    assert qv.filter("a man in a red shirt") == "a man in a red shirt"  # nothing unknown: the text itself
    assert qv.filter("Looking for a man in a RED shirt!") == "a man in a RED shirt!"  # case kept, punctuation kept
    assert qv.filter("Sex - man. Upper garment - red t-shirt.") == "- man. - red t-shirt."
    assert qv.filter("man, camera 3, 14:02, blue jeans") == "man, 3, 14:02, blue jeans"  # digits are not words
    assert qv.filter("穿红色外套的女人, wearing red") == "穿红色外套的女人, red"
    assert qv.filter("frobnicate quux") == "frobnicate quux"  # nothing known, no other script: as typed
    assert qv.filter("") == ""


def test_one_edit_typos_of_long_words_are_kept_short_words_exact():
    qv = QueryVocab(WORDS)
    for typo in ("jaens", "jeens", "jean", "jeanss", "backpak", "bakcpack", "wooman"):
        assert qv.knows(typo), typo
    for other in ("jumper", "jacket", "ab", "im", "re", "blues-rock"):
        assert not qv.knows(other), other
    assert qv.knows("t-shirt") and qv.knows("Black-Red")  # hyphen words: known when every part is
    assert not qv.knows("black-tie") and QueryVocab(WORDS + ["black-tie"]).knows("Black-Tie")


def test_file_round_trip_and_one_line_refusals(tmp_path):
    qv = QueryVocab(words_of("The man's T-shirt, blue jeans; a backpack. Émile"))
    assert qv.words == ("a", "backpack", "blue", "jeans", "man", "s", "shirt", "t", "the", "émile")
    p = tmp_path / "query_vocab.txt"
    p.write_text(qv.to_text(), encoding="utf-8")
    assert load_query_vocab(p).words == qv.words
    for content, pat in ((b"man\nRed Shirt\n", "not a lower-case word"), (b"\xff\xfe", "cannot read"),
                         (b"man\n1234\n", "not a lower-case word")):
        p.write_bytes(content)
        with pytest.raises(QueryVocabError, match=pat) as e:
            load_query_vocab(p)
        assert "\n" not in str(e.value)
    with pytest.raises(QueryVocabError, match="cannot read"):
        load_query_vocab(tmp_path / "missing.txt")


def test_an_oversized_list_is_refused_not_cut(tmp_path, monkeypatch):
    import search.query_words as qw
    p = tmp_path / "query_vocab.txt"
    p.write_text("man\nshirt\n", encoding="utf-8")
    monkeypatch.setattr(qw, "MAX_BYTES", 8)  # one byte short of the file: a cut-off read would leave "man", "shi"
    with pytest.raises(QueryVocabError, match="larger than"):
        load_query_vocab(p)
    monkeypatch.setattr(qw, "MAX_BYTES", 10)
    assert load_query_vocab(p).words == ("man", "shirt")


def test_search_side_module_imports_no_torch():
    code = "import sys; import search.query_words, search.engine; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_evaluation_filters_with_the_checkpoints_list_and_old_checkpoints_read_as_typed():
    import evaluation_model
    q = "looking for a man in a red shirt"
    assert evaluation_model.query_filter({})(q) == q  # written before the list existed: no filtering
    assert evaluation_model.query_filter({"query_vocab": WORDS})(q) == "a man in a red shirt"


@pytest.mark.parametrize("text, read", [
    ("Sex - male. Hair style - short black hair. Upper garment - red shirt. Carried item - none.",
     "male, short black hair, red shirt"),
    ("sex: female, hair: long, top: red t-shirt", "female, long hair, red t-shirt"),  # a bare adjective keeps its noun
    ("woman: red coat; bag = black handbag | shoes \u2013 white sneakers",
     "woman, red coat, black handbag, white sneakers"),
    ("GENDER=M\nShoes: white", "M, white Shoes"),
])
def test_field_labels_are_stripped(text, read):
    assert strip_labels(text) == read


@pytest.mark.parametrize("text", [
    "a man in a light-blue t-shirt, 1.8m tall",  # inner hyphens and decimals are no labels
    "a man wearing a red shirt. He has a bag.", "gender-male top-red", "bag: none", "top:", "",
    "性别：男，上衣：红色外套",  # other scripts' labels are left alone (not measured)
])
def test_texts_without_labels_are_returned_unchanged(text):
    assert strip_labels(text) == text


def test_prepare_query_strips_labels_before_filtering():
    qv = QueryVocab(WORDS)
    assert prepare_query("Sex - man. Upper garment - red t-shirt.", qv) == "man, red t-shirt"
    assert prepare_query("Sex - man. Upper garment - red t-shirt.") == "man, red t-shirt"  # no list: labels only
    assert prepare_query("looking for a man in red", qv) == "a man in red"
