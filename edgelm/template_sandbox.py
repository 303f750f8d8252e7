"""The sandbox chat templates render in: Jinja2's ImmutableSandboxedEnvironment (no escapes) plus limits on time
and size, because a template comes from the GGUF file, i.e. from anyone, and Jinja's sandbox stops escapes but not a
template that loops for ever or builds a 10 GB string.

The limits are enforced inside the render, so they hold on any thread: a line tracer on the template's own code
(filename '<template>') checks the deadline and the process's memory growth, and size checks run before anything
big is built (`*`, `**`, `+`, `%`, `~`, growing filters and str methods, lipsum, strftime_now).

The environment follows transformers' (utils/chat_template_utils.py): trim_blocks and lstrip_blocks, the
loopcontrols extension, `raise_exception`, `strftime_now`, and a `tojson` that keeps non-ASCII text.
"""
from __future__ import annotations

import functools
import json
import operator
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from .errors import EdgeLMError


# -- limits ---------------------------------------------------------------------------------------------------------
# A template comes from the GGUF file, i.e. from anyone. Jinja's sandbox stops escapes but not a template that
# loops for ever or builds a 10 GB string, so every render runs under these limits (per ChatTemplate, from its
# arguments, else the environment variables, else these defaults).
DEFAULT_MAX_SECONDS = 1.0                 # wall-clock budget of one render (EDGELM_TEMPLATE_TIMEOUT, seconds)
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20        # rendered text, and any single string/list built (EDGELM_TEMPLATE_MAX_BYTES)
MEMORY_HEADROOM_BYTES = 100 << 20         # growth of the process's resident memory allowed during one render
MAX_INT_BITS = 1 << 16                    # integers a template computes (`**`, `*`): no template needs more
_ENV_TIMEOUT, _ENV_MAX_BYTES = "EDGELM_TEMPLATE_TIMEOUT", "EDGELM_TEMPLATE_MAX_BYTES"
_MEMORY_CHECK_EVERY = 0.002               # seconds between two looks at the resident memory


class ChatTemplateError(EdgeLMError):
    """The template could not be parsed or rendered, or it went past its time or size budget."""


class LimitExceeded(Exception):
    """Raised inside a render when a limit is passed; turned into a one-line ChatTemplateError naming the
    template. Not a TypeError/LookupError, so that Jinja's attribute lookups do not swallow it."""


class _Budget:
    """The limits of the render under way on this thread, and the checks against them."""

    def __init__(self, max_seconds: float, max_bytes: int, memory_headroom: int | None):
        self.max_seconds, self.max_bytes = max_seconds, max_bytes
        self.deadline = time.monotonic() + max_seconds
        base = _resident_bytes() if memory_headroom is not None else None
        self.rss_limit = base + memory_headroom if base is not None else None
        self.next_memory_check = 0.0

    def check_time(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise LimitExceeded(f"exceeded its {self.max_seconds:g} s time budget ({_ENV_TIMEOUT})")
        if self.rss_limit is not None and now >= self.next_memory_check:
            self.next_memory_check = now + _MEMORY_CHECK_EVERY
            rss = _resident_bytes()
            if rss is not None and rss > self.rss_limit:
                raise LimitExceeded(f"grew the process's memory by more than {_mib(MEMORY_HEADROOM_BYTES)}")

    def check_size(self, n: int, what: str = "a value") -> None:
        if n > self.max_bytes:
            raise LimitExceeded(f"exceeded its {_mib(self.max_bytes)} size cap ({what} of {n:,} "
                                 f"characters; {_ENV_MAX_BYTES})")


_current = threading.local()
# Outside a render (the environment used directly): the default size cap, no deadline, no memory watch.
_NO_RENDER_BUDGET = _Budget(float("inf"), DEFAULT_MAX_OUTPUT_BYTES, None)


def _budget() -> _Budget:
    """The budget of the render under way on this thread."""
    return getattr(_current, "budget", None) or _NO_RENDER_BUDGET


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n:,} bytes"


def _resident_bytes() -> int | None:
    """This process's resident memory: /proc on Linux (a read of a few µs), else psutil when installed."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except Exception:
        return None


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _limit_from_env(name: str, value, kind, default):
    """An explicit limit, else the environment variable `name`, else the default; must be a positive number."""
    where = "argument"
    if value is None:
        raw = os.environ.get(name)
        if raw is None or not raw.strip():
            return default
        value, where = raw, name
    try:
        v = kind(value)
    except (TypeError, ValueError):
        v = None
    if v is None or not (0 < v < float("inf")):
        raise ChatTemplateError(f"{where} {name}={value!r}: the chat-template limit must be a positive number")
    return v


# -- the render-time guard: deadline (and memory) on every line and call of template code -----------------------------
def _make_tracer(budget: _Budget, previous):
    """sys.settrace hook for one render on one thread: template code (compiled Jinja, filename '<template>')
    gets a line tracer that checks the budget on every line (loops included). Other frames go to the tracer
    that was installed before (coverage, a debugger), if any; the size guards check the clock themselves."""
    check = budget.check_time

    def on_line(frame, event, arg):
        check()
        return on_line

    def on_call(frame, event, arg):
        if frame.f_code.co_filename == "<template>":
            check()
            return on_line
        return previous(frame, event, arg) if previous is not None else None
    return on_call


class _guarded:
    """Context manager: installs this thread's budget and tracer, and puts back what was there, even on error."""

    def __init__(self, budget: _Budget):
        self.budget = budget

    def __enter__(self):
        self.saved_budget = getattr(_current, "budget", None)
        self.saved_trace = sys.gettrace()
        _current.budget = self.budget
        sys.settrace(_make_tracer(self.budget, self.saved_trace))
        return self.budget

    def __exit__(self, *exc):
        sys.settrace(self.saved_trace)
        _current.budget = self.saved_budget
        return False


# -- sizes, checked before anything big is built ----------------------------------------------------------------------
_SIZED = (str, bytes, list, tuple)


def _length(x) -> int:
    return len(x) if isinstance(x, _SIZED) else 0


def _check_result(x, what: str = "a value"):
    n = _length(x)
    if n:
        _budget().check_size(n, what)
    return x


def _check_int_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise LimitExceeded(f"computed an integer of about {bits:,} bits (the limit is {MAX_INT_BITS:,})")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_repeat(seq, count) -> None:
    """`seq * count` (either order) before it is built."""
    if _is_int(count) and _length(seq):
        _budget().check_size(_length(seq) * max(count, 0), "a repeated value")


# %-format specs: flags, width, precision (Python's printf-style formatting); `*` takes the number from the args.
_PERCENT_SPEC = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent_format(fmt: str, args) -> None:
    """A width or precision in `fmt % args` (also the `format` filter) cannot exceed the size cap."""
    cap = _budget().max_bytes
    values = args if isinstance(args, tuple) else (args,)
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*":
                if any(_is_int(v) and abs(v) > cap for v in values):
                    raise LimitExceeded(f"asked for a %-format width above the {_mib(cap)} size cap")
            elif g is not None and int(g) > cap:
                raise LimitExceeded(f"asked for a %-format width of {int(g):,} characters")


_NUMBER = re.compile(r"\d{7,}")


def _check_brace_format(fmt: str, args, kwargs) -> None:
    """str.format / format_map: no width above the cap, written in the format or taken from an argument
    (`'{:{}}'.format(x, 10**9)`)."""
    cap = _budget().max_bytes
    if any(int(m.group()) > cap for m in _NUMBER.finditer(fmt)):
        raise LimitExceeded(f"asked for a str.format width above the {_mib(cap)} size cap")
    if "{" in fmt.replace("{{", ""):
        values = list(args) + list(kwargs.values())
        for v in values:
            if isinstance(v, dict):
                values.extend(v.values())
        if any(_is_int(v) and abs(v) > cap for v in values[:10000]):
            raise LimitExceeded(f"passed str.format a number above the {_mib(cap)} size cap")


def _guarded_binop(operator: str, left, right):
    b = _budget()
    b.check_time()
    if operator == "+":
        if isinstance(left, _SIZED) and isinstance(right, _SIZED):
            b.check_size(len(left) + len(right), "a concatenation")
    elif operator == "*":
        if _is_int(left) and _is_int(right):
            _check_int_bits(left.bit_length() + right.bit_length())
        _check_repeat(left, right)
        _check_repeat(right, left)
    elif operator == "**":
        if _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
            _check_int_bits(left.bit_length() * right)
    elif operator == "%" and isinstance(left, str):
        _check_percent_format(left, right)
    result = _BINOPS[operator](left, right)
    if isinstance(result, _SIZED) and len(result) > b.max_bytes:
        b.check_size(len(result))
    return result


_BINOPS = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}


def _guarded_concat(parts) -> str:
    """Jinja's `~` (and `{{ a ~ b }}`), which is compiled to a join rather than an operator."""
    strings = [p if isinstance(p, str) else str(p) for p in parts]
    _budget().check_size(sum(map(len, strings)), "a concatenation")
    return "".join(strings)


# Growing str/bytes methods a template can call, and the size of what each would build.
def _str_method_size(name: str, s, args, kwargs) -> int:
    def arg(i, key, default):
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg(0, "width", 0)
        return max(len(s), width) if _is_int(width) else len(s)
    if name == "expandtabs":
        size = arg(0, "tabsize", 8)
        return len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(size, 0) if _is_int(size) else len(s)
    if name == "replace":
        old, new, count = arg(0, "old", ""), arg(1, "new", ""), arg(2, "count", -1)
        hits = (s.count(old) if old else len(s) + 1) if _length(old) or old == s[:0] else 0
        if _is_int(count) and count >= 0:
            hits = min(hits, count)
        return len(s) + hits * max(_length(new) - _length(old), 0)
    if name == "join":
        items = arg(0, "iterable", ())
        if isinstance(items, (list, tuple)):
            return sum(map(_length, items)) + len(s) * max(len(items) - 1, 0)
        return 0
    if name == "translate":
        table = arg(0, "table", None)
        if isinstance(table, dict):
            longest = max((_length(v) for v in table.values()), default=1)
            return len(s) * max(longest, 1)
    return 0


def _check_call(obj, args, kwargs) -> None:
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    wrapped = getattr(obj, "__wrapped__", None)          # Jinja's sandboxed str.format wrapper
    if wrapped is not None and isinstance(getattr(wrapped, "__self__", None), str) and name in ("format", "format_map"):
        _check_brace_format(wrapped.__self__, args, kwargs)
        return
    if isinstance(owner, (str, bytes)):
        if name in ("format", "format_map"):
            _check_brace_format(owner, args, kwargs)
        else:
            _budget().check_size(_str_method_size(name, owner, args, kwargs), f"the result of str.{name}")


# -- filters and globals with bounded sizes ---------------------------------------------------------------------------
def _bounded_filter(name: str, original):
    """Wrap a filter: budget checked on entry, its size estimated first where it can grow, its result checked."""
    estimate = _FILTER_ESTIMATES.get(name)

    @functools.wraps(original)
    def filt(*args, **kwargs):
        b = _budget()
        b.check_time()
        if estimate is not None:
            # filters that take the eval context / environment get it as their first argument
            plain = args[1:] if getattr(original, "jinja_pass_arg", None) is not None else args
            b.check_size(estimate(*plain, **kwargs), f"the result of the {name} filter")
        return _check_result(original(*args, **kwargs), f"the result of the {name} filter")
    return filt


def _est_width(value, width=80, *rest, **kw) -> int:
    return max(_length(value), width if _is_int(width) else 0)


def _est_indent(s, width=4, *rest, **kw) -> int:
    s = s if isinstance(s, str) else str(s)
    w = width if _is_int(width) else _length(width)
    return len(s) + (s.count("\n") + 1) * max(w, 0)


def _est_wordwrap(s, width=79, break_long_words=True, wrapstring=None, *rest, **kw) -> int:
    s = s if isinstance(s, str) else str(s)
    wrap = kw.get("wrapstring", wrapstring)
    width = kw.get("width", width)
    lines = len(s) // max(width, 1) + s.count("\n") + 1 if _is_int(width) else 1
    return len(s) + lines * max(_length(wrap) or 1, 1)


def _est_format(value, *args, **kwargs) -> int:
    if isinstance(value, str):
        _check_percent_format(value, args or kwargs)
    return _length(value)


def _est_join(value, d="", attribute=None) -> int:
    if isinstance(value, (list, tuple)):
        return sum(map(_length, value)) + _length(d) * max(len(value) - 1, 0)
    return 0


def _est_replace(s, old="", new="", count=None) -> int:
    if not isinstance(s, str):
        return 0
    return _str_method_size("replace", s, (str(old), str(new), -1 if count is None else count), {})


def _est_count(value, count=1, *rest, **kw) -> int:
    """batch / slice: the number of items or groups asked for."""
    return count if _is_int(count) else 0


def _est_sum(iterable, attribute=None, start=0) -> int:
    if isinstance(iterable, (list, tuple)):
        return sum(map(_length, iterable)) + _length(start)
    return _length(start)


def _est_tojson(value, indent=None, *rest, **kw) -> int:
    indent = kw.get("indent", indent)
    return indent * 1000 if _is_int(indent) else 0


_FILTER_ESTIMATES = {
    "center": _est_width, "indent": _est_indent, "wordwrap": _est_wordwrap, "format": _est_format,
    "join": _est_join, "replace": _est_replace, "batch": _est_count, "slice": _est_count, "sum": _est_sum,
    "tojson": _est_tojson,
}


def _bounded_lipsum(n=5, html=True, min=20, max=100):
    # each word of Jinja's lorem ipsum is at most 12 characters long
    words = (n if _is_int(n) else 0) * (max if _is_int(max) else 0)
    _budget().check_size(words * 12, "lipsum's text")
    return _LIPSUM(n, html, min, max)


def _bounded_strftime_now(fmt):
    # one strftime directive (%c, %x...) expands to at most a few dozen characters
    _budget().check_size(_length(fmt) * 64, "strftime_now's text")
    return datetime.now().strftime(fmt)


def _make_environment():
    """An ImmutableSandboxedEnvironment whose arithmetic, concatenation, calls and size-risky filters check
    the render budget."""
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.ext import loopcontrols
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        @optimizeconst
        def visit_Concat(self, node, frame):
            # `a ~ b` becomes environment.bounded_concat((a, b)) instead of a plain join
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset(_BINOPS)

        def call_binop(self, context, operator, left, right):
            return _guarded_binop(operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
            _budget().check_time()
            _check_call(__obj, args, kwargs)
            return _check_result(super().call(__context, __obj, *args, **kwargs), "a call's result")

        def unsafe_undefined(self, obj, attribute):
            # Jinja returns an Undefined that only fails when used further; `{{ lipsum.__globals__ }}` would
            # render as "". Refuse the access itself, so that a probing template gets a clear error.
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe.")

        @staticmethod
        def bounded_concat(parts):
            return _guarded_concat(parts)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    for name, f in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, f)
    env.filters["tojson"] = _bounded_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _bounded_strftime_now
    global _LIPSUM
    _LIPSUM = env.globals["lipsum"]
    env.globals["lipsum"] = _bounded_lipsum
    return env


_LIPSUM = None


def short_error(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _raise_exception(message):
    raise ChatTemplateError(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment():
    return _make_environment()




@dataclass(frozen=True)
class Limits:
    """What one render may spend: wall-clock seconds, and characters of output (or of any one value built)."""
    max_seconds: float = DEFAULT_MAX_SECONDS
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES

    @classmethod
    def resolve(cls, max_seconds: float | None = None, max_output_bytes: int | None = None) -> "Limits":
        """Explicit values, else the environment variables, else the defaults."""
        return cls(_limit_from_env(_ENV_TIMEOUT, max_seconds, float, DEFAULT_MAX_SECONDS),
                   _limit_from_env(_ENV_MAX_BYTES, max_output_bytes, int, DEFAULT_MAX_OUTPUT_BYTES))

    def budget(self) -> _Budget:
        return _Budget(self.max_seconds, self.max_output_bytes, MEMORY_HEADROOM_BYTES)


def compile_template(source: str, limits: Limits):
    """Parse `source` in the bounded environment (parsing too runs under the time budget)."""
    with _guarded(limits.budget()):
        return _environment().from_string(source)


def render_bounded(template, limits: Limits, **context) -> str:
    """Render a template from compile_template; LimitExceeded when it passes a limit."""
    with _guarded(limits.budget()) as budget:
        out, size = [], 0
        for chunk in template.generate(**context):     # streamed: stop as soon as the output passes the cap
            size += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8", "surrogatepass"))
            if size > budget.max_bytes:
                raise LimitExceeded(f"produced more than its {_mib(budget.max_bytes)} output cap ({_ENV_MAX_BYTES})")
            out.append(chunk)
        return "".join(out)
