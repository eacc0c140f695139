"""`vqtok convert`: synthetic checkpoints in each published layout (tiny sizes, the sources' exact key names) arrive
bit-identical at their mapped names, keep their tokens, and compute what taming's network computes."""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vqtok.cli import main as cli_main
from vqtok.convert import convert
from vqtok.models import Tokenizer

# A tiny network with attention at its lowest level: ch 32 (GroupNorm(32) as taming), 3 levels, 1 block (decoder 2).
CH, CH_MULT, BLOCKS, Z, DIM, K, FEATURES = 32, (1, 2, 2), 1, 32, 4, 40, 12


# -- the sources' key names, written out from their model code ----------------------------------------------------
def network_shapes(layout: str, ch=CH, ch_mult=CH_MULT, blocks=BLOCKS, z=Z, attn=True) -> dict[str, tuple]:
    """Every encoder/decoder tensor of taming's Encoder/Decoder (layout "taming": taming, IBQ, VQGAN-LC) or of
    LlamaGen's vq_model.py (layout "llamagen"), with its shape, in the source's own names."""
    llama = layout == "llamagen"
    shapes: dict[str, tuple] = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin, 3), norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attention(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(net, c):
        names = ("0", "1", "2") if llama else ("block_1", "attn_1", "block_2")
        resnet(f"{net}.mid.{names[0]}", c, c), attention(f"{net}.mid.{names[1]}", c)
        resnet(f"{net}.mid.{names[2]}", c, c)

    levels = len(ch_mult)
    conv("encoder.conv_in", ch, 3, 3)
    c = ch
    for i, m in enumerate(ch_mult):
        level = f"encoder.conv_blocks.{i}" if llama else f"encoder.down.{i}"
        for j in range(blocks):
            resnet(f"{level}.{'res' if llama else 'block'}.{j}", c, ch * m)
            c = ch * m
            if attn and i == levels - 1:
                attention(f"{level}.attn.{j}", c)
        if i != levels - 1:
            conv(f"{level}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", z, c, 3)
    c = ch * ch_mult[-1]
    conv("decoder.conv_in", c, z, 3)
    mid("decoder", c)
    for k, i in enumerate(reversed(range(levels))):  # LlamaGen appends in execution order; taming indexes by level
        level = f"decoder.conv_blocks.{k}" if llama else f"decoder.up.{i}"
        for j in range(blocks + 1):
            resnet(f"{level}.{'res' if llama else 'block'}.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
            if attn and i == levels - 1:
                attention(f"{level}.attn.{j}", c)
        if i != 0:
            conv(f"{level}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", 3, c, 3)
    return shapes


def random_tensors(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Distinct random values (so each tensor can be recognised by its bytes), scaled to keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            base = 1.0 if name.endswith("weight") and ("norm" in name) else 0.0
            out[name] = base + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return out


def quant_shapes(dim=DIM, z=Z) -> dict[str, tuple]:
    return {"quant_conv.weight": (dim, z, 1, 1), "quant_conv.bias": (dim,),
            "post_quant_conv.weight": (z, dim, 1, 1), "post_quant_conv.bias": (z,)}


def taming_state(seed=0, **kw) -> dict[str, torch.Tensor]:
    shapes = {**network_shapes("taming", **kw), **quant_shapes(), "quantize.embedding.weight": (K, DIM)}
    state = random_tensors(shapes, seed)
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)  # dropped
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    return state


def ibq_state(seed=0) -> dict[str, torch.Tensor]:
    """Generator + LitEma's copy of every parameter under its dot-stripped name (other values), as SEED-Voken saves."""
    raw = taming_state(seed)
    state = dict(raw)
    for name, tensor in raw.items():
        state["model_ema." + name.replace(".", "")] = tensor + 0.01 * torch.randn_like(tensor)
    state["model_ema.decay"] = torch.tensor(0.999)
    state["model_ema.num_updates"] = torch.tensor(-1, dtype=torch.int32)
    return state


def lc_state(seed=0) -> dict[str, torch.Tensor]:
    shapes = {**network_shapes("taming"), **quant_shapes(), "tok_embeddings.weight": (K, FEATURES),
              "codebook_projection.weight": (DIM, FEATURES), "codebook_projection.bias": (DIM,)}
    state = random_tensors(shapes, seed)
    state["discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    return state


def llamagen_state(seed=0) -> dict[str, torch.Tensor]:
    shapes = {**network_shapes("llamagen"), **quant_shapes(), "quantize.embedding.weight": (K, DIM)}
    state = random_tensors(shapes, seed)
    state["quantize.codebook_used"] = torch.arange(65536).float()
    return state


DROPPED = {
    "taming": ("loss.",),
    "ibq": ("loss.", "model_ema.decay", "model_ema.num_updates", "model_ema.loss"),
    "vqgan-lc": ("discriminator.", "perceptual_loss."),
    "llamagen": ("quantize.codebook_used",),
}


def save(tmp_path: Path, checkpoint: dict, name: str = "source.ckpt") -> Path:
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def origins(saved: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> dict[str, str]:
    """{vqtok name: the source key whose tensor it equals bit for bit} (every source tensor has distinct values)."""
    by_bytes = {}
    for key, tensor in source.items():
        by_bytes.setdefault((tuple(tensor.shape), tensor.float().numpy().tobytes()), []).append(key)
    found = {}
    for name, tensor in saved.items():
        keys = by_bytes.get((tuple(tensor.shape), tensor.numpy().tobytes()), [])
        assert len(keys) == 1, f"{name} equals {len(keys)} source tensors"
        found[name] = keys[0]
    return found


# -- every tensor arrives bit-identical at its mapped name ----------------------------------------------------------
CASES = {  # name: (source, the checkpoint, weights option, the source keys that must be used)
    "taming": ("taming", lambda: {"state_dict": taming_state(), "epoch": 7}, None, lambda s: not s.startswith("loss.")),
    "ibq-ema": ("ibq", lambda: {"state_dict": ibq_state()}, None,
                lambda s: s.startswith("model_ema.") and not s.startswith(DROPPED["ibq"])),
    "ibq-raw": ("ibq", lambda: {"state_dict": ibq_state()}, "raw", lambda s: not s.startswith(("model_ema.", "loss."))),
    "vqgan-lc": ("vqgan-lc", lambda: {"model": lc_state()}, None, lambda s: not s.startswith(DROPPED["vqgan-lc"])),
    "llamagen-ema": ("llamagen", lambda: {"model": llamagen_state(1), "ema": llamagen_state(2)}, None,
                     lambda s: s != "quantize.codebook_used"),
    "llamagen-raw": ("llamagen", lambda: {"model": llamagen_state(1), "ema": llamagen_state(2)}, "raw",
                     lambda s: s != "quantize.codebook_used"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_arrives_bit_identical_and_only_the_documented_drops_are_left(tmp_path, case):
    source, make, weights, used = CASES[case]
    checkpoint = make()
    model = convert(source, save(tmp_path, checkpoint), tmp_path / "run", weights=weights)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert set(saved) == set(model.state_dict())
    container = {"llamagen-ema": "ema", "llamagen-raw": "model", "vqgan-lc": "model"}.get(case, "state_dict")
    state = checkpoint[container]
    found = origins(saved, state)
    assert len(set(found.values())) == len(found)  # one source tensor per vqtok tensor
    assert set(found.values()) == {k for k in state if used(k)}  # all of them, nothing else
    info = json.loads((tmp_path / "run" / "config.json").read_text())["convert"]
    assert info["container"] == container and info["source"] == source


def test_the_documented_renames(tmp_path):
    """taming: down.i.downsample -> resample, mid.block_1/attn_1/block_2 -> mid.0/1/2, up.i (by resolution) ->
    up.(L-1-i) (execution order); LlamaGen's decoder conv_blocks.k is already in execution order; IBQ's EMA copy is
    the dot-stripped name; LC's codebook and projector."""
    taming = taming_state()
    run = _converted(tmp_path, "taming", {"state_dict": taming})
    found = origins(load_file(str(run / "model.safetensors")), taming)
    assert found["encoder.down.0.resample.conv.weight"] == "encoder.down.0.downsample.conv.weight"
    assert found["encoder.mid.1.q.weight"] == "encoder.mid.attn_1.q.weight"
    assert found["decoder.mid.2.conv2.bias"] == "decoder.mid.block_2.conv2.bias"
    assert found["decoder.up.0.block.0.conv1.weight"] == "decoder.up.2.block.0.conv1.weight"  # lowest resolution first
    assert found["decoder.up.0.attn.1.proj_out.weight"] == "decoder.up.2.attn.1.proj_out.weight"
    assert found["decoder.up.1.resample.conv.weight"] == "decoder.up.1.upsample.conv.weight"
    assert found["decoder.up.2.block.0.nin_shortcut.weight"] == "decoder.up.0.block.0.nin_shortcut.weight"
    assert found["quantizer.codebook"] == "quantize.embedding.weight"

    llama = llamagen_state()
    found = origins(load_file(str(_converted(tmp_path, "llamagen", {"model": llama}) / "model.safetensors")), llama)
    assert found["decoder.up.0.block.0.conv1.weight"] == "decoder.conv_blocks.0.res.0.conv1.weight"
    assert found["decoder.up.0.attn.1.q.weight"] == "decoder.conv_blocks.0.attn.1.q.weight"
    assert found["decoder.up.0.resample.conv.weight"] == "decoder.conv_blocks.0.upsample.conv.weight"
    assert found["encoder.down.2.attn.0.k.weight"] == "encoder.conv_blocks.2.attn.0.k.weight"
    assert found["encoder.mid.0.norm1.weight"] == "encoder.mid.0.norm1.weight"

    ibq = ibq_state()
    found = origins(load_file(str(_converted(tmp_path, "ibq", {"state_dict": ibq}) / "model.safetensors")), ibq)
    assert found["encoder.conv_in.weight"] == "model_ema.encoderconv_inweight"
    assert found["decoder.up.0.block.1.norm2.bias"] == "model_ema.decoderup2block1norm2bias"
    assert found["quantizer.codebook"] == "model_ema.quantizeembeddingweight"

    lc = lc_state()
    found = origins(load_file(str(_converted(tmp_path, "vqgan-lc", lc) / "model.safetensors")), lc)
    assert found["quantizer.codebook"] == "tok_embeddings.weight"
    assert found["quantizer.projector.weight"] == "codebook_projection.weight"
    assert found["quantizer.projector.bias"] == "codebook_projection.bias"


def _converted(tmp_path: Path, source: str, checkpoint: dict, **options) -> Path:
    out = tmp_path / f"run-{source}-{len(list(tmp_path.iterdir()))}"
    convert(source, save(tmp_path, checkpoint, f"{out.name}.ckpt"), out, **options)
    return out


@pytest.mark.parametrize("source, make, container", [
    ("taming", taming_state, "state_dict"), ("taming", taming_state, None),
    ("ibq", ibq_state, "state_dict"), ("ibq", ibq_state, None),
    ("vqgan-lc", lc_state, "state_dict"), ("vqgan-lc", lc_state, "model"), ("vqgan-lc", lc_state, None),
    ("llamagen", llamagen_state, "model"), ("llamagen", llamagen_state, "ema"), ("llamagen", llamagen_state, None),
])
def test_each_container_converts(tmp_path, source, make, container):
    state = make()
    checkpoint = state if container is None else {container: state, "steps": 10, "args": argparse.Namespace(lr=1e-4)}
    run = _converted(tmp_path, source, checkpoint)
    saved = load_file(str(run / "model.safetensors"))
    assert len(origins(saved, state)) == len(saved)
    assert json.loads((run / "config.json").read_text())["convert"]["container"] == (container or "bare")


def test_ibq_takes_the_ema_copy_by_default_and_the_raw_weights_on_request(tmp_path):
    state = ibq_state()
    ema = load_file(str(_converted(tmp_path, "ibq", {"state_dict": state}) / "model.safetensors"))
    raw = load_file(str(_converted(tmp_path, "ibq", {"state_dict": state}, weights="raw") / "model.safetensors"))
    assert torch.equal(ema["quantizer.codebook"], state["model_ema.quantizeembeddingweight"])
    assert torch.equal(raw["quantizer.codebook"], state["quantize.embedding.weight"])
    assert not torch.equal(ema["encoder.conv_in.weight"], raw["encoder.conv_in.weight"])
    no_ema = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    with pytest.raises(ValueError, match="no EMA copy"):
        _converted(tmp_path, "ibq", {"state_dict": no_ema}, weights="ema")
    plain = load_file(str(_converted(tmp_path, "ibq", {"state_dict": no_ema}) / "model.safetensors"))  # default: raw
    assert torch.equal(plain["quantizer.codebook"], state["quantize.embedding.weight"])
    with pytest.raises(ValueError, match="no 'ema' weights"):
        _converted(tmp_path, "llamagen", {"model": llamagen_state()}, weights="ema")


def test_lc_projected_codebook_is_tok_times_w_transposed_plus_b(tmp_path):
    state = lc_state()
    model = Tokenizer.from_pretrained(_converted(tmp_path, "vqgan-lc", {"state_dict": state}))
    tok, w, b = state["tok_embeddings.weight"], state["codebook_projection.weight"], state["codebook_projection.bias"]
    expected = tok @ w.T + b
    assert torch.allclose(model.quantizer.codebook_vectors(), expected, atol=1e-6, rtol=0)
    assert torch.equal(model.quantizer.codebook, state["tok_embeddings.weight"])  # raw features: standardize off
    assert model.config.quantizer_options["standardize"] is False and model.config.quantizer_weight == 0.1


def test_lc_takes_its_codebook_from_a_separate_file(tmp_path):
    state = lc_state()
    features = state.pop("tok_embeddings.weight")
    torch.save(features, tmp_path / "codebook-100K.pth")  # the original code's codebook file: a bare tensor
    run = _converted(tmp_path, "vqgan-lc", {"model": state}, codebook=tmp_path / "codebook-100K.pth")
    assert torch.equal(load_file(str(run / "model.safetensors"))["quantizer.codebook"], features)


# -- the tokens do not change --------------------------------------------------------------------------------------
# For z = (1, 0): code 0 is nearest in L2, code 1 has the largest inner product, code 2 the largest cosine; the other
# codes lose on every count.
CODES = torch.tensor([[0.9, 0.2], [3.0, 3.0], [0.1, 0.0]] + [[-10.0 - i, -10.0] for i in range(K - 3)])


def with_constant_latent(state: dict, codebook_key: str | None) -> dict:
    """quant_conv outputs z = (1, 0) everywhere whatever the image (zero weight, bias (1, 0)); dim 2."""
    state = dict(state)
    state["quant_conv.weight"] = torch.zeros(2, Z, 1, 1)
    state["quant_conv.bias"] = torch.tensor([1.0, 0.0])
    state["post_quant_conv.weight"] = torch.randn(Z, 2, 1, 1) / 2
    if codebook_key is not None:
        state[codebook_key] = CODES.clone()
    return state


@pytest.mark.parametrize("source, expected", [("taming", 0), ("ibq", 1), ("llamagen", 2), ("vqgan-lc", 0)])
def test_each_source_keeps_its_own_token_rule(tmp_path, source, expected):
    """taming: nearest L2; IBQ: argmax z . e; LlamaGen: cosine (both sides l2-normalised); VQGAN-LC: nearest L2 to
    the projected codebook. Each picks a different code here, through encode on the whole converted tokenizer."""
    if source == "vqgan-lc":
        state = with_constant_latent(lc_state(), None)
        w = torch.tensor([[1.0, 0.0, 0.5] + [0.0] * (FEATURES - 3), [0.0, 1.0, 0.0] + [0.0] * (FEATURES - 3)])
        b = torch.tensor([0.5, 0.0])
        extra = torch.randn(K, FEATURES)
        extra[:, :2] = 0.0
        tok = extra.clone()
        tok[:, 0] = CODES[:, 0] - b[0] - 0.5 * extra[:, 2]
        tok[:, 1] = CODES[:, 1] - b[1]  # so that tok @ w.T + b == CODES
        state.update({"tok_embeddings.weight": tok, "codebook_projection.weight": w, "codebook_projection.bias": b})
        checkpoint = {"state_dict": state}
    elif source == "ibq":
        state = with_constant_latent(taming_state(), "quantize.embedding.weight")  # no EMA copy: the raw weights
        checkpoint = {"state_dict": state}
    elif source == "llamagen":
        checkpoint = {"model": with_constant_latent(llamagen_state(), "quantize.embedding.weight")}
    else:
        checkpoint = {"state_dict": with_constant_latent(taming_state(), "quantize.embedding.weight")}
    model = Tokenizer.from_pretrained(_converted(tmp_path, source, checkpoint))
    ids = model.encode(torch.rand(2, 3, 16, 16))
    assert ids.shape == (2, 4, 4) and (ids == expected).all(), ids.unique()
    code = model.quantizer.embed(torch.full((1, 1, 1), expected))[0, :, 0, 0]
    want = F.normalize(CODES[expected], dim=0) if source == "llamagen" else CODES[expected]  # what decode uses
    assert torch.allclose(code, want, atol=1e-6), (code, want)


# -- the network computes what taming's does ----------------------------------------------------------------------
def taming_modules(attn: bool):
    model = pytest.importorskip("taming.modules.diffusionmodules.model")
    dd = dict(ch=CH, out_ch=3, ch_mult=CH_MULT, num_res_blocks=BLOCKS, attn_resolutions=[8] if attn else [],
              dropout=0.0, in_channels=3, resolution=32, z_channels=Z, double_z=False)
    return model.Encoder(**dd).eval(), model.Decoder(**dd).eval()


def test_the_written_out_taming_names_are_tamings(capsys):
    encoder, decoder = taming_modules(attn=True)
    real = {f"{p}.{k}": tuple(v.shape) for p, m in (("encoder", encoder), ("decoder", decoder))
            for k, v in m.state_dict().items()}
    assert real == network_shapes("taming")


def reference(state: dict, encoder, decoder, x01: torch.Tensor, lookup: str):
    """taming's computation: x / 127.5 - 1 (= 2x - 1), encoder, quant_conv, the source's lookup, post_quant_conv,
    decoder, clamp to [-1, 1]. Returns (ids, decoded on the [-1, 1] scale)."""
    encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
    decoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")})
    codebook = state["quantize.embedding.weight"]
    with torch.no_grad():
        z = F.conv2d(encoder(2 * x01 - 1), state["quant_conv.weight"], state["quant_conv.bias"])  # (B, D, h, w)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if lookup == "cosine":
            flat, codebook = F.normalize(flat, dim=1), F.normalize(codebook, dim=1)
        distance = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * flat @ codebook.T
        ids = distance.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])
        z_q = codebook[ids].permute(0, 3, 1, 2)
        out = decoder(F.conv2d(z_q, state["post_quant_conv.weight"], state["post_quant_conv.bias"]))
    return ids, out.clamp(-1, 1)


@pytest.mark.parametrize("attn", [True, False])
def test_the_network_computes_what_tamings_does(tmp_path, attn):
    encoder, decoder = taming_modules(attn)
    state = taming_state(attn=attn)
    model = convert("taming", save(tmp_path, {"state_dict": state}), tmp_path / "run")
    loaded = Tokenizer.from_pretrained(tmp_path / "run")
    assert loaded.config.autoencoder.attn_lowest is attn
    x = torch.rand(2, 3, 32, 32)
    ids, decoded = reference(state, encoder, decoder, x, "l2")
    with torch.no_grad():
        assert torch.allclose(loaded.encoder(2 * x - 1), encoder(2 * x - 1), atol=1e-5, rtol=1e-5)
    for tok in (model, loaded):  # the converted model and its run directory read back
        assert torch.equal(tok.encode(x), ids)
        assert torch.allclose(tok.decode(ids), (decoded + 1) / 2, atol=1e-5, rtol=1e-5)


class LlamaGenLevel(torch.nn.Module):
    """LlamaGen's conv_block: res.j, attn.j, downsample/upsample (vq_model.py), on taming's blocks (same math)."""

    def __init__(self, blocks, attn_blocks, resample_name=None, resample=None):
        super().__init__()
        self.res, self.attn = torch.nn.ModuleList(blocks), torch.nn.ModuleList(attn_blocks)
        if resample is not None:
            setattr(self, resample_name, resample)
        self.resample_name = resample_name if resample is not None else None

    def forward(self, h):
        for j, block in enumerate(self.res):
            h = block(h, None)
            if len(self.attn):
                h = self.attn[j](h)
        return getattr(self, self.resample_name)(h) if self.resample_name else h


def llamagen_networks():
    """LlamaGen's Encoder/Decoder (module names and forward order of vq_model.py) from taming's blocks."""
    m = pytest.importorskip("taming.modules.diffusionmodules.model")
    def res(cin, cout):
        return m.ResnetBlock(in_channels=cin, out_channels=cout, dropout=0.0, temb_channels=0)

    levels = len(CH_MULT)

    class Net(torch.nn.Module):
        def __init__(self, encoder: bool):
            super().__init__()
            self.encoder = encoder
            self.conv_blocks = torch.nn.ModuleList()
            if encoder:
                self.conv_in, c = torch.nn.Conv2d(3, CH, 3, padding=1), CH
                for i, mult in enumerate(CH_MULT):
                    blocks = [res(c if j == 0 else CH * mult, CH * mult) for j in range(BLOCKS)]
                    c = CH * mult
                    attn = [m.AttnBlock(c) for _ in range(BLOCKS)] if i == levels - 1 else []
                    down = m.Downsample(c, True) if i != levels - 1 else None
                    self.conv_blocks.append(LlamaGenLevel(blocks, attn, "downsample", down))
            else:
                c = CH * CH_MULT[-1]
                self.conv_in = torch.nn.Conv2d(Z, c, 3, padding=1)
            self.mid = torch.nn.ModuleList([res(c, c), m.AttnBlock(c), res(c, c)])
            if not encoder:
                for i in reversed(range(levels)):
                    blocks = [res(c if j == 0 else CH * CH_MULT[i], CH * CH_MULT[i]) for j in range(BLOCKS + 1)]
                    c = CH * CH_MULT[i]
                    attn = [m.AttnBlock(c) for _ in range(BLOCKS + 1)] if i == levels - 1 else []
                    up = m.Upsample(c, True) if i != 0 else None
                    self.conv_blocks.append(LlamaGenLevel(blocks, attn, "upsample", up))
            self.norm_out = m.Normalize(c)
            self.conv_out = torch.nn.Conv2d(c, Z if encoder else 3, 3, padding=1)

        def forward(self, h):
            h = self.conv_in(h)
            if self.encoder:
                for level in self.conv_blocks:
                    h = level(h)
            h = self.mid[2](self.mid[1](self.mid[0](h, None)), None)
            if not self.encoder:
                for level in self.conv_blocks:
                    h = level(h)
            return self.conv_out(m.nonlinearity(self.norm_out(h)))

    return Net(True).eval(), Net(False).eval()


def test_llamagen_network_and_cosine_lookup_match_llamagens(tmp_path):
    encoder, decoder = llamagen_networks()
    real = {f"{p}.{k}": tuple(v.shape) for p, net in (("encoder", encoder), ("decoder", decoder))
            for k, v in net.state_dict().items()}
    assert real == network_shapes("llamagen")
    state = llamagen_state()
    loaded = Tokenizer.from_pretrained(_converted(tmp_path, "llamagen", {"model": state}))
    assert loaded.config.quantizer == "fc" and loaded.config.quantizer_options["l2_norm"] is True
    x = torch.rand(2, 3, 32, 32)
    ids, decoded = reference(state, encoder, decoder, x, "cosine")
    assert torch.equal(loaded.encode(x), ids)
    assert torch.allclose(loaded.decode(ids), (decoded + 1) / 2, atol=1e-5, rtol=1e-5)


# -- safe loading ---------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates `marker`: the test of whether anything unpickles arbitrary objects."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_the_payload_is_live_when_unpickled(tmp_path):
    """The check the tests below rely on: an ordinary torch.load DOES run the payload."""
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload(tmp_path / "marker")}, path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()


def test_convert_refuses_a_checkpoint_that_needs_unpickling(tmp_path, capsys):
    path = save(tmp_path, {"state_dict": taming_state(), "hook": Payload(tmp_path / "marker")})
    assert cli_main(["convert", "--from", "taming", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pickled global exec" in err and "re-save only the weights" in err, err
    assert not (tmp_path / "marker").exists() and not (tmp_path / "run").exists()


def test_lightning_callback_keys_and_namespace_args_are_read_as_inert_values(tmp_path, monkeypatch):
    """taming-era Lightning checkpoints key their `callbacks` by the ModelCheckpoint CLASS; LlamaGen's keep `args`."""
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    callbacks = {ModelCheckpoint: {"best_model_score": torch.tensor(1.0)}}
    path = save(tmp_path, {"state_dict": taming_state(), "callbacks": callbacks, "args": argparse.Namespace(a=K)})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.delitem(sys.modules, name)  # Lightning is not installed where vqtok reads the file
    model = convert("taming", path, tmp_path / "run")
    assert model.codebook_size == K


def test_a_run_directory_trainer_state_never_unpickles_a_payload(tmp_path):
    """trainer.pt holding a payload: `vqtok eval` and `encode` work without running it, `train --resume` refuses."""
    from vqtok.core.rundir import RunDir
    from vqtok.train import load_config, train

    run = tmp_path / "run"
    tiny = ["model.preset=tiny", "model.image_size=32", "model.codebook_size=64", "data.size=32",
            "data.train_length=16", "data.val_length=8", "data.batch_size=8", "loss.perceptual_weight=0", "fid=false",
            "eval_images=8", "checkpoint_every=2", "steps=2"]
    train(load_config(None, tiny), run, progress=False)
    marker = tmp_path / "marker"
    for path in [run / "trainer.pt", *(c / "trainer.pt" for c in RunDir(run).list_checkpoints())]:
        state = torch.load(path, weights_only=True)
        path.unlink()  # the top-level file is a hard link to the checkpoint's: write each anew
        torch.save({**state, "hook": Payload(marker)}, path)
    # --out: metrics/report.py cannot yet write a report without training token counts (tokens_train None)
    assert cli_main(["eval", str(run), "--no-fid", "--max-images", "4", "--no-progress",
                     "--out", str(tmp_path / "metrics.json")]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["utilization_train"] is None  # trainer.pt refused
    assert not marker.exists()
    assert cli_main(["encode", str(run), "--data", "photos", "--length", "4", "--out", str(tmp_path / "tok")]) == 0
    assert not marker.exists()
    assert cli_main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    assert not marker.exists()


# -- user mistakes: one line on stderr, exit status 2 ---------------------------------------------------------------
def test_user_mistakes_are_one_line_and_exit_status_2(tmp_path, capsys):
    good = save(tmp_path, {"state_dict": taming_state()}, "good.ckpt")
    extra = save(tmp_path, {"state_dict": {**taming_state(), "quantize.used": torch.arange(5)}}, "extra.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    (tmp_path / "bytes.ckpt").write_bytes(bytes(range(256)) * 8)
    yaml = tmp_path / "model.yaml"
    yaml.write_text("model:\n  params:\n    embed_dim: 4\n    n_embed: 40\n    ddconfig:\n      ch: 32\n"
                    "      ch_mult: [1, 1, 2]\n      num_res_blocks: 1\n      attn_resolutions: [8]\n"
                    "      resolution: 32\n")
    runs = iter(range(100))
    cases = [
        (["--from", "taming", str(tmp_path / "missing.ckpt")], "not found"),
        (["--from", "maskgit", str(good)], "unknown source 'maskgit'"),
        (["--from", "taming", str(good), "--config", str(yaml)],
         "ch_mult=[1, 1, 2] but the checkpoint's tensors give [1, 2, 2]"),
        (["--from", "taming", str(tmp_path / "text.ckpt")], "is not a PyTorch checkpoint"),
        (["--from", "taming", str(tmp_path / "bytes.ckpt")], "is not a PyTorch checkpoint"),
        (["--from", "llamagen", str(good)], "not a LlamaGen checkpoint"),
        (["--from", "taming", str(good), "--weights", "best"], "--weights must be one of ema, raw"),
        (["--from", "ibq", str(good), "--codebook", str(good)], "--codebook is VQGAN-LC's"),
        (["--from", "taming", str(extra)], "1 tensor(s) of this taming checkpoint have no place"),
    ]
    for args, says in cases:
        out = tmp_path / f"run{next(runs)}"
        assert cli_main(["convert", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("vqtok convert: error:") and says in err, (args, err)
        assert not out.exists()
    assert cli_main(["convert", "--from", "taming", str(good), "--out", str(tmp_path / "ok")]) == 0
    assert cli_main(["convert", "--from", "taming", str(good), "--out", str(tmp_path / "ok")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_matching_yaml_passes_and_sets_the_image_size(tmp_path):
    yaml = tmp_path / "model.yaml"
    yaml.write_text("model:\n  params:\n    embed_dim: 4\n    n_embed: 40\n    ddconfig:\n      ch: 32\n"
                    "      ch_mult: [1, 2, 2]\n"
                    "      num_res_blocks: 1\n      attn_resolutions: [8]\n      resolution: 32\n      z_channels: 32\n"
                    "      double_z: false\n")
    model = convert("taming", save(tmp_path, {"state_dict": taming_state()}), tmp_path / "run", config=yaml)
    assert model.config.image_size == 32 and model.grid == (8, 8)
    yaml.write_text(yaml.read_text().replace("attn_resolutions: [8]", "attn_resolutions: [16]"))
    with pytest.raises(ValueError, match="attention levels=\\[1\\]"):
        convert("taming", tmp_path / "source.ckpt", tmp_path / "run2", config=yaml)


# -- the real f16 shapes on this CPU --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("source", ["ibq", "vqgan-lc"])
def test_real_f16_shapes_convert_within_a_minute_and_evaluate(tmp_path, source, capsys):
    """IBQ f16 (ch 128, ch_mult (1, 1, 2, 2, 4), 4 blocks, 262,144 x 256 codebook, generator + EMA copy) and
    VQGAN-LC f16 (2 blocks, 100,000 x 768 frozen codebook, projector to 8): convert, then `vqtok eval` a few crops."""
    import time

    ch_mult = (1, 1, 2, 2, 4)
    if source == "ibq":
        shapes = {**network_shapes("taming", ch=128, ch_mult=ch_mult, blocks=4, z=256), **quant_shapes(256, 256),
                  "quantize.embedding.weight": (262_144, 256)}
    else:
        shapes = {**network_shapes("taming", ch=128, ch_mult=ch_mult, blocks=2, z=256), **quant_shapes(8, 256),
                  "tok_embeddings.weight": (100_000, 768), "codebook_projection.weight": (8, 768),
                  "codebook_projection.bias": (8,)}
    state = {name: torch.randn(shape) * (0.02 if len(shape) > 1 else 0.1) for name, shape in shapes.items()}
    if source == "ibq":
        state.update({"model_ema." + k.replace(".", ""): v + 0.001 for k, v in list(state.items())})
        state.update({"model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(-1)})
    path = tmp_path / "published.ckpt"
    torch.save({"state_dict": state, "epoch": 330}, path)
    del state
    start = time.perf_counter()
    assert cli_main(["convert", "--from", source, str(path), "--out", str(tmp_path / "run")]) == 0
    seconds = time.perf_counter() - start
    print(f"\n{source}: converted {path.stat().st_size / 2**30:.2f} GiB in {seconds:.1f} s", file=sys.stderr)
    assert seconds < 60
    path.unlink()
    # --out: metrics/report.py cannot yet write a report without training token counts (tokens_train None)
    assert cli_main(["eval", str(tmp_path / "run"), "--data", "photos", "--size", "64", "--max-images", "4",
                     "--batch-size", "4", "--no-fid", "--no-progress", "--out", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["codebook_size"] == (262_144 if source == "ibq" else 100_000)


def test_a_squeezed_1x1_weight_is_accepted_and_a_wrong_shape_is_refused(tmp_path):
    """Attention's q/k/v/proj_out stored as Linear (C, C) weights load into the 1x1 convs; other shapes are errors."""
    state = taming_state()
    state["encoder.mid.attn_1.q.weight"] = state["encoder.mid.attn_1.q.weight"][:, :, 0, 0].clone()
    saved = load_file(str(_converted(tmp_path, "taming", {"state_dict": state}) / "model.safetensors"))
    assert torch.equal(saved["encoder.mid.1.q.weight"][:, :, 0, 0], state["encoder.mid.attn_1.q.weight"])
    state["post_quant_conv.bias"] = torch.zeros(Z + 1)
    with pytest.raises(ValueError, match=r"post_quant_conv.bias has shape \(33,\) where vqtok's post_quant_conv.bias"):
        _converted(tmp_path, "taming", {"state_dict": state})
