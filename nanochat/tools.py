"""
The calculator tool. The model writes an expression between <|python_start|> and <|python_end|>; we
evaluate it by walking its syntax tree ourselves (never eval/exec), allowing only numbers, + - * / // %
** with small exponents, parentheses, and "<string>.count(<string>)". Anything else is refused (None).
RowState follows one generated sequence through the tool's tokens.
"""

import ast
import math
import operator
from collections import deque

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_NUMBER_MAGNITUDE = 1e100  # keeps every intermediate result small enough to compute instantly


def _evaluate_node(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Constant) and type(node.value) is str:
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _evaluate_node(node.operand)
        if isinstance(operand, str):
            raise ValueError("arithmetic on a string")
        return _UNARY_OPS[type(node.op)](operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate_node(node.left), _evaluate_node(node.right)
        if isinstance(left, str) or isinstance(right, str):
            raise ValueError("arithmetic on a string")
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("exponent too large")
        result = _BINARY_OPS[type(node.op)](left, right)
        if isinstance(result, complex) or abs(result) > MAX_NUMBER_MAGNITUDE:
            raise ValueError("result out of range")
        return result
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and not node.keywords and len(node.args) == 1):
        haystack, needle = _evaluate_node(node.func.value), _evaluate_node(node.args[0])
        if isinstance(haystack, str) and isinstance(needle, str):
            return haystack.count(needle)
    raise ValueError(f"not allowed: {type(node).__name__}")


def calculator(expression):
    """The tool's answer as text, or None when the expression is not plain arithmetic / str.count."""
    expression = expression.strip().replace(",", "") if "count" not in expression else expression.strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression, mode="eval")
        value = _evaluate_node(tree.body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None
    if isinstance(value, str):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value) if value.is_integer() and abs(value) < 1e15 else round(value, 10)
    return str(value)


class RowState:
    """
    One generated sequence: forced tool-output tokens waiting to be fed, the python expression being
    written, and whether the row is finished.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.terminal = tokenizer.terminal_token_ids()
        self.forced = deque()
        self.expression = None  # token ids between python_start and python_end, while inside
        self.done = False

    def has_forced(self):
        return bool(self.forced)

    def next(self, sampled):
        """The token this row emits given what was sampled: (token, mask) with mask 0 if forced."""
        token, mask = (self.forced.popleft(), 0) if self.forced else (sampled, 1)
        if token in self.terminal:
            self.done = True
        elif token == self.python_start:
            self.expression = []
        elif token == self.python_end and self.expression is not None:
            result = calculator(self.tokenizer.decode(self.expression))
            self.expression = None
            if result is not None:
                self.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif self.expression is not None:
            self.expression.append(token)
        return token, mask
