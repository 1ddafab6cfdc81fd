"""torchvision VisionTransformer end to end: coverage, conservation in both modes, and the
functional bits (residual adds, position embedding, class token, patch mapping)."""

from __future__ import annotations

import pytest
import torch
import torchvision as tv
from helpers import assert_conserved

import dlbhooks as dlb
from dlbhooks.engine import Engine
from dlbhooks.rules.attention import mha_recompute
from dlbhooks.rules.elementwise import add_rule

DT = torch.float64


def small_vit(seed=0, **kw):
    torch.manual_seed(seed)
    m = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                    hidden_dim=16, mlp_dim=32, num_classes=5, **kw)
    with torch.no_grad():  # torchvision zero-initialises the head, class token and biases
        for name, p in m.named_parameters():
            if name.endswith("bias") or name in ("class_token", "heads.head.weight"):
                p.normal_(0, 0.3)
    return m.to(DT).eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=DT)


def test_coverage_complete():
    cov = dlb.coverage(small_vit())
    assert cov.complete, str(cov)
    assert cov.rules[""] == "torchvision_vit"
    assert cov.rules["encoder"] == "torchvision_vit_encoder"
    assert cov.rules["encoder.layers.encoder_layer_0"] == "torchvision_vit_encoder_block"
    assert cov.rules["encoder.layers.encoder_layer_0.self_attention"] == "multihead_attention"


@pytest.mark.parametrize("kw", [{}, dict(representation_size=12)])
def test_vit_conserves_both_modes(kw):
    model = small_vit(**kw)
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, X, mode=mode)
        assert_conserved(exp)
        assert exp.inputs["x"].shape == X.shape
        assert float(exp.inputs["x"].abs().sum()) > 1e-3


def test_class_token_position_embedding_and_patch_mapping():
    model = small_vit(seed=2)
    with dlb.trace(model) as tape:
        model(X)
    exp = tape.explain()
    root = tape.last_root()
    for i in range(2):  # the rule's recomputed attention is the module's (fast path here)
        att = root.child(f"encoder.layers.encoder_layer_{i}.self_attention")
        assert torch.allclose(mha_recompute(att), att.outputs[0], rtol=0, atol=1e-13)
    ledger = {e.key: e for e in exp.ledger}
    total = 100.0 * X.shape[0]  # (the differences below: measured 0)
    assert abs(ledger["<root>"].relevance_out - total) < 1e-12 * total

    # the class token keeps exactly the relevance of position 0 of the encoder input
    R_enc = exp.at("encoder")  # [n, 1 + patches, hidden]
    assert abs(ledger["<root>"].absorbed - float(R_enc[:, 0].sum())) < 1e-12 * total
    assert float(R_enc[:, 0].abs().sum()) > 0

    # position embedding: its add-rule share of the relevance on input + pos_embedding
    R_sum = exp.at("encoder.dropout")
    enc = root.child("encoder")
    pos = model.encoder.pos_embedding.detach()
    (R_x, R_pos), lost = add_rule(R_sum, [enc.input_value(0), pos])
    assert abs(ledger["encoder"].absorbed - float(R_pos.sum() + lost)) < 1e-12 * total
    assert torch.allclose(R_enc, R_x, rtol=0, atol=1e-12)

    # patch tokens return to conv_proj's output: [n, tokens, hidden] -> [n, hidden, h, w]
    conv = root.child("conv_proj")
    R_feat = R_enc[:, 1:].permute(0, 2, 1).reshape(conv.outputs[0].shape)
    want = Engine(tape).propagate(conv, [R_feat.unsqueeze(0)])[0][0]  # one stream
    assert torch.allclose(exp.inputs["x"], want, rtol=0, atol=1e-12)
    # ... and a transposed mapping would not give the same input relevance
    wrong = R_enc[:, 1:].reshape(conv.outputs[0].shape)
    assert not torch.allclose(Engine(tape).propagate(conv, [wrong.unsqueeze(0)])[0][0], want,
                              atol=1e-6)


def test_encoder_block_residuals_use_the_add_rule():
    model = small_vit(seed=3)
    with dlb.trace(model) as tape:
        model(X)
    exp = tape.explain()
    blk = tape.last_root().child("encoder.layers.encoder_layer_1")
    R_out = exp.at("encoder.ln")  # relevance on the last block's output
    mid, mlp = blk.child("ln_2").input_value(0), blk.child("mlp").output_value(0)
    (R_mid, R_mlp), _ = add_rule(R_out, [mid, mlp])
    ledger = {e.key: e for e in exp.ledger}
    assert abs(ledger["encoder.layers.encoder_layer_1.mlp"].relevance_out
               - float(R_mlp.sum())) < 1e-12 * 200
    # the relevance on x = attention + input: add-rule share plus ln_2's input relevance
    R_x = R_mid + exp.at("encoder.layers.encoder_layer_1.ln_2")
    attn_out = blk.child("dropout").output_value(0)
    (R_attn, R_res), _ = add_rule(R_x, [attn_out, blk.input_value(0)])
    assert abs(ledger["encoder.layers.encoder_layer_1.self_attention"].relevance_out
               - float(R_attn.sum())) < 1e-12 * 200
    R_block_in = R_res + exp.at("encoder.layers.encoder_layer_1.ln_1")
    assert torch.allclose(exp.at("encoder.layers.encoder_layer_1"), R_block_in, rtol=0,
                          atol=1e-12)
