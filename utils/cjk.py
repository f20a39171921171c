"""Unicode blocks of Chinese, Japanese and Korean text, as ranges to put inside a regular-expression character class
(`re.compile(f"[{IDEOGRAPHS}]")`). Each caller combines the blocks it means: what counts as Chinese for a corpus's
share of Chinese text is not what splits text into words."""

CJK_UNIFIED_IDEOGRAPHS = "\u4e00-\u9fff"
CJK_EXTENSION_A = "\u3400-\u4dbf"
CJK_COMPATIBILITY_IDEOGRAPHS = "\uf900-\ufaff"
SUPPLEMENTARY_IDEOGRAPHIC_PLANE = "\U00020000-\U0002ffff"  # extensions B-F, compatibility supplement
TERTIARY_IDEOGRAPHIC_PLANE = "\U00030000-\U0003ffff"  # extensions G-H
CJK_SYMBOLS_AND_PUNCTUATION = "\u3000-\u303f"  # the ideographic space, 、。「」 and the like
HALFWIDTH_AND_FULLWIDTH_FORMS = "\uff00-\uffef"  # ，！？ and full-width Latin letters and digits
KANA = (
    "\u3040-\u309f"  # Hiragana
    "\u30a0-\u30ff"  # Katakana
    "\u31f0-\u31ff"  # Katakana Phonetic Extensions
)
HANGUL = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u3130-\u318f"  # Hangul Compatibility Jamo
    "\uac00-\ud7af"  # Hangul Syllables
)

IDEOGRAPHS = (CJK_EXTENSION_A + CJK_UNIFIED_IDEOGRAPHS + CJK_COMPATIBILITY_IDEOGRAPHS + SUPPLEMENTARY_IDEOGRAPHIC_PLANE
              + TERTIARY_IDEOGRAPHIC_PLANE)
