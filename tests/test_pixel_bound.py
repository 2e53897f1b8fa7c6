"""bench/pixel_bound.py's parsing of the attribute text and its gender guess (the retrieval itself needs the bench's
data and the MiniLM teacher; the bench runs it).
    python3 -m pytest -q tests/test_pixel_bound.py
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import pixel_bound  # noqa: E402


def test_visible_fields_parse_every_generated_identity(synth_data):
    from tools import make_synthetic_pedes as msp
    recs = json.loads(Path(synth_data).read_text(encoding="utf-8"))
    for r in recs:
        ident = msp.make_identity(0, r["id"])
        seen = pixel_bound.visible_fields(r["attributes"])
        assert seen["upper"] == ident["upper"]
        assert seen["lower"] == ident["lower"]
        assert seen["carried"] == (ident["carried"] or "unknown")
        assert seen["hair"] in (ident["hair"], None)  # the text sometimes leaves the length out


def test_gender_guess_follows_the_clothes():
    pri = pixel_bound.gender_priors()
    assert pri["woman"]["upper"]["dress"] > 0 and "dress" not in pri["man"]["upper"]
    assert pixel_bound.guess_gender("man,long black hair,red dress,unknown,black shoes,unknown", pri) == "woman"
    assert pixel_bound.guess_gender("woman,bald,gray t-shirt,blue jeans,black shoes,black backpack", pri) == "man"
    assert pixel_bound.guess_gender("man,short black hair,red coat,black skirt,black boots,red handbag", pri) == "woman"
