"""Weight push: save the policy as safetensors under the shared weights directory, POST /weights, time it.

The service answers POST /weights only after the engine has loaded the file and bumped its
`policy_version`, so the answer is the acknowledgement: trees requested afterwards use the new weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from treepo.client.client import TreePOClient

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PushResult:
    version: int
    path: Path
    save_s: float
    ack_s: float

    @property
    def total_s(self) -> float:
        return self.save_s + self.ack_s


def policy_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, each stored once; a tied group under the input embedding's name.

    safetensors' `save_model` keeps `lm_head.weight` of a tied pair, but SGLang (like vLLM) loads
    `model.embed_tokens.weight` and skips `lm_head.weight` for tied models: a push of such a file reported
    success and changed nothing. Transformers and the embedded engine re-tie either name.
    """
    state = model.state_dict()
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    preferred: dict[tuple, str] = {}
    for module_name, module in model.named_modules():
        if embedding is not None and module is embedding and f"{module_name}.weight" in state:
            preferred[_storage(state[f"{module_name}.weight"])] = f"{module_name}.weight"
    chosen: dict[tuple, str] = {}
    for name, tensor in state.items():
        chosen.setdefault(_storage(tensor), preferred.get(_storage(tensor), name))
    return {name: state[name].detach().contiguous() for name in chosen.values()}


def _storage(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.dtype


class WeightPusher:
    """Writes `policy-v{version}.safetensors` files under `weights_dir` and keeps the last `keep`."""

    def __init__(self, client: TreePOClient, weights_dir: str | Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (got {keep}): the service may still read the newest file")
        self.client = client
        self.weights_dir = Path(weights_dir)
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def push(self, model: torch.nn.Module, version: int) -> PushResult:
        """Save, POST, check the acknowledged version; raises RuntimeError if the service disagrees."""
        started = time.perf_counter()
        name = f"policy-v{version:07d}.safetensors"
        tmp = self.weights_dir / f".{name}.tmp"
        save_file(policy_tensors(model), str(tmp), metadata={"format": "pt"})
        final = self.weights_dir / name
        tmp.replace(final)  # the service never sees a half-written file
        saved = time.perf_counter()
        info = self.client.update_weights(path=name, version=version)
        acked = time.perf_counter()
        if info.policy_version != version:
            raise RuntimeError(
                f"service acknowledged policy_version {info.policy_version}, expected {version}"
            )
        self._prune()
        result = PushResult(version=version, path=final, save_s=saved - started, ack_s=acked - saved)
        logger.info("pushed weights v%d in %.3fs (save %.3fs)", version, result.total_s, result.save_s)
        return result

    def _prune(self) -> None:
        files = sorted(self.weights_dir.glob("policy-v*.safetensors"))
        for old in files[: -self.keep]:
            old.unlink(missing_ok=True)
