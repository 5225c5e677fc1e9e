"""Safe loading of Lightning checkpoints: weights-only first, inert placeholders for allow-listed
classes (sacred/Lightning/argparse/pathlib/numpy...), refusal of anything that could run code, and
one-line errors naming the file for every kind of bad input."""

import argparse
import os
import pathlib
import pickle
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict

import pytest
import torch

from smarttrim_cli.checkpoint_io import PickledObject, classify_global, load_lightning_checkpoint
from smarttrim_cli.errors import SmartTrimError

# ------------------------------------------------------------------------------------------- helpers


def _state_dict():
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("vit_model.visual.conv1.weight", torch.randn(8, 3, 4, 4, generator=g)),
            ("vit_model.visual.ln_pre.bias", torch.randn(8, generator=g, dtype=torch.float64)),
            ("text_transformer.embeddings.position_ids", torch.arange(12).unsqueeze(0)),
            ("cross_modal_text_layers.0.output.dense.weight", torch.randn(6, 6, generator=g).half()),
            ("flag", torch.tensor([True, False])),
        ]
    )


def _lightning_ckpt(sd, hp):
    return {
        "epoch": 9,
        "global_step": 1234,
        "pytorch-lightning_version": "1.3.2",
        "state_dict": sd,
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.7)}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [{"last_epoch": 9}],
        "hyper_parameters": hp,
    }


def _assert_same(a, b):
    assert list(a) == list(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _bad(path, *fragments):
    """Loading ``path`` must raise a one-line SmartTrimError naming it (and each fragment)."""
    with pytest.raises(SmartTrimError) as ei:
        load_lightning_checkpoint(path)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


def _fake_module(monkeypatch, dotted, **attrs):
    """Register ``dotted`` (and its parents) as throw-away modules so pickle can save references."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    mod = sys.modules[dotted]
    for k, v in attrs.items():
        monkeypatch.setattr(mod, k, v, raising=False)
        v.__module__ = dotted
        v.__qualname__ = k
    return mod


def _torch_zip(path, data_pkl, archive="archive"):
    """A zip with torch.save's layout whose data.pkl is ``data_pkl`` (hand-written pickles)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", data_pkl)
        zf.writestr(f"{archive}/byteorder", "little")
        zf.writestr(f"{archive}/version", "3\n")


# ------------------------------------------------------------------------------------- good files


def test_plain_lightning_ckpt_loads_weights_only_and_round_trips(tmp_path):
    sd = _state_dict()
    hp = {"config": {"image_size": 576, "vit": "ViT-B/16", "loss_names": {"vqa": 1, "nlvr2": 0},
                     "max_text_len": 50, "lr_mult": [1, 5.0]}}
    p = tmp_path / "meter_vqa.ckpt"
    torch.save(_lightning_ckpt(sd, hp), p)
    ck = load_lightning_checkpoint(p)
    _assert_same(ck["state_dict"], sd)
    assert ck["config"] == hp["config"]
    m = ck["meta"]
    assert m["loader"] == "weights_only" and m["placeholders"] == []
    assert (m["lightning_version"], m["epoch"], m["global_step"]) == ("1.3.2", 9, 1234)
    assert m["state_dict_key"] == "state_dict"
    # mmap off gives the same tensors
    _assert_same(load_lightning_checkpoint(str(p), mmap=False)["state_dict"], sd)


@pytest.mark.parametrize("layout", ["bare", "model", "module"])
def test_plain_state_dict_layouts(tmp_path, layout):
    sd = _state_dict()
    obj = sd if layout == "bare" else {layout: sd, "epoch": 1}
    p = tmp_path / f"{layout}.pt"
    torch.save(obj, p)
    ck = load_lightning_checkpoint(p)
    _assert_same(ck["state_dict"], sd)
    assert ck["config"] == {}
    assert ck["meta"]["state_dict_key"] == (None if layout == "bare" else layout)


def test_sacred_and_lightning_objects_load_as_inert_placeholders(tmp_path, monkeypatch):
    """hyper_parameters = AttributeDict(config=ReadOnlyDict(...)) as METER/Lightning write them, with
    classes that are NOT importable at load time; the config must come back as plain values."""

    class ReadOnlyDict(dict):  # sacred.config.custom_containers.ReadOnlyDict.__reduce__
        def __reduce__(self):
            return self.__class__, ({**self},)

    class ReadOnlyList(list):
        def __reduce__(self):
            return self.__class__, ([*self],)

    class AttributeDict(dict):  # lightning: default dict-subclass pickling (NEWOBJ + SETITEMS)
        def __getattr__(self, k):
            try:
                return self[k]
            except KeyError as e:
                raise AttributeError(k) from e

    import numpy as np

    sd = _state_dict()
    with monkeypatch.context() as m:
        _fake_module(m, "sacred.config.custom_containers", ReadOnlyDict=ReadOnlyDict, ReadOnlyList=ReadOnlyList)
        _fake_module(m, "lightning.fabric.utilities.data", AttributeDict=AttributeDict)
        config = ReadOnlyDict(
            image_size=576,
            vit="ViT-B/16",
            loss_names=ReadOnlyDict(vqa=1, itm=0),
            lr_mult=ReadOnlyList([1, 5]),
            data_root=pathlib.PurePosixPath("/data/vqa") if os.name != "nt" else "/data/vqa",
            log_dir=pathlib.Path("result"),
            drop_rate=np.float64(0.1),
            seed=np.int64(0),
            mean=np.array([[0.5, 0.25], [1.0, 2.0]], dtype=np.float32),
            args=argparse.Namespace(precision=16, num_gpus=8),
        )
        hp = AttributeDict(config=config)
        p = tmp_path / "meter_sacred.ckpt"
        torch.save(_lightning_ckpt(sd, hp), p)
    # The fake modules are gone: nothing can be imported by name any more.
    assert "sacred" not in sys.modules and "lightning.fabric.utilities.data" not in sys.modules
    before = set(map(repr, torch.serialization.get_safe_globals()))

    ck = load_lightning_checkpoint(p)

    assert "sacred" not in sys.modules  # nothing was imported
    assert set(map(repr, torch.serialization.get_safe_globals())) == before  # registry restored
    _assert_same(ck["state_dict"], sd)
    cfg = ck["config"]
    assert cfg["image_size"] == 576 and cfg["vit"] == "ViT-B/16"
    assert cfg["loss_names"] == {"vqa": 1, "itm": 0} and type(cfg["loss_names"]) is dict
    assert cfg["lr_mult"] == [1, 5]
    assert cfg["data_root"] == "/data/vqa" and cfg["log_dir"] == "result"
    assert cfg["drop_rate"] == 0.1 and type(cfg["drop_rate"]) is float
    assert cfg["seed"] == 0 and type(cfg["seed"]) is int
    assert cfg["mean"] == [[0.5, 0.25], [1.0, 2.0]]
    assert cfg["args"] == {"precision": 16, "num_gpus": 8}
    m = ck["meta"]
    assert m["loader"] == "restricted"
    assert "sacred.config.custom_containers.ReadOnlyDict" in m["placeholders"]
    assert "lightning.fabric.utilities.data.AttributeDict" in m["placeholders"]
    assert (m["epoch"], m["global_step"], m["lightning_version"]) == (9, 1234, "1.3.2")
    assert isinstance(ck["hyper_parameters"], dict) and ck["hyper_parameters"]["config"] == cfg


def test_omegaconf_namespace_and_defaultdict_hparams(tmp_path, monkeypatch):
    """Other shapes real Lightning files use: an omegaconf DictConfig, an argparse.Namespace as the
    whole hyper_parameters (old Lightning), collections.defaultdict with a builtin factory."""
    import collections
    import typing

    class AnyNode:
        def __init__(self, v):
            self._val, self._parent = v, None

    class DictConfig:
        def __init__(self, content):
            self._content = {k: AnyNode(v) for k, v in content.items()}
            self._metadata = {"ref_type": typing.Any, "object_type": dict}

    with monkeypatch.context() as m:
        _fake_module(m, "omegaconf.nodes", AnyNode=AnyNode)
        _fake_module(m, "omegaconf.dictconfig", DictConfig=DictConfig)
        dd = collections.defaultdict(list, {"a": [1]})
        hp1 = {"config": DictConfig({"image_size": 384, "tokenizer": "roberta-base"}), "dd": dd}
        hp2 = argparse.Namespace(image_size=288, vit="ViT-B/16", empty=collections.defaultdict(int))
        p1, p2 = tmp_path / "omega.ckpt", tmp_path / "ns.ckpt"
        torch.save(_lightning_ckpt(_state_dict(), hp1), p1)
        torch.save(_lightning_ckpt(_state_dict(), hp2), p2)
    ck1 = load_lightning_checkpoint(p1)
    assert ck1["config"] == {"image_size": 384, "tokenizer": "roberta-base"}
    assert ck1["hyper_parameters"]["dd"] == {"a": [1]}
    assert "typing.Any" in ck1["meta"]["placeholders"]
    ck2 = load_lightning_checkpoint(p2)
    assert ck2["config"] == {"image_size": 288, "vit": "ViT-B/16", "empty": {}}


def test_legacy_non_zip_format(tmp_path, monkeypatch):
    """torch.save(..., _use_new_zipfile_serialization=False): both loaders and the refusal work."""

    class ReadOnlyDict(dict):
        def __reduce__(self):
            return self.__class__, ({**self},)

    flag = tmp_path / "pwned"
    sd = _state_dict()
    good, evil = tmp_path / "legacy.pt", tmp_path / "legacy_evil.pt"
    with monkeypatch.context() as m:
        _fake_module(m, "sacred.config.custom_containers", ReadOnlyDict=ReadOnlyDict)
        torch.save(_lightning_ckpt(sd, {"config": ReadOnlyDict(image_size=384)}), good,
                   _use_new_zipfile_serialization=False)
        torch.save({"state_dict": sd, "x": _Reducer(os.system, (f"touch {flag}",))}, evil,
                   _use_new_zipfile_serialization=False)
    ck = load_lightning_checkpoint(good)
    _assert_same(ck["state_dict"], sd)
    assert ck["config"] == {"image_size": 384} and ck["meta"]["loader"] == "restricted"
    _bad(evil, "system", "forbidden")
    assert not flag.exists()


def test_placeholder_is_inert():
    cls = type("X", (PickledObject,), {"pickled_module": "sacred.x", "pickled_name": "X"})
    obj = cls({"a": 1})
    obj.__setstate__({"s": 2})
    assert obj == {"a": 1} and obj.state == {"s": 2} and obj.qualified_name == "sacred.x.X"
    assert not callable(obj)


# --------------------------------------------------------------------------------- malicious files


class _Reducer:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(flag):
    touch = f"touch {flag}"
    return {
        "os.system": (_Reducer(os.system, (touch,)), "system"),
        "subprocess.call": (_Reducer(subprocess.call, (["touch", str(flag)],)), "subprocess.call"),
        "subprocess.Popen": (_Reducer(subprocess.Popen, (["touch", str(flag)],)), "subprocess.Popen"),
        "builtins.exec": (_Reducer(exec, (f"open({str(flag)!r}, 'w').close()",)), "exec"),
        "builtins.eval": (_Reducer(eval, (f"open({str(flag)!r}, 'w').close()",)), "eval"),
    }


@pytest.mark.parametrize("name", ["os.system", "subprocess.call", "subprocess.Popen", "builtins.exec",
                                  "builtins.eval"])
def test_malicious_reduce_is_refused_and_never_runs(tmp_path, name):
    flag = tmp_path / "pwned"
    payload, fragment = _payloads(flag)[name]
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _state_dict(), "hyper_parameters": {"config": {"x": payload}}}, p)
    msg = _bad(p, fragment, "forbidden")
    assert not flag.exists(), msg


def test_malicious_payload_hidden_next_to_allowed_placeholders(tmp_path, monkeypatch):
    """An allowed sacred class does not open the door for a forbidden global in the same file."""
    flag = tmp_path / "pwned"

    class ReadOnlyDict(dict):
        def __reduce__(self):
            return self.__class__, ({**self},)

    with monkeypatch.context() as m:
        _fake_module(m, "sacred.config.custom_containers", ReadOnlyDict=ReadOnlyDict)
        hp = ReadOnlyDict(config=ReadOnlyDict(a=1), evil=_Reducer(os.system, (f"touch {flag}",)))
        p = tmp_path / "mixed.ckpt"
        torch.save({"state_dict": _state_dict(), "hyper_parameters": hp}, p)
    msg = _bad(p, "system", "forbidden")
    assert "ReadOnlyDict" not in msg.split("forbidden global(s)")[1].split("(")[0]
    assert not flag.exists()


def test_functions_in_allowed_families_and_unknown_classes_are_refused(tmp_path, monkeypatch):
    calls = []

    def run_me(*a):  # a *function* in an allow-listed family: REDUCE on it would call it
        calls.append(a)

    class Payload:
        pass

    with monkeypatch.context() as m:
        _fake_module(m, "lightning.pytorch.utilities.evil", run_me=run_me)
        _fake_module(m, "evil_pkg.models", Payload=Payload)
        p1, p2 = tmp_path / "fn.ckpt", tmp_path / "cls.ckpt"
        torch.save({"state_dict": _state_dict(), "x": _Reducer(run_me, (1,))}, p1)
        torch.save({"state_dict": _state_dict(), "x": Payload()}, p2)
    _bad(p1, "lightning.pytorch.utilities.evil.run_me")
    _bad(p2, "evil_pkg.models.Payload")
    assert calls == []


def test_protocol0_global_in_handwritten_torch_zip(tmp_path):
    flag = tmp_path / "pwned"
    data = f"cposix\nsystem\n(S'touch {flag}'\ntR.".encode()
    p = tmp_path / "proto0.ckpt"
    _torch_zip(p, data)
    _bad(p, "posix.system", "forbidden")
    assert not flag.exists()


def test_stack_global_protocol4_in_torch_zip_and_bare_pickles(tmp_path):
    flag = tmp_path / "pwned"
    evil = _Reducer(os.system, (f"touch {flag}",))
    p4 = tmp_path / "proto4.ckpt"
    _torch_zip(p4, pickle.dumps({"state_dict": {}, "x": evil}, protocol=4))
    _bad(p4, f"{os.system.__module__}.system", "forbidden")
    # bare pickles outside a zip (legacy torch.save stream / protocol-0 text pickle)
    p2 = tmp_path / "bare2.pt"
    p2.write_bytes(pickle.dumps(evil, protocol=2))
    _bad(p2, "system", "forbidden")
    p0 = tmp_path / "bare0.pt"
    p0.write_bytes(f"cposix\nsystem\n(S'touch {flag}'\ntR.".encode())
    _bad(p0, "posix.system", "forbidden")
    assert not flag.exists()


def test_classify_global():
    assert classify_global("torch._utils", "_rebuild_tensor_v2") == "torch"
    assert classify_global("collections", "OrderedDict") == "torch"
    assert classify_global("__builtin__", "list") == "builtin"
    for ok in ["sacred.config.custom_containers.ReadOnlyDict", "lightning.fabric.utilities.data.AttributeDict",
               "pytorch_lightning.utilities.parsing.AttributeDict", "argparse.Namespace", "pathlib.PosixPath",
               "numpy._core.multiarray.scalar", "numpy.dtype", "collections.defaultdict",
               "omegaconf.dictconfig.DictConfig", "munch.Munch", "torch.optim.adamw.AdamW"]:
        mod, name = ok.rsplit(".", 1)
        assert classify_global(mod, name) == "placeholder", ok
    for bad in ["os.system", "posix.system", "nt.system", "subprocess.call", "subprocess.Popen",
                "builtins.eval", "builtins.exec", "builtins.getattr", "builtins.__import__", "__builtin__.eval",
                "sys.exit", "shutil.rmtree", "importlib.import_module", "pickle.loads", "marshal.loads",
                "runpy.run_path", "code.interact", "types.FunctionType", "functools.partial",
                "operator.attrgetter", "operator.methodcaller", "copyreg._reconstructor", "numpy.load",
                "numpy.lib.npyio.load", "sacred.run", "collections.namedtuple", "torch.load",
                "torch.hub.load", "webbrowser.open", "ctypes.CDLL"]:
        mod, name = bad.rsplit(".", 1)
        assert classify_global(mod, name) == "forbidden", bad
    assert classify_global("sacred.config", "ReadOnlyDict.__init__") == "forbidden"
    assert classify_global("lightning.x", "Klass.method") == "forbidden"
    assert classify_global("pathlib._local", "PosixPath") == "placeholder"  # Python >= 3.13 spelling
    assert classify_global("commands", "call") == "forbidden"  # protocol-2 spelling of subprocess.call


# --------------------------------------------------------------------------------------- bad files


def test_bad_files_give_one_line_errors(tmp_path):
    real = tmp_path / "real.ckpt"
    torch.save(_lightning_ckpt(_state_dict(), {"config": {"a": 1}}), real)
    raw = real.read_bytes()

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(raw[: len(raw) // 2])
    _bad(truncated, "truncated")

    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\nsecond line\n")
    _bad(text, "not a PyTorch checkpoint", "text")

    png = tmp_path / "image.ckpt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    _bad(png, "not a PyTorch checkpoint", "PNG")

    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    _bad(empty, "empty")

    _bad(tmp_path / "missing.ckpt", "not found")

    d = tmp_path / "adir.ckpt"
    d.mkdir()
    _bad(d, "directory")

    other_zip = tmp_path / "other.ckpt"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
    _bad(other_zip, "no data.pkl")

    no_sd = tmp_path / "nosd.ckpt"
    torch.save({"epoch": 1, "hyper_parameters": {"config": {}}}, no_sd)
    _bad(no_sd, "no state_dict")

    not_dict = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], not_dict)
    _bad(not_dict, "no state_dict")

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02" + os.urandom(64))
    _bad(garbage)

    # corrupt the pickle inside an otherwise valid torch zip
    corrupt = tmp_path / "corrupt.ckpt"
    _torch_zip(corrupt, b"\x80\x02}q\x00(X\x01\x00\x00")
    _bad(corrupt)


def test_torchscript_archive_is_refused(tmp_path):
    import warnings

    p = tmp_path / "scripted.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p)
    _bad(p, "TorchScript")
