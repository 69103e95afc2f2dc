"""MAGI-1's caption cleaning before its T5 (the release's T5Embedder.text_preprocessing), so prompts give the same
tokens as in the release: URL and html scrubbing (BeautifulSoup), mojibake repair (ftfy), CJK removal, dash and
quote normalisation, scraped-caption noise (ids, file names, shop phrases), all lower-cased; applied twice, as the
release does."""
from __future__ import annotations

import html
import re
import urllib.parse

import ftfy
from bs4 import BeautifulSoup

_URL = r"\b((?:{head}(?:\/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
_DASHES = ("[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
           "\uFE31\uFE32\uFE58\uFE63\uFF0D]+")
_CJK_RANGES = ("\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf", "\u4dc0-\u4dff",
               "\u4e00-\u9fff")
_BAD_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}")
_UNDERSCORE_OR_DASH = re.compile(r"(?:\-|\_)")

# (pattern, replacement) in the release's order; the html parse, the ftfy pass and the "-"/"_" rule sit between
_BEFORE_HTML = [(r"<person>", "person"), (_URL.format(head="https?:"), ""), (_URL.format(head="www:"), "")]
_AFTER_HTML = ([(r"@[\w\d]+\b", "")] + [(f"[{r}]+", "") for r in _CJK_RANGES] + [
    (_DASHES, "-"), (r"[`´«»“”¨]", '"'), (r"[‘’]", "'"), (r"&quot;?", ""), (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "), (r"\d:\d\d\s+$", ""), (r"\\n", " "), (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""), (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),
    (r"[\"\']{2,}", r'"'), (r"[\.]{2,}", r" "), (_BAD_PUNCT, r" "), (r"\s+\.\s+", r" ")])
_AFTER_FTFY = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""), (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""), (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""), (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "), (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),
    (r"\b\s+\:\s+", r": "), (r"(\D[,\./])\b", r"\1 "), (r"\s+", " ")]
_EDGES = [(r"^[\"\']([\w\W]+)[\"\']$", r"\1"), (r"^[\'\_,\-\:;]", r""), (r"[\'\_,\-\:\-\+]$", r""), (r"^\.\S+$", "")]


def _subs(text: str, rules) -> str:
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text)
    return text


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _clean_once(caption: str) -> str:
    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = _subs(caption, _BEFORE_HTML)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = _subs(caption, _AFTER_HTML)
    if len(_UNDERSCORE_OR_DASH.findall(caption)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        caption = _UNDERSCORE_OR_DASH.sub(" ", caption)
    caption = _subs(_basic_clean(caption), _AFTER_FTFY)
    return _subs(caption, _EDGES).strip()


def clean_caption(text: str) -> str:
    """The release's cleaning, applied twice as its T5Embedder does."""
    return _clean_once(_clean_once(text))
