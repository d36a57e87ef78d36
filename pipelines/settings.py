"""The base of every config section: unknown keys are errors, values are frozen once loaded."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
