"""Property and reference tests of so8lab.models (SPEC §3): shapes of every configuration, attention against a
float64 reference, the Flamingo gate at 0, conditioning, padding, batch independence, input errors, determinism,
parameter counts by hand, and a small overfit run."""
import subprocess, sys
from dataclasses import replace
from itertools import product

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import math
from so8lab.adapters import build_model
from so8lab.models import (CONDITIONINGS, ENCODERS, FUSIONS, GRID_FUSIONS, PROGRAM_ENCODINGS, SO8T_FUSIONS, Attention, GridModel, ModelConfig,
                           SparseAutoencoder, TokenLayout, attention_weights, count_parameters, patchify, step_code, unpatchify)
from so8lab.primitives import composition_id
from so8lab.tasks import sample_tasks

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny models run fastest on one thread (and do not oversubscribe the CPU under pytest -n)."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ModelConfig(d_model=32, bottleneck_dim=16, layers=2, heads=4, sae_width=24)
ALL = [c for c in product(ENCODERS, CONDITIONINGS, FUSIONS, (1, 2)) if not (c[1] == "none" and c[2] in SO8T_FUSIONS)]  # so8t fuses a context


@pytest.fixture(scope="module")
def batch(): return sample_tasks(5, with_demo=True, seed=3)


def tiny(**changes): return replace(TINY, **changes)


def model_for(seed=0, **changes):
    torch.manual_seed(seed)
    return build_model(tiny(**changes)).eval()      # a MultimodalSO8T for the so8t fusions


def open_gates(model, value=0.8):
    for gate in getattr(model, "cross_attention", []): nn.init.constant_(gate.alpha, value)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Shapes and layout

@pytest.mark.parametrize("encoder,conditioning,fusion,patch", ALL)
def test_shapes_of_every_configuration(batch, encoder, conditioning, fusion, patch):
    model = model_for(encoder=encoder, conditioning=conditioning, fusion=fusion, patch_size=patch)
    attention = encoder == "transformer"
    out = model.forward_batch(batch, return_hidden=True, return_attention=attention)
    n = 64 // patch ** 2
    context = {"program": 9, "demo": 2 * n, "none": 0}[conditioning]
    length = n + (context if fusion == "concat" else 0)
    assert out.logits.shape == (5, 4, 8, 8)
    assert (out.h.shape, out.h_cells.shape, out.z.shape, out.h_hat.shape) == ((5, 16), (5, n, 16), (5, 24), (5, 16))
    assert out.primitive_logits.shape == (5, 6)
    assert [h.shape for h in out.hidden] == [(5, length, 32)] * 2
    assert out.layout.length == length and out.layout.cell_count == n
    if fusion != "so8t_resampler": assert len(out.layout.context_segments) == context   # the resampler's context is its latents
    torch.testing.assert_close(out.h, out.h_cells.mean(1))
    if attention: assert [a.shape for a in out.attentions] == [(5, 4, length, length)] * 2
    cross = fusion != "concat" and conditioning != "none"
    keys = 8 if fusion == "so8t_resampler" else context          # the resampler hands over its 8 latents
    if attention and cross: assert [a.shape for a in out.cross_attentions] == [(5, 4, n, keys)] * 2
    else: assert out.cross_attentions is None
    assert torch.isfinite(out.logits).all()


@given(st.integers(1, 2), st.integers(0, 7), st.integers(0, 7), st.booleans())
def test_layout_maps_cells_to_their_tokens(patch, row, column, concatenated):
    layout = TokenLayout(("program",) * 9, concatenated, patch)
    side = 8 // patch
    sequence = torch.arange(float(layout.length))
    expected = (9 if concatenated else 0) + (row // patch) * side + column // patch
    assert layout.position(row, column) == expected
    assert layout.to_grid(sequence)[row, column] == expected
    assert layout.to_grid(sequence[layout.cells])[row, column] == expected


@given(st.integers(1, 3), st.sampled_from([1, 2]), st.integers(1, 4))
def test_unpatchify_inverts_patchify(batch_size, patch, features):
    grid = torch.randn(batch_size, 8, 8, features)
    tokens = patchify(grid, patch)
    assert tokens.shape == (batch_size, (8 // patch) ** 2, patch * patch * features)
    for t in range(tokens.shape[1]):  # loop reference: token t covers rows/cols of its patch, row-major inside
        r, c = divmod(t, 8 // patch)
        block = grid[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
        assert torch.equal(tokens[:, t], block.reshape(batch_size, -1))
    assert torch.equal(unpatchify(tokens, patch), grid.permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------------------------
# Attention

def reference_attention(x, context, mask, module, heads):
    "Float64 multi-head attention from the textbook formula, head by head, from `module`'s weights."
    weights = {k: v.detach().double() for k, v in module.state_dict().items()}
    if "qkv.weight" in weights:
        wq, wk, wv = weights["qkv.weight"].chunk(3); bq, bk, bv = weights["qkv.bias"].chunk(3)
    else:
        wq, bq = weights["query.weight"], weights["query.bias"]
        wk, wv = weights["key_value.weight"].chunk(2); bk, bv = weights["key_value.bias"].chunk(2)
    x, context = x.double(), context.double()
    q, k, v = x @ wq.T + bq, context @ wk.T + bk, context @ wv.T + bv
    e, outputs, maps = q.shape[-1] // heads, [], []
    for head in range(heads):
        part = slice(head * e, (head + 1) * e)
        scores = (q[..., part] @ k[..., part].transpose(-2, -1)) / e ** 0.5
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        maps.append(scores.softmax(-1)); outputs.append(maps[-1] @ v[..., part])
    return torch.cat(outputs, -1) @ weights["out.weight"].T + weights["out.bias"], torch.stack(maps, 1)


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 2, 4]), st.booleans(),
       st.integers(0, 2 ** 31 - 1))
def test_attention_matches_float64_reference(batch_size, queries, keys, heads, cross, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = Attention(8, heads, cross=cross)
    x = torch.randn(batch_size, queries, 8, generator=generator)
    context = torch.randn(batch_size, keys, 8, generator=generator) if cross else x
    mask = torch.rand(batch_size, context.shape[1], generator=generator) > 0.4
    mask[:, 0] = True
    expected, expected_maps = reference_attention(x, context, mask, module, heads)
    args = (context if cross else None, mask)
    fused, none = module(x, *args)
    explicit, maps = module(x, *args, return_attention=True)
    assert none is None
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(explicit.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.double(), expected_maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
    assert (maps.masked_select(~mask[:, None, None, :]) == 0).all()


def test_attention_weights_formula():
    q, k = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 6, 5, dtype=torch.float64)
    expected = torch.exp(torch.einsum("bhte,bhse->bhts", q, k) / 5 ** 0.5)
    torch.testing.assert_close(attention_weights(q, k), expected / expected.sum(-1, keepdim=True))


@pytest.mark.parametrize("conditioning,fusion,patch", [c for c in product(CONDITIONINGS, FUSIONS, (1, 2)) if not (c[0] == "none" and c[1] in SO8T_FUSIONS)])
def test_explicit_softmax_path_equals_fused_path(batch, conditioning, fusion, patch):
    model = open_gates(model_for(conditioning=conditioning, fusion=fusion, patch_size=patch))
    with torch.no_grad():
        fast = model.forward_batch(batch)
        slow = model.forward_batch(batch, return_attention=True, return_hidden=True)
    torch.testing.assert_close(slow.logits, fast.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow.z, fast.z, atol=1e-5, rtol=1e-5)
    for maps in slow.attentions + (slow.cross_attentions or []):
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
        assert (maps >= 0).all()


def test_program_padding_gets_no_attention_and_is_inert():
    data = sample_tasks(6, composition=torch.full((6,), composition_id(("FLIP",))))
    assert (data.tokens[:, 3:] == 0).all()
    for fusion in ("concat", "cross_attention", "so8t"):   # so8t_resampler's cross-attention reads its latents, not token positions
        model = open_gates(model_for(fusion=fusion))
        with torch.no_grad():
            full = model(data.inputs, data.tokens, return_attention=True)
            short = model(data.inputs, data.tokens[:, :3])
        torch.testing.assert_close(full.logits, short.logits, atol=1e-5, rtol=1e-5)
        maps = full.attentions if fusion == "concat" else full.cross_attentions
        for layer in maps: assert layer[..., 3:9].abs().max() == 0


@pytest.mark.parametrize("fusion", FUSIONS)
def test_an_empty_program_gives_finite_outputs(batch, fusion):
    model = open_gates(model_for(fusion=fusion))
    for return_attention in (False, True):
        out = model(batch.inputs, torch.zeros_like(batch.tokens), return_attention=return_attention)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.h).all()


def test_no_hooks_or_state_left_behind(batch):
    model = open_gates(model_for(fusion="cross_attention"))
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model.forward_batch(batch).logits
        model.forward_batch(batch, return_attention=True, return_hidden=True)
        after = model.forward_batch(batch)
    assert after.attentions is None and after.hidden is None and after.cross_attentions is None
    assert torch.equal(after.logits, before)
    assert list(model.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# Conditioning and the gate

@pytest.mark.parametrize("encoder,patch", list(product(ENCODERS, (1, 2))))
def test_program_changes_logits_in_program_mode(encoder, patch):
    grids, programs = sample_tasks(12, seed=1).inputs, sample_tasks(12, seed=2).tokens
    other = programs.roll(1, 0)
    changed = (programs != other).any(1)
    model = model_for(encoder=encoder, patch_size=patch)
    with torch.no_grad(): delta = (model(grids, programs).logits - model(grids, other).logits).flatten(1).abs().amax(1)
    assert changed.sum() >= 6 and (delta[changed] > 1e-4).all() and (delta[~changed] < 1e-5).all()


def test_demo_changes_logits_in_demo_mode():
    data = sample_tasks(8, with_demo=True, seed=4)
    model = model_for(conditioning="demo")
    with torch.no_grad():
        a = model(data.inputs, demo_inputs=data.demo_inputs, demo_outputs=data.demo_outputs).logits
        b = model(data.inputs, demo_inputs=data.demo_inputs, demo_outputs=data.demo_outputs.roll(1, 0)).logits
    assert ((a - b).flatten(1).abs().amax(1) > 1e-4).all()


@pytest.mark.parametrize("encoder,fusion", list(product(ENCODERS, GRID_FUSIONS)))
def test_none_mode_ignores_every_conditioning_input(encoder, fusion):
    data, other = sample_tasks(6, with_demo=True, seed=5), sample_tasks(6, with_demo=True, seed=6)
    model = model_for(encoder=encoder, fusion=fusion, conditioning="none")
    with torch.no_grad():
        plain = model(data.inputs).logits
        given_all = model(data.inputs, other.tokens, other.demo_inputs, other.demo_outputs).logits
    assert torch.equal(plain, given_all)
    assert not any(name.startswith(("token", "context", "cross")) for name, _ in model.named_parameters())


@pytest.mark.parametrize("encoder,conditioning,patch", list(product(ENCODERS, ("program", "demo"), (1, 2))))
def test_closed_gates_give_exactly_the_unconditioned_model(batch, encoder, conditioning, patch):
    gated = model_for(encoder=encoder, conditioning=conditioning, fusion="cross_attention", patch_size=patch)
    unconditioned = GridModel(tiny(encoder=encoder, conditioning="none", patch_size=patch)).eval()
    result = unconditioned.load_state_dict(gated.state_dict(), strict=False)
    assert result.missing_keys == []
    with torch.no_grad():
        a, b = gated.forward_batch(batch, return_hidden=True), unconditioned.forward_batch(batch, return_hidden=True)
    for x, y in zip([a.logits, a.h, a.z, a.primitive_logits, *a.hidden], [b.logits, b.h, b.z, b.primitive_logits, *b.hidden]):
        assert torch.equal(x, y)
    open_gates(gated, 0.3)
    with torch.no_grad(): assert not torch.equal(gated.forward_batch(batch).logits, b.logits)


def test_gate_gradient_is_nonzero_at_initialisation(batch):
    model = model_for(fusion="cross_attention").train()
    out = model.forward_batch(batch)
    F.cross_entropy(out.logits, batch.outputs.long()).backward()
    for gate in model.cross_attention:
        assert gate.alpha.grad.abs() > 0
        assert gate.attention.query.weight.grad.abs().max() == 0  # tanh(0) = 0 blocks it until the gate opens


def test_samples_do_not_interact_across_the_batch(batch):
    for conditioning, fusion in product(CONDITIONINGS, FUSIONS):
        if conditioning == "none" and fusion in SO8T_FUSIONS: continue   # so8t fuses a context: 'none' has none
        model = open_gates(model_for(conditioning=conditioning, fusion=fusion))
        with torch.no_grad():
            together = model.forward_batch(batch).logits
            alone = torch.cat([model.forward_batch(batch[i]).logits for i in range(len(batch))])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_every_parameter_receives_gradient(batch):
    model = open_gates(model_for(), 0.5).train()
    out = model.forward_batch(batch)
    loss = F.cross_entropy(out.logits, batch.outputs.long()) + F.binary_cross_entropy_with_logits(out.primitive_logits, batch.multi_hot)
    (loss + (out.h - out.h_hat).pow(2).mean() + out.z.abs().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []


# ---------------------------------------------------------------------------------------------------------------
# Sparse autoencoder

@given(st.integers(1, 16), st.integers(1, 40), st.integers(0, 2 ** 31 - 1))
def test_sparse_autoencoder_formula_and_unit_norm(dim, width, seed):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(dim, width)
    torch.testing.assert_close(sae.decoder_weight.norm(dim=0), torch.ones(width))
    with torch.no_grad():
        for p in sae.parameters(): p.add_(torch.randn_like(p))
    h = torch.randn(3, dim)
    z, h_hat = sae(h)
    E, be, D, bd = (p.detach().double() for p in (sae.encoder_weight, sae.encoder_bias, sae.decoder_weight, sae.decoder_bias))
    z_ref = torch.clamp((h.double() - bd) @ E.T + be, min=0)
    torch.testing.assert_close(z.double(), z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_hat.double(), z_ref @ D.T + bd, atol=1e-5, rtol=1e-5)
    direction = sae.decoder_weight.detach() / sae.decoder_weight.detach().norm(dim=0)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.decoder_weight.norm(dim=0), torch.ones(width))
    torch.testing.assert_close(sae.decoder_weight, direction)


# ---------------------------------------------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("field,value", [("encoder", "lstm"), ("conditioning", "text"), ("fusion", "add"), ("num_colors", 1),
                                         ("num_colors", 11), ("d_model", 0), ("d_model", 32.0), ("bottleneck_dim", 0),
                                         ("layers", 1), ("layers", 5), ("heads", 0), ("patch_size", 4), ("patch_size", True),
                                         ("mlp_ratio", -1.0), ("mlp_ratio", "4"), ("dropout", -0.1), ("dropout", 1.0),
                                         ("sae_width", 0), ("program_layers", -1), ("decoder_layers", 9),
                                         ("program_encoding", "relative"), ("program_encoding", None)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field): ModelConfig(**{field: value})


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="d_model must be divisible by heads"): ModelConfig(d_model=30, heads=4)


def test_missing_and_bad_inputs_name_the_argument(batch):
    program, demo = model_for(), model_for(conditioning="demo")
    cases = [(lambda: program(batch.inputs), "tokens"), (lambda: demo(batch.inputs), "demo_inputs"),
             (lambda: demo(batch.inputs, demo_inputs=batch.demo_inputs), "demo_outputs"),
             (lambda: program(batch.inputs.float(), batch.tokens), "inputs"),
             (lambda: program(batch.inputs.view(5, 64), batch.tokens), "inputs"),
             (lambda: program(batch.inputs.numpy(), batch.tokens), "inputs"),
             (lambda: program(batch.inputs + 4, batch.tokens), "inputs"),
             (lambda: program(batch.inputs, batch.tokens[:, :0]), "tokens"),
             (lambda: program(batch.inputs, torch.zeros(5, 10, dtype=torch.long)), "tokens"),
             (lambda: program(batch.inputs, batch.tokens - 1), "tokens"),
             (lambda: demo(batch.inputs, demo_inputs=batch.demo_inputs[:2], demo_outputs=batch.demo_outputs), "demo_inputs"),
             (lambda: demo(batch.inputs, demo_inputs=batch.demo_inputs, demo_outputs=batch.demo_outputs + 9), "demo_outputs"),
             (lambda: model_for(encoder="gru").forward_batch(batch, return_attention=True), "return_attention")]
    for call, name in cases:
        with pytest.raises((ValueError, TypeError), match=name): call()


# ---------------------------------------------------------------------------------------------------------------
# Initialisation and parameter counts

def test_initialisation_is_deterministic_and_process_independent():
    a, b, c = model_for(seed=3), model_for(seed=3), model_for(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    script = ("import torch; from so8lab.models import GridModel, ModelConfig; torch.manual_seed(3); "
              "m = GridModel(ModelConfig(d_model=32, bottleneck_dim=16, layers=2, heads=4, sae_width=24)); "
              "print(sum(float((p.double() * (i + 1)).sum()) for i, p in enumerate(m.state_dict().values())).hex())")
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    mine = sum(float((p.double() * (i + 1)).sum()) for i, p in enumerate(a.state_dict().values())).hex()
    assert fresh == mine


def block(d, m): return 4 * d * d + 9 * d + 2 * d * m + m


@pytest.mark.parametrize("d,ratio,layers,patch,width", [(128, 4.0, 3, 1, 512), (64, 2.0, 2, 2, 100), (32, 3.0, 4, 1, 7)])
def test_parameter_count_by_hand(d, ratio, layers, patch, width):
    m, colours = round(d * ratio), 4
    config = ModelConfig(d_model=d, mlp_ratio=ratio, layers=layers, patch_size=patch, sae_width=width, bottleneck_dim=d, heads=4)
    embedding = patch * patch * colours * d + d + 2 * (8 // patch) * d + 4 * d
    program = 19 * d + 3 * d + block(d, m)              # token embedding, 3 role rows (program_encoding='step')
    bottleneck = 2 * (d * d + d)
    decoder = block(d, m) + 2 * d + d * patch * patch * colours + patch * patch * colours
    sae, primitive = 2 * d * width + width + d, 6 * d + 6
    concat = embedding + program + layers * block(d, m) + 2 * d + bottleneck + decoder + sae + primitive
    assert count_parameters(GridModel(config)) == concat
    gates = layers * (2 * d + 4 * d * d + 4 * d + 1) + 2 * d
    assert count_parameters(GridModel(replace(config, fusion="cross_attention"))) == concat + gates
    gru = 2 * d + 2 * 3 * (2 * d * d + 2 * d) + 2 * d * d + d
    assert count_parameters(GridModel(replace(config, encoder="gru"))) == concat + layers * (gru - block(d, m))
    assert count_parameters(GridModel(replace(config, program_encoding="absolute"))) == concat + 6 * d   # 9 rows, not 3


def test_count_parameters_trainable_only():
    model = model_for()
    total = count_parameters(model)
    for p in model.sae.parameters(): p.requires_grad_(False)
    assert count_parameters(model) == total - sum(p.numel() for p in model.sae.parameters())
    assert count_parameters(model, trainable_only=False) == total
    with pytest.raises(TypeError, match="module"): count_parameters(torch.zeros(3))


def test_bottleneck_layers_are_plain_linears_used_by_forward(batch):
    model = model_for()
    assert type(model.bottleneck_in) is nn.Linear and type(model.bottleneck_out) is nn.Linear
    assert (model.bottleneck_in.in_features, model.bottleneck_in.out_features) == (32, 16)
    calls = []
    for name in ("bottleneck_in", "bottleneck_out"):
        inner = getattr(model, name)
        wrapper = nn.Module(); wrapper.forward = lambda x, inner=inner, name=name: calls.append(name) or inner(x)
        setattr(model, name, wrapper)
    model.forward_batch(batch)
    assert calls == ["bottleneck_in", "bottleneck_out"]


def test_bfloat16_autocast_runs(batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model_for().forward_batch(batch)
        F.cross_entropy(out.logits.float(), batch.outputs.long()).backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


# ---------------------------------------------------------------------------------------------------------------
# Learning

@pytest.mark.parametrize("conditioning,fusion,name", [("program", "concat", ("FLIP",)), ("demo", "concat", ("SHIFT",))])
def test_overfits_a_small_batch_of_one_composition(conditioning, fusion, name):
    torch.manual_seed(0)
    data = sample_tasks(16, composition=torch.full((16,), composition_id(name)), seed=12, with_demo=True)
    model = GridModel(tiny(conditioning=conditioning, fusion=fusion))
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(500):
        logits = model.forward_batch(data).logits
        accuracy = (logits.argmax(1) == data.outputs).float().mean().item()
        if accuracy == 1.0: break
        optimizer.zero_grad(); F.cross_entropy(logits, data.outputs.long()).backward(); optimizer.step()
    assert accuracy == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Program encoding (issue 12): a length-3 program reads nothing that length-1/2 training leaves untrained

def nonzero_gradient_entries(model, batch):
    """The set of (parameter name, flat index) whose gradient of the training loss on `batch` is nonzero, in float64:
    some gradients are zero in exact arithmetic but not in float32 (a key bias shifts every score of a query
    equally, and softmax ignores that), so "nonzero" means above float64 rounding (1e-10)."""
    model.double()
    for p in model.parameters(): p.grad = None
    out = model.forward_batch(batch)
    loss = F.cross_entropy(out.logits, batch.outputs.long()) + F.binary_cross_entropy_with_logits(out.primitive_logits, batch.multi_hot)
    loss.backward()
    return {(name, int(i)) for name, p in model.named_parameters() if p.grad is not None
            for i in torch.nonzero(p.grad.flatten().abs() > 1e-10).flatten()}


@pytest.mark.parametrize("fusion", ("concat", "cross_attention", "so8t"))   # a resampler mixes all positions into its latents
def test_length_3_programs_read_only_trained_entries(fusion):
    """After a backward pass on length-1/2 programs, every parameter entry a length-3 forward pass reads has a
    nonzero gradient with program_encoding='step'; with 'absolute' exactly rows 6-8 of token_position do not."""
    short, long = sample_tasks(384, "train", seed=21), sample_tasks(48, "heldout", seed=21)
    assert ((short.primitive >= 0).sum(1) <= 2).all() and ((long.primitive >= 0).sum(1) == 3).all()
    d = TINY.d_model
    for encoding in PROGRAM_ENCODINGS:
        model = open_gates(model_for(seed=5, fusion=fusion, program_encoding=encoding), 0.5).train()
        trained, read = nonzero_gradient_entries(model, short), nonzero_gradient_entries(model, long)
        assert len(read) > 1000
        never_trained = read - trained
        if encoding == "step":
            assert never_trained == set()
            assert {("token_role", i) for i in range(3 * d)} <= trained
        else:
            assert never_trained == {("token_position", i) for i in range(6 * d, 9 * d)}   # rows 6, 7, 8


def test_default_program_encoding_is_step():
    assert ModelConfig().program_encoding == "step"
    names = dict(model_for().named_parameters())
    assert "token_role" in names and "token_position" not in names and names["token_role"].shape == (3, 32)
    absolute = dict(model_for(program_encoding="absolute").named_parameters())
    assert "token_position" in absolute and "token_role" not in absolute and absolute["token_position"].shape == (9, 32)


def test_step_code_is_the_sinusoidal_formula():
    for steps, d in ((3, 32), (5, 7)):
        code = step_code(steps, d)
        for s in range(steps):
            for j in range(d):
                angle = s / 10000 ** ((j - j % 2) / d)
                assert abs(float(code[s, j]) - (math.sin(angle) if j % 2 == 0 else math.cos(angle))) < 1e-6


def test_program_position_is_role_plus_step_code(batch):
    model = model_for()
    position, code = model.program_position(), step_code(3, 32)
    for t in range(9):
        torch.testing.assert_close(position[t], model.token_role[t % 3] + code[t // 3])
    # the embedding of a program token is token + position + program segment
    x = model.token_embedding(batch.tokens) + position + model.segment_embedding.weight[3]
    manual = x
    for block_ in model.context_encoder: manual = block_(manual, batch.tokens != 0)[0]
    torch.testing.assert_close(model.encode_context(batch.tokens)[0], manual)


def test_step_model_moves_its_code_with_the_model_and_keeps_it_out_of_the_state_dict():
    model = model_for().double()
    assert model.step_code.dtype == torch.float64
    assert "step_code" not in model.state_dict() and "step_code" in dict(model.named_buffers())


def test_checkpoints_of_the_other_encoding_give_a_clear_error():
    absolute, step = model_for(seed=1, program_encoding="absolute"), model_for(seed=1)
    fresh = model_for(seed=2, program_encoding="absolute")
    fresh.load_state_dict(absolute.state_dict())                      # the pre-issue-12 name still loads
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), absolute.state_dict().values()))
    with pytest.raises(ValueError, match="program_encoding='absolute'"): step.load_state_dict(absolute.state_dict())
    with pytest.raises(ValueError, match="program_encoding='step'"): absolute.load_state_dict(step.state_dict())
    result = step.load_state_dict(absolute.state_dict(), strict=False)   # non-strict loads behave as in torch
    assert result.missing_keys == ["token_role"] and result.unexpected_keys == ["token_position"]
