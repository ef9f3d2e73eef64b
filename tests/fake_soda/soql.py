"""A real subset of SoQL: tokenizer, parser with type checking, and two evaluators.

Supported:

- `$select`: `*`, `:*`, columns and system columns with `AS alias`, `count(*)`, `count(col)`,
  `max(col)`, `min(col)`, `sum(col)`; an aggregate's key follows its spelling (`COUNT(*)` ->
  `"COUNT"`, `max(:updated_at)` -> `"max_updated_at"`). `*` must come first or right after `:*`
  (`:id,*` was reported to fail on the real server).
- `$where`: `= != <> < <= > >=`, `AND`/`OR`/`NOT`, parentheses, `IS [NOT] NULL`, `[NOT] IN (...)`,
  `[NOT] BETWEEN a AND b`, `[NOT] LIKE '%x_'`, string literals in single quotes (`''` escapes a
  quote), numbers, `true`/`false`, a bare checkbox column.
- `$order`: columns, each `ASC`/`DESC`.
- `$group`: columns, with `$select` of those columns and aggregates; `$having`: one comparison
  of an aggregate's key (`n > 1` after `count(*) AS n`) or `count(*)` with a whole number.

Literals are coerced to the compared column's type while parsing: numbers compare numerically,
text/`:id`/`:version` by code point, timestamps as instants (fixed: µs since the epoch; floating:
the canonical `YYYY-MM-DDTHH:MM:SS.fff` text). Evaluation is SQL three-valued (`None` = unknown).
`evaluate` works on one row; `vector_mask` works on numpy columns (system fields and the numeric
key) for many rows at once.

Errors carry the two body shapes of the real server: `Malformed` (`query.compiler.malformed`) and
`CoordinatorError` (`query.soql.no-such-column`, `query.soql.type-mismatch`, ...).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from .schema import CHECKBOX, FIXED, FLOATING, LOCATION, NUMBER, POINT, Column, Schema

# ----------------------------------------------------------------------------------------------
# Errors


class SoqlError(Exception):
    """A query the server answers with 400 and `body`."""

    status = 400

    def body(self) -> dict[str, Any]:
        raise NotImplementedError


class Malformed(SoqlError):
    def body(self) -> dict[str, Any]:
        return {"code": "query.compiler.malformed", "error": True, "message": str(self), "data": {}}


class CoordinatorError(SoqlError):
    """The query coordinator's error shape: `message`, `errorCode`, `data`."""

    def __init__(self, code: str, message: str, data: dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.data = data

    def body(self) -> dict[str, Any]:
        return {
            "message": f"Query coordinator error: {self.code}; {self}",
            "errorCode": self.code,
            "data": self.data,
        }


def _position(text: str, pos: int) -> dict[str, Any]:
    return {"row": 1, "column": pos + 1, "line": text}


def no_such_column(name: str, dataset_id: str, text: str = "", pos: int = 0) -> CoordinatorError:
    where = _position(text, pos)
    return CoordinatorError(
        "query.soql.no-such-column",
        f'No such column: {name}; position: Map(row -> 1, column -> {pos + 1}, line -> "{text}")',
        {"column": name, "dataset": f"alpha.{dataset_id}", "position": where},
    )


def _type_mismatch(message: str, text: str, pos: int) -> CoordinatorError:
    return CoordinatorError("query.soql.type-mismatch", message, {"position": _position(text, pos)})


# ----------------------------------------------------------------------------------------------
# Tokens

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)
    | (?P<system>:\*|:@?[A-Za-z_][A-Za-z0-9_]*)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*|`[^`]+`)
    | (?P<op><=|>=|<>|!=|=|<|>|\(|\)|,|\*|-)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str  # string number system ident op end
    text: str
    pos: int

    @property
    def word(self) -> str:
        return self.text.upper() if self.kind == "ident" else ""


def tokenize(text: str) -> list[Token]:
    tokens = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.lastgroup is None:
            start = len(text) - len(text[pos:].lstrip())
            raise Malformed(
                f"Unexpected character at position {start + 1}: {text[start : start + 10]!r}"
            )
        tokens.append(Token(m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup)))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


# ----------------------------------------------------------------------------------------------
# Typed expressions


@dataclass(frozen=True)
class Const:
    value: bool | None


@dataclass(frozen=True)
class Compare:
    op: str  # = != < <= > >=
    column: Column
    value: Any  # coerced to the column's type


@dataclass(frozen=True)
class CompareColumns:
    op: str
    left: Column
    right: Column


@dataclass(frozen=True)
class IsNull:
    column: Column
    negated: bool


@dataclass(frozen=True)
class InList:
    column: Column
    values: tuple[Any, ...]
    negated: bool


@dataclass(frozen=True)
class Like:
    column: Column
    pattern: re.Pattern[str]
    negated: bool


@dataclass(frozen=True)
class Not:
    expr: Expr


@dataclass(frozen=True)
class And:
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Or:
    left: Expr
    right: Expr


Expr = Const | Compare | CompareColumns | IsNull | InList | Like | Not | And | Or


def conjuncts(expr: Expr | None) -> list[Expr]:
    """The top-level AND operands of expr."""
    if expr is None:
        return []
    if isinstance(expr, And):
        return conjuncts(expr.left) + conjuncts(expr.right)
    return [expr]


def and_all(exprs: list[Expr]) -> Expr | None:
    out: Expr | None = None
    for e in exprs:
        out = e if out is None else And(out, e)
    return out


def columns_of(expr: Expr) -> set[str]:
    """Field names an expression reads."""
    if isinstance(expr, Compare | IsNull | InList | Like):
        return {expr.column.field}
    if isinstance(expr, CompareColumns):
        return {expr.left.field, expr.right.field}
    if isinstance(expr, Not):
        return columns_of(expr.expr)
    if isinstance(expr, And | Or):
        return columns_of(expr.left) | columns_of(expr.right)
    return set()


# ----------------------------------------------------------------------------------------------
# Select / order items


@dataclass(frozen=True)
class AllData:
    """`*`: every data column."""


@dataclass(frozen=True)
class AllSystem:
    """`:*`: every system column."""


@dataclass(frozen=True)
class SelectColumn:
    column: Column
    key: str


@dataclass(frozen=True)
class Aggregate:
    func: str  # count max min sum (lower case)
    column: Column | None  # None for count(*)
    key: str


SelectItem = AllData | AllSystem | SelectColumn | Aggregate


@dataclass(frozen=True)
class OrderItem:
    column: Column
    desc: bool


# ----------------------------------------------------------------------------------------------
# Literal coercion

_TS = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:\.(\d{1,9}))?)?)?"
    r"\s*(Z|[+-]\d\d:?\d\d)?"
)


def parse_timestamp(text: str) -> dt.datetime | None:
    """A SoQL timestamp literal as a datetime (UTC when it has an offset), or None."""
    m = _TS.fullmatch(text.strip())
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        t = dt.datetime(
            int(y),
            int(mo),
            int(d),
            int(h or 0),
            int(mi or 0),
            int(s or 0),
            int((frac or "0")[:6].ljust(6, "0")),
        )
    except ValueError:
        return None
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        t -= sign * dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return t


_EPOCH = dt.datetime(1970, 1, 1)


def fixed_us(t: dt.datetime) -> int:
    delta = t - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def floating_text(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


@dataclass(frozen=True)
class _Literal:
    kind: str  # string number bool null
    value: Any
    pos: int


@dataclass(frozen=True)
class _ColumnRef:
    column: Column
    pos: int


def typed(column: Column, raw: Any) -> Any:
    """A stored JSON value (numbers are strings) as the comparable value of its column type."""
    if raw is None:
        return None
    if column.soda_type == NUMBER:
        return float(raw)
    return raw


# ----------------------------------------------------------------------------------------------
# Parser


class _Parser:
    def __init__(self, text: str, schema: Schema, param: str) -> None:
        self.text = text
        self.schema = schema
        self.param = param
        self.tokens = tokenize(text)
        self.i = 0

    # token helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def next(self) -> Token:
        t = self.tokens[self.i]
        self.i += 1
        return t

    def accept_word(self, *words: str) -> bool:
        if self.tok.word in words:
            self.i += 1
            return True
        return False

    def accept_op(self, op: str) -> bool:
        if self.tok.kind == "op" and self.tok.text == op:
            self.i += 1
            return True
        return False

    def expect_op(self, op: str) -> None:
        if not self.accept_op(op):
            self.fail(f"expected '{op}'")

    def fail(self, what: str) -> NoReturn:
        t = self.tok
        found = "end of input" if t.kind == "end" else repr(t.text)
        raise Malformed(
            f"Invalid {self.param}: {what}, found {found} at position {t.pos + 1}: {self.text}"
        )

    def done(self) -> None:
        if self.tok.kind != "end":
            self.fail("expected end of input")

    def column(self, name: str, pos: int) -> Column:
        field = name[1:-1] if name.startswith("`") else name
        col = self.schema.column(field) or self.schema.column(field.lower())
        if col is None:
            raise no_such_column(field, self.schema.dataset_id, self.text, pos)
        return col

    # where
    def expr(self) -> Expr:
        left = self.conjunction()
        while self.accept_word("OR"):
            left = Or(left, self.conjunction())
        return left

    def conjunction(self) -> Expr:
        left = self.negation()
        while self.accept_word("AND"):
            left = And(left, self.negation())
        return left

    def negation(self) -> Expr:
        if self.accept_word("NOT"):
            return Not(self.negation())
        return self.predicate()

    def predicate(self) -> Expr:
        start = self.tok
        left = self.operand()
        if self.tok.kind == "op" and self.tok.text in ("=", "!=", "<>", "<", "<=", ">", ">="):
            op = self.next().text
            right = self.operand()
            return self.compare("!=" if op == "<>" else op, left, right)
        if self.accept_word("IS"):
            negated = self.accept_word("NOT")
            if not self.accept_word("NULL"):
                self.fail("expected NULL")
            if isinstance(left, _Literal):
                return Const((left.kind == "null") != negated)
            return IsNull(self.column_of(left), negated)
        negated = self.accept_word("NOT")
        if self.accept_word("IN"):
            col = self.column_of(left)
            self.expect_op("(")
            values = [self.coerce(col, self.literal())]
            while self.accept_op(","):
                values.append(self.coerce(col, self.literal()))
            self.expect_op(")")
            return InList(col, tuple(values), negated)
        if self.accept_word("BETWEEN"):
            lo = self.operand()
            if not self.accept_word("AND"):
                self.fail("expected AND")
            hi = self.operand()
            both: Expr = And(self.compare(">=", left, lo), self.compare("<=", left, hi))
            return Not(both) if negated else both
        if self.accept_word("LIKE"):
            col = self.column_of(left)
            pattern = self.literal()
            if pattern.kind != "string":
                raise _type_mismatch("LIKE needs a text pattern", self.text, pattern.pos)
            regex = "".join(
                ".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern.value
            )
            return Like(col, re.compile(regex, re.DOTALL), negated)
        if negated:
            self.fail("expected IN, BETWEEN or LIKE after NOT")
        if isinstance(left, Expr):
            return left
        if isinstance(left, _ColumnRef) and left.column.soda_type == CHECKBOX:
            return Compare("=", left.column, True)
        if isinstance(left, _Literal) and left.kind in ("bool", "null"):
            return Const(left.value)
        raise _type_mismatch(
            f"Expected a boolean expression at {start.text!r}", self.text, start.pos
        )

    def operand(self) -> Expr | _Literal | _ColumnRef:
        t = self.tok
        if self.accept_op("("):
            inner = self.expr()
            self.expect_op(")")
            return inner
        if t.kind in ("system", "ident") and t.word not in _RESERVED:
            self.i += 1
            if self.tok.kind == "op" and self.tok.text == "(":
                raise CoordinatorError(
                    "query.soql.no-such-function",
                    f"No such function '{t.text}' in $where of the fake server",
                    {"function": t.text, "position": _position(self.text, t.pos)},
                )
            return _ColumnRef(self.column(t.text, t.pos), t.pos)
        return self.literal()

    def literal(self) -> _Literal:
        t = self.tok
        if t.kind == "string":
            self.i += 1
            return _Literal("string", t.text[1:-1].replace("''", "'"), t.pos)
        if t.kind == "number":
            self.i += 1
            return _Literal("number", float(t.text), t.pos)
        if t.kind == "op" and t.text == "-":
            self.i += 1
            if self.tok.kind != "number":
                self.fail("expected a number after '-'")
            return _Literal("number", -float(self.next().text), t.pos)
        if t.word in ("TRUE", "FALSE"):
            self.i += 1
            return _Literal("bool", t.word == "TRUE", t.pos)
        if t.word == "NULL":
            self.i += 1
            return _Literal("null", None, t.pos)
        self.fail("expected a column or a literal")

    def column_of(self, operand: object) -> Column:
        if isinstance(operand, _ColumnRef):
            return operand.column
        self.fail("expected a column")

    def compare(self, op: str, left: object, right: object) -> Expr:
        if isinstance(left, _Literal) and isinstance(right, _ColumnRef):
            flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
            return self.compare(flipped, right, left)
        if isinstance(left, _ColumnRef) and isinstance(right, _Literal):
            if right.kind == "null":
                return Const(None)
            if left.column.soda_type in (LOCATION, POINT):
                raise _type_mismatch(
                    f"Cannot compare {left.column.field} ({left.column.soda_type})",
                    self.text,
                    left.pos,
                )
            return Compare(op, left.column, self.coerce(left.column, right))
        if isinstance(left, _ColumnRef) and isinstance(right, _ColumnRef):
            lt, rt = left.column.soda_type, right.column.soda_type
            if _family(lt) != _family(rt) or lt in (LOCATION, POINT):
                raise _type_mismatch(f"Cannot compare {lt} with {rt}", self.text, right.pos)
            return CompareColumns(op, left.column, right.column)
        if isinstance(left, _Literal) and isinstance(right, _Literal):
            if left.kind == "null" or right.kind == "null":
                return Const(None)
            if left.kind != right.kind:
                raise _type_mismatch(
                    "Cannot compare literals of different types", self.text, right.pos
                )
            return Const(bool(_OPS[op](left.value, right.value)))
        self.fail("expected a comparison of a column and a literal")

    def coerce(self, col: Column, lit: _Literal) -> Any:
        t, v = col.soda_type, lit.value
        if lit.kind == "null":
            return None
        if t == NUMBER:
            if lit.kind == "number":
                return v
            if lit.kind == "string":
                try:
                    return float(v)
                except ValueError:
                    pass
        elif t == CHECKBOX:
            if lit.kind == "bool":
                return v
        elif t in (FIXED, FLOATING):
            when = parse_timestamp(v) if lit.kind == "string" else None
            if when is not None:
                return fixed_us(when) if t == FIXED else floating_text(when)
        elif t not in (LOCATION, POINT) and lit.kind == "string":
            return v
        raise _type_mismatch(
            f"Type mismatch for {col.field} ({t}) and {lit.kind} literal {v!r}", self.text, lit.pos
        )

    # select
    def select_items(self, grouped: bool = False) -> list[SelectItem]:
        items: list[SelectItem] = []
        keys: set[str] = set()
        while True:
            t = self.tok
            if self.accept_op("*"):
                if any(not isinstance(i, AllSystem) for i in items):
                    self.fail("'*' must come first or right after ':*'")
                items.append(AllData())
            elif t.kind == "system" and t.text == ":*":
                self.i += 1
                items.append(AllSystem())
            else:
                items.append(self.select_expr(keys))
            if not self.accept_op(","):
                break
        self.done()
        aggregates = [i for i in items if isinstance(i, Aggregate)]
        if aggregates and len(aggregates) != len(items) and not grouped:
            raise Malformed(
                f"Invalid $select: columns must be grouped or aggregated without "
                f"$group: {self.text}"
            )
        return items

    def select_expr(self, keys: set[str]) -> SelectItem:
        t = self.next()
        if t.kind not in ("ident", "system") or t.word in _RESERVED:
            self.i -= 1
            self.fail("expected a column, '*' or a function")
        item: SelectItem
        if self.accept_op("("):
            func = t.text.lower()
            if func not in ("count", "max", "min", "sum"):
                raise CoordinatorError(
                    "query.soql.no-such-function",
                    f"No such function '{t.text}'",
                    {"function": t.text, "position": _position(self.text, t.pos)},
                )
            column = None
            if self.accept_op("*"):
                if func != "count":
                    self.fail(f"{t.text}(*) is not a function")
                key = t.text
            else:
                a = self.next()
                if a.kind not in ("ident", "system"):
                    self.i -= 1
                    self.fail("expected a column")
                column = self.column(a.text, a.pos)
                if (func == "sum" and column.soda_type != NUMBER) or (
                    func in ("max", "min") and _unordered(column)
                ):
                    raise _type_mismatch(
                        f"{t.text}({column.field}) is not defined for {column.soda_type}",
                        self.text,
                        a.pos,
                    )
                key = f"{t.text}_{column.field.lstrip(':')}"
            self.expect_op(")")
            item = Aggregate(func, column, key)
        else:
            column = self.column(t.text, t.pos)
            item = SelectColumn(column, column.field)
        if self.accept_word("AS"):
            alias = self.next()
            if alias.kind != "ident":
                self.i -= 1
                self.fail("expected an alias")
            item = (
                Aggregate(item.func, item.column, alias.text)
                if isinstance(item, Aggregate)
                else SelectColumn(item.column, alias.text)
            )
        if item.key in keys:
            raise Malformed(f"Invalid $select: duplicate alias {item.key!r}: {self.text}")
        keys.add(item.key)
        return item

    # order
    def order_items(self) -> list[OrderItem]:
        items = []
        while True:
            t = self.next()
            if t.kind not in ("ident", "system") or t.word in _RESERVED:
                self.i -= 1
                self.fail("expected a column")
            column = self.column(t.text, t.pos)
            if _unordered(column):
                raise _type_mismatch(f"Cannot order by {column.field}", self.text, t.pos)
            desc = False
            if self.accept_word("DESC"):
                desc = True
            else:
                self.accept_word("ASC")
            items.append(OrderItem(column, desc))
            if not self.accept_op(","):
                break
        self.done()
        return items


_RESERVED = {
    "AND",
    "OR",
    "NOT",
    "IS",
    "NULL",
    "IN",
    "BETWEEN",
    "LIKE",
    "AS",
    "ASC",
    "DESC",
    "TRUE",
    "FALSE",
}
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _unordered(column: Column) -> bool:
    return column.soda_type in (LOCATION, POINT)


def _family(soda_type: str) -> str:
    return {NUMBER: "n", FIXED: "f", FLOATING: "t", CHECKBOX: "b"}.get(soda_type, "s")


def parse_where(text: str, schema: Schema) -> Expr:
    p = _Parser(text, schema, "$where")
    if p.tok.kind == "end":
        p.fail("expected an expression")
    expr = p.expr()
    p.done()
    return expr


def parse_select(text: str, schema: Schema, grouped: bool = False) -> list[SelectItem]:
    p = _Parser(text, schema, "$select")
    if p.tok.kind == "end":
        p.fail("expected a column")
    return p.select_items(grouped)


def parse_group(text: str, schema: Schema) -> list[Column]:
    p = _Parser(text, schema, "$group")
    columns = []
    while True:
        t = p.next()
        if t.kind not in ("ident", "system"):
            p.i -= 1
            p.fail("expected a column")
        columns.append(p.column(t.text, t.pos))
        if not p.accept_op(","):
            break
    p.done()
    return columns


@dataclass(frozen=True)
class Having:
    key: str  # an aggregate's key in $select, or "count(*)"
    op: str
    value: int

    def holds(self, got: int) -> bool:
        ops: dict[str, Callable[[int, int], bool]] = {
            "=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<>": lambda a, b: a != b,
            "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
            ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
        }  # fmt: skip
        return ops[self.op](got, self.value)


_HAVING = re.compile(r"\s*(count\(\*\)|[A-Za-z_]\w*)\s*(>=|<=|!=|<>|=|>|<)\s*(\d+)\s*", re.I)


def parse_having(text: str, select: list[SelectItem]) -> Having:
    m = _HAVING.fullmatch(text)
    keys = {i.key for i in select if isinstance(i, Aggregate)}
    if m is None or (m.group(1).lower() != "count(*)" and m.group(1) not in keys):
        raise Malformed(f"Invalid $having (the fake takes `<aggregate> <op> <number>`): {text}")
    key = m.group(1) if m.group(1) in keys else "count(*)"
    return Having(key, m.group(2), int(m.group(3)))


def parse_order(text: str, schema: Schema) -> list[OrderItem]:
    p = _Parser(text, schema, "$order")
    return p.order_items()


def simple_filter(field: str, value: str, schema: Schema) -> Expr:
    """`?borough=BROOKLYN`: equality on a column, the value coerced to its type."""
    p = _Parser(field, schema, field)
    col = p.column(field, 0)
    if col.soda_type == CHECKBOX and value.lower() in ("true", "false"):
        return Compare("=", col, value.lower() == "true")
    return Compare("=", col, p.coerce(col, _Literal("string", value, 0)))


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(expr: Expr, get: Callable[[Column], Any]) -> bool | None:
    """Three-valued truth of expr for one row; `get` returns a column's typed value or None."""
    if isinstance(expr, Compare):
        v = get(expr.column)
        return None if v is None else bool(_OPS[expr.op](v, expr.value))
    if isinstance(expr, And):
        a = evaluate(expr.left, get)
        if a is False:
            return False
        b = evaluate(expr.right, get)
        return False if b is False else (None if a is None or b is None else True)
    if isinstance(expr, Or):
        a = evaluate(expr.left, get)
        if a is True:
            return True
        b = evaluate(expr.right, get)
        return True if b is True else (None if a is None or b is None else False)
    if isinstance(expr, Not):
        v = evaluate(expr.expr, get)
        return None if v is None else not v
    if isinstance(expr, IsNull):
        return (get(expr.column) is None) != expr.negated
    if isinstance(expr, InList):
        v = get(expr.column)
        return None if v is None else (v in expr.values) != expr.negated
    if isinstance(expr, Like):
        v = get(expr.column)
        return None if v is None else bool(expr.pattern.fullmatch(str(v))) != expr.negated
    if isinstance(expr, CompareColumns):
        a, b = get(expr.left), get(expr.right)
        return None if a is None or b is None else bool(_OPS[expr.op](a, b))
    return expr.value


def vectorizable(expr: Expr, fields: Mapping[str, object]) -> bool:
    """Whether vector_mask can evaluate expr: only never-null columns in `fields`, no LIKE."""
    if isinstance(expr, Const):
        return expr.value is not None
    if isinstance(expr, Like):
        return False
    if isinstance(expr, Not):
        return vectorizable(expr.expr, fields)
    if isinstance(expr, And | Or):
        return vectorizable(expr.left, fields) and vectorizable(expr.right, fields)
    return columns_of(expr) <= fields.keys()


def vector_mask(expr: Expr, column: Callable[[str], np.ndarray], n: int) -> np.ndarray:
    """Boolean mask of expr over n rows whose columns (never null) `column(field)` returns."""
    if isinstance(expr, Compare):
        arr = column(expr.column.field)
        value = expr.value.encode() if isinstance(expr.value, str) else expr.value
        return np.asarray(_OPS[expr.op](arr, value), bool)
    if isinstance(expr, CompareColumns):
        return np.asarray(_OPS[expr.op](column(expr.left.field), column(expr.right.field)), bool)
    mask: np.ndarray
    if isinstance(expr, And):
        mask = vector_mask(expr.left, column, n) & vector_mask(expr.right, column, n)
    elif isinstance(expr, Or):
        mask = vector_mask(expr.left, column, n) | vector_mask(expr.right, column, n)
    elif isinstance(expr, Not):
        mask = ~vector_mask(expr.expr, column, n)
    elif isinstance(expr, IsNull):
        mask = np.full(n, expr.negated)
    elif isinstance(expr, InList):
        arr = column(expr.column.field)
        values = [v.encode() if isinstance(v, str) else v for v in expr.values]
        mask = np.isin(arr, values) != expr.negated
    else:
        assert isinstance(expr, Const)
        mask = np.full(n, bool(expr.value))
    return mask
