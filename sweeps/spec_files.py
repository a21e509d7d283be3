"""Reading spec files: ``${VARIABLES}`` in values, and pydantic's errors in the spec's words
(``probe.head[2].bcos_b: must be >= 1, got 0.5``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "SECRET_URI_ENV", "SpecError", "check_name", "expand_variables", "problem_lines", "read_spec_file", "redact_uri",
    "secret_uri",
]

SECRET_URI_ENV = "PROBESWEEP_TRACKING_URI"  # the real tracking URI, where it holds a secret (never stored)
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|password|passwd|secret|key|sig|signature)=)[^&#]*")


def redact_uri(uri: str) -> str:
    """``uri`` with its password (``user:PASSWORD@``) and token-like query values replaced by ``****``:
    the form that may be printed or stored. A URI without secrets comes back unchanged."""
    uri = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:****@", uri)
    uri = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@:]+@", r"\1****@", uri)  # a token as the user name
    return _SECRET_QUERY.sub(r"\1****", uri)


def secret_uri(shown: str) -> str:
    """The real tracking URI for its redacted form ``shown``: ``shown`` itself when it holds no
    secret, else ``$PROBESWEEP_TRACKING_URI``, which must redact to ``shown``."""
    if "****" not in shown:
        return shown
    real = os.environ.get(SECRET_URI_ENV, "")
    if redact_uri(real) != shown:
        raise PermissionError(
            f"the tracking URI {shown} holds a secret that is never stored: set {SECRET_URI_ENV} (or give --tracking-uri) "
            "to the full URI"
        )
    return real

NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(value: str, what: str = "sweep name") -> str:
    """``value`` if it may become a file or folder name (sweep, experiment, report folder): up to 64
    letters, digits, '_', '.', '-', starting with a letter or digit, so no path separator and no
    ``..`` can take a write outside the folder it belongs in."""
    if not NAME_RULE.fullmatch(value):
        article = "an" if what[0] in "aeiou" else "a"
        rule = "use up to 64 letters, digits, '_', '.', '-', starting with a letter or digit"
        raise ValueError(f"{value!r} is not {article} {what}: {rule}")
    return value


class SpecError(ValueError):
    """A spec failed to load or validate; ``problems`` lists ``path: message`` lines."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        listing = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{listing}")


def _yaml_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "list[", "literal[", "<")):  # pydantic's internal steps
            out += f".{part}" if out else str(part)
    return out or "(top level)"


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(error: dict) -> str:
    """pydantic's message in the spec's words: ``must be >= 1, got 0`` rather than ``Input should ...``."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"must be {_BOUNDS[kind]} {bound}, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {value!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be an integer, got {value!r}"
    if kind in ("float_parsing", "float_type"):
        return f"must be a number, got {value!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    if kind in ("string_type", "bool_type", "list_type", "dict_type", "model_type", "model_attributes_type"):
        wanted = {"string_type": "text", "bool_type": "true or false", "list_type": "a list"}.get(kind, "a mapping of keys")
        return f"must be {wanted}, got {value!r}"
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        return "must not be empty" if least == 1 else f"must have {least} items, got {len(value)}"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items, got {len(value)}"
    return error["msg"].removeprefix("Value error, ")


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


MAX_VALUES, MAX_DEPTH = 100_000, 64  # a spec is a few hundred values; YAML aliases can make billions


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                try:
                    key = self.construct_object(key_node, deep=deep)
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base class says what is wrong
                    continue
                if first != key_node.start_mark.line + 1:
                    raise yaml.MarkedYAMLError(problem=f"key {key!r} is given twice, on lines {first} and {key_node.start_mark.line + 1}")
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _size_problem(data: Any) -> str | None:
    """Why ``data`` is too big or too deep to be a spec, or None. Shared (aliased) values count every
    time they appear, as expanding and validating them costs; the walk stops at the budget."""
    count, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return f"the spec holds more than {MAX_VALUES:,} values (YAML aliases repeat what they point to): simplify it"
        if depth > MAX_DEPTH:
            return f"the spec is nested deeper than {MAX_DEPTH} levels"
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return None


def read_spec_file(path: Path) -> Any:
    """The YAML in ``path``; every way it can fail is a :class:`SpecError` naming the file."""
    import yaml

    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found"]) from None
    except IsADirectoryError:
        raise SpecError(str(path), ["is a folder, not a spec file"]) from None
    except UnicodeDecodeError as err:
        raise SpecError(str(path), [f"not UTF-8 text (byte {err.start}): save the spec as UTF-8"]) from None
    except OSError as err:
        raise SpecError(str(path), [f"cannot be read: {err.strerror}"]) from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise SpecError(str(path), [f"the spec is nested deeper than {MAX_DEPTH} levels"]) from None
    except yaml.YAMLError as err:
        where = f"line {err.problem_mark.line + 1}: " if getattr(err, "problem_mark", None) else ""
        raise SpecError(str(path), [f"not valid YAML: {where}{err.problem or err}".replace("\n", " ")]) from None
    problem = _size_problem(data)
    if problem:
        raise SpecError(str(path), [problem])
    return data


def expand_variables(node: Any, path: str = "", problems: list[str] | None = None) -> Any:
    """``${NAME}`` in any string value -> the environment variable's value (data roots, weights
    files: one spec for every machine); unset variables are added to ``problems`` with their path."""
    problems = [] if problems is None else problems
    if isinstance(node, dict):
        return {k: expand_variables(v, f"{path}.{k}".lstrip("."), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_variables(v, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def value(match: re.Match) -> str:
        if match[1] not in os.environ:
            problems.append(f"{path or '(top level)'}: environment variable {match[1]} is not set")
            return match[0]
        return os.environ[match[1]]

    return _VARIABLE.sub(value, node)


def problem_lines(errors: list[dict]) -> list[str]:
    """pydantic's ``ValidationError.errors()`` as ``path: message`` lines."""
    problems = [f"{_yaml_path(e['loc'])}: {_message(e)}" for e in errors]
    # checks across sections name their own path: "(top level): probe.loss: ..." -> "probe.loss: ..."
    return [p.removeprefix("(top level): ") if p.count(": ") > 1 else p for p in problems]


def default_tracking_uri(workdir: Path) -> str:
    """A spec's ``tracking.uri`` when it names none: ``sqlite:///<absolute workdir>/mlflow.db``
    (absolute, because Ray trials change directory). Here, not in ``sweeps.tracking``, so that
    knowing it imports neither MLflow nor torch."""
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
