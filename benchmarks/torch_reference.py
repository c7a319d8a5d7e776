"""llm_jax's train step against PyTorch eager's on the same GPT-2-style model.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/torch_reference.py [preset]

Builds the preset's model (default configs/gpt2_small_cpu.py: LayerNorm,
learned positions, tanh-GELU, biases, tied embeddings) in llm_jax and in plain
PyTorch (SDPA attention, AdamW with clipping), then alternates one step of
each with a 2048^3 matmul of each library, REPS rounds (default 6). On a
shared machine the load drifts by the second; alternating makes the ratio of
the two step times, and each one's ratio to its own library's matmul peak,
comparable. Needs torch (not a dependency of llm_jax).

Kept for its in-process profile hooks; it under-measures PyTorch: both
libraries' thread pools live in one process and OpenMP must wait passively
beside XLA's, and the 2048^3 peaks are fp32 only. For the comparison of
record use benchmarks/side_by_side.py (one process per variant, eager,
torch.compile and bf16 autocast against llm_jax fp32 and bf16).
"""
import os, sys, time, statistics
import torch, torch.nn as nn, torch.nn.functional as F
import jax, jax.numpy as jnp
from llm_jax.core import configuration
from llm_jax.perf import measure as bench
from llm_jax.training import metrics
c = configuration.load_preset(sys.argv[1] if len(sys.argv) > 1 else 'gpt2_small_cpu')
m = c.model; V = c.tokenizer.vocab_size; T = c.data.seq_len; B = c.train.batch_size
D, L, N, Fd = m.d_model, m.num_layers, m.num_heads, m.mlp_dim
torch.set_num_threads(os.cpu_count())
class Block(nn.Module):
  def __init__(s):
    super().__init__(); s.ln1 = nn.LayerNorm(D); s.qkv = nn.Linear(D, 3 * D); s.o = nn.Linear(D, D)
    s.ln2 = nn.LayerNorm(D); s.up = nn.Linear(D, Fd); s.down = nn.Linear(Fd, D)
  def forward(s, x):
    q, k, v = s.qkv(s.ln1(x)).view(B, T, 3, N, D // N).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
    x = x + s.o(a)
    return x + s.down(F.gelu(s.up(s.ln2(x)), approximate='tanh'))
class GPT(nn.Module):
  def __init__(s):
    super().__init__(); s.wte = nn.Embedding(V, D); s.wpe = nn.Embedding(T, D)
    s.blocks = nn.ModuleList([Block() for _ in range(L)]); s.ln = nn.LayerNorm(D)
  def forward(s, idx, tgt):
    x = s.wte(idx) + s.wpe(torch.arange(T))
    for b in s.blocks: x = b(x)
    return F.cross_entropy((s.ln(x) @ s.wte.weight.T).view(-1, V), tgt.view(-1))
tm = GPT(); opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, fused=False)
ti = torch.randint(0, V, (B, T)); tt = torch.randint(0, V, (B, T))
def torch_step():
  loss = tm(ti, tt); opt.zero_grad(set_to_none=True); loss.backward()
  torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0); opt.step(); return loss
tr = bench.build_trainer(c); st = [tr.init_fn()]; batch = bench.random_batch(tr, c)
def jax_step():
  st[0], mm = tr.step_fn(st[0], batch); jax.block_until_ready((st[0], mm))
P = jnp.ones((2048, 2048)); mmj = jax.jit(jnp.dot); PT = torch.ones(2048, 2048)
fns = {'jax': jax_step, 'torch': torch_step,
       'jax_peak': lambda: mmj(P, P).block_until_ready(), 'torch_peak': lambda: torch.mm(PT, PT)}
for f in fns.values(): f(); f()
times = {k: [] for k in fns}
for _ in range(int(os.environ.get("REPS", 6))):
  for k, f in fns.items():
    t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
flops = metrics.train_flops_per_token(tr.model_cfg, T) * B * T
med = {k: statistics.median(v) for k, v in times.items()}
print({k: round(1000 * v, 1) for k, v in med.items()}, 'ms')
print('jax MFU %.1f%% of jax peak %.0f GF/s; torch MFU %.1f%% of torch.mm peak %.0f GF/s; jax/torch step time %.2f' % (
  100 * flops / med['jax'] / (2 * 2048**3 / med['jax_peak']), 2 * 2048**3 / med['jax_peak'] / 1e9,
  100 * flops / med['torch'] / (2 * 2048**3 / med['torch_peak']), 2 * 2048**3 / med['torch_peak'] / 1e9,
  med['jax'] / med['torch']))
