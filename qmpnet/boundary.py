"""Reading outside documents (Kata JSON, TOML, CNI JSON) into the model's attrs classes.

One cattrs configuration serves every boundary: exact types (``"1"`` is not 1, ``true`` is
not an integer, a string is not a list), unknown keys refused, keys spelled as the document
spells them. The classes' own constructors still run, so the kernel limits checked by their
attrs validators hold for every parsed value.

cattrs' errors never leave: the first one is told as an ``InvalidInputError`` naming the
field in the document's spelling (``hwAddr``, ``timeouts.connect``; an entry of a list is
named by its own keys, or by the list) and the value found there.

Before any of that, the document itself is read here (:func:`read_capped`, :func:`load_json`,
:func:`load_toml`): at most :data:`DOCUMENT_MAX` bytes, UTF-8 only, nested at most
:data:`DEPTH_MAX` deep, integers of at most :data:`INT_DIGITS_MAX` digits. Whatever breaks
a cap or is not the format is an ``InvalidInputError`` that says so, never a RecursionError,
a UnicodeDecodeError or Python's int conversion limit.
"""

from __future__ import annotations

import enum
import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, TypeVar, get_origin

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory, is_sequence
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from qmpnet.errors import InvalidInputError, UnknownValueError

T = TypeVar("T")

#: The largest outside document read, in bytes (an interface, a config, a CNI invocation).
DOCUMENT_MAX = 1 << 20
#: The deepest nesting of objects and lists (tables and arrays) in an outside document.
DEPTH_MAX = 32
#: The most digits of an integer in an outside document (no field needs more than 20).
INT_DIGITS_MAX = 100


def read_capped(stream: IO[bytes], field: str, source: str) -> bytes:
    """Read all of ``stream``, refusing more than :data:`DOCUMENT_MAX` bytes."""
    raw = stream.read(DOCUMENT_MAX + 1)
    if len(raw) > DOCUMENT_MAX:
        raise InvalidInputError(field, source, f"larger than the cap of {DOCUMENT_MAX} bytes")
    return raw


def _text(raw: bytes, field: str, source: str) -> str:
    if len(raw) > DOCUMENT_MAX:
        raise InvalidInputError(field, source, f"larger than the cap of {DOCUMENT_MAX} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError(
            field, source, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from err


def _big_int(digits: str) -> int:
    if len(digits.lstrip("+-")) > INT_DIGITS_MAX:
        raise ValueError(f"an integer of {len(digits)} digits (the cap is {INT_DIGITS_MAX})")
    return int(digits)


def _check_depth(data: object, field: str, source: str) -> None:
    """Refuse nesting deeper than :data:`DEPTH_MAX` (iteratively: no recursion to exhaust)."""
    todo: list[tuple[object, int]] = [(data, 0)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict | list):
            if depth >= DEPTH_MAX:
                raise InvalidInputError(
                    field, source, f"nested deeper than the cap of {DEPTH_MAX} levels"
                )
            todo.extend((child, depth + 1) for child in _children(node))


def _children(node: dict[Any, Any] | list[Any]) -> list[Any]:
    return list(node.values()) if isinstance(node, dict) else node


def load_json(raw: bytes, field: str, source: str) -> Any:
    """``raw`` as a JSON document within the caps; ``field``/``source`` name it in errors."""
    text = _text(raw, field, source)
    try:
        data = json.loads(text, parse_int=_big_int)
    except RecursionError as err:
        raise InvalidInputError(
            field, source, f"nested deeper than the cap of {DEPTH_MAX} levels"
        ) from err
    except ValueError as err:  # JSONDecodeError, or an integer past the digit cap
        raise InvalidInputError(field, source, f"not valid JSON: {err}") from err
    _check_depth(data, field, source)
    return data


def load_toml(raw: bytes, field: str, source: str) -> dict[str, Any]:
    """``raw`` as a TOML document within the caps."""
    text = _text(raw, field, source)
    try:
        data = tomllib.loads(text)
    except RecursionError as err:
        raise InvalidInputError(
            field, source, f"nested deeper than the cap of {DEPTH_MAX} levels"
        ) from err
    except ValueError as err:  # TOMLDecodeError, or Python's own int conversion limit
        raise InvalidInputError(field, source, f"not valid TOML: {err}") from err
    _check_depth(data, field, source)
    _check_ints(data, field, source)
    return data


def _check_ints(data: object, field: str, source: str) -> None:
    """tomllib has no parse_int: refuse an integer past the digit cap after the fact."""
    todo = [data]
    while todo:
        node = todo.pop()
        if isinstance(node, dict | list):
            todo.extend(_children(node))
        elif isinstance(node, int) and node.bit_length() > INT_DIGITS_MAX * 3.33:
            raise InvalidInputError(
                field, source, f"not valid TOML: an integer past the cap of {INT_DIGITS_MAX} digits"
            )


#: a path into a document: keys in the document's spelling, and list indices
Path = tuple[str | int, ...]


class WrongType(TypeError):
    """A value of the wrong JSON/TOML type; ``reason`` says which type was wanted."""

    def __init__(self, value: object, reason: str) -> None:
        super().__init__(f"{reason}, got {type(value).__name__}")
        self.value = value
        self.reason = reason


def _exact(kind: type, reason: str) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        if type(value) is not kind:
            raise WrongType(value, reason)
        return value

    return structure


def _number(value: Any, _: Any) -> float:
    if type(value) not in (int, float):
        raise WrongType(value, "must be a number")
    return float(value)


def _vocabulary(value: Any, kind: Any) -> Any:
    return getattr(kind, "parse", kind)(value)


def _origin(kind: Any) -> object:
    origin: object = get_origin(kind)
    return origin or kind


def _is_tuple(kind: Any) -> bool:
    return is_sequence(kind) and _origin(kind) is tuple


def _tuple_factory(kind: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    inner = homogenous_tuple_structure_factory(kind, conv)

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise WrongType(value, "must be a list")
        return inner(value, kind)

    return structure


def exact_converter(
    *, detailed_validation: bool = True, forbid_extra_keys: bool = True
) -> cattrs.Converter:
    """The base every reader of outside or saved data shares: no coercion of any kind."""
    conv = cattrs.Converter(
        forbid_extra_keys=forbid_extra_keys, detailed_validation=detailed_validation
    )
    conv.register_structure_hook(str, _exact(str, "must be a string"))
    conv.register_structure_hook(int, _exact(int, "must be an integer"))
    conv.register_structure_hook(bool, _exact(bool, "must be true or false"))
    conv.register_structure_hook(float, _number)
    # The str hook would also catch the str enums: a closed vocabulary parses itself, and
    # names the valid values when it cannot.
    conv.register_structure_hook(enum.StrEnum, _vocabulary)
    conv.register_structure_hook_factory(_is_tuple, lambda kind: _tuple_factory(kind, conv))
    return conv


def _ignore_type(hook: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    return lambda value, _: hook(value)


class Boundary:
    """One kind of outside document and the attrs classes it is read into.

    ``root`` names the document itself; unknown keys are reported under
    ``key_field.format(container)``; ``mapping`` is what the document calls an object.
    """

    def __init__(
        self,
        root: str,
        *,
        mapping: str = "an object",
        key_field: str = "{}",
        none_is_absent: bool = False,
    ) -> None:
        self.root = root
        self.mapping = mapping
        self.key_field = key_field
        #: a top-level ``null`` means "not set" (Kata and CNI documents use it so)
        self.none_is_absent = none_is_absent
        self._conv = exact_converter()
        self._keys: dict[type, Mapping[str, str]] = {}
        # a free-form object (CNI's ipam, prevResult) is taken as it came: its keys are not ours
        self._conv.register_structure_hook_func(
            lambda t: _origin(t) in (dict, Mapping), self._mapping
        )

    def register(
        self,
        cls: type,
        keys: Mapping[str, str] | None = None,
        *,
        forbid_extra_keys: bool = True,
        hooks: Mapping[str, Callable[[Any], Any]] | None = None,
        omit: Sequence[str] = (),
        reshape: Callable[[Any], Any] | None = None,
    ) -> None:
        """Read ``cls`` with ``keys`` (attribute -> key; others keep their name).

        ``hooks`` structure one attribute's raw value; ``omit`` are attributes never read
        (set by the caller); ``reshape`` turns an accepted variant of the shape into the
        canonical one before reading. Register a class after the classes of its fields.
        """
        keys = {
            a.name: (keys or {}).get(a.name, a.name)
            for a in attrs.fields(cls)
            if a.name not in omit
        }
        self._keys[cls] = keys
        omitted: dict[str, Any] = {name: override(omit=True) for name in omit}
        fields: dict[str, Any] = {name: override(rename=key) for name, key in keys.items()}
        unstructure: Callable[[Any], Any] = make_dict_unstructure_fn(
            cls, self._conv, **fields, **omitted
        )
        for name, hook in (hooks or {}).items():
            fields[name] = override(rename=keys[name], struct_hook=_ignore_type(hook))
        structure: Callable[[Any, Any], Any] = make_dict_structure_fn(
            cls, self._conv, **fields, **omitted, _cattrs_forbid_extra_keys=forbid_extra_keys
        )

        def read(value: Any, _: Any) -> Any:
            if reshape is not None:
                value = reshape(value)
            if not isinstance(value, Mapping):
                raise WrongType(value, f"must be {self.mapping}")
            return structure(value, cls)

        self._conv.register_structure_hook(cls, read)
        self._conv.register_unstructure_hook(cls, unstructure)

    def register_value(
        self, cls: type[T], read: Callable[[Any], T], write: Callable[[T], Any]
    ) -> None:
        """Read and write ``cls`` with functions of its own (its spelling is not its fields'):
        ``read`` names the fields of its errors itself."""
        self._conv.register_structure_hook(cls, _ignore_type(read))
        self._conv.register_unstructure_hook(cls, write)

    def structure(self, data: object, cls: type[T]) -> T:
        """``data`` as a ``cls``, or the first problem as an ``InvalidInputError``."""
        if self.none_is_absent and isinstance(data, Mapping):
            data = {k: v for k, v in data.items() if v is not None}
        try:
            result: T = self._conv.structure(data, cls)
        except (cattrs.BaseValidationError, WrongType, InvalidInputError) as err:
            found = self._explain(err, (), data)
            if found.__traceback__ is not None:  # raised as it is by a check or a hook
                raise found from found.__cause__
            raise found from err
        return result

    def unstructure(self, obj: object) -> dict[str, Any]:
        data: dict[str, Any] = self._conv.unstructure(obj)
        return data

    def _mapping(self, value: Any, _: Any) -> Any:
        if not isinstance(value, dict):
            raise WrongType(value, f"must be {self.mapping}")
        return value

    # --- telling cattrs' errors --------------------------------------------------------------

    def _name(self, where: Path) -> str:
        """The field at ``where``: dotted keys; an entry of a list is named by the list."""
        while where and isinstance(where[-1], int):
            where = where[:-1]
        start = max((i + 1 for i, s in enumerate(where) if isinstance(s, int)), default=0)
        return ".".join(str(s) for s in where[start:]) or self.root

    def _explain(self, err: BaseException, where: Path, node: object) -> InvalidInputError:
        if isinstance(err, ClassValidationError):
            return self._explain_class(err, where, node)
        if isinstance(err, IterableValidationError):
            sub = err.exceptions[0]
            index = next(
                n.index
                for n in getattr(sub, "__notes__", ())
                if isinstance(n, cattrs.IterableValidationNote)
            )
            item = node[index] if isinstance(node, Sequence) and isinstance(index, int) else None
            return self._explain(sub, (*where, index), item)
        if isinstance(err, InvalidInputError):
            # a vocabulary or a hook names its own field; cattrs' notes are of no use past here
            err.__notes__ = [
                n
                for n in getattr(err, "__notes__", ())
                if not isinstance(n, cattrs.AttributeValidationNote | cattrs.IterableValidationNote)
            ]
            return err
        if isinstance(err, WrongType):
            return InvalidInputError(self._name(where), err.value, err.reason)
        if isinstance(err, KeyError):
            entry = len(where) > 1 and isinstance(where[-2], int)
            container = self._name(where[:-1])
            return InvalidInputError(
                self._name(where),
                None,
                "missing from " + (f"an {container} entry" if entry else container),
            )
        return InvalidInputError(self._name(where), node, f"{type(err).__name__}: {err}")

    def _explain_class(
        self, err: ClassValidationError, where: Path, node: object
    ) -> InvalidInputError:
        keys = self._keys.get(err.cl, {})
        extra = [e for e in err.exceptions if isinstance(e, ForbiddenExtraKeysError)]
        if extra:
            key = sorted(extra[0].extra_fields, key=str)[0]
            return InvalidInputError(
                self.key_field.format(self._name(where)),
                key,
                "unknown key; known keys are " + ", ".join(keys.values()),
            )
        sub = err.exceptions[0]
        note = next(
            (
                n
                for n in getattr(sub, "__notes__", ())
                if isinstance(n, cattrs.AttributeValidationNote)
            ),
            None,
        )
        if note is not None:
            key = keys.get(note.name, note.name)
            value = node.get(key) if isinstance(node, Mapping) else None
            return self._explain(sub, (*where, key), value)
        if isinstance(sub, InvalidInputError):
            # the constructor's own check: name the attribute as the document spells it
            field = self._name((*where, keys.get(sub.field, sub.field)))
            if field == sub.field:
                return sub
            if isinstance(sub, UnknownValueError):
                return UnknownValueError(field, sub.value, sub.valid)
            return InvalidInputError(field, sub.value, sub.reason)
        return InvalidInputError(self._name(where), node, f"{type(sub).__name__}: {sub}")
