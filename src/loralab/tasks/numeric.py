"""One reader of numeric answers for every numeric evaluation (GSM8K, numeric MATH, later ones).

Why: a model writes the same number many ways (``57500``, ``57,500``, ``$57{,}500$``,
``\\$57,500.00``, ``\\boxed{57{,}500}``, ``57\\,500``, ``−3.5``). A pattern that knows only one of
them scores a right answer as wrong (issue 12: ``The answer is: $57{,}500$`` was read as 57).

Two steps, both pure functions of the text:

1. ``normalise``: LaTeX and typography to plain text. ``{,}`` -> ``,``; ``\\!`` dropped; a
   thin/no-break space between digit groups (``\\,``, ``\\ ``, ``~``, U+00A0, U+2009, U+202F)
   dropped when three digits follow; ``\\boxed``/``\\fbox``/``\\text``/``\\textbf``/``\\mathrm``/
   ``\\mbox`` unwrapped (their content kept); ``\\frac{a}{b}`` (also ``\\dfrac``, ``\\tfrac``,
   ``\\frac12``) -> ``a/b``; ``\\left``/``\\right``, ``^\\circ``, math delimiters (``$``, ``\\(``,
   ``\\)``, ``\\[``, ``\\]``) and leftover braces dropped; currency signs (``$ \\$ € £ ¥ ₹``) dropped;
   ``\\%`` -> ``%``; the Unicode minus U+2212 -> ``-``.
2. ``NUMBER`` finds numbers in the normalised text: an optional sign, digits with optional
   comma thousands groups (exactly three digits per group: ``1,450,000``), an optional decimal
   part (``.5`` reads 0.5), and an optional ``/denominator`` (``3/4``). A ``.`` or ``,`` not
   followed by a digit is punctuation (``57,500.`` reads 57500).

Decisions, each tested in ``tests/test_scoring_numeric.py``:
- A plain ASCII space is **not** a thousands separator: ``1 000`` reads 1 (then 0), because
  space-separated digit runs in model output are far more often separate numbers (``5 100-dollar
  bills``) than SI-style grouping. Typographic spaces that only serve as separators (LaTeX
  ``\\,``, U+202F, U+00A0, U+2009) are accepted.
- A comma followed by anything other than exactly three digits ends the number: ``3,5`` reads 3
  (English lists), not the European 3.5.
- Percent: ``50%`` reads 50 (GSM8K's golds carry no percent sign; ``0.5`` is not ``50%``).
- Units and words after a number are ignored by ``find_numbers``; ``parse_number`` accepts a
  whole string that is one number followed only by currency, ``%``, ``\\text{unit}`` or words of
  two or more letters (``5 cm``, ``12 dollars``), never an expression (``5x``, ``5 and 7``).
- Not read as one number: scientific notation (``1.5e3``, ``1.5 \\times 10^3`` read 1.5 first),
  mixed numbers (``2 1/2`` reads 2), number words (``five``). None of these appears in GSM8K golds.
- Values are exact ``Fraction``s, so ``0.1 + 0.2``-style float error never decides a comparison;
  ``a/0`` has no value (None).
"""

from __future__ import annotations

import re
from fractions import Fraction

_WRAPPERS = ("boxed", "fbox", "text", "textbf", "textrm", "mathrm", "mathbf", "mbox")
_CURRENCY = "$€£¥₹"
_SEPARATOR_SPACES = "\u00a0\u2009\u202f"

NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-+]?)"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<frac>\.\d+)?"
    r"(?:/(?P<den>\d+(?:\.\d+)?))?"
)
_UNIT_TAIL = re.compile(r"(?:\s*(?:%|[A-Za-z]{2,}\.?))*\s*[.!?,;:]*\s*")


def _unwrap(text: str, command: str) -> str:
    """``\\command{X}`` -> ``X`` for every occurrence, braces matched (nested ones kept)."""
    token = "\\" + command + "{"
    while True:
        start = text.find(token)
        if start < 0:
            return text
        depth, i = 0, start + len(token) - 1
        for i in range(start + len(token) - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
        else:  # unbalanced: drop the command, keep the rest
            return text[:start] + text[start + len(token):]
        text = text[:start] + text[start + len(token):i] + text[i + 1:]


def normalise(text: str) -> str:
    """Plain text from LaTeX/typographic number writing (see the module docstring)."""
    text = text.replace("\u2212", "-").replace("{,}", ",").replace("\\!", "")
    text = re.sub(r"(?<=\d)(?:\\[,;: ]|~|[" + _SEPARATOR_SPACES + r"])(?=\d{3}(?!\d))", "", text)
    text = re.sub(r"\\[dt]?frac\s*(\d)\s*(\d)", r"{\1}/{\2}", text)  # \frac12
    text = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"{\1}/{\2}", text)
    for command in _WRAPPERS:
        text = _unwrap(text, command)
    text = re.sub(r"\^\s*\{?\\circ\}?|°", "", text)
    text = re.sub(r"\\left|\\right|\\[()\[\]]", "", text)
    text = text.replace("\\%", "%").replace("\\$", "$").replace("\\,", " ").replace("\\ ", " ")
    text = re.sub(r"[{}" + re.escape(_CURRENCY) + "]", "", text)
    # currency signs go in place, so "-$5" and "$-5$" both read -5
    return text


def _value(match: re.Match) -> Fraction | None:
    integer, frac, den = match.group("int"), match.group("frac"), match.group("den")
    if integer is None and frac is None:
        return None
    value = Fraction((integer or "0").replace(",", "") + (frac or ""))
    if den is not None:
        if Fraction(den) == 0:
            return None
        value /= Fraction(den)
    return -value if match.group("sign") == "-" else value


def find_numbers(text: str) -> list[Fraction]:
    """Every number in free text, in order of appearance (normalised first)."""
    out = []
    for match in NUMBER.finditer(normalise(text)):
        value = _value(match)
        if value is not None:
            out.append(value)
    return out


def first_number(text: str) -> Fraction | None:
    """The first number in ``text`` (None: there is none)."""
    numbers = find_numbers(text)
    return numbers[0] if numbers else None


def parse_number(text: str) -> Fraction | None:
    """``text`` read as exactly one number (currency, ``%``, units and trailing punctuation
    allowed around it); None when it is anything else (an expression, a list, words)."""
    plain = normalise(text).strip()
    match = NUMBER.match(plain)
    if match is None or match.end() == 0:
        return None
    value = _value(match)
    if value is None or _UNIT_TAIL.fullmatch(plain[match.end():]) is None:
        return None
    return value


def numbers_equal(a: str, b: str) -> bool | None:
    """Whether two answers are the same number; None when either is not a single number."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return None
    return x == y
