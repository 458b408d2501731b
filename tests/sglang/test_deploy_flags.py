"""The GPU deployments launch the pinned SGLang with flags and variables it knows: the compose `sglang` service
and the Kubernetes workers are parsed by SGLang's own argument parser (a typo or a flag a release dropped fails
here, not on a GPU host), and every SGLANG_* variable they set is one SGLang declares."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from treepo.service.engine.sglang_server import DEFAULT_PYTHON

ROOT = Path(__file__).resolve().parents[2]
DEFAULTED = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")  # compose's ${VAR:-default}

PARSE = """
import argparse, json, sys
from sglang.srt.environ import envs
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser(exit_on_error=False)
ServerArgs.add_cli_args(parser)
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    args, unknown = parser.parse_known_args(argv)
    out[name] = {"unknown": unknown, "dtype": args.dtype, "weight_version": args.weight_version,
                 "metrics": args.enable_metrics, "skip_tokenizer_init": args.skip_tokenizer_init}
out["declared"] = [v for v in json.loads(sys.argv[2]) if not hasattr(envs, v)]
print(json.dumps(out))
"""


def launches() -> tuple[dict[str, list[str]], set[str]]:
    """name -> launch_server arguments, and the SGLANG_* variables the deployments set."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["sglang"]
    compose_args = [DEFAULTED.sub(r"\1", str(arg)) for arg in compose["command"][3:]]
    docs = yaml.safe_load_all((ROOT / "deploy/k8s/overlays/gpu/sglang.yaml").read_text())
    worker = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    variables = {k for k in compose["environment"] if k.startswith("SGLANG_")}
    variables |= {e["name"] for e in worker["env"] if e["name"].startswith("SGLANG_")}
    return {"compose": compose_args, "kubernetes": [str(arg) for arg in worker["args"]]}, variables


def test_gpu_launch_flags_parse_with_the_pinned_sglang() -> None:
    python = os.environ.get("SGLANG_PYTHON") or str(DEFAULT_PYTHON)
    argvs, variables = launches()
    assert variables >= {"SGLANG_RETURN_ORIGINAL_LOGPROB", "SGLANG_CACHE_DIR"}
    result = subprocess.run(
        [python, "-c", PARSE, json.dumps(argvs), json.dumps(sorted(variables))],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed.pop("declared") == [], "SGLang declares no such variable"
    for name, args in parsed.items():
        assert args["unknown"] == [], f"{name}: SGLang does not know {args['unknown']}"
        assert args["dtype"] == "bfloat16" and args["weight_version"] == "0", name
        assert args["metrics"] and args["skip_tokenizer_init"], name
