"""Derive Arrow schemas from the Pydantic models: the only way storage learns a table's layout."""
from __future__ import annotations

import types
import typing
from datetime import datetime
from functools import cache
from typing import Any, Literal, Union

import pyarrow as pa
from pydantic import BaseModel

_SCALARS: dict[type, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    datetime: pa.timestamp("us", tz="UTC"),
}


@cache
def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """One field per model field, in declaration order, named by alias where the model has one."""
    return pa.schema([_field(name, info.annotation, info.alias) for name, info in model.model_fields.items()])


def _field(name: str, annotation: Any, alias: str | None) -> pa.Field:
    arrow_type, nullable = _arrow_type(annotation)
    return pa.field(alias or name, arrow_type, nullable=nullable)


def _arrow_type(annotation: Any) -> tuple[pa.DataType, bool]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        if len(present) != 1:
            raise TypeError(f"only Optional[X] unions map to Arrow, not {annotation}")
        return _arrow_type(present[0])[0], True
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or kinds.pop() not in _SCALARS:
            raise TypeError(f"a Literal maps to Arrow when all its values share one scalar type: {annotation}")
        return _SCALARS[type(args[0])], False
    if origin is list:
        return pa.list_(_arrow_type(args[0])[0]), False
    if origin is dict:
        return pa.map_(_arrow_type(args[0])[0], _arrow_type(args[1])[0]), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(list(arrow_schema(annotation))), False
    if annotation in _SCALARS:
        return _SCALARS[annotation], False
    raise TypeError(f"no Arrow type for {annotation!r}")


def to_table(rows: typing.Iterable[BaseModel], model: type[BaseModel]) -> pa.Table:
    """Validated models to an Arrow table with the derived schema.

    Only instances of `model` are accepted: Arrow would otherwise fill missing columns with nulls (even
    in non-nullable fields) and drop unknown ones without a word.
    """
    schema = arrow_schema(model)
    rows = list(rows)
    for row in rows:
        if not isinstance(row, model):
            raise TypeError(f"to_table({model.__name__}) got a {type(row).__name__} row")
    return pa.Table.from_pylist([r.model_dump(by_alias=True) for r in rows], schema=schema)


def from_table(table: pa.Table, model: type[BaseModel]) -> list[BaseModel]:
    """Arrow rows back to validated models (maps come back from Arrow as key/value pairs)."""
    map_fields = [f.name for f in arrow_schema(model) if pa.types.is_map(f.type)]
    rows = table.to_pylist()
    for row in rows:
        for name in map_fields:
            if isinstance(row.get(name), list):
                row[name] = dict(row[name])
    return [model.model_validate(row) for row in rows]
