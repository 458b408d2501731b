"""Loading new policy weights into a running model: safetensors in, names and shapes checked first."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

logger = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or of every `*.safetensors` in a Hugging Face checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors file in {path}; save the checkpoint with safetensors")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"weights path {path} does not exist; pass a .safetensors file or a checkpoint dir")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read {file} as safetensors: {error}") from error
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model` in place after checking it is a full state of the same architecture."""
    expected = dict(model.state_dict())
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(
            f"weights have {len(unknown)} unknown tensor names (not in the model), e.g. {unknown[:3]}; "
            "is it a checkpoint of the same architecture?"
        )
    wrong = [
        f"{name}: {tuple(tensor.shape)} != {tuple(expected[name].shape)}"
        for name, tensor in state.items()
        if tensor.shape != expected[name].shape
    ]
    if wrong:
        raise ValueError(f"weights have {len(wrong)} tensors of the wrong shape, e.g. {wrong[:3]}")
    missing = [name for name in expected if name not in state and not _is_tied_to_loaded(model, name, state)]
    if missing:
        raise ValueError(f"weights lack {len(missing)} tensors of the model, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)
    logger.info("loaded %d tensors", len(state))


def _is_tied_to_loaded(model: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> bool:
    """True when `name` shares storage with a tensor present in `state` (tied embeddings)."""
    tensors = model.state_dict()
    pointer = tensors[name].data_ptr()
    return any(tensors[other].data_ptr() == pointer for other in state if other in tensors)
