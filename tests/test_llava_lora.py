"""LoRA of the language model in a LLaVA fine-tune (nn/lora.py, training settings lora_*), and full fine-tuning
(train_backbone=true): a tiny real LLaVA (tests/tiny_llava.py) on a tiny prompts folder with answers. LoRA starts
bit-identical, trains only its adapters and the trimmer (the base weights stay as they were), is merged into plain
weights in the written directory (same logits as the trained model in memory), resumes exactly, keeps the "start"
teacher at the start weights, and bad settings are one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.cli import app
from smarttrim_cli.errors import SmartTrimError
from smarttrim_cli.nn.lora import apply_lora, lora_layers, merged
from smarttrim_cli.train import step as step_mod
from smarttrim_cli.train.checkpointing import load_state
from smarttrim_cli.train.loop import finetune

from llava_data import attached_word_llava, write_images, write_prompts
from tiny_llava import tiny_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["what color is the shape ?", "what shape is there ?", "is there a red circle in the image ?",
             "what is in the image ?"]
ANSWERS = [["red"], ["circle"], ["yes"], ["blue square"]]
LORA = {"lora_rank": 4, "lora_alpha": 8}
# few steps, no generation beyond one validation of 2 inputs (2 tokens), lr high enough for LoRA to move visibly
SETTINGS = {"dataset": "prompts", "workers": 0, "max_new_tokens": 2, "max_steps": 3, "batch_size": 2, "limit": 4,
            "val_limit": 2, "lr": 1e-3, "calibrate": False, "eval_before": False, "save_every": 2}
Q_KEY = "hf.model.language_model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("llava_lora")


@pytest.fixture(scope="module")
def model_dir(root):
    return attached_word_llava(root)  # 16 x 16 images: 16 image tokens


@pytest.fixture(scope="module")
def data(root):
    d = root / "prompts"
    d.mkdir()
    write_images(d, len(QUESTIONS))
    write_prompts(d, QUESTIONS, ANSWERS)
    return d


@pytest.fixture(scope="module")
def batch(model_dir):
    return tiny_inputs(model_dir.parent / "src", QUESTIONS[:2])


def train(model_dir, data, out, **sets):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(out.parent / "home"))
        return finetune(model_dir, out, overrides={**SETTINGS, "data_dir": str(data), **sets}, progress=False,
                        device="cpu")


@pytest.fixture(scope="module")
def trained(model_dir, data, root):
    return train(model_dir, data, root / "lora", **LORA)


def logits(m, batch, mode="full"):
    m.eval()
    with torch.no_grad():
        return m(**batch, ctx=m.make_context(mode=mode))


def test_lora_starts_bit_identical_and_merges(model_dir, batch):
    m = smarttrim_cli.load(model_dir).model
    keys = set(m.state_dict())
    before = logits(m, batch)
    wrapped = apply_lora(m.lora_module(), "q_proj,v_proj", rank=4, alpha=8)
    assert len(wrapped) == 4  # q and v of both decoder layers, nothing else
    assert {n for _, n, _ in lora_layers(m)} == {"q_proj", "v_proj"}
    assert torch.equal(logits(m, batch), before)  # B = 0: exactly the base model
    lm = dict(m.lora_module().named_parameters())
    assert [n for n, p in lm.items() if p.requires_grad] == [n for n in lm if ".lora_" in n]  # LM: adapters only
    with torch.no_grad():
        for w in wrapped:
            w.lora_B.normal_(0, 0.5)
    adapted = logits(m, batch)
    assert (adapted - before).abs().max() > 1e-3
    with merged(m):  # plain layers with the adapted weight: the unwrapped model's keys and its outputs
        assert set(m.state_dict()) == keys and not lora_layers(m)
        torch.testing.assert_close(logits(m, batch), adapted, rtol=0, atol=1e-5)
    assert len(lora_layers(m)) == 4
    base_q = wrapped[0].base.weight.clone()
    for w in wrapped:
        w.merge()
    assert not torch.equal(wrapped[0].base.weight, base_q)
    torch.testing.assert_close(logits(m, batch), adapted, rtol=0, atol=1e-5)
    for w in wrapped:
        w.unmerge()
    torch.testing.assert_close(wrapped[0].base.weight, base_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(m, batch), adapted, rtol=0, atol=1e-5)


def test_lora_trains_adapters_and_trimmer_only(trained, model_dir):
    start = smarttrim_cli.load(model_dir).model.state_dict()
    m = trained.model
    assert len(lora_layers(m)) == 4
    sd = m.state_dict()
    lora = [k for k in sd if ".lora_" in k]
    assert lora and all(torch.any(sd[k] != 0) for k in lora if k.endswith("lora_B"))  # B left zero: it moved
    assert any(not torch.equal(start[k], sd[k]) for k in sd if k.startswith("token_trimmers."))
    for k, v in sd.items():  # every other weight, the wrapped linears' own included, as it started
        if ".lora_" not in k and not k.startswith("token_trimmers."):
            assert torch.equal(v.cpu(), start[k.replace(".base.", ".")]), k
    assert trained.summary["config"]["lora_rank"] == 4


def test_saved_model_is_merged_and_gives_the_trained_logits(trained, model_dir, batch):
    start = smarttrim_cli.load(model_dir)
    out = smarttrim_cli.load(trained.output)
    assert set(out.model.state_dict()) == set(start.model.state_dict()) and not lora_layers(out.model)
    sd, s0 = out.model.state_dict(), start.model.state_dict()
    assert not torch.equal(sd[Q_KEY], s0[Q_KEY])  # the adapter folded into q_proj ...
    assert torch.equal(sd[Q_KEY.replace("q_proj", "k_proj")], s0[Q_KEY.replace("q_proj", "k_proj")])  # ... not k
    for mode in ("full", "hard"):
        torch.testing.assert_close(logits(out.model, batch, mode), logits(trained.model.cpu(), batch, mode),
                                   rtol=0, atol=1e-5)
    assert (logits(out.model, batch) - logits(start.model, batch)).abs().max() > 1e-4  # it is not the start model


def test_lora_resume_equals_uninterrupted(trained, model_dir, data, root):
    class Kill(Exception):
        pass

    def kill(step):
        if step == 3:  # after the checkpoint at step 2; step 3 is lost
            raise Kill()
    with pytest.raises(Kill):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SMARTTRIM_HOME", str(root / "home"))
            finetune(model_dir, root / "killed", overrides={**SETTINGS, "data_dir": str(data), **LORA},
                     progress=False, device="cpu", on_step=kill)
    st = load_state(root / "killed.state" / "last.pt")
    assert st["step"] == 2 and any(".lora_B" in k for k in st["model"])
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Exception, match="different settings.*lora_rank"):
        mp.setenv("SMARTTRIM_HOME", str(root / "home"))
        finetune(model_dir, root / "killed", overrides={**SETTINGS, "data_dir": str(data), **LORA, "lora_rank": 2},
                 resume=True, progress=False, device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(root / "home"))
        res = finetune(model_dir, root / "killed", overrides={**SETTINGS, "data_dir": str(data), **LORA},
                       resume=True, progress=False, device="cpu")
    assert res.summary["resumed_from_step"] == 2
    a, b = (load_state(r.state_dir / "last.pt")["model"] for r in (trained, res))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("elapsed_s", "inputs_per_s")} for r in h]  # noqa
    assert strip(res.history) == strip(trained.history)


def test_teacher_start_keeps_the_start_weights_with_lora(model_dir, data, root, batch, monkeypatch):
    made = []
    real = step_mod.teacher_model
    monkeypatch.setattr(step_mod, "teacher_model", lambda m, cfg: made.append(real(m, cfg)) or made[-1])
    res = train(model_dir, data, root / "start_teacher", **LORA, teacher="start", max_steps=2)
    (teacher,) = [t for t in made if t is not res.model]
    tl = [w for _, _, w in lora_layers(teacher)]
    assert len(tl) == 4 and all(not torch.any(w.lora_B) and not w.lora_B.requires_grad for w in tl)
    assert any(torch.any(w.lora_B != 0) for _, _, w in lora_layers(res.model))  # the student's adapters moved
    assert torch.equal(logits(teacher.cpu(), batch), logits(smarttrim_cli.load(model_dir).model, batch))


def test_lora_loss_goes_down_without_trimming(model_dir, data, root):
    """--no-trim with LoRA (and the backbone frozen): the adapters alone learn the answers."""
    res = train(model_dir, data, root / "plain", **LORA, trim=False, train_backbone=False, max_steps=6, lr=1e-2,
                lr_mult_lora=1.0, limit=2, batch_size=2, save_every=0, warmup=0)
    losses = [r["task"] for r in res.history if r.get("event") == "step"]
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.92 * losses[0], \
        losses  # the same two inputs every step: each step lowers their loss
    assert res.summary["mode"] == "plain"


def test_full_fine_tuning_moves_the_language_model(model_dir, data, root):
    res = train(model_dir, data, root / "full", train_backbone=True, max_steps=1)
    start = smarttrim_cli.load(model_dir).model.state_dict()
    end = smarttrim_cli.load(res.output).model.state_dict()
    assert not lora_layers(res.model)
    assert not torch.equal(start[Q_KEY], end[Q_KEY]) and not torch.equal(start["hf.lm_head.weight"],
                                                                         end["hf.lm_head.weight"])


@pytest.mark.parametrize("sets, says", [
    (["lora_rank=-1"], "lora_rank must be >= 0"),
    (["lora_rank=two"], "bad value 'two' for lora_rank"),
    (["lora_rank=4", "lora_alpha=0"], "lora_alpha must be positive"),
    (["lora_rank=4", "lora_dropout=1.5"], "lora_dropout must be in [0, 1)"),
    (["lora_rank=4", "lora_targets=,"], "lora_targets must name linear layers"),
    (["lora_rank=4", "lora_targets=q_proj,qkv"], "lora_targets: qkv name(s) no linear layer"),
    (["lora_rank=4", "train_backbone=true"], "set train_backbone=false, or lora_rank=0"),
])
def test_bad_lora_settings_are_one_line_errors(sets, says, model_dir, data, root, tmp_path):
    r = CliRunner().invoke(app, ["finetune", str(model_dir), "--dataset", "prompts", "--data-dir", str(data), "-o",
                                 str(tmp_path / "o"), "--workers", "0", "--no-progress",
                                 *sum((["--set", s] for s in sets), [])], env={"SMARTTRIM_HOME": str(root / "home")})
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert says in text and "Traceback" not in r.output, text
    assert r.output.strip().startswith("error:") and r.output.count("error:") == 1


def test_a_family_without_a_language_model_refuses_lora(model_dir, data, root, tmp_path, monkeypatch):
    from smarttrim_cli.backbones.base import TrimmableModel
    from smarttrim_cli.backbones.llava import LlavaModel

    monkeypatch.setattr(LlavaModel, "lora_module", TrimmableModel.lora_module)  # the contract's default
    with pytest.raises(SmartTrimError, match="supports no LoRA") as e:
        train(model_dir, data, tmp_path / "o", **LORA)
    assert "\n" not in str(e.value)


def test_lora_settings_are_recorded_and_resume_safe_defaults():
    from smarttrim_cli.train.config import build_config, parse_sets, run_settings

    cfg, _ = build_config(None, parse_sets(["lora_rank=8", "lora_targets=q_proj,k_proj,v_proj,o_proj"]),
                          task="generate", family="llava")
    assert cfg.lora_rank == 8 and cfg.lora_targets == "q_proj,k_proj,v_proj,o_proj" and not cfg.train_backbone
    # a run without LoRA keeps the cache key it had before the settings existed
    plain = run_settings(None, {}, task="generate", family="llava")
    assert plain and not any(k.startswith("lora") or k == "lr_mult_lora" for k in plain)
    assert run_settings(None, {"lora_rank": 8}, task="generate", family="llava")["lora_rank"] == 8
    assert json.loads(json.dumps(cfg.to_dict()))["lora_alpha"] == 16.0
    assert cfg.update({"lora_targets": ["q_proj", "o_proj"]}, "recipe").lora_targets == "q_proj,o_proj"  # YAML list


def test_readme_lora_command_runs_on_the_llava_recipe(model_dir, data, root, tmp_path):
    """The README's --set syntax, on the bundled recipe (train_backbone false): a loadable merged directory."""
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["finetune", str(model_dir), "--dataset", "prompts", "--data-dir", str(data), "-o",
                                 str(out), "--max-steps", "1", "--batch-size", "2", "--limit", "2", "--workers", "0",
                                 "--no-progress", "--set", "max_new_tokens=2", "--set", "calibrate=false",
                                 "--set", "eval_before=false", "--set", "lora_rank=8", "--set", "lora_alpha=16",
                                 "--set", "lora_targets=q_proj,k_proj,v_proj,o_proj"],
                           env={"SMARTTRIM_HOME": str(root / "home")})
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "finetune_summary.json").read_text())["config"]
    assert (cfg["lora_rank"], cfg["lora_targets"], cfg["train_backbone"]) == (8, "q_proj,k_proj,v_proj,o_proj", False)
    start, end = (smarttrim_cli.load(d).model.state_dict() for d in (model_dir, out))
    assert start.keys() == end.keys()
    moved = [k for k in start if not torch.equal(start[k], end[k]) and not k.startswith("token_trimmers.")]
    assert all(k.startswith("hf.model.language_model.layers.") for k in moved)  # not the tower's q/k/v
    assert {k.split(".")[-2] for k in moved} == {"q_proj", "k_proj", "v_proj", "o_proj"}  # merged there, only
