"""deepspeed.bf16 end to end on CPU (2 gloo ranks, the shared job): at a learning rate of 1e-6,
whose per-round update is below one bf16 step, the global state still moves, in fp32."""
import torch
from safetensors.torch import load_file


def test_bf16_run_keeps_small_updates(batch):
    run = batch.run_dir("bf16")
    first = load_file(run / "checkpoints/round_00000/global.safetensors")
    final = load_file(run / "final/global.safetensors")
    assert all(t.dtype == torch.float32 for t in final.values())
    moved = sum(int((final[n] != first[n]).sum()) for n in final) / sum(t.numel() for t in final.values())
    assert moved > 0.3, f"round 1 moved only {moved:.3f} of the global weights"
    # and the moves are below what bf16 could represent: they exist only in fp32
    step = max(float((final[n] - first[n]).abs().max()) for n in final)
    assert step < 1e-4, step
