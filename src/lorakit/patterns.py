"""Module-name regexes that cannot hang lorakit.

Adapter configs select modules by regex (peft: `re.fullmatch(target_modules, name)`; rank and alpha
patterns match the end of a name). Python's `re` backtracks: it may try every way the pattern can
align with a name before failing, and for some patterns that number grows exponentially with the
name's length. "((.)*)*!" against a 40-character name never finishes, and a config file from
someone else is enough to hang a process.

The rule: count the ways a pattern can align with a name of up to NAME_LENGTH characters, an upper
bound from its parse tree, and refuse the pattern when the count exceeds MAX_ALIGNMENTS:

    ways(literal, ., [class])      = 1
    ways(a b)                      = ways(a) * ways(b)         (a sequence)
    ways(a | b)                    = ways(a) + ways(b)
    ways(x{m,n})                   = sum over k = m..K of ways(x)^k,  K = min(n, L / min width of x)
                                     (K - m + 1 when x aligns one way, e.g. one character)

with L = NAME_LENGTH. Backtracking does at most about ways × len(pattern) steps, so a pattern
under the bound matches any module name in milliseconds. Every pattern people write for module
names passes: ".*\\.(q_proj|v_proj)" has 258 ways, peft's documented
".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$" about 4.3 million. Refused: nested repeats such as
"((.)*)*" or "(\\w+\\.)*", repeats of overlapping alternatives "(.|\\w)*", and long chains
"(a|a)(a|a)..." - each has more than 2^40 ways.
"""

from __future__ import annotations

import re

try:  # Python 3.11+
    import re._constants as _c
    import re._parser as _parser
except ImportError:  # Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

NAME_LENGTH = 128  # module names are far shorter ("model.layers.31.self_attn.q_proj": 32)
MAX_ALIGNMENTS = 10**7

_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT} | ({_c.POSSESSIVE_REPEAT} if hasattr(_c, "POSSESSIVE_REPEAT") else set())


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` may not be used to match module names (invalid, or may backtrack without end),
    or None when it is fine."""
    try:
        parsed = _parser.parse(pattern)
    except re.error as e:
        return f"{pattern!r} is not a valid regular expression ({e})"
    ways = _ways(parsed)
    if ways > MAX_ALIGNMENTS:
        return (f"{pattern!r} can align with a {NAME_LENGTH}-character module name in more than "
                f"{MAX_ALIGNMENTS:,} ways (nested or overlapping repeats such as '(x+)*' or '(.|\\w)*'), "
                f"so matching it may never finish; write it without repeating a group, e.g. "
                f"'.*\\.(q_proj|v_proj)'")
    return None


def _ways(items) -> int:
    """Upper bound on the alignments of a sequence of parsed items (saturates above MAX_ALIGNMENTS)."""
    total = 1
    for op, arg in items:
        total = _cap(total * _item_ways(op, arg))
    return total


def _item_ways(op, arg) -> int:
    if op in _REPEATS:
        lo, hi, body = arg
        lo_width, _ = body.getwidth()
        times = min(hi, NAME_LENGTH // max(lo_width, 1))
        if times < lo:
            return 1  # cannot repeat that often within a name: at most one (failing) attempt
        ways = _ways(body)
        if ways == 1:  # one way per repeat count
            return times - lo + 1
        total = 0
        for k in range(lo, times + 1):
            total = _cap(total + ways ** k)
            if total > MAX_ALIGNMENTS:
                break
        return total
    if op is _c.SUBPATTERN:
        return _ways(arg[-1])
    if op is _c.BRANCH:
        return _cap(sum(_ways(branch) for branch in arg[1]))
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return _ways(arg[1])
    if op is _c.GROUPREF_EXISTS:
        _, yes, no = arg
        return _cap(_ways(yes) + (_ways(no) if no else 1))
    if hasattr(_c, "ATOMIC_GROUP") and op is _c.ATOMIC_GROUP:
        return _ways(arg)
    return 1  # one character or a position: LITERAL, ANY, IN, AT, CATEGORY, GROUPREF, ...


def _cap(n: int) -> int:
    return min(n, MAX_ALIGNMENTS + 1)
