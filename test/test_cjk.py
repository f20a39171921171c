"""utils/cjk.py: the named Unicode blocks cover what unicodedata calls CJK, kana and Hangul, and nothing else."""

import re
import unicodedata

import pytest

from utils.cjk import CJK_UNIFIED_IDEOGRAPHS, HANGUL, IDEOGRAPHS, KANA


def matcher(ranges: str):
    pattern = re.compile(f"[{ranges}]")
    return lambda char: pattern.fullmatch(char) is not None


def test_the_ideographs_are_every_cjk_ideograph_unicode_names():
    inside = matcher(IDEOGRAPHS)
    for code in range(0x110000):
        name = unicodedata.name(chr(code), "")
        if name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")):
            assert inside(chr(code)), (hex(code), name)
        elif name:
            assert not inside(chr(code)), (hex(code), name)


@pytest.mark.parametrize("ranges, name_prefixes", [(KANA, ("HIRAGANA", "KATAKANA", "COMBINING KATAKANA-HIRAGANA")),
                                                   (HANGUL, ("HANGUL",))])
def test_kana_and_hangul_ranges_hold_only_their_script(ranges, name_prefixes):
    inside = matcher(ranges)
    names = [unicodedata.name(chr(code), "") for code in range(0x110000) if inside(chr(code))]
    assigned = [name for name in names if name]
    assert len(assigned) > 90 and all(name.startswith(name_prefixes) for name in assigned), \
        [name for name in assigned if not name.startswith(name_prefixes)][:5]


def test_the_ranges_hold_no_latin_digits_or_punctuation():
    everything = matcher(IDEOGRAPHS + KANA + HANGUL)
    assert not any(everything(char) for char in "azAZ09 _-.,!?;:'\"()[]{}")
    assert all(everything(char) for char in "中文漢字𠀀㐀あアー한글")
    chinese = matcher(CJK_UNIFIED_IDEOGRAPHS)
    assert chinese("中") and not chinese("あ") and not chinese("한") and not chinese("。")
