"""The kernel registry (vqtok.kernels): every backend against the dense reference, the automatic choice, forcing
with `use` and a call's `backend=`, and IBQ's kernel= option routed through the same mechanism."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from vqtok import kernels
from vqtok.kernels import numba_search
from vqtok.kernels import triton as triton_kernels
from vqtok.quantize import build_quantizer

PAIRS = [(op, name) for op in kernels.OPS for name in kernels.backends(op)]


def backend(op: str, name: str) -> kernels.Backend:
    return next(b for b in kernels.BACKENDS[op] if b.name == name)


def search_inputs(dtype: torch.dtype, unit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens near a code each, codes far apart (unambiguous nearest code; unit: unit codes, so that the largest
    inner product is with the code a token sits near). Codes 0..49 repeat exactly as codes 650..699, in later
    chunks, and tokens 0..19 sit near codes 0..19: those ties must go to the first index."""
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(700, 8, generator=g, dtype=torch.float64)
    codebook = torch.nn.functional.normalize(codebook, dim=1) if unit else codebook * 4
    codebook[650:] = codebook[:50]
    near = torch.cat([torch.arange(20), torch.randint(50, 650, (17,), generator=g)])
    z = codebook[near] + 0.01 * torch.randn(37, 8, generator=g, dtype=torch.float64)
    return z.to(dtype), codebook.to(dtype)


def ibq_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, 3, generator=g, dtype=torch.float64)
    codebook = torch.randn(13, 3, generator=g, dtype=torch.float64)
    grad = torch.randn(9, 3, generator=g, dtype=torch.float64)
    return z.to(dtype), codebook.to(dtype), grad.to(dtype)


def first_applicable(op: str, name: str, candidates: list[tuple], **options):
    """The first candidate inputs the backend applies to (float64 before float32, as the references allow)."""
    for inputs in candidates:
        if backend(op, name).applies(inputs[0], inputs[1], **options):
            return inputs
    pytest.skip(f"{op} backend {name!r} applies to none of the CPU test inputs")


# -- (a) every registered backend equals the dense reference ----------------------------------------------------------
@pytest.mark.parametrize("op,name", PAIRS, ids=[f"{op}-{name}" for op, name in PAIRS])
def test_every_backend_equals_the_dense_reference(op, name):
    if op == "ibq_step":
        z, codebook, grad = first_applicable(op, name, [ibq_inputs(torch.float64), ibq_inputs(torch.float32)],
                                             temperature=0.5, entropy=True, code_chunk=4)
        tol = 1e-11 if z.dtype == torch.float64 else 1e-5

        def run(which: str):
            zz, ee = z.clone().requires_grad_(), codebook.clone().requires_grad_()
            with kernels.use(op, which):
                assert kernels.choose(op, zz, ee, temperature=0.5, entropy=True) == which
                result = kernels.ibq_step(zz, ee, temperature=0.5, entropy=True, code_chunk=4)
            loss = (result.z_q * grad).sum() + (result.hard * grad.square()).sum()
            (loss + 0.7 * (result.sample_entropy - result.codebook_entropy)).backward()
            return result, zz.grad, ee.grad

        (out, dz, de), (ref, ref_dz, ref_de) = run(name), run("dense")
        assert torch.equal(out.indices, ref.indices) and torch.equal(out.z_q, ref.z_q)
        assert torch.equal(out.hard, ref.hard)
        for value, reference in ((out.sample_entropy, ref.sample_entropy), (out.codebook_entropy, ref.codebook_entropy),
                                 (dz, ref_dz), (de, ref_de)):
            assert (value - reference).abs().max() <= tol * reference.abs().max().clamp_min(1e-30)
        return

    if op == "cross_entropy":  # the GPT head's loss (tests/test_cross_entropy.py tests it in depth)
        if name == "triton" and not (triton_kernels.available() and triton_kernels.interpreting()):
            pytest.skip("the triton backend runs on CPU tensors only through the interpreter")
        hidden, weight, grad = ibq_inputs(torch.float32 if name == "triton" else torch.float64)
        bias, targets = weight[:, 0].clone(), torch.tensor([0, 12, 5, -100, 3, 3, 7, 1, 12])

        def run_ce(which: str):
            leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            with kernels.use(op, which):
                assert kernels.choose(op, leaves[0], leaves[1], bias=leaves[2], targets=targets) == which
                loss = kernels.cross_entropy(*leaves, targets, reduction="none", code_chunk=4)
            (loss * grad[:, 0]).sum().backward()
            return [loss.detach()] + [t.grad for t in leaves]

        tol = 1e-11 if hidden.dtype == torch.float64 else 1e-5
        for value, reference in zip(run_ce(name), run_ce("dense")):
            assert (value - reference).abs().max() <= tol * reference.abs().max()
        return

    if name == "triton" and not (triton_kernels.available() and triton_kernels.interpreting()):
        pytest.skip("the triton backend runs on CPU tensors only through the interpreter: it is tested here when "
                    "TRITON_INTERPRET=1 is set (tests/conftest.py sets it where torch sees no GPU)")
    key = ("test", object())  # a key no other test uses: the k-d tree cache is process-wide
    options = {"frozen_key": key} if op == "nearest_code" else {}
    unit = op == "max_inner_product"
    z, codebook = first_applicable(op, name, [search_inputs(torch.float64, unit), search_inputs(torch.float32, unit)],
                                   **options)
    fn = getattr(kernels, op)
    with kernels.use(op, name):
        assert kernels.choose(op, z, codebook, **options) == name
        index, value = fn(z, codebook, token_chunk=16, code_chunk=64, **options)
    with kernels.use(op, "dense"):
        ref_index, ref_value = fn(z, codebook, **options)
    assert index.dtype == torch.int64 and torch.equal(index, ref_index)
    assert torch.equal(index[:20], torch.arange(20))  # the exact duplicates at 650.. lose the ties
    assert value.dtype == ref_value.dtype
    scale = float(codebook.double().pow(2).sum(1).max())
    atol = (1e-9 if z.dtype == torch.float64 else 1e-4) * scale
    assert torch.allclose(value.double(), ref_value.double(), rtol=0, atol=atol)


def test_the_dense_reference_is_registered_last_and_always_applies():
    for op in kernels.OPS:
        last = kernels.BACKENDS[op][-1]
        assert last.name == "dense"
        meta = torch.empty(3, 40, device="meta", dtype=torch.float16)
        assert last.applies(meta, meta) and last.worthwhile(meta, meta)


# -- (b) the automatic choice -------------------------------------------------------------------------------------------
def tensors(N: int, K: int, D: int, dtype=torch.float32, device: str = "cpu"):
    return torch.empty(N, D, dtype=dtype, device=device), torch.empty(K, D, dtype=dtype, device=device)


KEY = ("choice", object())
CHOICES = [
    # IBQ: dense while N x K <= 64Ki elements, chunked beyond; the meta device stands in for an accelerator
    ("ibq_step", (64, 1024, 16), {}, "dense"),
    ("ibq_step", (64, 1025, 16), {}, "chunked"),
    ("ibq_step", (1, 1, 4), {}, "dense"),
    ("ibq_step", (4096, 100_000, 256, torch.float32, "meta"), {}, "chunked"),
    # nearest code: the k-d tree needs a frozen key, the CPU, D <= 16 and K >= 4096
    ("nearest_code", (64, 4096, 8), {"frozen_key": KEY}, "kdtree"),
    ("nearest_code", (64, 4096, 16), {"frozen_key": KEY}, "kdtree"),
    ("nearest_code", (64, 4096, 8, torch.float64), {"frozen_key": KEY}, "kdtree"),
    ("nearest_code", (64, 4096, 8), {}, "fused"),
    ("nearest_code", (64, 4095, 8), {"frozen_key": KEY}, "fused"),
    ("nearest_code", (64, 4096, 17), {"frozen_key": KEY}, "fused"),
    ("nearest_code", (64, 4096, 8, torch.float32, "meta"), {"frozen_key": KEY}, "chunked"),
    # the fused loop: CPU, fp32 search (bf16 is searched in fp32, fp64 is not), D <= 32
    ("nearest_code", (64, 100, 32), {}, "fused"),
    ("nearest_code", (64, 100, 33), {}, "chunked"),
    ("nearest_code", (64, 100, 8, torch.bfloat16), {}, "fused"),
    ("nearest_code", (64, 100, 8, torch.float64), {}, "chunked"),
    ("nearest_code", (64, 100, 8, torch.float32, "meta"), {}, "chunked"),
    ("max_inner_product", (64, 100, 32), {}, "fused"),
    ("max_inner_product", (64, 100, 33), {}, "chunked"),
    ("max_inner_product", (64, 100, 8, torch.float64), {}, "chunked"),
    ("max_inner_product", (64, 100, 8, torch.float32, "meta"), {}, "chunked"),
]


@pytest.mark.parametrize("op,shape,options,expected", CHOICES)
def test_the_automatic_choice_per_device_shape_and_context(op, shape, options, expected):
    z, codebook = tensors(*shape)
    assert kernels.choose(op, z, codebook, **options) == expected


def test_without_numba_the_search_falls_back_to_chunked(monkeypatch):
    monkeypatch.setattr(numba_search, "numba", None)
    z, codebook = tensors(64, 100, 8)
    assert kernels.choose("nearest_code", z, codebook) == "chunked"
    assert kernels.choose("max_inner_product", z, codebook) == "chunked"
    with pytest.raises(ValueError, match="numba"):
        kernels.choose("nearest_code", z, codebook, backend="fused")


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, str, dict]]:
    """Every backend call as (op, backend, options): the registry's entries are swapped for recording ones."""
    log: list[tuple[str, str, dict]] = []

    def recording(op: str, entry: kernels.Backend) -> kernels.Backend:
        def fn(z, codebook, **options):
            log.append((op, entry.name, options))
            return entry.fn(z, codebook, **options)
        return dataclasses.replace(entry, fn=fn)

    for op, table in list(kernels.BACKENDS.items()):
        monkeypatch.setitem(kernels.BACKENDS, op, tuple(recording(op, entry) for entry in table))
    return log


def test_lc_passes_its_frozen_key_only_in_eval_mode_and_gets_the_tree(calls):
    torch.manual_seed(0)
    q = build_quantizer("lc", codebook_size=5000, dim=8, codebook=torch.randn(5000, 16))
    z = torch.randn(2, 8, 4, 4)
    q.train()(z)
    q.eval()(z)
    q.eval()(z)
    (_, train_backend, train_options), *evals = calls
    assert train_backend == "fused" and train_options["frozen_key"] is None
    assert [name for _, name, _ in evals] == ["kdtree", "kdtree"]
    assert evals[0][2]["frozen_key"] is not None and evals[0][2]["frozen_key"] == evals[1][2]["frozen_key"]
    other = build_quantizer("lc", codebook_size=5000, dim=8, codebook=torch.randn(5000, 16)).eval()
    other.load_state_dict(q.state_dict())  # equal contents, but another quantizer: never the same key
    other(z)
    assert calls[-1][2]["frozen_key"] != evals[0][2]["frozen_key"]


# -- (c) forcing ----------------------------------------------------------------------------------------------------------
def test_use_forces_a_backend_and_restores_the_previous_choice():
    small, large = tensors(8, 16, 4), tensors(8, 16, 40)
    assert kernels.choose("ibq_step", *small) == "dense"
    with kernels.use("ibq_step", "chunked"):
        assert kernels.choose("ibq_step", *small) == "chunked"
        assert kernels.choose("nearest_code", *small) == "fused"  # other operations keep their own choice
        with kernels.use("ibq_step", "dense"):
            assert kernels.choose("ibq_step", *small) == "dense"
        assert kernels.choose("ibq_step", *small) == "chunked"
        with kernels.use("ibq_step", "auto"):  # lifts the outer forcing
            assert kernels.choose("ibq_step", *small) == "dense"
    assert kernels.choose("ibq_step", *small) == "dense"
    with pytest.raises(RuntimeError, match="inside"):
        with kernels.use("nearest_code", "dense"):
            assert kernels.choose("nearest_code", *large) == "dense"
            raise RuntimeError("inside")
    assert kernels.choose("nearest_code", *large) == "chunked"


def test_use_holds_in_its_own_thread_only():
    seen = []
    with kernels.use("ibq_step", "chunked"):
        thread = threading.Thread(target=lambda: seen.append(kernels.choose("ibq_step", *tensors(8, 16, 4))))
        thread.start()
        thread.join()
    assert seen == ["dense"]


def test_a_calls_backend_forces_the_same_way_and_use_overrides_it():
    z, codebook = tensors(8, 16, 4)
    assert kernels.choose("ibq_step", z, codebook, backend="chunked") == "chunked"
    assert kernels.choose("ibq_step", z, codebook, backend="auto") == "dense"
    with kernels.use("ibq_step", "dense"):
        assert kernels.choose("ibq_step", z, codebook, backend="chunked") == "dense"
    real_z, real_codebook = search_inputs(torch.float32)
    index, _ = kernels.nearest_code(real_z, real_codebook, backend="dense")
    assert torch.equal(index, kernels.nearest_code_dense(real_z, real_codebook)[0])


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError) as error:
        with kernels.use("nearest_code", "fast"):
            pass
    message = str(error.value)
    assert "nearest_code" in message and "'fast'" in message
    assert all(f"'{name}'" in message for name in ("auto", "kdtree", "fused", "chunked", "dense"))
    with pytest.raises(ValueError, match="'chunked', 'dense'"):
        kernels.choose("ibq_step", *tensors(8, 16, 4), backend="triton-someday")
    with pytest.raises(ValueError, match="unknown kernel operation 'argmin'.*'nearest_code'"):
        with kernels.use("argmin", "dense"):
            pass


def test_a_forced_backend_that_does_not_apply_says_why():
    z, codebook = tensors(8, 5000, 8)
    with kernels.use("nearest_code", "kdtree"):
        with pytest.raises(ValueError) as error:
            kernels.nearest_code(z, codebook)
    message = str(error.value)
    assert "nearest_code" in message and "'kdtree'" in message and "frozen_key" in message
    with pytest.raises(ValueError, match=r"max_inner_product backend 'fused'.*float64.*requires .*float64"):
        kernels.max_inner_product(*tensors(8, 50, 8, torch.float64), backend="fused")
    with kernels.use("nearest_code", "fused"):  # forcing skips only the size threshold: D = 64 runs fused
        z64, codebook64 = torch.randn(20, 64), torch.randn(90, 64)
        assert torch.equal(kernels.nearest_code(z64, codebook64)[0], kernels.nearest_code_dense(z64, codebook64)[0])


# -- (d) IBQ's kernel= option goes through the registry -------------------------------------------------------------------
def ibq_forward(kernel: str, K: int) -> None:
    torch.manual_seed(0)
    q = build_quantizer("ibq", codebook_size=K, dim=8, kernel=kernel).train()
    out = q(torch.randn(1, 8, 8, 8))  # N = 64 tokens
    (out.loss + out.z_q.sum()).backward()


@pytest.mark.parametrize("kernel,K,expected", [
    ("auto", 1024, "dense"), ("auto", 1100, "chunked"), ("dense", 1100, "dense"), ("chunked", 1024, "chunked")])
def test_ibq_kernel_option_is_the_calls_backend_preference(calls, kernel, K, expected):
    ibq_forward(kernel, K)
    assert [(op, name) for op, name, _ in calls] == [("ibq_step", expected)]


def test_use_overrides_ibq_kernel_option_and_bad_kernels_list_the_backends(calls):
    with kernels.use("ibq_step", "chunked"):
        ibq_forward("dense", 1100)
    assert [name for _, name, _ in calls] == ["chunked"]
    with pytest.raises(ValueError, match="kernel.*'auto', 'triton', 'chunked', 'dense'"):
        build_quantizer("ibq", codebook_size=10, dim=4, kernel="fastest")


def test_a_registered_ibq_backend_is_a_valid_kernel_option(calls, monkeypatch):
    """Adding a backend is one registry entry: the quantizer's kernel= option and `use` accept it at once."""
    def probe_fn(z, codebook, temperature=0.01, **options):
        calls.append(("ibq_step", "probe", options))
        return kernels.ibq_dense(z, codebook, temperature)

    never = lambda z, codebook, **options: False  # noqa: E731 - never the automatic choice
    probe = kernels.Backend("probe", probe_fn, worthwhile=never)
    monkeypatch.setitem(kernels.BACKENDS, "ibq_step", (probe, *kernels.BACKENDS["ibq_step"]))
    ibq_forward("probe", 1100)
    ibq_forward("auto", 1100)
    assert [name for _, name, _ in calls] == ["probe", "chunked"]
    assert build_quantizer("ibq", codebook_size=10, dim=4, kernel="probe").config()["kernel"] == "probe"
