"""The base of every config section: unknown keys are errors, values are frozen once loaded,
numbers are finite (`.inf` and `.nan` are refused wherever a number is asked for)."""

import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value, info: ValidationInfo):
        """pydantic takes `true` as 1 for an int or float field; a boolean where a number is
        asked for is a mistake (`micro_batch: true`), so it is refused, naming the field."""
        if isinstance(value, bool) and info.field_name:
            kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
            if kinds & {int, float} and not kinds & {bool, typing.Any}:
                raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


def _leaf_types(annotation) -> set:
    """The plain types an annotation admits: int | None -> {int, NoneType}; Annotated and
    Literal are looked through (a Literal contributes the types of its values)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    if origin is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    args = typing.get_args(annotation)
    if args and origin in (typing.Union, types.UnionType):
        return set().union(*(_leaf_types(a) for a in args))
    return {origin or annotation}
