"""Loading METER's own checkpoint format exactly, and the text tower against transformers' RoBERTa."""
import pytest
import torch

from smarttrim_cli.backbones import meter
from smarttrim_cli.checkpoint_io import save_lightning_checkpoint
from smarttrim_cli.errors import SmartTrimError

from tiny_meter import batch, tiny_model, write_tiny_ckpt


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "snli", "retrieval"])
def test_loaded_weights_equal_saved_and_model_runs(tmp_path, task):
    src, sd = write_tiny_ckpt(tmp_path / "meter.ckpt", task)
    model, info = meter.from_checkpoint(tmp_path / "meter.ckpt")
    assert model.config.task == task
    assert model.config.num_token_types == (3 if task == "nlvr2" else 2)
    loaded = model.state_dict()
    for k, v in sd.items():
        if meter.is_unused_key(k):
            assert k not in loaded
            continue
        assert torch.equal(loaded[k], v), k
    assert set(info["ignored_keys"]) == {k for k in sd if meter.is_unused_key(k)}
    assert len(info["ignored_keys"]) == 7
    b = batch(model)
    with torch.no_grad():
        ours, _ = model.run(b, mode="full")
        ref, _ = src.run(b, mode="full")
    assert torch.equal(ours, ref)
    assert ours.shape == (3, {"vqa": 7, "nlvr2": 2, "snli": 3, "retrieval": 1}[task])


def test_unknown_and_missing_keys_are_named(tmp_path):
    src = tiny_model("vqa")
    save_lightning_checkpoint(meter.lightning_checkpoint(src), tmp_path / "a.ckpt")
    ck = torch.load(tmp_path / "a.ckpt", weights_only=True)
    ck["state_dict"]["cross_modal_text_layers.0.surprise.weight"] = torch.zeros(2)
    del ck["state_dict"]["cross_modal_image_pooler.dense.bias"]
    torch.save(ck, tmp_path / "b.ckpt")
    with pytest.raises(SmartTrimError) as e:
        meter.from_checkpoint(tmp_path / "b.ckpt")
    msg = str(e.value)
    assert "cross_modal_text_layers.0.surprise.weight" in msg and "cross_modal_image_pooler.dense.bias" in msg
    assert "b.ckpt" in msg and "\n" not in msg


def test_other_architecture_is_refused(tmp_path):
    torch.save({"state_dict": {"encoder.layer.0.weight": torch.zeros(3)}}, tmp_path / "bert.ckpt")
    with pytest.raises(SmartTrimError, match="not a METER checkpoint"):
        meter.from_checkpoint(tmp_path / "bert.ckpt")


def test_positional_embeddings_interpolated(tmp_path):
    write_tiny_ckpt(tmp_path / "m.ckpt", "vqa")  # 32px, patch 8: 4x4 grid
    model, info = meter.from_checkpoint(tmp_path / "m.ckpt", image_size=48)
    assert model.config.image_size == 48 and info["source_image_size"] == 32
    pos = model.vit_model.visual.positional_embedding
    assert pos.shape[0] == 1 + 36
    src, _ = meter.from_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(pos[0], src.vit_model.visual.positional_embedding[0])  # [CLS] position kept
    with torch.no_grad():
        out, _ = model.run(batch(model), mode="hard")
    assert out.shape == (3, 7)
    with pytest.raises(SmartTrimError, match="multiple of the patch size"):
        meter.from_checkpoint(tmp_path / "m.ckpt", image_size=50)


def test_text_tower_matches_transformers_roberta():
    """Invariant 1 for the part of METER that transformers still ships: our RoBERTa text tower
    (embeddings + post-LN layers) equals RobertaModel's encoder on the same weights."""
    from transformers import RobertaConfig, RobertaModel

    m = tiny_model("vqa")
    c = m.config
    rc = RobertaConfig(vocab_size=c.vocab_size, hidden_size=c.text_hidden, num_hidden_layers=c.text_layers,
                       num_attention_heads=c.text_heads, intermediate_size=c.text_intermediate,
                       max_position_embeddings=c.max_position, type_vocab_size=1, layer_norm_eps=1e-5,
                       pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref = RobertaModel(rc, add_pooling_layer=False).eval()
    ours = {k[len("text_transformer."):]: v for k, v in m.state_dict().items() if k.startswith("text_transformer.")}
    missing, unexpected = ref.load_state_dict(ours, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    b = batch(m)
    with torch.no_grad():
        want = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        x = m.text_transformer.embeddings(b["input_ids"])
        add = (1.0 - b["attention_mask"].float()) * -10000.0
        for layer in m.text_transformer.encoder.layer:
            x = layer(x, add)
    real = b["attention_mask"].bool()
    assert torch.allclose(x[real], want[real], atol=1e-5), (x[real] - want[real]).abs().max()
