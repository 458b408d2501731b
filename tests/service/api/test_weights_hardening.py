"""POST /weights under bad input: small JSON limit, bad paths/versions/uploads are 4xx with no server path,
checkpoints checked before loading (NaN/Inf refused), refused uploads deleted, old uploads pruned, idempotent
retries of a push."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_helpers import Service, factory_of
from safetensors.numpy import save, save_file

from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.factory import printable_script
from treepo.service.weights_store import MAX_POLICY_VERSION, MAX_VERSION_STEP


def weights(value: float = 0.5, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {"w": np.full((8, 4), value, dtype=dtype), "step": np.arange(3)}


def upload(http: httpx.Client, content: bytes, version: str | None = None) -> httpx.Response:
    data = {"version": version} if version is not None else {}
    return http.post("/weights", files={"file": ("w.safetensors", content)}, data=data)


def uploads_on_disk(service: Service) -> list[str]:
    folder = service.settings.weights_dir / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_no_server_path(service: Service, answer: httpx.Response) -> None:
    root = str(service.settings.weights_dir.resolve())
    assert root not in answer.text and str(Path(root).parent) not in answer.text, answer.text


class CountingEngine(ScriptedEngine):
    """Counts weight loads."""

    def __init__(self) -> None:
        super().__init__(printable_script())
        self.loads: list[tuple[str, int]] = []

    async def update_weights(self, path: str, version: int) -> None:
        self.loads.append((path, version))
        await super().update_weights(path, version)


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) of this process


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _zeros(total: int, chunk: int = 2**20) -> Iterator[bytes]:
    block = b"0" * chunk
    for _ in range(total // chunk):
        yield block


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_64_mib_json_body_is_413_without_reading_it(service: Service, declared: bool) -> None:
    size = 64 * 2**20
    headers = {"content-type": "application/json"}
    if declared:
        headers["content-length"] = str(size)
    _peak_rss_reset()
    before = _peak_rss()
    with service.client() as http:
        answer = http.post("/weights", content=_zeros(size), headers=headers)
    assert answer.status_code == 413 and "larger than 65536 bytes" in answer.json()["detail"]
    assert _peak_rss() - before < 16 * 2**20  # the body was never held in memory


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"path": "a\x00b.safetensors"}, 422, "control characters"),
        ({"path": "x" * 300}, 422, "at most 255 characters"),
        ({"path": "a/" * 100 + "x" * 200}, 422, "at most 255 characters"),
        ({"path": "../outside.safetensors"}, 403, "outside the weights directory"),
        ({"path": "/etc/passwd"}, 403, "outside the weights directory"),
        ({"path": "missing.safetensors"}, 422, "no checkpoint"),
        ({"path": "ok.safetensors", "version": 1.5}, 422, "version"),
        ({"path": "ok.safetensors", "version": "²"}, 422, "version"),
        ({"path": "ok.safetensors", "version": 0}, 422, "version"),
        ({"path": "ok.safetensors", "version": MAX_POLICY_VERSION + 1}, 422, "version"),
        ({"path": "ok.safetensors", "version": 2**80}, 422, "version"),
        ({"path": "ok.safetensors", "version": MAX_VERSION_STEP + 1}, 422, "jumps more than"),
        ({"path": "not-safetensors.bin"}, 422, "not a safetensors file"),
        ({"path": "nan.safetensors"}, 422, "NaN or Inf"),
        ({"path": "inf16.safetensors"}, 422, "NaN or Inf"),
        ({"path": "empty-dir"}, 422, "no *.safetensors"),
    ],
)
def test_bad_json_pushes_are_4xx_with_a_reason_and_no_server_path(
    service: Service, body: dict, status: int, needle: str
) -> None:
    root = service.settings.weights_dir
    save_file(weights(), str(root / "ok.safetensors"))
    save_file(weights(float("nan")), str(root / "nan.safetensors"))
    save_file(weights(float("-inf"), np.float16), str(root / "inf16.safetensors"))
    (root / "not-safetensors.bin").write_bytes(b"\x00" * 64)
    (root / "empty-dir").mkdir()
    (root.parent / "outside.safetensors").write_bytes(save(weights()))
    with service.client() as http:
        answer = http.post("/weights", json=body)
        current = http.get("/weights").json()
    assert answer.status_code == status and needle in answer.json()["detail"], answer.text
    assert_no_server_path(service, answer)
    assert current["policy_version"] == 0 and service.engine.weights_path is None


@pytest.mark.parametrize(
    ("content", "version", "needle"),
    [
        (save(weights()), "²", "version must be an integer"),
        (save(weights()), "1e3", "version must be an integer"),
        (save(weights()), "9" * 40, "version must be"),
        (save(weights()), str(MAX_POLICY_VERSION + 1), "version must be an integer"),
        (b"\x00tensor-bytes", "1", "not a safetensors file"),
        (save(weights())[:-5], "1", "outside the file"),  # truncated
        (save(weights(float("nan"))), "1", "NaN or Inf"),
        (save({"w": np.array([1.0, np.inf], dtype=np.float64)}), "1", "NaN or Inf"),
    ],
)
def test_refused_uploads_are_422_and_deleted(
    service: Service, content: bytes, version: str, needle: str
) -> None:
    with service.client() as http:
        answer = upload(http, content, version)
        current = http.get("/weights").json()
    assert answer.status_code == 422 and needle in answer.json()["detail"], answer.text
    assert_no_server_path(service, answer)
    assert current["policy_version"] == 0 and uploads_on_disk(service) == []


def test_an_upload_over_the_limit_is_413_and_deleted(make_service) -> None:
    service = make_service(max_upload_bytes=64 * 2**10)
    files = {"file": ("w.safetensors", save({"w": np.zeros(40_000, dtype=np.float32)}))}
    body = httpx.Request("POST", service.url, files=files, data={"version": "1"})
    content = body.read()
    with service.client() as http:
        declared = http.post("/weights", files=files, data={"version": "1"})
        chunked = http.post(  # no Content-Length: counted while streaming to disk
            "/weights",
            content=(content[i : i + 4096] for i in range(0, len(content), 4096)),
            headers={"content-type": body.headers["content-type"]},
        )
    assert declared.status_code == chunked.status_code == 413, chunked.text
    assert uploads_on_disk(service) == []


def test_uploads_are_pruned_to_the_current_and_previous_weights(service: Service) -> None:
    paths = []
    with service.client() as http:
        for version in range(1, 5):
            answer = upload(http, save(weights(version / 10)), str(version))
            assert answer.status_code == 200, answer.text
            paths.append(answer.json()["path"])
        assert http.get("/weights").json()["path"] == paths[-1]
    assert uploads_on_disk(service) == sorted(Path(p).name for p in paths[-2:])


def test_a_retried_push_is_200_with_the_current_info(make_service) -> None:
    """The trainer lost the answer and pushes again: same version and content -> 200, loaded once."""
    service = make_service(engine_factory=factory_of(CountingEngine))
    save_file(weights(), str(service.settings.weights_dir / "p1.safetensors"))
    save_file(weights(0.7), str(service.settings.weights_dir / "other.safetensors"))
    content = save(weights(0.9))
    with service.client() as http:
        first = http.post("/weights", json={"path": "p1.safetensors", "version": 1})
        retry = http.post("/weights", json={"path": "p1.safetensors", "version": 1})
        different = http.post("/weights", json={"path": "other.safetensors", "version": 1})
        up_first, up_retry = upload(http, content, "2"), upload(http, content, "2")
    assert first.status_code == retry.status_code == 200 and retry.json() == first.json()
    assert different.status_code == 409 and "different weights" in different.json()["detail"]
    assert up_first.status_code == up_retry.status_code == 200 and up_retry.json() == up_first.json()
    assert [version for _, version in service.engine.loads] == [1, 2]
    assert len(uploads_on_disk(service)) == 1


def test_readyz_and_503s_hide_server_paths(make_service, tmp_path: Path) -> None:
    secret_dir = tmp_path / "models" / "policy"

    def broken(settings):
        raise OSError(f"no config.json in {secret_dir}")

    service = make_service(engine_factory=broken, wait=False)
    with service.client() as http:
        while (ready := http.get("/readyz")).json()["engine"] != "failed":
            pass
        sample = http.post("/rollout_tree", json={"prompts": [{"text": "1"}]})
    assert "config.json in policy" in ready.json()["engine_error"]
    assert str(tmp_path) not in ready.text and str(tmp_path) not in sample.text
    assert sample.status_code == 503


def test_an_upload_is_streamed_to_disk_while_the_service_keeps_answering(service: Service) -> None:
    """Mid-upload, the bytes already received are in a temporary file of the uploads dir (not in memory)
    and the event loop still answers; the finished upload is checked and loaded."""
    tensor = np.arange(3 * 2**20, dtype=np.float32)  # 12 MiB
    files = {"file": ("w.safetensors", save({"w": tensor}))}
    body = httpx.Request("POST", service.url, files=files, data={"version": "1"})
    content = body.read()
    seen: dict[str, int] = {}

    def slow_body() -> Iterator[bytes]:
        yield content[: 6 * 2**20]
        folder = service.settings.weights_dir / "uploads"
        deadline = time.monotonic() + 30  # hang guard only
        while not (incoming := list(folder.glob(".incoming-*"))) or incoming[0].stat().st_size < 4 * 2**20:
            assert time.monotonic() < deadline, "nothing of the upload reached the disk"
        seen["on_disk"] = incoming[0].stat().st_size
        with service.client() as other:
            seen["healthz"] = other.get("/healthz").status_code
        yield content[6 * 2**20 :]

    with service.client() as http:
        answer = http.post(
            "/weights", content=slow_body(), headers={"content-type": body.headers["content-type"]}
        )
    assert answer.status_code == 200, answer.text
    assert seen["on_disk"] >= 4 * 2**20 and seen["healthz"] == 200
    assert uploads_on_disk(service) == [Path(answer.json()["path"]).name]


def test_a_symlink_out_of_the_weights_dir_is_refused(service: Service, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    save_file(weights(), str(outside))
    (service.settings.weights_dir / "link.safetensors").symlink_to(outside)
    with service.client() as http:
        answer = http.post("/weights", json={"path": "link.safetensors"})
    assert answer.status_code == 403 and "outside the weights directory" in answer.json()["detail"]
    assert_no_server_path(service, answer)
