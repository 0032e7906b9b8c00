"""DeepSpeed engine helpers: ZeRO-0 clipping done by `engine_step`, and the single-GPU ZeRO rule."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.train.engine import effective_zero_stage, engine_step, make_engine


def _reference(model: nn.Module, batches, lr: float, clip: float | None) -> nn.Module:
    """Plain AdamW steps, gradients scaled by min(1, clip / (‖g‖ + 1e-6)) when `clip` is given."""
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.0)
    for x, y in batches:
        ((ref(x) - y) ** 2).mean().backward()
        grads = [p.grad for p in ref.parameters()]
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        if clip is not None:
            assert norm > 2 * clip  # clipping is active on every step
            for g in grads:
                g.mul_(min(1.0, clip / (norm + 1e-6)))
        opt.step()
        opt.zero_grad()
    return ref


def test_zero0_engine_step_clips_like_hand_clipped_adamw_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    # Adam is nearly invariant to one gradient scale, not to per-step scales: three steps with
    # differently scaled batches, so each step's clip coefficient differs
    batches = [(torch.randn(8, 6) * s, torch.randn(8, 3) * s) for s in (1.0, 4.0, 0.5)]
    clip, lr = 0.05, 0.1
    clipped, unclipped = _reference(model, batches, lr, clip), _reference(model, batches, lr, None)

    engine = make_engine(model, lr=lr, weight_decay=0.0, warmup_steps=0, micro_batch=8, zero_stage=0,
                         grad_clip=clip, device=torch.device("cpu"), precision="fp32")
    assert engine.gradient_clipping() == 0.0  # DeepSpeed's own stage-0 clip is off: engine_step clips
    for x, y in batches:
        engine.backward(((engine(x) - y) ** 2).mean())
        engine_step(engine, clip)

    for a, b in zip(engine.module.parameters(), clipped.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max(float((a - c).abs().max()) for a, c in
               zip(engine.module.parameters(), unclipped.parameters(), strict=True)) > 1e-3


def test_one_gpu_worker_uses_zero0_for_stages_1_2_only() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [effective_zero_stage(s, 1, cuda) for s in (0, 1, 2, 3)] == [0, 0, 0, 3]
    assert [effective_zero_stage(s, 2, cuda) for s in (0, 1, 2, 3)] == [0, 1, 2, 3]
    assert [effective_zero_stage(s, 1, cpu) for s in (0, 1, 2, 3)] == [0, 1, 2, 3]


class _WithBuffers(nn.Module):
    """A layer with a persistent buffer (saved) and a non-persistent one (rebuilt by the model, like DiT's
    fixed sin-cos `pos_embed`)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("fixed", torch.arange(4.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x + self.fixed)


def test_full_state_keeps_persistent_buffers_and_loads_into_a_fresh_module() -> None:
    from pipeline.train.engine import full_state, load_module_state

    torch.manual_seed(0)
    model = _WithBuffers()
    model.count.fill_(7.0)
    engine = make_engine(model, lr=0.1, weight_decay=0.0, warmup_steps=0, micro_batch=2, zero_stage=0,
                         grad_clip=1.0, device=torch.device("cpu"), precision="fp32")
    engine.backward(engine(torch.randn(2, 4)).square().mean())
    engine_step(engine, 1.0)
    tensors, _ = full_state(engine)
    assert "buffer/count" in tensors and "buffer/fixed" not in tensors  # what state_dict() would hold
    fresh = _WithBuffers()
    load_module_state(fresh, tensors)  # strict: a saved non-persistent buffer was "Unexpected key(s)"
    assert float(fresh.count) == 7.0
    for a, b in zip(fresh.parameters(), engine.module.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_engine(tmp_path) -> None:
    """torch's `lock` file in DeepSpeed's op build directory, left by a killed worker, is cleared.

    Before, every later process waited for it forever (four CI tests hit their 20-minute limit).
    The op's build is copied from this machine's cache, so nothing is compiled when it is there.
    """
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    build = tmp_path / "deepspeed_shm_comm"  # where torch builds with TORCH_EXTENSIONS_DIR=tmp_path
    shutil.copytree(built, build, ignore=shutil.ignore_patterns("lock"))
    (build / "lock").touch()  # what a process killed while holding it leaves behind
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    code = ("from pipeline.train.engine import load_comm_op; load_comm_op(); "
            "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; "
            "print('loaded', hasattr(ShareMemCommBuilder().load(), 'initialize'))")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise AssertionError("the op's load waited on the dead process's lock") from None
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded True" in out.stdout
    assert not (build / "lock").exists()
    assert f"removing {build / 'lock'}, a build lock left by a killed process" in out.stderr
