"""The reference's decode step at batch 64 split into the operations that bound it (2.7b layer), each timed
alone as a CUDA-graph replay of 20 calls after warm-up, best of 5:

  in_proj / out_proj      torch.nn.functional.linear in bf16 on 64 rows (what Mamba2.step runs), and in f16 on 128
                          rows, the products that ours compute on tensor cores (x's hi and lo f16 parts, each row
                          of x twice; mma.wgsl)
  state                   the (64, 80, 64, 128) fp32 ssm state multiplied in place (read and written once, as a
                          decode update does) and copied to another buffer
  selective_state_update  mamba_ssm's Triton decode update (dt_bias, softplus, D, z) on that state

Run (GPU machine, mamba_ssm's python sources under .ref/ as for bench_ref.py):
  PYTHONPATH=.ref python3 tools/ref_decode_ops.py
"""
import torch
import torch.nn.functional as F
from mamba_ssm.ops.triton.selective_state_update import selective_state_update

DEV = torch.device("cuda")
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
ROWS, D_MODEL, D_INNER, D_IN_PROJ, HEADS, HEADDIM, D_STATE = 64, 2560, 5120, 10576, 80, 64, 128


def timed(name, fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / reps)
    print(f"{name:44s} {best:8.1f} us", flush=True)


def main():
    torch.manual_seed(0)
    for dtype, rows in ((BF16, ROWS), (F16, 2 * ROWS)):
        x = torch.randn(rows, D_MODEL, device=DEV, dtype=dtype)
        w_in = torch.randn(D_IN_PROJ, D_MODEL, device=DEV, dtype=dtype)
        y = torch.randn(rows, D_INNER, device=DEV, dtype=dtype)
        w_out = torch.randn(D_MODEL, D_INNER, device=DEV, dtype=dtype)
        timed(f"in_proj {dtype} x {rows} rows", lambda: F.linear(x, w_in))
        timed(f"out_proj {dtype} x {rows} rows", lambda: F.linear(y, w_out))
    state = torch.randn(ROWS, HEADS, HEADDIM, D_STATE, device=DEV, dtype=F32)
    other = torch.empty_like(state)
    timed("state multiplied in place", lambda: state.mul_(0.999))
    timed("state copied", lambda: other.copy_(state))
    xs = torch.randn(ROWS, HEADS, HEADDIM, device=DEV, dtype=BF16)
    dt = torch.randn(ROWS, HEADS, HEADDIM, device=DEV, dtype=BF16)
    z = torch.randn(ROWS, HEADS, HEADDIM, device=DEV, dtype=BF16)
    a = -torch.rand(HEADS, HEADDIM, D_STATE, device=DEV, dtype=F32)
    b = torch.randn(ROWS, 1, D_STATE, device=DEV, dtype=BF16)
    c = torch.randn(ROWS, 1, D_STATE, device=DEV, dtype=BF16)
    d = torch.randn(HEADS, HEADDIM, device=DEV, dtype=F32)
    dt_bias = torch.randn(HEADS, HEADDIM, device=DEV, dtype=F32)
    timed("selective_state_update, batch 64",
          lambda: selective_state_update(state, xs, dt, a, b, c, D=d, z=z, dt_bias=dt_bias, dt_softplus=True))


if __name__ == "__main__":
    main()
