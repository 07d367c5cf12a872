#!/usr/bin/env python3
"""Reference benchmark: mamba_ssm's Mamba-2 kernels on a CUDA GPU (the figures to beat).

bf16 activations and weights, fp32 SSM state, every case timed as a CUDA-graph replay after warm-up (Triton
autotuning happens in the warm-up, outside the graph). The graph holds n back-to-back calls of the case (n chosen
so one replay lasts ~25 ms, as triton.testing.do_bench_cudagraph does); the figure is the median over 15 replays
of (replay time / n), in microseconds per call. Python launch overhead is therefore not measured.

Layers (tools/README.md, /work/shared/GPU.md): "2.7b" d_model 2560, expand 2, headdim 64 -> 80 heads, d_state 128,
ngroups 1, d_conv 4, chunk 256; "130m" d_model 768 -> 24 heads, otherwise the same.

Cases (--cases, comma separated; default: all):
  scan            mamba_chunk_scan_combined alone, batch 1 x L (x, dt, A, B, C, chunk_size, D, dt_bias,
                  dt_softplus=True, return_final_states=True, state_dtype=fp32)
  scan_bf16       the same at the longest L with mamba_ssm's default state_dtype (= C.dtype, bf16 chunk states)
  prefill         the whole layer, batch 1 x L, composed exactly as Mamba2.forward(use_mem_eff_path=False)
                  composes it: in_proj (torch linear), causal depthwise nn.Conv1d-style conv (torch conv1d,
                  padding d_conv-1, cuDNN; causal_conv1d is not installed), silu, mamba_chunk_scan_combined
                  (state_dtype fp32, final state returned), gated group RMSNorm (rmsnorm_fn), out_proj; the
                  final conv and ssm states are written to a (B, conv_dim, d_conv) bf16 / (B, H, P, N) fp32 cache
  prefill_module  mamba_ssm's own Mamba2 module (use_mem_eff_path=False) at the longest L, called as
                  m(u): same kernels, but bf16 chunk states and no final states handed out
  decode          Mamba2.step (mamba_ssm's own code) with an inference cache, one token per request, batch B:
                  in_proj, conv state roll/sum (torch, no causal_conv1d), selective_state_update (Triton),
                  gated norm, out_proj; ssm state fp32 (B, H, P, N), conv state bf16
  spec            batch 16, 1+3 tokens, 4 state snapshots: 4 successive Mamba2.step calls, each followed by
                  copying the conv and ssm states into a snapshot buffer (4, B, ...)
  spec_chunked    the same 4 tokens through the prefill kernels instead: one in_proj over 16x4 tokens, conv over
                  [conv_state, 4 new columns] (the window holds all 4 conv snapshots), the chunked scan with
                  chunk_size=1 from the cached fp32 state (its per-chunk `states` output IS the ssm snapshot
                  after every token; uses mamba_ssm's private _mamba_chunk_scan_combined_fwd), norm, out_proj
Ceilings (--no-ceilings to skip): device copy of a 1 GiB tensor (TB/s, read+write) and a bf16 8192^3 matmul.
The copy is timed three ways: tensor.copy_ captured in a graph (a memcpy node: on the H200 it ran at only 2.71
TB/s, presumably on a copy engine), copy_ launched on a stream (4.23) and an elementwise kernel in a graph (4.28); the best one
is the ceiling. Note that the contiguous state copies of `spec` are such memcpy nodes too.
The "floor us" column of decode cases = bytes that must move / copy bandwidth: all weights once, per request the
fp32 ssm state and the bf16 conv state read and written (spec: read once, written 4 times), in/out activations.

Run (GPU machine, mamba_ssm's python sources under .ref/, its __init__.py emptied; see tools/README.md):
  PYTHONPATH=.ref python3 tools/bench_ref.py [--layers 2.7b,130m] [--cases scan,prefill,decode,spec]
"""
import argparse
import os
import statistics
import sys
import time
import types

LAYERS = {
    "2.7b": dict(d_model=2560),
    "130m": dict(d_model=768),
}
COMMON = dict(expand=2, headdim=64, d_state=128, ngroups=1, d_conv=4, chunk_size=256)
ALL_CASES = ["scan", "scan_bf16", "prefill", "prefill_module", "decode", "spec", "spec_chunked"]


def die(msg):
    print(f"bench_ref.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def csv_list(s, conv=str):
    return [conv(v.strip()) for v in s.split(",") if v.strip()]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--layers", default="2.7b,130m", help="comma list of: " + ",".join(LAYERS))
    p.add_argument("--cases", default=",".join(ALL_CASES), help="comma list of: " + ",".join(ALL_CASES))
    p.add_argument("--lengths", default="2048,8192", help="prefill/scan lengths L (batch 1)")
    p.add_argument("--batches", default="1,16,64", help="decode batch sizes")
    p.add_argument("--spec-batch", type=int, default=16, help="batch of the 1+3-token cases")
    p.add_argument("--spec-tokens", type=int, default=4, help="tokens per request in the spec cases (1+3)")
    p.add_argument("--target-ms", type=float, default=25.0, help="GPU time of one graph replay")
    p.add_argument("--replays", type=int, default=15, help="timed replays (median reported)")
    p.add_argument("--no-ceilings", action="store_true", help="skip the copy-bandwidth / matmul ceilings")
    p.add_argument("--mamba-commit", default=None,
                   help="mamba_ssm commit to print (default: COMMIT file next to the mamba_ssm package, if any)")
    a = p.parse_args()
    a.layers = csv_list(a.layers)
    bad = [x for x in a.layers if x not in LAYERS]
    if bad or not a.layers:
        p.error(f"--layers: unknown {bad}; choose from {list(LAYERS)}")
    a.cases = csv_list(a.cases)
    bad = [x for x in a.cases if x not in ALL_CASES]
    if bad or not a.cases:
        p.error(f"--cases: unknown {bad}; choose from {ALL_CASES}")
    try:
        a.lengths = csv_list(a.lengths, int)
        a.batches = csv_list(a.batches, int)
    except ValueError as e:
        p.error(f"--lengths/--batches: {e}")
    if any(v <= 0 for v in a.lengths + a.batches) or a.spec_batch <= 0 or a.spec_tokens <= 0:
        p.error("lengths, batches, --spec-batch and --spec-tokens must be positive")
    return a


ARGS = parse_args()

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    die(f"cannot import torch ({e}); run this on the GPU machine")
if not torch.cuda.is_available():
    die("no CUDA device visible to torch (torch.cuda.is_available() is False)")

# mamba_ssm.modules.mamba2 imports huggingface_hub only for a mixin; stub it if it is not installed.
try:
    import huggingface_hub  # noqa: F401
except ImportError:
    _hf = types.ModuleType("huggingface_hub")

    class PyTorchModelHubMixin:
        pass

    _hf.PyTorchModelHubMixin = PyTorchModelHubMixin
    sys.modules["huggingface_hub"] = _hf

try:
    import triton
    import mamba_ssm
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, _mamba_chunk_scan_combined_fwd
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.modules.mamba2 import Mamba2
    import mamba_ssm.modules.mamba2 as _m2
except ImportError as e:
    die(f"cannot import mamba_ssm ({e}).\n  Put its python sources in .ref/: `git --git-dir=<mirror of "
        "state-spaces/mamba> archive HEAD mamba_ssm | tar -x -C .ref/`, empty .ref/mamba_ssm/__init__.py, "
        "and run with PYTHONPATH=.ref (see tools/README.md).")
if _m2.selective_state_update is None:
    die("mamba_ssm.ops.triton.selective_state_update could not be imported: Mamba2.step would fall back to torch")
if _m2.causal_conv1d_fn is not None:
    print("note: causal_conv1d is installed; Mamba2.forward/step would use it (this script's prefill uses torch conv1d)")

DEV = torch.device("cuda")
BF16, F32 = torch.bfloat16, torch.float32
torch.manual_seed(0)


def mamba_commit():
    if ARGS.mamba_commit:
        return ARGS.mamba_commit
    pkg = os.path.dirname(os.path.abspath(mamba_ssm.__file__))
    for cand in (os.path.join(os.path.dirname(pkg), "COMMIT"), os.path.join(pkg, "COMMIT")):
        if os.path.isfile(cand):
            return open(cand).read().strip()
    return "unknown (pass --mamba-commit)"


# ------------------------------------------------------------------------------------------------------------
# Timing: CUDA graph of n calls, median replay time / n.

def bench(fn, target_ms=None, replays=None):
    target_ms = ARGS.target_ms if target_ms is None else target_ms
    replays = ARGS.replays if replays is None else replays
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: compiles and autotunes the Triton kernels, outside any graph
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g1 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):
        fn()
    g1.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        g1.replay()
    e1.record()
    torch.cuda.synchronize()
    est_ms = max(e0.elapsed_time(e1) / 5, 1e-3)
    del g1
    n = int(max(1, min(1000, target_ms / est_ms)))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1000.0 / n)
    del g
    torch.cuda.synchronize()
    return statistics.median(times), min(times), n


# ------------------------------------------------------------------------------------------------------------
# Layer

class Layer:
    def __init__(self, name):
        c = dict(COMMON, **LAYERS[name])
        self.name = name
        self.c = c
        self.d_model = c["d_model"]
        self.d_inner = c["expand"] * c["d_model"]
        self.P, self.N, self.G, self.K = c["headdim"], c["d_state"], c["ngroups"], c["d_conv"]
        self.H = self.d_inner // self.P
        self.conv_dim = self.d_inner + 2 * self.G * self.N
        self.chunk = c["chunk_size"]
        m = Mamba2(d_model=c["d_model"], d_state=self.N, d_conv=self.K, expand=c["expand"], headdim=self.P,
                   ngroups=self.G, chunk_size=self.chunk, use_mem_eff_path=False, layer_idx=0,
                   device=DEV, dtype=BF16)
        m.eval()
        assert m.nheads == self.H and m.conv1d.weight.shape[0] == self.conv_dim
        self.m = m
        self.A = -torch.exp(m.A_log.float())  # (H,) fp32, as Mamba2 computes it
        self.weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())

    def describe(self):
        return (f"{self.name}: d_model {self.d_model}, d_inner {self.d_inner}, {self.H} heads x headdim {self.P}, "
                f"d_state {self.N}, ngroups {self.G}, d_conv {self.K}, chunk {self.chunk}, conv_dim {self.conv_dim}, "
                f"in_proj {tuple(self.m.in_proj.weight.shape)}, weights {self.weight_bytes / 1e6:.1f} MB bf16 "
                f"(D fp32)")

    def new_cache(self, batch):
        conv_state, _ = self.m.allocate_inference_cache(batch, 1)  # bf16 (B, conv_dim, d_conv), strided
        ssm_state = torch.zeros(batch, self.H, self.P, self.N, device=DEV, dtype=F32)  # fp32 state
        return conv_state, ssm_state

    def state_bytes(self, batch):  # one read or one write of the per-request states
        return batch * (self.H * self.P * self.N * 4 + self.conv_dim * self.K * 2)

    # -- scan alone
    def scan_fn(self, L, state_dtype):
        x = torch.randn(1, L, self.H, self.P, device=DEV, dtype=BF16)
        dt = torch.randn(1, L, self.H, device=DEV, dtype=BF16) * 0.5
        B = torch.randn(1, L, self.G, self.N, device=DEV, dtype=BF16)
        C = torch.randn(1, L, self.G, self.N, device=DEV, dtype=BF16)
        m = self.m

        def fn():
            return mamba_chunk_scan_combined(x, dt, self.A, B, C, chunk_size=self.chunk, D=m.D, dt_bias=m.dt_bias,
                                             dt_softplus=True, return_final_states=True, state_dtype=state_dtype)
        return fn

    # -- whole layer forward, composed as Mamba2.forward(use_mem_eff_path=False) does, fp32 states
    def prefill_fn(self, L):
        m = self.m
        u = torch.randn(1, L, self.d_model, device=DEV, dtype=BF16)
        conv_state, ssm_state = self.new_cache(1)
        w = m.conv1d.weight

        def fn():
            zxbcdt = m.in_proj(u)
            z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.H], dim=-1)
            xBC_t = xBC.transpose(1, 2)
            conv_state.copy_(F.pad(xBC_t, (self.K - xBC_t.shape[-1], 0)))
            xBC = F.silu(F.conv1d(xBC_t, w, m.conv1d.bias, padding=self.K - 1, groups=self.conv_dim)
                         [..., :L].transpose(1, 2))
            x, B, C = torch.split(xBC, [self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
            y, last = mamba_chunk_scan_combined(
                x.reshape(1, L, self.H, self.P), dt, self.A, B.reshape(1, L, self.G, self.N),
                C.reshape(1, L, self.G, self.N), chunk_size=self.chunk, D=m.D, dt_bias=m.dt_bias,
                dt_softplus=True, return_final_states=True, state_dtype=F32)
            ssm_state.copy_(last)
            y = rmsnorm_fn(y.reshape(1, L, self.d_inner), m.norm.weight, None, z=z, eps=m.norm.eps,
                           group_size=self.d_inner // self.G, norm_before_gate=False)
            return m.out_proj(y)
        return fn

    def prefill_module_fn(self, L):
        u = torch.randn(1, L, self.d_model, device=DEV, dtype=BF16)
        return lambda: self.m(u)

    # -- decode: Mamba2.step
    def decode_fn(self, batch):
        hs = torch.randn(batch, 1, self.d_model, device=DEV, dtype=BF16)
        conv_state, ssm_state = self.new_cache(batch)
        return lambda: self.m.step(hs, conv_state, ssm_state)[0]

    def spec_fn(self, batch, T):
        hs = torch.randn(batch, T, self.d_model, device=DEV, dtype=BF16)
        conv_state, ssm_state = self.new_cache(batch)
        conv_snap = torch.empty(T, *conv_state.shape, device=DEV, dtype=conv_state.dtype)
        ssm_snap = torch.empty(T, *ssm_state.shape, device=DEV, dtype=F32)
        outs = torch.empty(batch, T, self.d_model, device=DEV, dtype=BF16)

        def fn():
            for t in range(T):
                outs[:, t:t + 1].copy_(self.m.step(hs[:, t:t + 1], conv_state, ssm_state)[0])
                conv_snap[t].copy_(conv_state)
                ssm_snap[t].copy_(ssm_state)
            return outs
        return fn

    def spec_chunked_fn(self, batch, T):
        m = self.m
        hs = torch.randn(batch, T, self.d_model, device=DEV, dtype=BF16)
        conv_state, ssm_state = self.new_cache(batch)
        conv_state.copy_(torch.randn_like(conv_state))
        ssm_state.copy_(torch.randn_like(ssm_state) * 0.1)
        window_keep = torch.empty(batch, self.conv_dim, self.K - 1 + T, device=DEV, dtype=BF16)
        w = m.conv1d.weight

        def fn():
            zxbcdt = m.in_proj(hs)  # (b, T, d_in_proj)
            z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.H], dim=-1)
            # columns [c1, c2, c3, x0..x_{T-1}]: conv state after token t = window[..., t : t + d_conv]
            window = torch.cat([conv_state[:, :, 1:], xBC.transpose(1, 2)], dim=-1)
            window_keep.copy_(window)
            xBC = F.silu(F.conv1d(window, w, m.conv1d.bias, groups=self.conv_dim).transpose(1, 2))
            x, B, C = torch.split(xBC, [self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
            # states[:, c] = state entering token c (fp32), final = after the last token
            y, _, _, _, states, final = _mamba_chunk_scan_combined_fwd(
                x.reshape(batch, T, self.H, self.P), dt, self.A, B.reshape(batch, T, self.G, self.N),
                C.reshape(batch, T, self.G, self.N), chunk_size=1, D=m.D, dt_bias=m.dt_bias,
                initial_states=ssm_state, dt_softplus=True, state_dtype=F32)
            y = rmsnorm_fn(y.reshape(batch, T, self.d_inner), m.norm.weight, None, z=z, eps=m.norm.eps,
                           group_size=self.d_inner // self.G, norm_before_gate=False)
            return m.out_proj(y), states, final
        return fn, dict(hs=hs, conv_state=conv_state, ssm_state=ssm_state, window=window_keep)


def check_spec_chunked(layer, batch, T):
    """The chunked 1+3 path vs T Mamba2.step calls from the same cache: relative L2 of outputs, ssm snapshots
    and the final conv state (bf16 roundings differ: one GEMM over T tokens vs T GEMMs, cuDNN conv vs sum)."""
    fn, d = layer.spec_chunked_fn(batch, T)
    with torch.no_grad():
        out, states, final = fn()
        cs, ss = d["conv_state"].clone(), d["ssm_state"].clone()
        outs, snaps = [], []
        for t in range(T):
            outs.append(layer.m.step(d["hs"][:, t:t + 1], cs, ss)[0])
            snaps.append(ss.clone())
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    got_snaps = torch.cat([states[:, 1:], final[:, None]], dim=1).transpose(0, 1)
    return (rel(out, torch.cat(outs, dim=1)), rel(got_snaps, torch.stack(snaps)),
            rel(d["window"][:, :, T - 1:T - 1 + layer.K], cs))


# ------------------------------------------------------------------------------------------------------------

def main():
    t_start = time.time()
    rows = []  # (layer, case, us, tok/s, floor_us, note)
    failures = 0
    props = torch.cuda.get_device_properties(0)
    print(f"# mamba_ssm reference benchmark")
    print(f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
          f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
          f"mamba_ssm {mamba_commit()}")
    print(f"timing: CUDA graph of n calls (~{ARGS.target_ms:g} ms a replay), median of {ARGS.replays} replays / n; "
          f"bf16 activations and weights, fp32 ssm state")

    copy_tbs = None
    if not ARGS.no_ceilings:
        a = torch.empty(2**30 // 2, device=DEV, dtype=BF16).normal_()
        b = torch.empty_like(a)
        # b.copy_(a) is a cudaMemcpyAsync; captured in a graph it becomes a memcpy node. Also time it without a
        # graph and as an SM elementwise kernel (mul by 1); the best of the three is the ceiling.
        us_g, _, _ = bench(lambda: b.copy_(a), target_ms=50, replays=10)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        b.copy_(a)
        e0.record()
        for _ in range(20):
            b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        us_s = e0.elapsed_time(e1) * 1000 / 20
        us_k, _, _ = bench(lambda: torch.mul(a, 1, out=b), target_ms=50, replays=10)
        tbs = lambda t: 2 * 2**30 / (t * 1e-6) / 1e12  # noqa: E731
        us = min(us_g, us_s, us_k)
        copy_tbs = tbs(us)
        copy_note = (f"copy_ in a graph {tbs(us_g):.2f}, copy_ on a stream {tbs(us_s):.2f}, "
                     f"elementwise kernel in a graph {tbs(us_k):.2f} TB/s")
        del a, b
        n = 8192
        a = torch.randn(n, n, device=DEV, dtype=BF16)
        b = torch.randn(n, n, device=DEV, dtype=BF16)
        us_mm, _, _ = bench(lambda: a @ b, target_ms=50, replays=10)
        tflops = 2 * n**3 / (us_mm * 1e-6) / 1e12
        del a, b
        torch.cuda.empty_cache()
        print(f"ceilings: device copy 1 GiB -> 1 GiB: {us:.0f} us = {copy_tbs:.2f} TB/s (read+write; {copy_note}); "
              f"bf16 matmul 8192^3: {us_mm:.0f} us = {tflops:.0f} TFLOP/s")

    def floor(nbytes):
        return f"{nbytes / (copy_tbs * 1e12) * 1e6:.1f}" if copy_tbs else "-"

    def run(layer, case, make, tokens, floor_bytes=None, note=""):
        nonlocal failures
        try:
            with torch.no_grad():
                fn = make()
                out = fn()
                out0 = out[0] if isinstance(out, tuple) else out
                if not torch.isfinite(out0.float()).all():
                    raise RuntimeError("output has non-finite values")
                us, us_min, n = bench(fn)
            del fn
            rows.append((layer.name, case, f"{us:.1f}", f"{tokens / us:.2f}",
                         floor(floor_bytes) if floor_bytes else "-", note))
            print(f"  {layer.name:5s} {case:45s} {us:9.1f} us (min {us_min:.1f}, {n} calls/graph)", flush=True)
        except Exception as e:  # report and go on with the other cases
            failures += 1
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            rows.append((layer.name, case, "FAILED", "-", "-", msg))
            print(f"  {layer.name:5s} {case:45s} FAILED {msg}", flush=True)
        torch.cuda.empty_cache()

    Lmax = max(ARGS.lengths)
    T, SB = ARGS.spec_tokens, ARGS.spec_batch
    for name in ARGS.layers:
        layer = Layer(name)
        print(layer.describe(), flush=True)
        act = lambda b: 2 * b * layer.d_model * 2  # noqa: E731  hidden in + out, bf16
        if "scan" in ARGS.cases:
            for L in ARGS.lengths:
                run(layer, f"scan 1x{L}", lambda: layer.scan_fn(L, F32), L, note="fp32 states")
        if "scan_bf16" in ARGS.cases:
            run(layer, f"scan 1x{Lmax}, bf16 chunk states", lambda: layer.scan_fn(Lmax, None), Lmax,
                note="mamba_ssm default state_dtype")
        if "prefill" in ARGS.cases:
            for L in ARGS.lengths:
                run(layer, f"prefill 1x{L}", lambda: layer.prefill_fn(L), L, note="composition, fp32 states")
        if "prefill_module" in ARGS.cases:
            run(layer, f"prefill 1x{Lmax}, Mamba2 module", lambda: layer.prefill_module_fn(Lmax), Lmax,
                note="Mamba2(use_mem_eff_path=False)(u)")
        if "decode" in ARGS.cases:
            for B in ARGS.batches:
                run(layer, f"decode batch {B}", lambda: layer.decode_fn(B), B,
                    layer.weight_bytes + 2 * layer.state_bytes(B) + act(B), note="Mamba2.step")
        spec_floor = layer.weight_bytes + (1 + T) * layer.state_bytes(SB) + act(SB * T)
        if "spec" in ARGS.cases:
            run(layer, f"decode batch {SB}, 1+{T - 1} tokens, {T} snapshots", lambda: layer.spec_fn(SB, T), SB * T,
                spec_floor, note=f"{T}x Mamba2.step + state copies")
        if "spec_chunked" in ARGS.cases:
            try:
                e_out, e_snap, e_conv = check_spec_chunked(layer, SB, T)
                note = (f"chunk scan, chunk_size 1; rel. diff. to the steps: out {e_out:.1e}, "
                        f"ssm snapshots {e_snap:.1e}, conv state {e_conv:.1e}")
            except Exception as e:
                note = f"check failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            run(layer, f"decode batch {SB}, 1+{T - 1} tokens, chunked", lambda: layer.spec_chunked_fn(SB, T)[0],
                SB * T, spec_floor, note=note)
        del layer
        torch.cuda.empty_cache()

    print()
    print("| layer | case | mamba_ssm us | Mtok/s | floor us | note |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    print(f"floor = weights once + per-request states read and written (spec: read once, written {T} times) + "
          f"activations, at the measured copy bandwidth" + (f" {copy_tbs:.2f} TB/s" if copy_tbs else ""))
    print(f"wall time {time.time() - t_start:.0f} s, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if failures:
        print(f"{failures} case(s) FAILED", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
