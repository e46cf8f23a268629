"""Reading another library's checkpoint strictly: every tensor is used exactly once, or it is an error.

`CheckpointTensors` reads a directory of safetensors or PyTorch `.bin` shards (one file, or
several with an index json) and remembers which tensors the importer took; `TargetState`
collects the tensors for a vlmoe model and refuses a missing, doubly set or mis-shaped one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlmoe.models.checkpoint import unique_state

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointTensors:
    """The tensors of a checkpoint directory or file, by name, with a record of which were used.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> folder = tempfile.mkdtemp()
        >>> save_file({"a": torch.ones(2)}, folder + "/model.safetensors")
        >>> tensors = CheckpointTensors(folder)
        >>> tensors.take("a").tolist(), tensors.unused()
        ([1.0, 1.0], [])
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file_of = self._locate(self.path)  # {tensor name: file}
        if not self._file_of:
            raise ValueError(f"{self.path} holds no tensors: the weights file is empty; fetch it again")
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._used: set[str] = set()

    @staticmethod
    def _locate(path: Path) -> dict[str, Path]:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: give the checkpoint's file or folder")
        if path.is_file():
            return {name: path for name in _names_in(path)}
        for index_name in _INDEXES:
            index_file = path / index_name
            if index_file.is_file():
                weight_map = _weight_map(index_file)
                files = {shard: path / shard for shard in set(weight_map.values())}
                absent = sorted(shard for shard, file in files.items() if not file.is_file())
                if absent:
                    raise FileNotFoundError(
                        f"{index_file} lists shard(s) {absent} that are not in {path}: the download is "
                        "incomplete; fetch the missing files"
                    )
                present = {shard: set(_names_in(file)) for shard, file in files.items()}
                for name, shard in weight_map.items():
                    if name not in present[shard]:
                        raise ValueError(
                            f"{path / shard} lacks tensor {name!r} that {index_name} places there: the shard "
                            "is truncated or from another checkpoint; fetch it again"
                        )
                return {name: files[shard] for name, shard in weight_map.items()}
        for file_name in _SINGLE_FILES:
            if (path / file_name).is_file():
                return {name: path / file_name for name in _names_in(path / file_name)}
        raise FileNotFoundError(
            f"{path} holds no weights: expected {' or '.join(_SINGLE_FILES)}, or shards with "
            f"{' or '.join(_INDEXES)}"
        )

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def take(self, name: str) -> torch.Tensor:
        """The tensor `name`, marked used; a missing name is an error that says so."""
        if name not in self._file_of:
            raise ValueError(
                f"{self.path}: the checkpoint has no tensor {name!r}; it is truncated or not this model"
            )
        self._used.add(name)
        return _read(self._file_of[name], self._loaded)[name]

    def describe(self, name: str) -> str:
        """How errors name the tensor `name`: as the file names it."""
        return name

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor (checkpoints are saved in one dtype, beside
        integer buffers such as position_ids), without marking it used."""
        for name in self.names():
            tensor = _read(self._file_of[name], self._loaded)[name]
            if tensor.is_floating_point():
                return tensor.dtype
        raise ValueError(
            f"{self.path} holds no floating-point tensors: these are not weights; fetch them again"
        )

    def unused(self) -> list[str]:
        return sorted(set(self._file_of) - self._used)


def _weight_map(index_file: Path) -> dict[str, str]:
    """{tensor name: shard file name} of a shard index json, refused with the reason if malformed."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index_file}: not a shard index with a 'weight_map' ({error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ValueError(
            f"{index_file}: 'weight_map' must map tensor names to shard file names; fetch it again"
        )
    if not weight_map:
        raise ValueError(f"{index_file}: 'weight_map' lists no tensors; fetch it again")
    return weight_map


def _names_in(file: Path) -> Iterable[str]:
    if file.stat().st_size == 0:  # torch's error for it is an EOFError with no text
        raise ValueError(f"{file}: the file is empty (0 bytes); fetch it again")
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as handle:
                return list(handle.keys())
        except Exception as error:  # safetensors raises its own error types for a corrupt header
            raise ValueError(f"{file}: not a readable safetensors file ({error}); fetch it again") from None
    return list(_load_bin(file))


def _read(file: Path, cache: dict[Path, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if file not in cache:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                cache[file] = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        else:
            cache[file] = _load_bin(file)
    return cache[file]


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file, some bare
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise ValueError(f"{file}: not a readable PyTorch checkpoint ({reason}); fetch it again") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training scripts often wrap the weights (LLaVA-MoLE does)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{file}: expected a dict of tensors (or {{'state_dict': ...}})")
    return state


class TargetState:
    """The state dict of a vlmoe model being filled from foreign tensors, checked name by name."""

    def __init__(self, model: nn.Module, source: str) -> None:
        # A tied tensor (LM head = embeddings) is expected once, under its first name.
        self._expected = unique_state(model)
        self._source = source
        self.state: dict[str, torch.Tensor] = {}

    def set(self, name: str, tensor: torch.Tensor, origin: str) -> None:
        if name not in self._expected:
            raise ValueError(f"{self._source}: {origin} maps to {name!r}, which the model does not have")
        if name in self.state:
            raise ValueError(f"{self._source}: {name!r} is set twice (again from {origin})")
        if tuple(tensor.shape) != tuple(self._expected[name].shape):
            raise ValueError(
                f"{self._source}: {origin} has shape {tuple(tensor.shape)} but {name!r} needs "
                f"{tuple(self._expected[name].shape)}: the config and the weights do not match"
            )
        dtype = self._expected[name].dtype
        # float to float is a cast (a bfloat16 checkpoint, a float32 model); int to float is damage
        if tensor.is_floating_point() != dtype.is_floating_point:
            raise ValueError(
                f"{self._source}: {origin} is {tensor.dtype} but {name!r} is {dtype}: the file is damaged or "
                "not this model's weights; fetch it again"
            )
        self.state[name] = tensor.to(dtype).clone()

    def set_experts(
        self, name: str, parts: list[tuple[str, torch.Tensor]], origin: str, pieces: int = 1
    ) -> None:
        """Set `name` [E, ...] from its experts' tensors `parts` [(their name, tensor)] in expert order,
        each checked against its slot (torch.stack would fail without naming one). With `pieces`=2
        each expert's slot is its two tensors concatenated on dim 0 (a fused gate_up: gate, then up)."""
        if name not in self._expected:
            raise ValueError(f"{self._source}: {origin} maps to {name!r}, which the model does not have")
        shape = list(self._expected[name].shape[1:])
        shape[0] //= pieces
        for their_name, tensor in parts:
            if list(tensor.shape) != shape:
                raise ValueError(
                    f"{self._source}: {their_name} has shape {tuple(tensor.shape)} but each expert of "
                    f"{name!r} needs {tuple(shape)}: the config and the weights do not match"
                )
        tensors = [tensor for _, tensor in parts]
        experts = [torch.cat(tensors[i : i + pieces]) for i in range(0, len(tensors), pieces)]
        self.set(name, torch.stack(experts), origin)

    def load_into(self, model: nn.Module) -> None:
        missing = sorted(set(self._expected) - set(self.state))
        if missing:
            raise ValueError(
                f"{self._source}: no tensor for {_some(missing)}; the checkpoint is truncated or "
                "its config.json describes another model"
            )
        model.load_state_dict(self.state, strict=False, assign=True)  # the tied names come back below
        model.tie_weights()


def load_checked(
    model: nn.Module, tensors: CheckpointTensors, target: TargetState, recomputed: tuple[str, ...]
) -> nn.Module:
    """Load the mapped tensors into `model` once every checkpoint tensor has found its place.

    Tensors whose names end in `recomputed` (buffers the model rebuilds, e.g. rotary inv_freq)
    are dropped rather than reported as unused. Returns the model in eval mode.
    """
    for name in tensors.names():
        if name.endswith(recomputed):
            tensors.take(name)
    check_all_used(tensors)
    target.load_into(model)
    return model.eval()


def check_all_used(tensors: CheckpointTensors) -> None:
    unused = tensors.unused()
    if unused:
        raise ValueError(
            f"{tensors.path}: tensors {_some(unused)} have no place in the converted model; the "
            "checkpoint has parts this importer does not know (see the README's differences table)"
        )


def _some(names: list[str]) -> str:
    return str(names[:6])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > 6 else "]")
