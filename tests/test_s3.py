"""Object storage: the pipeline reads its dataset and models from S3 and writes every output there.

The S3 server is moto's, started by the test on a free loopback port; everything talks to it through the
real clients (pyarrow's S3 filesystem in the driver and the Ray workers, boto3 in the checks), configured
only by the standard AWS_* environment variables, as on a cluster.
"""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from engine import schema, storage

BUCKET = "synthray-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the AWS_* variables that point every client at it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield {"client": client, "env": env}
    server.stop()


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def upload(local_dir, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_storage_helpers_on_s3(s3, tmp_path):
    root = f"s3://{BUCKET}/helpers"
    storage.make_dirs(storage.join(root, "data"))  # a no-op on object stores, and no error
    storage.write_text(storage.join(root, "data", "b.txt"), "bee")
    storage.write_bytes(storage.join(root, "data", "a.parquet"), b"PAR1")
    storage.write_text(storage.join(root, "model", "sub", "weights.bin"), "w")
    assert keys(s3["client"], "helpers/") == [
        "helpers/data/a.parquet",
        "helpers/data/b.txt",
        "helpers/model/sub/weights.bin",
    ]
    assert storage.read_text(f"{root}/data/b.txt") == "bee"
    assert storage.list_files(storage.join(root, "data"), ".parquet") == [f"{root}/data/a.parquet"]
    assert storage.exists(f"{root}/data/b.txt") and not storage.exists(f"{root}/nothing")
    assert storage.parent(f"{root}/data") == root

    # A model directory on S3 is fetched once into the node's cache, then reused.
    local = storage.fetch(f"{root}/model", cache_dir=tmp_path)
    assert (local / "sub" / "weights.bin").read_text() == "w"
    storage.write_text(storage.join(root, "model", "sub", "weights.bin"), "changed")
    assert storage.fetch(f"{root}/model", cache_dir=tmp_path) == local
    assert (local / "sub" / "weights.bin").read_text() == "w"
    with pytest.raises(FileNotFoundError):
        storage.fetch(f"{root}/missing", cache_dir=tmp_path)

    storage.delete_dir(storage.join(root, "data"))
    assert keys(s3["client"], "helpers/data/") == []


@pytest.mark.slow
def test_generate_from_s3_to_s3(s3, tiny_models_dir, tmp_path, monkeypatch):
    import ray

    from engine.config import GenerateConfig, load_config
    from engine.pipeline import run_generate
    from engine.tiny.toy_dataset import make_toy_dataset
    from tests.conftest import ROOT

    # 1. The dataset and the tiny models go to the bucket; nothing local is named in the config.
    toy = tmp_path / "toy"
    make_toy_dataset(toy, num_classes=2, train_per_class=2, val_per_class=1, test_per_class=1, size=32)
    upload(toy, f"s3://{BUCKET}/datasets/toy")
    for name in ("grounding-dino", "sam", "llm", "sdxl"):
        upload(tiny_models_dir / name, f"s3://{BUCKET}/models/{name}")
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("SYNTHRAY_MODEL_CACHE", str(cache))
    out = f"s3://{BUCKET}/runs/aga"
    config = load_config(
        GenerateConfig,
        ROOT / "configs" / "aga_tiny_cpu.yaml",
        [
            f"data.path=s3://{BUCKET}/datasets/toy",
            f"data.masks_path=s3://{BUCKET}/datasets/toy/masks",
            f"output.path={out}",
            f"segment.detector.id=s3://{BUCKET}/models/grounding-dino",
            f"segment.sam.id=s3://{BUCKET}/models/sam",
            f"prompt.model.id=s3://{BUCKET}/models/llm",
            f"background.model.id=s3://{BUCKET}/models/sdxl",
            "background.height=32",
            "background.width=32",
            "background.num_inference_steps=2",
            "output.gallery_classes=2",
            "ray.progress_bars=false",
        ],
    )

    # 2. Run on a local Ray whose workers see the same AWS_* variables (as a cluster's pods would).
    ray.shutdown()
    env = {**s3["env"], "SYNTHRAY_MODEL_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        report = run_generate(config)
    finally:
        ray.shutdown()

    # 3. Every output is in the bucket, read back through boto3 and pyarrow.
    written = keys(s3["client"], "runs/aga/")
    for name in ("run.json", "errors.parquet", "config.yaml", "manifest.json", "gallery/index.html"):
        assert f"runs/aga/{name}" in written, written
    shards = [k for k in written if k.startswith("runs/aga/data/") and k.endswith(".parquet")]
    assert shards and not [k for k in written if "/.tmp-" in k]
    run = json.loads(s3["client"].get_object(Bucket=BUCKET, Key="runs/aga/run.json")["Body"].read())
    assert run == json.loads(json.dumps(report.data))
    assert run["output"]["data"] == f"{out}/data"

    fs, path = storage.filesystem(f"{out}/data")
    table = pq.read_table(path, filesystem=fs)
    rows = table.to_pylist()
    real = [r for r in rows if r[schema.RECIPE] == "real"]
    synthetic = [r for r in rows if r[schema.RECIPE] == "aga"]
    assert len(real) == 2 * (2 + 1 + 1) == run["rows"]["real_written"]
    assert len(synthetic) == 2 * 2 * 2 == run["rows"]["synthetic_written"]
    assert run["errors"]["total"] == 0
    assert json.loads(synthetic[0][schema.MODELS])["background"].startswith(f"s3://{BUCKET}/models/sdxl")
    errors = pq.read_table(
        io.BytesIO(s3["client"].get_object(Bucket=BUCKET, Key="runs/aga/errors.parquet")["Body"].read())
    )
    assert errors.num_rows == 0 and errors.schema.equals(schema.ERRORS_SCHEMA)

    # 4. The models came from the bucket: each actor's node fetched them into the model cache.
    fetched = {p.name for p in cache.glob("*/*")}
    assert {"llm", "sdxl"} <= fetched, fetched


def test_hf_parquet_with_relative_image_paths_on_s3(s3, tmp_path, monkeypatch):
    """A `datasets` Parquet whose images are relative paths (bytes None), uploaded as a whole: the paths are
    read against the dataset root in the bucket, through the storage layer."""
    import datasets
    import numpy as np
    from PIL import Image

    from engine.config import DataConfig
    from engine.readers import dataset_root, inspect_source, parquet_pieces, read_parquet_rows

    local = tmp_path / "hf"
    (local / "images").mkdir(parents=True)
    paths = []
    for i in range(3):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(local / "images" / f"{i}.png")
        paths.append(f"images/{i}.png")
    monkeypatch.chdir(local)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": paths, "label": [0, 1, 0]}, features=features)
    ds.to_parquet(local / "data" / "train-00000-of-00001.parquet")
    root = f"s3://{BUCKET}/hf"
    upload(local, root)
    expected = [(local / p).read_bytes() for p in paths]
    monkeypatch.chdir(tmp_path)  # only the bucket holds the images now
    for p in paths:
        (local / p).unlink()

    data = DataConfig(format="parquet", path=root)
    info = inspect_source(data)
    assert info.class_names == ["a", "b"] and info.counts == {"train": 3}
    piece = {k: np.array([v], dtype=object) for k, v in parquet_pieces(info).to_pylist()[0].items()}
    (block,) = read_parquet_rows(piece, "image", dataset_root(root), 16, info.class_names)
    assert list(block[schema.SOURCE_ID]) == paths
    assert [bytes(b) for b in block[schema.IMAGE_BYTES]] == expected


def test_storage_helpers_on_local_paths_and_fsspec(tmp_path):
    # Local: relative paths become absolute (Ray workers do not share the driver's working directory).
    assert storage.resolve("out") == str(Path.cwd() / "out")
    storage.write_text(tmp_path / "run" / "data" / "a.parquet", "x")  # parents are created
    assert storage.list_files(tmp_path / "run" / "data", ".parquet") == [
        str(tmp_path / "run" / "data" / "a.parquet")
    ]
    assert storage.parent(tmp_path / "run" / "data") == str(tmp_path / "run")
    assert storage.fetch(str(tmp_path / "run")) == tmp_path / "run"  # local models are used in place
    storage.delete_dir(tmp_path / "run")
    assert not (tmp_path / "run").exists()

    # A scheme pyarrow lacks goes through fsspec (here its in-memory filesystem).
    root = "memory://synthray-test/run"
    storage.write_text(storage.join(root, "data", "a.parquet"), "x")
    assert isinstance(storage.filesystem(root)[0], pafs.PyFileSystem)
    assert storage.list_files(storage.join(root, "data"), ".parquet") == [f"{root}/data/a.parquet"]
    assert storage.read_text(f"{root}/data/a.parquet") == "x"
