"""qft.models: registry, creation, checkpoint layouts, detection, errors, CLI.

Every architecture is built once at a tiny (N, M). Every layout people have is checked for
every architecture through ``state_dict_of`` and end to end through a file for one; every
architecture is loaded from a file with and without ``--arch`` and must reproduce the
original's outputs exactly.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import io
import json
import os
import re

import pytest
import torch

from test_dcae_cca import TINY as TINY_SLICE_MODELS  # sibling test modules: one tiny size per family
from test_mlicpp import TINY as TINY_MLICPP
from test_tcm import TINY as TINY_TCM

from qft.cli import main
from qft.errors import UserError
from qft.models import (
    ARCHITECTURES,
    DERIVED_BUFFERS,
    Architecture,
    LoadedCheckpoint,
    create_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    state_dict_of,
)

#: tiny parameters per architecture
TINY = {
    "bmshj2018-hyperprior": {"N": 8, "M": 12},
    "mbt2018-mean": {"N": 8, "M": 12},
    "mbt2018": {"N": 8, "M": 16},
    "cheng2020-anchor": {"N": 8},
    "cheng2020-attn": {"N": 8},
    "elic2022-official": {"N": 8, "M": 16, "groups": [4, 4, 8]},
    "elic2022-chandelier": {"N": 8, "M": 16, "groups": [2, 6, 8]},
    "tcm": TINY_TCM,
    **TINY_SLICE_MODELS,
    "mlicpp": TINY_MLICPP,
}

ENTROPY = {
    "bmshj2018-hyperprior": "scale-hyperprior",
    "mbt2018-mean": "mean-scale-hyperprior",
    "mbt2018": "autoregressive",
    "cheng2020-anchor": "autoregressive",
    "cheng2020-attn": "autoregressive",
    "elic2022-official": "channel-checkerboard",
    "elic2022-chandelier": "channel-checkerboard",
    "tcm": "channel-conditional",
    "dcae": "channel-conditional",
    "cca": "channel-conditional",
    "mlicpp": "channel-checkerboard",
}


class Payload:
    """A custom class: pickled instances are refused by weights-only loading."""


class Command:
    """Unpickling it would run a shell command (``os.system``)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


@pytest.fixture(scope="module")
def models():
    return {arch: create_model(arch, seed=1, **params) for arch, params in TINY.items()}


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def outputs(model, x):
    out = model(x)
    return [out["x_hat"], *out["likelihoods"].values()]


@pytest.fixture(scope="module")
def reference(models, image):
    """The original models' outputs on ``image``, computed once."""
    return {arch: outputs(model, image) for arch, model in models.items()}


def assert_outputs(model, expected, x):
    for u, v in zip(outputs(model, x), expected, strict=True):
        assert torch.equal(u, v)


def assert_same_outputs(a, b, x):
    assert_outputs(a, outputs(b, x), x)


_LEGACY_NAMES = {"matrices": "_matrix", "biases": "_bias", "factors": "_factor"}


def legacy_eb(sd):
    """CompressAI < 1.2.7 EntropyBottleneck names: matrices.0 -> _matrix0."""
    return {
        re.sub(
            r"\b(matrices|biases|factors)\.(\d+)$",
            lambda m: f"{_LEGACY_NAMES[m[1]]}{m[2]}",
            k,
        ): v
        for k, v in sd.items()
    }


def legacy_eb_list(sd):
    """ParameterList-era names (compressai.zoo): matrices.0 -> _matrices.0."""
    return {re.sub(r"\b(matrices|biases|factors)\.(\d+)$", r"_\1.\2", k): v for k, v in sd.items()}


def half_params(model):
    """qft's shipping format: parameters fp16, buffers unchanged."""
    params = {n for n, _ in model.named_parameters()}
    return {k: v.half() if k in params else v for k, v in model.state_dict().items()}


LAYOUTS = {
    "raw": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3, "lambda": 0.0130},
    "network": lambda sd: {"network": sd},
    "model_state_dict": lambda sd: {
        "model_state_dict": sd,
        "optimizer_state_dict": {"state": {}, "lr": 1e-4},
    },
    "model": lambda sd: {
        "model": sd,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}},
        "lambda": 0.0130,
    },
    "nested": lambda sd: {"model": {"state_dict": sd}},
    "module": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "orig_mod": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "module_orig_mod": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    "legacy_eb": legacy_eb,
    "legacy_eb_list": legacy_eb_list,
    "no_cdf": lambda sd: {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS},
    "odd_cdf": lambda sd: {
        k: torch.zeros(3, 5, dtype=v.dtype) if k.endswith("_quantized_cdf") else v for k, v in sd.items()
    },
}


def save(obj, path, **kwargs):
    torch.save(obj, path, **kwargs)
    return path


# --------------------------------------------------------------------------- registry


class TestRegistry:
    def test_ids_and_entropy(self):
        assert {a: ARCHITECTURES[a].entropy for a in ARCHITECTURES} == ENTROPY
        for name, arch in ARCHITECTURES.items():
            assert isinstance(arch, Architecture) and arch.name == name
            assert set(TINY[name]) <= set(arch.defaults)

    @pytest.mark.parametrize("arch", TINY)
    def test_params_read_back(self, arch, models):
        sd = state_dict_of(models[arch].state_dict())
        assert ARCHITECTURES[arch].infer_params(sd) == TINY[arch]

    def test_create_model(self, models, image):
        m = models["mbt2018-mean"]
        assert not m.training and m.gaussian_conditional._offset.numel() == 64
        state = torch.random.get_rng_state()
        again = create_model("mbt2018-mean", seed=1, **TINY["mbt2018-mean"])
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
        assert_same_outputs(m, again, image)
        other = create_model("mbt2018-mean", seed=2, **TINY["mbt2018-mean"])
        assert not torch.equal(other.g_a[0].weight, m.g_a[0].weight)

    def test_defaults(self):
        arch = ARCHITECTURES["elic2022-official"]
        assert arch.resolve_params() == {
            "N": 192,
            "M": 320,
            "groups": [16, 16, 32, 64, 192],
        }
        assert ARCHITECTURES["cheng2020-anchor"].resolve_params({"N": 64}) == {"N": 64}

    @pytest.mark.parametrize(
        "arch, params, message",
        [
            (
                "mbt2018-x",
                {},
                "unknown architecture 'mbt2018-x' (registered: bmshj2018-hyperprior",
            ),
            (
                "cheng2020-anchor",
                {"M": 8},
                "cheng2020-anchor has no parameter M (its parameters: N)",
            ),
            ("mbt2018-mean", {"N": 0}, "N must be a positive integer"),
            ("elic2022-official", {"M": 64}, "needs explicit groups"),
            ("elic2022-official", {"M": 16, "groups": [8, 4]}, "sum to 12, not M=16"),
        ],
    )
    def test_create_errors(self, arch, params, message):
        with pytest.raises(UserError, match=re.escape(message)):
            create_model(arch, **params)


# --------------------------------------------------------------------------- layouts


class TestLayouts:
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("arch", TINY)
    def test_state_dict_of(self, arch, layout, models):
        """Every layout of every architecture normalizes to the same state_dict."""
        sd = models[arch].state_dict()
        expected = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}
        got = state_dict_of(LAYOUTS[layout](sd))
        assert list(got) == list(expected)
        assert all(torch.equal(got[k], v) for k, v in expected.items())

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_load_layout(self, layout, models, image, reference, tmp_path):
        """Every layout through the file, end to end (one architecture)."""
        arch = "mbt2018-mean"
        path = save(LAYOUTS[layout](models[arch].state_dict()), tmp_path / "ckpt.pth")
        ckpt = load_checkpoint(path)
        assert isinstance(ckpt, LoadedCheckpoint)
        assert (ckpt.arch, ckpt.params, ckpt.path) == (arch, TINY[arch], str(path))
        assert not ckpt.model.training
        assert_outputs(ckpt.model, reference[arch], image)

    @pytest.mark.parametrize("arch", TINY)
    def test_detected(self, arch, models, image, reference, tmp_path):
        """Every architecture detected from a wrapped, prefixed, CDF-less file."""
        sd = LAYOUTS["no_cdf"](models[arch].state_dict())
        path = save(
            {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "lambda": 0.0483},
            tmp_path / "c.pth",
        )
        ckpt = load_checkpoint(path)
        assert (ckpt.arch, ckpt.params, ckpt.extra) == (
            arch,
            TINY[arch],
            {"lambda": 0.0483},
        )
        assert_outputs(ckpt.model, reference[arch], image)

    @pytest.mark.parametrize("arch", TINY)
    def test_given_arch_fp16_legacy_format(self, arch, models, image, tmp_path):
        """--arch given; fp16 parameters, DDP prefix, legacy EB names, no CDF tables, and
        torch's legacy (non-zip) serialization, all at once."""
        model = models[arch]
        sd = LAYOUTS["no_cdf"](legacy_eb({f"module.{k}": v for k, v in half_params(model).items()}))
        path = save(
            {"state_dict": sd},
            tmp_path / "ckpt.pth.tar",
            _use_new_zipfile_serialization=False,
        )
        ckpt = load_checkpoint(path, arch)
        assert ckpt.arch == arch and ckpt.params == TINY[arch]
        assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())
        rounded = copy.deepcopy(model)
        with torch.no_grad():
            for p in rounded.parameters():
                p.copy_(p.half().float())
        assert_same_outputs(ckpt.model, rounded, image)

    def test_sha256_extra(self, models, tmp_path):
        model = models["mbt2018-mean"]
        path = save(LAYOUTS["model"](model.state_dict()), tmp_path / "train.pth")
        ckpt = load_checkpoint(path)
        assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert ckpt.extra == {"lambda": 0.0130}  # the optimizer state holds tensors: not metadata

    def test_zoo_downsample_keys(self, models, image, reference, tmp_path):
        sd = {k.replace(".skip.", ".downsample."): v for k, v in models["cheng2020-attn"].state_dict().items()}
        assert any(".downsample." in k for k in sd)
        ckpt = load_checkpoint(save(sd, tmp_path / "zoo.pth.tar"))
        assert ckpt.arch == "cheng2020-attn"
        assert_outputs(ckpt.model, reference["cheng2020-attn"], image)

    def test_absent_constant_buffer_kept(self, models, image, tmp_path):
        model = models["mbt2018-mean"]
        sd = {k: v for k, v in model.state_dict().items() if not k.endswith("pedestal")}
        assert_same_outputs(load_checkpoint(save(sd, tmp_path / "c.pth")).model, model, image)

    def test_cdf_tables_rebuilt(self, models, tmp_path):
        model = models["mbt2018-mean"]
        sd = model.state_dict()
        stale = {
            **sd,
            "gaussian_conditional._quantized_cdf": torch.ones_like(sd["gaussian_conditional._quantized_cdf"]),
        }
        loaded = load_checkpoint(save(stale, tmp_path / "c.pth")).model
        for name in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"):
            assert torch.equal(
                getattr(loaded.gaussian_conditional, name),
                getattr(model.gaussian_conditional, name),
            )
        assert torch.equal(
            loaded.entropy_bottleneck._quantized_cdf,
            model.entropy_bottleneck._quantized_cdf,
        )

    def test_save_checkpoint_compressai_loads(self, models, image, tmp_path):
        for arch in (
            "bmshj2018-hyperprior",
            "mbt2018-mean",
            "mbt2018",
            "cheng2020-attn",
        ):
            path = tmp_path / f"{arch}.pth"
            save_checkpoint(path, models[arch], arch, TINY[arch], extra={"lambda": 0.01})
            obj = torch.load(path, weights_only=True)
            assert obj["arch"] == arch and obj["params"] == TINY[arch] and obj["lambda"] == 0.01
            plain = ARCHITECTURES[arch].cls.from_state_dict(obj["state_dict"]).eval()
            assert_same_outputs(plain, models[arch], image)

    def test_unsafe_load_whole_module(self, models, image, tmp_path):
        model = models["cheng2020-anchor"]
        path = save({"model": model, "epoch": 1}, tmp_path / "module.pth")
        with pytest.raises(UserError, match="--unsafe-load"):
            load_checkpoint(path)
        ckpt = load_checkpoint(path, unsafe_load=True)
        assert ckpt.arch == "cheng2020-anchor" and ckpt.extra == {"epoch": 1}
        assert_same_outputs(ckpt.model, model, image)


# --------------------------------------------------------------------------- errors


class TestErrors:
    def test_not_a_checkpoint(self, tmp_path):
        path = tmp_path / "notes.txt"
        path.write_text("# not a checkpoint\nlambda: 0.013\n")
        with pytest.raises(UserError, match=r"notes.txt is not a PyTorch checkpoint$"):
            load_checkpoint(path)

    @pytest.mark.parametrize("zip_format", [True, False])
    def test_truncated(self, models, tmp_path, zip_format):
        buffer = io.BytesIO()
        torch.save(
            models["mbt2018-mean"].state_dict(),
            buffer,
            _use_new_zipfile_serialization=zip_format,
        )
        path = tmp_path / "cut.pth"
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        with pytest.raises(UserError, match="cut.pth is truncated or corrupt"):
            load_checkpoint(path)

    def test_missing_empty_directory(self, tmp_path):
        with pytest.raises(UserError, match="does not exist"):
            load_checkpoint(tmp_path / "nope.pth")
        (tmp_path / "empty.pth").write_bytes(b"")
        with pytest.raises(UserError, match="is empty"):
            load_checkpoint(tmp_path / "empty.pth")
        with pytest.raises(UserError, match="is a directory"):
            load_checkpoint(tmp_path)

    @pytest.mark.parametrize("zip_format", [True, False])
    def test_pickle_payload_by_type_not_wording(self, models, tmp_path, zip_format):
        """A payload that would run a command (refused by torch with a wording other
        than 'Unsupported global') is still named as Python objects, never executed."""
        marker = tmp_path / "ran"
        path = tmp_path / "evil.pth"
        buffer = io.BytesIO()
        torch.save(
            {"state_dict": models["mbt2018-mean"].state_dict(), "x": Command(f"touch {marker}")},
            buffer,
            _use_new_zipfile_serialization=zip_format,
        )
        path.write_bytes(buffer.getvalue())
        with pytest.raises(UserError, match=r"holds Python objects.*system.*pass --unsafe-load"):
            load_checkpoint(path)
        assert not marker.exists()
        path.write_bytes(buffer.getvalue()[: -20 if zip_format else 300])  # damaged: not taken for a payload
        with pytest.raises(UserError, match="truncated or corrupt"):
            load_checkpoint(path)

    def test_pickle_payload(self, models, image, tmp_path):
        model = models["mbt2018-mean"]
        path = save(
            {"state_dict": model.state_dict(), "scheduler": Payload()},
            tmp_path / "p.pth",
        )
        with pytest.raises(UserError, match=r"holds Python objects.*Payload.*pass --unsafe-load"):
            load_checkpoint(path)
        ckpt = load_checkpoint(path, unsafe_load=True)
        assert ckpt.arch == "mbt2018-mean" and ckpt.extra == {}
        assert_same_outputs(ckpt.model, model, image)

    def test_counter_is_plain_data(self, models, tmp_path):
        """MultiStepLR state holds a collections.Counter, which torch's weights-only
        loader accepts: such training dicts load without --unsafe-load."""
        sd = models["mbt2018-mean"].state_dict()
        path = save(
            {"state_dict": sd, "milestones": collections.Counter([10, 20])},
            tmp_path / "c.pth",
        )
        assert load_checkpoint(path).arch == "mbt2018-mean"

    def test_no_state_dict(self, tmp_path):
        with pytest.raises(UserError, match=r"holds a list, not a state_dict"):
            load_checkpoint(save([1, 2], tmp_path / "a.pth"))
        with pytest.raises(UserError, match=r"entry 'epoch' is not a tensor \(int\)"):
            load_checkpoint(save({"epoch": 3, "optimizer": {}}, tmp_path / "b.pth"))

    def test_wrong_arch(self, models, tmp_path):
        path = save(models["mbt2018-mean"].state_dict(), tmp_path / "mean.pth")
        with pytest.raises(UserError) as info:
            load_checkpoint(path, "mbt2018")
        assert (
            str(info.value)
            == f"{path} is not a mbt2018 checkpoint: missing key 'entropy_parameters.0.weight' (and 7 more)"
        )
        shapes = (
            r"is not a bmshj2018-hyperprior checkpoint: 'h_s.0.weight' has shape \(8, 12, 5, 5\), "
            r"the model \(8, 8, 5, 5\) \(and 5 more\)$"
        )
        with pytest.raises(UserError, match=shapes):
            load_checkpoint(path, "bmshj2018-hyperprior")
        with pytest.raises(
            UserError,
            match=r"missing key 'g_a.0.conv1.weight' \(and \d+ more\), unexpected key 'g_a.0.weight'",
        ):
            load_checkpoint(path, "cheng2020-anchor")

    def test_unknown_arch(self, models, tmp_path):
        path = save(models["mbt2018-mean"].state_dict(), tmp_path / "mean.pth")
        with pytest.raises(
            UserError,
            match=r"unknown architecture 'mbt2018_mean' \(registered: .*mbt2018-mean",
        ):
            load_checkpoint(path, "mbt2018_mean")
        with pytest.raises(UserError) as info:
            load_checkpoint(save({"a.weight": torch.zeros(1)}, tmp_path / "other.pth"))
        assert re.fullmatch(
            r"\S+other.pth matches no registered architecture; the closest is [\w-]+: "
            r"missing key '[\w.]+' \(and \d+ more\), unexpected key 'a.weight' \(`qft models` .*",
            str(info.value),
        )

    def test_ambiguous(self, models, tmp_path):
        sd = {**models["mbt2018-mean"].state_dict(), "adapter.weight": torch.zeros(1)}
        with pytest.raises(UserError) as info:
            load_checkpoint(save(sd, tmp_path / "amb.pth"))
        message = str(info.value)
        assert "ambiguous architecture" in message and "pass --arch" in message and "\n" not in message
        assert "closest first: mbt2018-mean (unexpected key 'adapter.weight'); bmshj2018-hyperprior (" in message

    def test_ambiguous_exact(self, models, tmp_path, monkeypatch):
        twin = dataclasses.replace(ARCHITECTURES["mbt2018-mean"], name="twin")
        monkeypatch.setitem(ARCHITECTURES, "twin", twin)
        path = save(models["mbt2018-mean"].state_dict(), tmp_path / "mean.pth")
        with pytest.raises(
            UserError,
            match=r"ambiguous architecture, fits mbt2018-mean, twin; pass --arch$",
        ):
            load_checkpoint(path)
        assert load_checkpoint(path, "twin").arch == "twin"

    def test_load_weights_mismatch(self, models):
        model = create_model("mbt2018-mean", N=8, M=16)
        with pytest.raises(
            UserError,
            match=r"^checkpoint does not fit the model: 'g_a.6.weight' has shape",
        ):
            load_weights(model, models["mbt2018-mean"].state_dict())

    def test_looks_like(self, models, tmp_path):
        sd = dict(models["cheng2020-anchor"].state_dict())
        del sd["g_s.0.conv1.weight"]
        with pytest.raises(
            UserError,
            match=r"looks like a cheng2020-anchor checkpoint but is not one: missing key 'g_s.0.conv1.weight'$",
        ):
            load_checkpoint(save(sd, tmp_path / "attn.pth"))


# --------------------------------------------------------------------------- CLI


class TestCLI:
    def test_models(self, capsys):
        assert main(["models"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:3] == ["id", "entropy", "class"]
        assert [line.split()[0] for line in out[1:]] == list(ARCHITECTURES)
        assert "N=128 M=192" in out[2] and "MeanScaleHyperprior" in out[2]
        assert main(["models", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows[1]["id"] == "mbt2018-mean" and rows[1]["defaults"] == {
            "N": 128,
            "M": 192,
        }

    def test_init(self, tmp_path, capsys, image):
        path = tmp_path / "init" / "mbt.pth"

        def init(*extra: str) -> int:
            """``qft init`` of a tiny mbt2018 (N 8, M 16) at ``path``."""
            return main(["init", "--arch", "mbt2018", "--N", "8", "--M", "16", "-o", str(path), *extra])

        assert init("--seed", "3") == 0
        assert capsys.readouterr().out.startswith(f"wrote {path}: mbt2018")
        ckpt = load_checkpoint(path)
        assert (ckpt.arch, ckpt.params, ckpt.extra) == (
            "mbt2018",
            {"N": 8, "M": 16},
            {"arch": "mbt2018", "params": {"N": 8, "M": 16}, "seed": 3},
        )
        assert_same_outputs(ckpt.model, create_model("mbt2018", seed=3, N=8, M=16), image)

        first = path.read_bytes()
        assert init() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"qft init: error: {path} exists; pass --force to overwrite it"
        assert path.read_bytes() == first
        assert init("--force") == 0
        assert path.read_bytes() != first  # seed 0, not 3

    def test_init_elic_groups(self, tmp_path, capsys):
        path = tmp_path / "elic.pth"
        args = [
            "init",
            "--arch",
            "elic2022-chandelier",
            "--N",
            "8",
            "--M",
            "16",
            "-o",
            str(path),
        ]
        assert main(args) == 2
        assert (
            capsys.readouterr()
            .err.strip()
            .splitlines()[-1]
            .startswith("qft init: error: ELIC at M=16 needs explicit groups")
        )
        assert main([*args, "--groups", "4,4,8"]) == 0
        assert load_checkpoint(path).params == {"N": 8, "M": 16, "groups": [4, 4, 8]}

    @pytest.mark.parametrize(
        "argv, message",
        [
            (
                ["init", "--arch", "nope", "-o", "x.pth"],
                "qft init: error: unknown architecture 'nope'",
            ),
            (
                ["init", "--arch", "cheng2020-anchor", "--M", "8", "-o", "x.pth"],
                "qft init: error: cheng2020-anchor has no parameter M",
            ),
            (
                [
                    "init",
                    "--arch",
                    "elic2022-official",
                    "--groups",
                    "a,b",
                    "-o",
                    "x.pth",
                ],
                "qft init: error: --groups must be comma-separated integers",
            ),
        ],
    )
    def test_init_errors(self, argv, message, capsys, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qft ")]
        assert len(err) == 1 and err[0].startswith(message)
        assert not (tmp_path / "x.pth").exists()
