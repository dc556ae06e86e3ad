"""Encoders: registry, exact architectures (on `meta`), preprocessing, embedding, weights, CLI.

Real Virchow weights are gated and never downloaded here: full-size models are only built on the
`meta` device; everything that runs uses the registered tiny variants (width 48, depth 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import save_file
from timm.layers import GluMlp

from napari_virchow.cli import main
from napari_virchow.errors import WeightsError
from napari_virchow.models import encoder as encoders
from napari_virchow.models import weights as _weights
from napari_virchow.models.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    build_model,
    get_spec,
    list_encoders,
    load_encoder,
    preprocess,
    resolve_device,
    resolve_dtype,
)

RNG = np.random.default_rng(0)
TILES = RNG.integers(0, 256, size=(4, 224, 224, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _hf_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty, offline Hugging Face home; any download attempt fails the test."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args: object, **kwargs: object) -> str:
        pytest.fail(f"tests must not download ({args})")

    monkeypatch.setattr(_weights, "hf_hub_download", no_download)
    return tmp_path / "hf" / "hub"


def _random(name: str, **kw: object) -> Encoder:
    with pytest.warns(UserWarning, match="NOT those of the real model"):
        return load_encoder(name, "random", device="cpu", dtype="fp32", **kw)


def _open_gates(enc: Encoder) -> Encoder:
    # Layer-scale gammas start at 1e-5: the blocks would barely change the tokens and every
    # comparison would pass trivially. At 1 the blocks matter.
    for block in enc.model.blocks:
        block.ls1.gamma.data.fill_(1.0)
        block.ls2.gamma.data.fill_(1.0)
    return enc


@pytest.fixture(scope="module")
def tiny2() -> Encoder:
    return _open_gates(_random("virchow2-tiny"))


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- registry and architectures ------------------------------------------------------------------


def test_registry_lists_virchow_and_tiny_variants() -> None:
    assert {"virchow", "virchow2", "virchow-tiny", "virchow2-tiny"} <= set(list_encoders())
    assert get_spec("virchow2-tiny").dim == 96


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(WeightsError, match="virchow2"):
        get_spec("virchow3")
    with pytest.raises(WeightsError, match="vit_small_patch16_224"):
        get_spec("timm:vit_smal_patch16_224")


def test_names_are_case_insensitive_and_accept_hf_ids() -> None:
    assert get_spec("Virchow2").name == "virchow2"
    assert get_spec("hf-hub:paige-ai/Virchow2").name == "virchow2"


@pytest.mark.parametrize(("name", "n_params", "n_prefix"), [("virchow2", 631_239_424, 5), ("virchow", 631_229_184, 1)])
def test_full_size_architecture_on_meta(name: str, n_params: int, n_prefix: int) -> None:
    with torch.device("meta"):
        model = build_model(name)
        tokens = model.forward_features(torch.empty(2, 3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == n_params  # GELU MLP would be 771 M
    assert model.num_prefix_tokens == n_prefix
    assert model.embed_dim == 1280
    assert tuple(model.patch_embed.grid_size) == (16, 16)
    assert isinstance(model.blocks[0].mlp, GluMlp)
    assert isinstance(model.blocks[0].mlp.act, torch.nn.SiLU)
    assert tokens.shape == (2, n_prefix + 256, 1280)
    assert get_spec(name).dim == 2560
    assert get_spec(name).num_prefix_tokens == n_prefix


@pytest.mark.parametrize("name", ["virchow", "virchow2"])
def test_virchow_preprocessing_is_set_explicitly(name: str) -> None:
    spec = get_spec(name)  # timm's defaults for ViT-H would be mean/std 0.5
    assert (spec.input_size, spec.mpp, spec.interpolation) == (224, 0.5, "bicubic")
    assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert spec.hf_repo == {"virchow": "paige-ai/Virchow", "virchow2": "paige-ai/Virchow2"}[name]


def test_timm_spec_uses_the_architecture_pretrained_config() -> None:
    spec = get_spec("timm:vit_small_patch16_224")
    assert (spec.dim, spec.pooling, spec.mpp, spec.input_size) == (384, "pooled", 0.5, 224)
    assert spec.mean == (0.5, 0.5, 0.5)
    assert spec.hf_repo and spec.hf_repo.startswith("timm/")


def test_spec_is_plain_data() -> None:
    spec = get_spec("virchow2")
    text = json.dumps(spec.summary())
    assert '"SwiGLUPacked"' in text and '"silu"' in text
    assert pickle.loads(pickle.dumps(spec)) == spec  # e.g. sent to dask workers
    assert hash(spec) == hash(get_spec("virchow2"))


# --- preprocessing ---------------------------------------------------------------------------


def test_preprocess_matches_numpy() -> None:
    spec = get_spec("virchow2")
    expected = (TILES / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    x = preprocess(TILES, spec)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 224, 224)
    np.testing.assert_allclose(x.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-5)


def test_preprocess_resizes_other_sizes() -> None:
    spec = get_spec("virchow2")
    flat = np.full((2, 256, 300, 3), 200, dtype=np.uint8)
    x = preprocess(flat, spec)
    assert x.shape == (2, 3, 224, 224)
    expected = (200 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.mean(dim=(2, 3))[0].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(x.std(dim=(2, 3)).numpy(), 0.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(256, 300), (300, 256), (448, 448), (160, 200)])
def test_preprocess_resizes_like_timms_transform_on_pil(sample_svs: Path, shape: tuple[int, int]) -> None:
    # Virchow's transforms: Resize(shorter side, PIL bicubic) then CenterCrop, in uint8
    from PIL import Image

    from napari_virchow.slides.slide import Slide

    h, w = shape
    with Slide(sample_svs) as slide:
        region = slide.read_region((600, 900), 0, (1024, 1024))  # tissue: sharp edges
    tiles = np.stack([region[:h, :w], region[300 : 300 + h, 500 : 500 + w]])
    scale = 224 / min(h, w)
    nh, nw = max(224, round(h * scale)), max(224, round(w * scale))
    top, left = (nh - 224) // 2, (nw - 224) // 2
    pil = [np.asarray(Image.fromarray(t).resize((nw, nh), Image.Resampling.BICUBIC)) for t in tiles]
    expected = np.stack([p[top : top + 224, left : left + 224] for p in pil]).astype(np.float64)
    got = preprocess(tiles, get_spec("virchow2")).numpy().transpose(0, 2, 3, 1)
    grey = (got * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255  # back to grey levels
    diff = np.abs(grey - expected)
    assert diff.max() < 1.01 and diff.mean() < 0.01  # rounding only (one pass in floats was 5-13 off)


# --- embedding ------------------------------------------------------------------------------------


def test_embedding_is_cls_plus_mean_of_patch_tokens(tiny2: Encoder) -> None:
    x = preprocess(TILES[:2], tiny2.spec)
    with torch.inference_mode():
        tokens = tiny2.model.forward_features(x)
    assert tokens.shape == (2, 1 + 4 + 256, 48)
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], 1).numpy()
    got = tiny2.embed(TILES[:2])
    assert got.shape == (2, 96) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1).numpy()
    assert not np.allclose(got, with_registers, rtol=1e-3, atol=1e-4)


def test_virchow_v1_layout_has_no_registers() -> None:
    enc = _open_gates(_random("virchow-tiny"))
    x = preprocess(TILES[:1], enc.spec)
    with torch.inference_mode():
        tokens = enc.model.forward_features(x)
    assert tokens.shape == (1, 1 + 256, 48)
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1).numpy()
    np.testing.assert_allclose(enc.embed(TILES[:1]), expected, rtol=1e-5, atol=1e-6)


def test_embedding_is_deterministic_and_batch_invariant(tiny2: Encoder) -> None:
    batch = tiny2.embed(TILES)
    np.testing.assert_array_equal(batch, tiny2.embed(TILES))
    one_by_one = np.concatenate([tiny2.embed(TILES[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(batch, one_by_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tiny2.embed(TILES, batch_size=3), batch, rtol=1e-5, atol=1e-5)


def test_bf16_agrees_with_fp32(tiny2: Encoder) -> None:
    fp32 = tiny2.embed(TILES)
    bf16 = tiny2.with_dtype("bf16")
    assert bf16.dtype == torch.bfloat16
    # weights cast once on a CPU with native bf16 (a copy), else the fp32 model under autocast
    assert (bf16.model is tiny2.model) is (not encoders.cpu_has_native_bf16())
    low = bf16.embed(TILES)
    assert low.dtype == np.float32 and not np.array_equal(low, fp32)  # bf16 did something
    cos = (low * fp32).sum(1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(fp32, axis=1))
    assert cos.min() >= 0.999


def test_empty_batch_gives_empty_embeddings(tiny2: Encoder) -> None:
    out = tiny2.embed(np.zeros((0, 224, 224, 3), np.uint8))
    assert out.shape == (0, 96) and out.dtype == np.float32


@pytest.mark.parametrize(
    ("tiles", "error", "match"),
    [
        (TILES.astype(np.float32), TypeError, "uint8"),
        (TILES[..., 0], ValueError, r"\(N, H, W, 3\)"),
        (np.zeros((2, 224, 224, 4), np.uint8), ValueError, "RGBA"),
        (TILES[0], ValueError, "batch axis"),
    ],
)
def test_bad_tiles_give_clear_errors(tiny2: Encoder, tiles: np.ndarray, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        tiny2.embed(tiles)


def test_generic_timm_model_embeds() -> None:
    enc = _random("timm:vit_tiny_patch16_224")
    out = enc.embed(TILES[:2])
    assert out.shape == (2, 192) == (2, enc.dim) and np.isfinite(out).all()


# --- device and precision ------------------------------------------------------------------------


def test_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) is None
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("fp16", cpu) is torch.float16
    auto = torch.bfloat16 if encoders.cpu_has_native_bf16() else None
    assert resolve_dtype("auto", cpu) is auto
    with pytest.raises(WeightsError, match="dtype"):
        resolve_dtype("int8", cpu)


def test_device_resolution() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(WeightsError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(WeightsError, match="unknown device"):
        resolve_device("gpu please")
    assert resolve_device("cpu") == torch.device("cpu")


# --- weights --------------------------------------------------------------------------------------


def test_random_weights_are_seeded_loud_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = _random("virchow2-tiny")
    assert torch.equal(torch.rand(3), expected_next)
    b = _random("virchow2-tiny")
    assert _state_equal(a.model, b.model)
    assert a.weights_id == b.weights_id and a.weights_id.startswith("random-seed")
    assert a.weights_id != _random("virchow-tiny").weights_id


def test_safetensors_roundtrip_is_bit_exact(tiny2: Encoder, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(tiny2.model.state_dict(), str(path))
    enc = load_encoder("virchow2-tiny", path, device="cpu", dtype="fp32")
    assert _state_equal(enc.model, tiny2.model)
    np.testing.assert_array_equal(enc.embed(TILES[:2]), tiny2.embed(TILES[:2]))
    assert len(enc.weights_id) == 16 and int(enc.weights_id, 16) >= 0
    assert enc.weights_source == str(path)
    other = tmp_path / "other.safetensors"
    save_file({k: v + 1 for k, v in tiny2.model.state_dict().items()}, str(other))
    assert load_encoder("virchow2-tiny", other, device="cpu").weights_id != enc.weights_id


def test_pth_with_prefix_and_nesting_roundtrip(tiny2: Encoder, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    sd = {f"module.{k}": v for k, v in tiny2.model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3}, path)
    enc = load_encoder("virchow2-tiny", path, device="cpu", dtype="fp32")
    assert _state_equal(enc.model, tiny2.model)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        # Unpickling this calls open(marker, "w"): code run by the loader, creating the marker.
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        torch.save({"weight": torch.zeros(2), "x": _Payload(marker)}, fh)
    assert not marker.exists()
    with pytest.raises(WeightsError, match="refused"):
        load_encoder("virchow2-tiny", path, device="cpu")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker))).close()  # the payload is real: pickle runs it
    assert marker.exists()


def test_truncated_safetensors_names_the_file(tiny2: Encoder, tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file(tiny2.model.state_dict(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cut.safetensors.*truncated"):
        load_encoder("virchow2-tiny", path, device="cpu")


@pytest.mark.parametrize(
    ("source", "target", "match"),
    [
        ("virchow-tiny", "virchow2-tiny", "reg_token.*'virchow'"),
        ("virchow2-tiny", "virchow-tiny", "'virchow2'"),
    ],
)
def test_weights_of_the_other_model_are_refused(source: str, target: str, match: str, tmp_path: Path) -> None:
    path = tmp_path / f"{source}.safetensors"
    save_file(_random(source).model.state_dict(), str(path))
    with pytest.raises(WeightsError, match=match):
        load_encoder(target, path, device="cpu")


def test_shape_mismatch_is_listed(tiny2: Encoder, tmp_path: Path) -> None:
    sd = dict(tiny2.model.state_dict())
    sd["norm.weight"] = torch.zeros(5)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"norm\.weight \(5,\) != \(48,\)"):
        load_encoder("virchow2-tiny", path, device="cpu")


@pytest.mark.parametrize(
    ("weights", "match"),
    [("nowhere.safetensors", "not found"), ("w.npz", "unsupported"), (None, "no published")],
)
def test_missing_or_unsupported_weights(weights: str | None, match: str, tmp_path: Path) -> None:
    if weights == "w.npz":
        (tmp_path / weights).write_bytes(b"x")
    arg = None if weights is None else tmp_path / weights
    with pytest.raises(WeightsError, match=match):
        load_encoder("virchow2-tiny", arg, device="cpu")


def _fake_hf_cache(hub: Path, repo: str, state: dict[str, torch.Tensor], rev: str) -> Path:
    root = hub / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    save_file(state, str(snap / "model.safetensors"))
    return snap / "model.safetensors"


def test_weights_come_from_the_hf_cache(tiny2: Encoder, _hf_sandbox: Path) -> None:
    rev = "0123456789abcdef0123456789abcdef01234567"
    _fake_hf_cache(_hf_sandbox, "paige-ai/Virchow2", tiny2.model.state_dict(), rev)
    spec = dataclasses.replace(get_spec("virchow2-tiny"), hf_repo="paige-ai/Virchow2")
    assert encoders.weights_status(spec)["found"]
    enc = load_encoder(spec, device="cpu", dtype="fp32")
    assert enc.weights_source == "hf-cache:paige-ai/Virchow2@0123456789ab"
    assert _state_equal(enc.model, tiny2.model)


def test_offline_and_not_cached_names_the_fix() -> None:
    with pytest.raises(WeightsError) as info:
        load_encoder("virchow2", device="cpu")
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and "https://huggingface.co/paige-ai/Virchow2" in msg
    assert "hf auth login" in msg and "weights=PATH" in msg


_RESPONSE = SimpleNamespace(headers={}, request=None)


@pytest.mark.parametrize(
    ("exc", "match"),
    [
        (GatedRepoError("restricted", response=_RESPONSE), "gated.*accept the licence"),
        (RepositoryNotFoundError("404", response=_RESPONSE), "not found"),
        (LocalEntryNotFoundError("connection error"), "cannot reach"),
    ],
)
def test_hub_errors_become_clear_weights_errors(exc: Exception, match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def fake_download(*args: object, **kwargs: object) -> str:
        raise exc

    monkeypatch.setattr(_weights, "hf_hub_download", fake_download)
    with pytest.raises(WeightsError, match=match):
        load_encoder("virchow2", device="cpu")


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_encoders_json(tiny2: Encoder, _hf_sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_hf_cache(_hf_sandbox, "paige-ai/Virchow2", tiny2.model.state_dict(), "abc")
    assert main(["encoders", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["encoders"]}
    assert rows["virchow2"]["dim"] == 2560 and rows["virchow2"]["mpp"] == 0.5
    assert rows["virchow2"]["weights"]["found"] and not rows["virchow"]["weights"]["found"]
    assert report["runtime"]["device"] == str(resolve_device("auto"))


def test_cli_encoders_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders", "timm:vit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "timm:vit_tiny_patch16_224" in out and "192" in out and "device:" in out


def test_cli_encoders_says_how_the_loaded_encoder_runs(capsys: pytest.CaptureFixture[str]) -> None:
    # the precision line must describe what load_encoder does here: weights cast once, or autocast
    assert main(["encoders", "--json", "virchow2-tiny"]) == 0
    said = json.loads(capsys.readouterr().out)["runtime"]["precision"]
    assert main(["encoders", "virchow2-tiny"]) == 0
    assert f"precision: {said}" in capsys.readouterr().out
    enc = load_encoder("virchow2-tiny", "random", device="auto", dtype="auto")
    if enc.dtype is None:
        assert said == "float32"
    elif enc.autocast:
        assert said.endswith(" autocast") and said.startswith(str(enc.dtype).removeprefix("torch."))
    else:  # weights cast to the compute dtype at load
        assert said == f"{str(enc.dtype).removeprefix('torch.')} weights (cast once)"
        assert next(enc.model.parameters()).dtype == enc.dtype


def test_cli_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders", "virchow3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-virchow: error: unknown encoder 'virchow3'")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_runs_as_module() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-m", "napari_virchow.cli", "--version"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0 and "napari-virchow" in done.stdout
