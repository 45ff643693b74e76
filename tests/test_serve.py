"""``fastwan serve`` as clients use it: a real uvicorn server on a free loopback port (a
background thread of this process), the shipped toy student, a real HTTP client (httpx)."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import fastwan.cli as cli
from fastwan.serve.app import MAX_BODY_BYTES, Server, check_bind
from fastwan.serve.runtime import ServeOptions, field_of, parse_lora
from fastwan.serve.schemas import MAX_IMAGE_CHARS, decode_image
from fastwan.serve.store import MAX_ATTEMPTS, JobStore
from fastwan.serve.worker import load_generator, parse_devices
from fastwan.toy.assets import toy_model_path
from fastwan.video_io import read_video, save_video

KEY = "test-key-0123456789abcdef"
FINISHED = ("succeeded", "failed", "cancelled", "expired")
TOY_SHAPE = (8, 16, 16, 3)  # the toy student's default video: frames, height, width, RGB


def image_b64(width: int = 96, height: int = 64, fmt: str = "PNG", seed: int = 0) -> str:
    """A random RGB image file, base64-encoded as a request carries it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def start_server(
    state_dir, *, api_key=None, queue_size=8, ttl=3600.0, model=None, **options
) -> Server:
    options = ServeOptions(
        model=str(model or toy_model_path("student")),
        state_dir=state_dir,
        devices=options.pop("devices", "cpu"),
        queue_size=queue_size,
        ttl=ttl,
        **options,
    )
    return Server(options, port=0, api_key=api_key, log_level="warning").start()


def wait_for(client: httpx.Client, job_id: str, timeout: float = 90.0, until=FINISHED) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")
        time.sleep(0.05)


def submit(client: httpx.Client, **body) -> str:
    r = client.post("/v1/videos", json={"prompt": "a red ball moves right", **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("serve"), api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as c:
        yield c


def decode_mp4(data: bytes, tmp_path):
    path = tmp_path / "got.mp4"
    path.write_bytes(data)
    return read_video(path)[0]


def test_submit_poll_download_decodes(client, tmp_path):
    r = client.post("/v1/videos", json={"prompt": "a red ball moves right", "seed": 3})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] == "queued" and job["progress"] == {"step": 0, "total": 3}
    assert r.headers["location"] == f"/v1/videos/{job['id']}"
    assert re.fullmatch(r"[0-9a-f]{32}", job["id"])
    done = wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"step": 3, "total": 3}
    assert set(done["timings"]) == {"text_encode", "denoise", "decode", "total"}
    assert done["expires_at"] == pytest.approx(done["finished_at"] + 3600)
    video = client.get(done["content_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    frames = decode_mp4(video.content, tmp_path)
    assert frames.shape == TOY_SHAPE
    assert frames.std() > 1.0  # a picture, not a blank frame


def test_twenty_concurrent_requests_complete_or_get_429(server, client):
    def post(i: int) -> httpx.Response:
        return client.post("/v1/videos", json={"prompt": f"a blue square {i}", "seed": i})

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {202, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    accepted = [r.json()["id"] for r in responses if r.status_code == 202]
    assert rejected and accepted  # 20 at once overflow a queue of 8
    assert len(accepted) <= 8 + 20 - len(rejected)
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert "retry" in r.json()["detail"]
    assert len(set(accepted)) == len(accepted)
    for job_id in accepted:
        assert wait_for(client, job_id)["status"] == "succeeded"
    metrics = client.get("/metrics").text
    assert int(re.search(r"^fastwan_rejected_total (\d+)$", metrics, re.M)[1]) >= len(rejected)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "height": 17}, "height"),  # the model's check: not a multiple of 4
        ({"prompt": "x", "width": 30}, "width"),
        ({"prompt": "x", "num_frames": 1000}, "num_frames"),  # past the rotary table
        ({"prompt": "x", "height": "16"}, "height"),  # a string is not a size
        ({"prompt": "x", "height": 0}, "height"),
        ({"prompt": "   "}, "prompt"),
        ({"negative_prompt": "y"}, "prompt"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**63}, "seed"),
        ({"prompt": "x", "seed": True}, "seed"),
        ({"prompt": "x", "guidance_scale": 0}, "guidance_scale"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "attention": "sparse"}, "attention"),
        ({"prompt": "x", "sparsity": 1.0}, "sparsity"),
        ({"prompt": "x", "attention": "dense", "sparsity": 0.5}, "sparsity"),
        ({"prompt": "x", "image_path": "/etc/passwd"}, "image_path"),  # unknown: refused
        ({"prompt": "x", "image": "/etc/passwd"}, "image"),  # not base64: never a path
        ({"prompt": "x", "image": image_b64()}, "image"),  # a text-to-video model
        ({"prompt": "x", "image": "aGVsbG8="}, "image"),  # base64 of 'hello': no image
        ({"prompt": "x", "image": image_b64(fmt="GIF")}, "image"),  # PNG / JPEG only
        ({"prompt": "x", "image": image_b64(4097, 1)}, "image"),  # over 4096 a side
        ({"prompt": "x", "image": "A" * (MAX_IMAGE_CHARS + 4)}, "image"),  # over 8 MiB
        ({"prompt": "x", "last_image": image_b64()}, "last_image"),  # needs image
        ({"prompt": "x", "lora": "style"}, "lora"),  # no adapter registered by that name
        ({"prompt": "x", "lora": "../x"}, "lora"),
        ({"prompt": "x", "lora_scale": 0.5}, "lora_scale"),  # needs lora
    ],
)
def test_bad_inputs_are_422_naming_the_field(server, client, body, field):
    before = sum(server.runtime.store.counts().values())
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert ["body", field] in locs, locs
    assert sum(server.runtime.store.counts().values()) == before  # nothing was queued


def test_malformed_requests(client):
    r = client.post(
        "/v1/videos", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    big = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    r = client.post("/v1/videos", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/videos", json={"prompt": "a" * 5000})  # within the body limit
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    for bad in ("../../etc/passwd", "ABC", "0" * 31, "g" * 32):
        r = client.get(f"/v1/videos/{bad}/content")
        assert r.status_code in (404, 422), (bad, r.status_code)  # never a file
        if r.status_code == 422:
            assert r.json()["detail"][0]["loc"] == ["path", "job_id"]
    assert client.get(f"/v1/videos/{'0' * 32}").status_code == 404
    assert client.delete(f"/v1/videos/{'0' * 32}").status_code == 404


def test_cancel_queued_and_running(server, client):
    long_id = submit(client, num_inference_steps=200)
    queued_id = submit(client)
    wait_for(client, long_id, until=("running",))
    deadline = time.monotonic() + 60
    while client.get(f"/v1/videos/{long_id}").json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = client.delete(f"/v1/videos/{queued_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.delete(f"/v1/videos/{long_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # The worker stops the running job at its next step and is free again.
    deadline = time.monotonic() + 30
    while server.runtime.workers[0].job is not None:
        assert time.monotonic() < deadline, "the cancelled job kept running"
        time.sleep(0.05)
    long_job = client.get(f"/v1/videos/{long_id}").json()
    assert long_job["status"] == "cancelled"
    assert 1 <= long_job["progress"]["step"] < 200
    queued_job = client.get(f"/v1/videos/{queued_id}").json()
    assert queued_job["status"] == "cancelled" and queued_job["started_at"] is None
    assert client.get(f"/v1/videos/{long_id}/content").status_code == 409
    assert client.delete(f"/v1/videos/{long_id}").status_code == 409
    assert not server.runtime.store.video_path(long_id).exists()
    assert wait_for(client, submit(client))["status"] == "succeeded"  # the worker goes on


def test_results_expire_after_ttl(server, client):
    job_id = submit(client, seed=11)
    assert wait_for(client, job_id)["status"] == "succeeded"
    path = server.runtime.store.video_path(job_id)
    assert path.is_file()
    expired = server.runtime.store.expire(now=time.time() + server.runtime.store.ttl + 1)
    assert job_id in expired
    assert client.get(f"/v1/videos/{job_id}").json()["status"] == "expired"
    assert client.get(f"/v1/videos/{job_id}/content").status_code == 410
    assert not path.exists()


def test_metrics_health_and_docs(server, client):
    assert wait_for(client, submit(client, seed=5))["status"] == "succeeded"
    text = client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    body = text.text
    assert re.search(r"^fastwan_queue_depth \d+$", body, re.M)
    for state in ("queued", "running", "succeeded", "failed", "cancelled", "expired"):
        assert re.search(rf'^fastwan_jobs{{state="{state}"}} \d+$', body, re.M), state
    for stage in ("text_encode", "denoise", "decode", "total"):
        count = re.search(rf'^fastwan_stage_seconds_count{{stage="{stage}"}} (\d+)$', body, re.M)
        assert count and int(count[1]) >= 1, stage
        inf = re.search(rf'fastwan_stage_seconds_bucket{{stage="{stage}",le="\+Inf"}} (\d+)', body)
        assert inf[1] == count[1]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "toy-student"
    assert health["task"] == "t2v" and health["loras"] == []
    assert [w["device"] for w in health["workers"]] == ["cpu"]
    assert {"/v1/videos", "/v1/videos/{job_id}", "/v1/videos/{job_id}/content", "/health",
            "/metrics"} <= set(client.get("/openapi.json").json()["paths"])  # fmt: skip
    assert client.get("/docs").status_code == 200


def test_api_key_is_required_when_set(server):
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        r = anon.post("/v1/videos", json={"prompt": "a cat"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert anon.get(f"/v1/videos/{'0' * 32}").status_code == 401
        assert anon.get("/metrics").status_code == 401
        wrong = {"Authorization": "Bearer " + "x" * len(KEY)}
        assert anon.post("/v1/videos", json={"prompt": "a cat"}, headers=wrong).status_code == 401
        assert anon.get("/health").status_code == 200  # liveness stays open


def test_non_loopback_without_key_is_refused_at_startup(tmp_path, capsys):
    state = tmp_path / "state"
    rc = cli.main(["serve", "toy-student", "--host", "0.0.0.0", "--state-dir", str(state)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "0.0.0.0" in err
    assert not state.exists()  # refused before anything was created or loaded
    check_bind("0.0.0.0", 8000, KEY)  # with a key it may start
    check_bind("::1", 8000, None)  # loopback needs none
    with pytest.raises(ValueError, match="at least 16"):
        check_bind("127.0.0.1", 8000, "short")


def test_restart_runs_the_queued_jobs(tmp_path):
    state = tmp_path / "state"
    first = start_server(state)
    with httpx.Client(base_url=first.url, timeout=30) as c:  # loopback: no key needed
        ids = [submit(c, num_inference_steps=30), submit(c, seed=1), submit(c, seed=2)]
        wait_for(c, ids[0], until=("running",))
    first.stop()  # the running job stops at its next step and goes back to the queue
    store = JobStore(state, max_queued=8, ttl=3600)
    assert [store.get(i).status for i in ids] == ["queued"] * 3
    store.close()

    second = start_server(state)
    try:
        with httpx.Client(base_url=second.url, timeout=30) as c:
            for job_id in ids:
                job = wait_for(c, job_id)
                assert job["status"] == "succeeded", job
                assert client_video_ok(c, job)
    finally:
        second.stop()


def client_video_ok(c: httpx.Client, job: dict) -> bool:
    r = c.get(job["content_url"])
    return r.status_code == 200 and r.content[4:8] == b"ftyp"  # an MP4 box header


def test_jobs_running_at_a_crash_are_requeued_then_given_up(tmp_path):
    store = JobStore(tmp_path, max_queued=4, ttl=60)
    job = store.submit({"prompt": "a cat"}, attention="vsa", sparsity=0.75, total=3)
    assert store.claim("w0").status == "running"
    stray = store.video_path(job.id)
    stray.write_bytes(b"half a video")
    store.close()  # a crash: the job is left running, its video half written
    for attempt in range(1, MAX_ATTEMPTS):
        store = JobStore(tmp_path, max_queued=4, ttl=60)
        recovered = store.recover()
        assert recovered["requeued"] == 1
        assert store.get(job.id).status == "queued"
        assert not stray.exists()  # no succeeded job owns it
        assert store.claim("w0").attempts == attempt + 1
        store.close()
    store = JobStore(tmp_path, max_queued=4, ttl=60)
    assert store.recover()["failed"] == 1
    failed = store.get(job.id)
    assert failed.status == "failed" and "interrupted" in failed.error
    store.close()


def test_store_bounds_locks_and_cancels(tmp_path):
    store = JobStore(tmp_path, max_queued=2, ttl=60)
    try:
        with pytest.raises(ValueError, match="in use"):
            JobStore(tmp_path, max_queued=2, ttl=60)  # one server per state dir
        a = store.submit({"prompt": "a"}, attention="dense", sparsity=None, total=3)
        store.submit({"prompt": "b"}, attention="dense", sparsity=None, total=3)
        from fastwan.serve.store import QueueFull

        with pytest.raises(QueueFull):
            store.submit({"prompt": "c"}, attention="dense", sparsity=None, total=3)
        assert store.cancel(a.id)[0] == "queued"
        assert store.claim("w0").request == {"prompt": "b"}  # a cancelled job never runs
        assert store.claim("w0") is None
        with pytest.raises(ValueError, match="32 lowercase hex"):
            store.video_path("../x")
    finally:
        store.close()


def test_parse_devices_groups_and_errors():
    assert parse_devices("cpu") == [("cpu",)]
    assert parse_devices("cpu,cpu") == [("cpu",), ("cpu",)]
    assert parse_devices("cpu,cpu", 2) == [("cpu", "cpu")]  # one worker of two processes
    assert parse_devices("0,1,2,3", 2, cuda_count=4) == [
        ("cuda:0", "cuda:1"),
        ("cuda:2", "cuda:3"),
    ]
    for spec, per, message in (
        ("0,1,2", 2, "multiple"),
        ("0,0", 1, "twice"),
        ("0,cpu", 1, "do not mix"),
        ("4", 1, "does not exist"),
        ("cpu", 2, "once per process"),
        ("", 1, "--devices"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_devices(spec, per, cuda_count=4)
    # A worker spanning several devices runs without offload / compile (refused before
    # anything loads, with the fix).
    with pytest.raises(ValueError, match="--compile runs on one device per worker"):
        load_generator("toy-student", ("cuda:0", "cuda:1"), compile=True)


def test_image_fields_decode_and_are_refused_clearly():
    img = decode_image(image_b64(20, 10, fmt="JPEG"), "image")
    assert img.mode == "RGB" and img.size == (20, 10)
    data_url = "data:image/png;base64," + image_b64(8, 4)
    assert decode_image(data_url, "image").size == (8, 4)
    truncated = base64.b64encode(base64.b64decode(image_b64())[:200]).decode()
    with pytest.raises(ValueError, match="last_image: the image data is damaged"):
        decode_image(truncated, "last_image")


def test_lora_flag_parsing(tmp_path):
    file = tmp_path / "style.safetensors"
    file.write_bytes(b"")
    assert parse_lora(f"style={file}") == ("style", str(file), 1.0)
    assert parse_lora(f"style={file}:0.5") == ("style", str(file), 0.5)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_lora(f"x={odd}") == ("x", str(odd), 1.0)  # a ':' in the path stays
    for spec, message in (
        ("style", "NAME=PATH"),
        (f"my.style={file}", "no dots"),
        (f"style={file}:20", "SCALE must be in"),
        ("style=/nowhere.safetensors", "does not exist"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_lora(spec)
    rc = cli.main(["serve", "toy-student", "--lora", f"a={file}", "--lora", f"a={file}",
                   "--state-dir", str(tmp_path / "s")])  # fmt: skip
    assert rc == 2


@pytest.fixture(scope="module")
def ti2v_folder(tmp_path_factory):
    """A tiny Wan2.2 TI2V folder whose defaults are tiny too (fastwan.json)."""
    from _tiny_wan import build_tiny_wan

    path = build_tiny_wan(tmp_path_factory.mktemp("ti2v") / "model", variant="wan2.2")
    sampling = dict(height=64, width=96, num_frames=5, text_length=16, num_inference_steps=2)
    (path / "fastwan.json").write_text(json.dumps({"format_version": 1, "sampling": sampling}))
    return path


def test_image_to_video_request(ti2v_folder, tmp_path):
    from fastwan.pipeline import VideoGenerator

    image = image_b64(96, 64, seed=4)
    srv = start_server(tmp_path / "state", model=ti2v_folder)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/health").json()["task"] == "ti2v"
            with_image = submit(c, image=image, seed=2, guidance_scale=1.0)
            text_only = submit(c, seed=2, guidance_scale=1.0)
            bad = c.post("/v1/videos", json={"prompt": "x", "image": image, "height": 64})
            assert bad.status_code == 422, bad.text  # with an image: both sizes or neither
            assert bad.json()["detail"][0]["loc"] == ["body", "image"]
            flf = c.post("/v1/videos", json={"prompt": "x", "image": image, "last_image": image})
            assert flf.status_code == 422 and "first frame only" in flf.text
            done = wait_for(c, with_image)
            assert done["status"] == "succeeded", done
            info = done["request"]["image"]  # the view names the image, not its bytes
            raw = base64.b64decode(image)
            assert info["format"] == "PNG" and (info["width"], info["height"]) == (96, 64)
            assert info["bytes"] == len(raw) and len(info["sha256"]) == 64
            got = decode_mp4(c.get(done["content_url"]).content, tmp_path)
            assert wait_for(c, text_only)["status"] == "succeeded"
            plain = decode_mp4(c.get(f"/v1/videos/{text_only}/content").content, tmp_path)
    finally:
        srv.stop()
    ref = VideoGenerator.from_pretrained(ti2v_folder, device="cpu").generate(
        "a red ball moves right", image=Image.open(io.BytesIO(raw)), seed=2, guidance_scale=1.0
    )
    save_video(ref.video, tmp_path / "ref.mp4", fps=ref.fps)
    want = read_video(tmp_path / "ref.mp4")[0]
    assert got.shape == want.shape == (5, 64, 96, 3)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() < 1.0, diff.mean()  # the same video, up to float and codec rounding
    # the first frame follows the image: text alone gives another video
    assert np.abs(plain.astype(np.int16) - got.astype(np.int16)).mean() > 5 * diff.mean() + 1


def test_model_errors_name_their_field():
    fields = ["prompt", "negative_prompt", "height", "num_inference_steps"]
    assert field_of("height=17 is not a multiple of 4", fields) == "height"
    assert field_of("negative_prompt must be a string", fields) == "negative_prompt"
    assert field_of("the dmd sampler takes timesteps=, not num_inference_steps=", fields) == (
        "num_inference_steps"
    )
    assert field_of("nothing known", fields) is None


def test_stop_while_idle_is_prompt(tmp_path):
    srv = start_server(tmp_path / "idle")
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 10
    assert not any(w.is_alive() for w in srv.runtime.workers)
    with pytest.raises(httpx.ConnectError):  # the port is closed
        httpx.get(f"{srv.url}/health", timeout=5)


def write_toy_lora(path, *, rank: int = 4, seed: int = 0):
    """A diffusers-format LoRA of the toy student's self-attention (q and v projections
    of every block), large enough to change its videos."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((toy_model_path("student") / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(config["num_layers"]):
        for proj in ("to_q", "to_v"):
            key = f"transformer.blocks.{i}.attn1.{proj}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, dim, generator=g) / dim**0.5
            state[f"{key}.lora_B.weight"] = torch.randn(dim, rank, generator=g)
    save_file(state, str(path))
    return path


def test_lora_chosen_by_name(tmp_path):
    from fastwan.pipeline import VideoGenerator

    lora = write_toy_lora(tmp_path / "style.safetensors")
    srv = start_server(tmp_path / "state", loras={"style": (str(lora), 1.0)})
    body = {"prompt": "a red ball moves right", "seed": 5}
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/health").json()["loras"] == ["style"]
            ids = [
                submit(c, **body),
                submit(c, **body, lora="style"),
                submit(c, **body, lora="style", lora_scale=0.0),
                submit(c, **body),  # the adapter off again
            ]
            videos = []
            for job_id in ids:
                job = wait_for(c, job_id)
                assert job["status"] == "succeeded", job
                videos.append(decode_mp4(c.get(job["content_url"]).content, tmp_path))
            assert c.get(f"/v1/videos/{ids[1]}").json()["request"]["lora"] == "style"
            r = c.post("/v1/videos", json={**body, "lora": "other"})
            assert r.status_code == 422 and "it has style" in r.text
    finally:
        srv.stop()
    base, styled, zero, again = (v.astype(np.int16) for v in videos)
    assert np.array_equal(base, zero) and np.array_equal(base, again)  # scale 0: the base
    assert np.abs(styled - base).mean() > 2.0  # the adapter changes the video
    gen = VideoGenerator.from_pretrained(toy_model_path("student"), device="cpu")
    gen.load_lora(lora, adapter_name="style")
    ref = gen.generate(body["prompt"], seed=5)
    save_video(ref.video, tmp_path / "ref.mp4", fps=ref.fps)
    want = read_video(tmp_path / "ref.mp4")[0].astype(np.int16)
    assert np.abs(styled - want).mean() < 0.5  # as the library computes it
