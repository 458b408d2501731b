"""Import stand-in for SGLang's `sgl_kernel` CPU extension. TEST SUPPORT ONLY, not an upstream-supported setup.

`SGLANG_USE_CPU_ENGINE=1` makes sglang import `sgl_kernel`, whose CPU build the package index does not carry. On a
CPU without AMX, sglang 0.5.23 never calls a compiled kernel op for a dense model (attention falls back to
`torch_native`; norms, activations and RoPE use plain torch; its AMX check also wants the op
`convert_weight_packed`, which this module does not register, so AMX machines fall back safely as well). So a
module whose every attribute is a function raising NotImplementedError is enough to serve the tiny model, with
logprobs identical to the compiled kernel. A user with an AMX Xeon or a GPU installs and uses the real kernel.
`tests/sglang/conftest.py` and `treepo bench sampling --engine sglang` put this directory on the server's
PYTHONPATH; nothing else imports it.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*_args, **_kwargs):
        raise NotImplementedError(f"sgl_kernel stand-in: {name}")

    _missing.__name__ = name
    return _missing
