"""The image model in use: request errors, arrays, the predict CLI and the HTTP server (make serve)."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from serving.image_inputs import ROOTS_ENV, chunks
from serving.server import BODY_ENV
from serving.predict import label_from_path
from serving.predict import main as predict_main
from serving.pyfunc_model import ImageEnsembleModel, log_image_model, member_from_checkpoint
from evaluation.calibration import sigmoid
from test_ensemble import demo_images, reference_probs, tiny_member

NAME = "deepfake-detector"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model(tmp_path: Path) -> ImageEnsembleModel:
    return ImageEnsembleModel.from_members([member_from_checkpoint(tiny_member(tmp_path, 0, 32))], device="cpu")


def _b64(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def test_arrays_and_bytes_score_like_files_and_bad_requests_are_400(model: ImageEnsembleModel, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from dataio.loaders import load_rgb

    paths = demo_images(1)
    monkeypatch.setenv(ROOTS_ENV, str(Path(paths[0]).parents[1]))
    by_path = model.predict(None, pd.DataFrame({"path": paths}))
    u8 = np.stack([load_rgb(p, 32) for p in paths])  # same decode as the path route (JPEG draft at 32 px)
    by_array = model.predict(None, u8)
    assert list(by_array.columns) == ["fake_prob"]
    np.testing.assert_allclose(by_array["fake_prob"], by_path["fake_prob"], atol=1e-6)
    by_float = model.predict(None, (u8.transpose(0, 3, 1, 2) / 255.0).astype(np.float32))
    np.testing.assert_allclose(by_float["fake_prob"], by_path["fake_prob"], atol=1e-3)
    by_bytes = model.predict(None, pd.DataFrame({"image": [_b64(p) for p in paths]}))  # no roots needed
    monkeypatch.delenv(ROOTS_ENV)
    assert list(by_bytes.columns) == ["fake_prob"]
    np.testing.assert_allclose(by_bytes["fake_prob"], by_path["fake_prob"], atol=1e-6)
    bad_requests = (pd.DataFrame({"file": paths}), pd.DataFrame({"path": paths, "image": [_b64(paths[0])] * 2}),
                    pd.DataFrame({"image": ["not base64!"]}), pd.DataFrame({"image": [base64.b64encode(b"text").decode()]}),
                    np.full((1, 3, 8, 8), 2.0, np.float32), np.zeros((2, 8), np.uint8))
    for bad in bad_requests:
        with pytest.raises(MlflowException) as exc:
            model.predict(None, bad)
        assert exc.value.get_http_status_code() == 400 and "\n" not in exc.value.message


def test_members_score_paths_in_a_retained_heap_given_back_after_the_request(
        model: ImageEnsembleModel, monkeypatch: pytest.MonkeyPatch, heap_depth) -> None:
    """Each batch's activations reuse heap pages (dataio.loaders.retained_heap: no fresh page faults per batch);
    glibc's defaults are back once the request is scored."""
    scored_in_heap: list[bool] = []
    member = model.members[0]

    def recorded_logits_of(x, real=member.logits_of):
        scored_in_heap.append(heap_depth() > 0)
        return real(x)

    monkeypatch.setattr(member, "logits_of", recorded_logits_of)
    paths = demo_images(3)
    monkeypatch.setenv(ROOTS_ENV, str(Path(paths[0]).parents[1]))
    out = model.predict(None, pd.DataFrame({"path": paths}), params={"batch_size": 2})
    assert len(out) == 6 and scored_in_heap == [True] * 3 and heap_depth() == 0


def test_paths_only_under_the_data_roots_with_one_answer_for_every_refusal(
        model: ImageEnsembleModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client cannot read server files outside DFSWEEP_DATA_ROOTS, nor learn whether a file exists."""
    root, outside = tmp_path / "served", tmp_path / "private"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    image = demo_images(1)[0]
    shutil.copy(image, root / "sub" / "ok.jpg")
    shutil.copy(image, outside / "secret.jpg")
    (root / "link.jpg").symlink_to(outside / "secret.jpg")  # inside by name, outside once resolved
    (root / "inner.jpg").symlink_to(root / "sub" / "ok.jpg")  # resolves inside: allowed
    (root / "notes.jpg").write_text("not an image")
    (root / "dir.jpg").mkdir()
    monkeypatch.setenv(ROOTS_ENV, os.pathsep.join(["", str(tmp_path / "elsewhere"), str(root)]))
    ok = model.predict(None, pd.DataFrame({"path": [str(root / "sub" / "ok.jpg"), str(root / "inner.jpg")]}))
    assert ok["fake_prob"].nunique() == 1
    refused = [outside / "secret.jpg", root / "link.jpg", root / "sub" / ".." / ".." / "private" / "secret.jpg",
               root / "missing.jpg", outside / "missing.jpg", root / "notes.jpg", root / "dir.jpg", "/etc/passwd",
               "relative.jpg"]
    answers = set()
    for path in map(str, refused):
        with pytest.raises(MlflowException) as exc:
            model.predict(None, pd.DataFrame({"path": [str(root / "sub" / "ok.jpg"), path]}))
        assert exc.value.get_http_status_code() == 400
        answers.add(exc.value.message.replace(repr(path), "<path>"))
    assert len(answers) == 1, answers  # the same words whether the file exists, is outside, or is not an image
    assert "DFSWEEP_DATA_ROOTS" in answers.pop()
    monkeypatch.delenv(ROOTS_ENV)  # no roots configured: no path at all
    with pytest.raises(MlflowException, match="allowed data roots"):
        model.predict(None, pd.DataFrame({"path": [str(root / "sub" / "ok.jpg")]}))


def test_request_size_limits(model: ImageEnsembleModel, monkeypatch: pytest.MonkeyPatch) -> None:
    image = demo_images(1)[0]
    monkeypatch.setenv("DFSWEEP_MAX_REQUEST_ROWS", "3")
    with pytest.raises(MlflowException, match="4 images; the limit is 3") as exc:
        model.predict(None, pd.DataFrame({"image": [_b64(image)] * 4}))
    assert exc.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="limit is 3"):
        model.predict(None, np.zeros((4, 8, 8, 3), np.uint8))
    assert len(model.predict(None, pd.DataFrame({"image": [_b64(image)] * 3}))) == 3
    size_mb = Path(image).stat().st_size / 2**20
    monkeypatch.setenv("DFSWEEP_MAX_REQUEST_MB", f"{size_mb * 1.5:.6f}")
    with pytest.raises(MlflowException, match="MB of image data"):
        model.predict(None, pd.DataFrame({"image": [_b64(image)] * 2}))
    monkeypatch.setenv(ROOTS_ENV, str(Path(image).parent))
    with pytest.raises(MlflowException, match="MB of image data"):
        model.predict(None, pd.DataFrame({"path": [image, image]}))
    assert len(model.predict(None, pd.DataFrame({"path": [image]}))) == 1
    assert [len(c) for c in chunks([image] * 5)] == [1] * 5  # clients split to fit
    monkeypatch.setenv("DFSWEEP_MAX_REQUEST_MB", "64")
    assert [len(c) for c in chunks([image] * 7)] == [3, 3, 1]


def test_decoding_workers_and_channels_last_keep_the_serial_scores(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Files decoded in worker threads, members in channels_last: the scores of a serial decode and a
    contiguous forward within 1e-5, in input order, over several batches; a bad file still names itself."""
    monkeypatch.setenv(ROOTS_ENV, os.pathsep.join([str(Path(demo_images(1)[0]).parents[2]), str(tmp_path)]))
    ckpts = [tiny_member(tmp_path, 0, 32), tiny_member(tmp_path, 1, 40)]  # two preprocessings
    model = ImageEnsembleModel.from_members([member_from_checkpoint(c) for c in ckpts], [0.5, 0.5], device="cpu")
    assert all(m.channels_last for m in model.members)
    paths = demo_images(4)[::-1]
    out = model.predict(None, pd.DataFrame({"path": paths}), params={"batch_size": 3, "num_workers": 2})
    assert list(out["path"]) == paths
    expected = np.mean([sigmoid(reference_probs(c, paths)) for c in ckpts], axis=0)
    np.testing.assert_allclose(out["fake_prob"].to_numpy(), expected, rtol=0, atol=1e-5)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(MlflowException, match="not a readable image") as exc:
        model.predict(None, pd.DataFrame({"path": paths + [str(bad)]}), params={"batch_size": 3, "num_workers": 2})
    assert str(bad) in str(exc.value) and exc.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="row 1 is not a readable image") as exc:  # bytes, decoded in threads
        model.predict(None, pd.DataFrame({"image": [_b64(paths[0]), _b64(bad)]}), params={"num_workers": 2})
    assert exc.value.get_http_status_code() == 400


def test_label_from_path() -> None:
    assert label_from_path("/d/fake/faceswap/x.jpg") == 1
    assert label_from_path("/d/0_real/x.png") == 0
    assert label_from_path("/d/unknown/x.png") is None


def test_predict_cli_writes_predictions_and_metrics(tmp_path: Path) -> None:
    ckpt = tiny_member(tmp_path, 0, 32)
    listing = tmp_path / "list.txt"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")  # zero bytes: skipped with a warning, not a crash
    listing.write_text("\n".join(demo_images(3) + [str(empty)]))
    out = tmp_path / "out" / "preds.csv"
    assert predict_main(["--checkpoint", str(ckpt), "--input", str(listing), "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == ["path", "fake_prob", "prediction", "label"] and len(df) == 6
    assert df["fake_prob"].between(0, 1).all() and set(df["label"]) == {0, 1}
    metrics = json.loads((out.parent / "metrics.json").read_text())
    assert {"auc", "accuracy", "ece", "auc_ci_low", "auc_ci_high"} <= set(metrics)
    assert predict_main(["--checkpoint", str(ckpt), "--input", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_served_champion_answers_an_image_with_a_score(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve", artifact_location=(tmp_path / "a").as_uri()))
    image = demo_images(1)[0]
    with mlflow.start_run():
        info = log_image_model([member_from_checkpoint(tiny_member(tmp_path, 0, 32))], example_path=image)
    mv = mlflow.register_model(info.model_uri, NAME)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", mv.version)

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, ROOTS_ENV: str(Path(image).parent), BODY_ENV: "0.25"}
    log_file = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "-m", f"models:/{NAME}@champion",  # make serve
                             "-h", "127.0.0.1", "-p", str(port)], cwd=REPO_ROOT,
                            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not answer /ping within 180 s:\n" + (tmp_path / "serve.log").read_text()[-2000:])
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["path"], "data": [[image]]}})
        assert status == 200, body
        (row,) = body["predictions"]
        assert row["path"] == image and 0.0 <= row["fake_prob"] <= 1.0
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[_b64(image)]]}})
        assert status == 200 and body["predictions"][0]["fake_prob"] == pytest.approx(row["fake_prob"], abs=1e-6)
        answers = set()
        for refused in (str(tmp_path / "no-such-image.jpg"), str(tmp_path / "serve.log"), "/etc/hostname"):
            status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["path"], "data": [[refused]]}})
            assert status == 400 and refused in body["message"]
            answers.add(body["message"].split("Error: ")[-1].replace(repr(refused), "<path>"))  # after MLflow's echo
        assert len(answers) == 1, answers
        # a body over DFSWEEP_MAX_BODY_MB (0.25 MB here) is refused before MLflow reads or parses it
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [["A" * 400_000]]}})
        assert status == 413 and "too large" in body["message"], body
        with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:  # and the server goes on
            assert r.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: pid == pgid, uvicorn workers included
        deadline = time.time() + 30
        while _group_alive(proc.pid) and time.time() < deadline:
            proc.poll()
            time.sleep(0.2)
        alive = _group_alive(proc.pid)
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log_file.close()
    assert not alive, "server processes left after SIGTERM to the group"
