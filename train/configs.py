"""Model configurations: frozen dataclasses that round-trip through run.json and bundle.json."""

import dataclasses
import math
import typing

from edgeinspect.runtime.console import InspectError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of every model's configuration; JSON lists come back as tuples and unknown keys are refused."""

    # setting → what a run.json without it (written before the setting existed) was fitted with; the others
    # take today's default
    missing_means: typing.ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def input_step(self) -> int:
        """The input's sides are multiples of this: the deepest stride of the features the model uses."""
        return max(self.strides)

    @classmethod
    def from_dict(cls, record: dict):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise InspectError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)} (made by a newer version?)")
        values = {key: value for key, value in cls.missing_means.items() if key not in record}
        for key, value in record.items():
            is_tuple = typing.get_origin(hints[key]) is tuple
            values[key] = tuple(value) if is_tuple else value
        return cls(**values)


def check_seed(seed: int) -> None:
    """NumPy's and PyTorch's generators both take seeds from 0 to 2³² − 1."""
    if not 0 <= seed < 1 << 32:
        raise InspectError(f"--seed must be between 0 and {(1 << 32) - 1}, got {seed}")


@dataclasses.dataclass(frozen=True)
class GradientConfig(ModelConfig):
    """Settings of a model with learned weights; the validation split picks the best epoch."""

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 10  # stop when the validation loss has not improved for this many epochs
    seed: int = 0

    def __post_init__(self):
        check_seed(self.seed)
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise InspectError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise InspectError(f"--lr must be a finite number above 0, got {self.learning_rate}")
