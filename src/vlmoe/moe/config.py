"""Typed configuration of a router: one dataclass, validated on construction.

Every MoE flavour (FFN experts, LoRA experts, connector experts) is configured through the same
`RouterConfig`; it is saved in the model's `config.json` by `vlmoe.models`.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Literal

RouterInput = Literal["token", "cluster"]
BalanceScope = Literal["device", "global"]


@dataclass
class RouterConfig:
    """How tokens choose experts, and which auxiliary losses that choice produces.

    Example:
        >>> RouterConfig(num_experts=4, top_k=2, load_balance_coef=0.01).capacity(1000) is None
        True
    """

    num_experts: int
    top_k: int = 1
    # Renormalise the k chosen probabilities to sum to one (only meaningful when top_k > 1;
    # with top_k == 1 the weight is the chosen probability, Switch-style, so the router learns).
    normalize_top_k: bool = True
    # Forward value of every combine weight is 1 (or 1/k after renormalisation) while the
    # gradient still flows through the router probabilities (LLaVA-MoLE's straight-through).
    straight_through: bool = False
    # Multiplicative input jitter U(1-eps, 1+eps) during training (Switch Transformer).
    jitter_noise: float = 0.0
    # Softmax temperature: logits are divided by it (MoCLE uses 0.05-0.1).
    temperature: float = 1.0
    # None = dropless. Otherwise each expert takes at most
    # max(min_capacity, ceil(capacity_factor * tokens * top_k / num_experts)) token-slots.
    capacity_factor: float | None = None
    min_capacity: int = 0
    load_balance_coef: float = 0.0
    # Count only each token's first choice in the balance loss's f_i (GShard / DeepSpeed-MoE
    # top-2, as MoE-LLaVA trains); False counts every chosen slot (Switch, Mixtral).
    load_balance_first_choice: bool = False
    # Where f_i (the expert counts) of the balance loss come from. "device": this process's
    # batch (Switch, GShard, DeepSpeed-MoE, so MoE-LLaVA). "global": counts all-reduced over
    # the data-parallel group first, so the loss is that of the global batch (a no-op when
    # torch.distributed is not initialised). Only P_i carries a gradient either way.
    load_balance_scope: BalanceScope = "device"
    z_loss_coef: float = 0.0
    bias: bool = False
    # "token": logits from the token's hidden state. "cluster": logits from a learned
    # embedding of the sample's instruction cluster (MoCLE).
    input: RouterInput = "token"
    num_clusters: int = 0
    cluster_embed_dim: int = 64

    def __post_init__(self) -> None:
        # Types first, here rather than only in from_dict: a top_k=2.0 or num_experts="4" from
        # Python would otherwise pass the range checks below and fail deep inside torch.
        for name, hint in typing.get_type_hints(type(self)).items():
            value = checked_value(getattr(self, name), hint, name)
            setattr(self, name, value)
            # NaN passes every range check below (each comparison is false) and would make the
            # losses or the jitter NaN; an infinite capacity or coefficient is no number either.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}"
            )
        if self.jitter_noise < 0 or self.jitter_noise >= 1:
            raise ValueError(f"jitter_noise must be in [0, 1), got {self.jitter_noise}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        for name in ("load_balance_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.input == "cluster" and self.num_clusters < 1:
            raise ValueError(
                "num_clusters must be >= 1 when input='cluster' "
                f"(got {self.num_clusters}); set it to the number of k-means clusters"
            )
        if self.cluster_embed_dim < 1:
            raise ValueError(f"cluster_embed_dim must be >= 1, got {self.cluster_embed_dim}")

    def capacity(self, num_tokens: int) -> int | None:
        """Token-slots one expert may take for `num_tokens` real tokens; None when dropless."""
        if self.capacity_factor is None:
            return None
        per_expert = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(self.min_capacity, per_expert)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "router config") -> RouterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise ValueError(f'{where}: missing key(s) {missing}; add them, e.g. "num_experts": 4')
        try:
            return cls(**data)  # __post_init__ checks the types and ranges
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


def as_python_number(value: Any, hint: Any) -> Any:
    """A numpy (or other `numbers`) scalar given for an int or float field, as the Python number.

    Values computed with numpy (`np.int64(4)` experts) are numbers to the user; kept as they are,
    they would be refused by `check_type` or break `json.dump` of the saved config.
    """
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value  # already plain, or not a number at all (check_type names it)
    accepted = typing.get_args(hint) or (hint,)
    if int in accepted and isinstance(value, numbers.Integral):
        return int(value)
    if float in accepted:
        return float(value)
    return value


def checked_value(value: Any, hint: Any, key: str) -> Any:
    """`value` as the Python number it is (`as_python_number`), refused unless of `hint`'s type.

    Example:
        >>> import numpy as np
        >>> checked_value(np.int64(4), int, "num_experts")
        4
    """
    value = as_python_number(value, hint)
    check_type(value, hint, key)
    return value


def check_type(value: Any, hint: Any, key: str) -> None:
    """Refuse a value of another JSON type than the type annotation `hint` says; `key` names it.

    A hand-edited config.json's "false" or "no" would otherwise be read as true, and a string number
    fail far from the file. Shared by `RouterConfig` (checked on construction) and the surgery record
    (`vlmoe.models`).

    Example:
        >>> check_type("false", bool, "config.json: normalize_top_k")
        Traceback (most recent call last):
        ValueError: config.json: normalize_top_k is 'false'; expected true or false
    """
    if not _is(value, hint):
        raise ValueError(f"{key} is {value!r}; expected {_describe(hint)}")


def _is(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_is(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):  # an int to Python, not to JSON
        return hint is bool
    if hint is float:  # a whole number given for a float (alpha=8) is saved as 8
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is list or hint is list:
        return "a list of integers" if args == (int,) else "a list"  # the lists saved: layers, steps
    return JSON_TYPE_NAMES[hint]


# How a message names a JSON value's expected type (the recipe checks too: vlmoe.train.validate).
JSON_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    type(None): "null",
}
