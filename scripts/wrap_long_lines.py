"""Wrap Python lines longer than a limit without reformatting anything else (no black/ruff format churn).

Only two rewrites, both inside brackets where Python continues lines implicitly:
  - break after a comma (or before a binary `and`/`or`/`+`/`if`/`else`), indenting to the bracket;
  - split a long string literal at a space into two adjacent literals (same value).
A file is rewritten only if its AST is unchanged (string splits compared by value). Usage:
    python scripts/wrap_long_lines.py [--limit 110] FILE...
"""

import argparse
import ast
import io
import sys
import tokenize

OPEN, CLOSE = "([{", ")]}"
BREAK_BEFORE = {"and", "or", "if", "else", "for", "+"}


def _normalise(tree: ast.AST) -> str:
    """AST dump with implicitly concatenated f-string parts merged (splitting one changes its pieces)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            merged = []
            for v in node.values:
                if merged and isinstance(v, ast.Constant) and isinstance(merged[-1], ast.Constant):
                    merged[-1] = ast.Constant(merged[-1].value + v.value)
                else:
                    merged.append(v)
            node.values = merged
    return ast.dump(tree, include_attributes=False)


def _tokens(line_no: int, src: str):
    return [t for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.start[0] == line_no]


def _depth_stack(src_lines, line_no):
    """Open brackets (their columns) at the start of each token of line `line_no` (1-based)."""
    src = "".join(src_lines)
    stack, out = [], {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.start[0] > line_no:
            break
        if tok.start[0] == line_no:
            out[tok.start] = (list(stack), tok)
        if tok.type == tokenize.OP and tok.string in OPEN:
            stack.append((tok.start[0], tok.start[1]))
        elif tok.type == tokenize.OP and tok.string in CLOSE and stack:
            stack.pop()
    return out


def _split_point(src_lines, i, limit):
    """(column to cut at, indent for the rest) for line i (0-based), or None."""
    line = src_lines[i]
    info = _depth_stack(src_lines, i + 1)
    best = None
    for (_row, col), (stack, tok) in sorted(info.items(), key=lambda kv: kv[0][1]):
        if not stack:
            continue
        opener_row, opener_col = stack[-1]
        indent = opener_col + 1 if opener_row == i + 1 else None
        if indent is None:  # the bracket opened on an earlier line: continue at this line's indent + 4
            indent = len(line) - len(line.lstrip())
        if tok.type == tokenize.OP and tok.string == "," and tok.end[1] <= limit:
            cut = tok.end[1]
            if line[cut:].strip() and line[cut:].strip()[0] not in CLOSE:
                best = (cut, indent, None)
        elif tok.type == tokenize.NAME and tok.string in BREAK_BEFORE and 0 < col <= limit and col > indent:
            best = (col, indent, None)
        elif tok.type == tokenize.OP and tok.string == "+" and 0 < col <= limit and col > indent:
            best = (col, indent, None)
        elif tok.type == tokenize.STRING and tok.start[1] < limit < tok.end[1] and tok.start[0] == tok.end[0]:
            split = _string_split(tok.string, limit - tok.start[1])
            if split is not None:
                return (tok.start[1], indent, (tok, split))
        elif tok.type == getattr(tokenize, "FSTRING_START", -1):
            pass
    return best


def _string_split(s: str, room: int):
    """Index in literal `s` to split at (after a space, outside {} for f-strings, not in an escape)."""
    prefix = ""
    while s and s[0] not in "'\"":
        prefix += s[0]
        s = s[1:]
    if "r" in prefix.lower() or s[:3] in ('"""', "'''") or "b" in prefix.lower():
        return None
    quote = s[0]
    body = s[1:-1]
    room -= len(prefix) + 2  # prefix, opening and closing quote
    depth, last = 0, None
    for j, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if j + 1 >= room:
            break
        if ch == " " and depth == 0 and j > 8 and body[j - 1] != "\\":
            last = j + 1
    if last is None or last >= len(body) - 2:
        return None
    return prefix, quote, body[:last], body[last:]


def wrap(text: str, limit: int) -> str:
    lines = text.splitlines(keepends=True)
    for _ in range(2000):
        long = [i for i, ln in enumerate(lines) if len(ln.rstrip("\n")) > limit]
        done = True
        for i in long:
            try:
                point = _split_point(lines, i, limit)
            except (tokenize.TokenError, IndentationError, SyntaxError):
                point = None
            if point is None:
                continue
            cut, indent, string = point
            line = lines[i]
            nl = "\n" if line.endswith("\n") else ""
            if string is not None:
                tok, (prefix, quote, head, tail) = string
                a, b = tok.start[1], tok.end[1]
                new = [
                    line[:a] + prefix + quote + head + quote + nl,
                    " " * indent + prefix + quote + tail + quote + line[b:],
                ]
            else:
                head, tail = line[:cut].rstrip(), line[cut:].lstrip()
                if not tail.strip() or len(head) < indent + 4:
                    continue
                new = [head + "\n", " " * indent + tail]
            candidate = lines[:i] + new + lines[i + 1 :]
            try:
                ast.parse("".join(candidate))
            except SyntaxError:
                continue
            lines = candidate
            done = False
            break
        if done:
            break
    return "".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=110)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    left = 0
    for f in args.files:
        text = open(f, encoding="utf-8").read()
        new = wrap(text, args.limit)
        if new != text:
            if _normalise(ast.parse(text)) != _normalise(ast.parse(new)):
                print(f"{f}: AST changed, not rewritten", file=sys.stderr)
                continue
            open(f, "w", encoding="utf-8").write(new)
        over = [n + 1 for n, ln in enumerate(new.splitlines()) if len(ln) > args.limit]
        left += len(over)
        for n in over:
            print(f"{f}:{n}: still over {args.limit}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
