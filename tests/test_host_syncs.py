"""A training micro step never makes the host wait for the GPU: no tensor value is read on the host
(.item(), bool(), .cpu()) and no op has a data-dependent shape (boolean-mask indexing, nonzero) between
the batch going in and the optimizer step. On a GPU each of those blocks the Python thread until the
device catches up, so the GPU idles while the next micro step is prepared.

The CPU has no device to wait for; these tests see the same operations through a dispatch mode that
records every host read and every data-dependent shape, and through meta tensors (no data at all: any
read raises)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.diffusion import ObjectiveConfig, compute_loss
from models.gpt import GPT, GPTConfig
from training.metrics import LossWindow

HOST_READS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "masked_select", "unique", "_unique2"}


class HostWaits(TorchDispatchMode):
    """Records the aten ops that would make the host wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.seen.append(name)
        elif name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.seen.append(f"{name} with a boolean mask")  # its output shape is the number of Trues
        return func(*args, **(kwargs or {}))


MODELS = {"ar": "causal", "mdlm": "bidirectional", "bd3lm": "block_causal"}


@pytest.mark.parametrize("objective", MODELS)
def test_a_micro_steps_loss_and_backward_read_nothing_on_the_host(objective):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64, attention=MODELS[objective],
                       block_length=4 if objective == "bd3lm" else 0)
    model = GPT(config)
    x = torch.randint(0, 63, (2, 16))
    with HostWaits() as waits:
        loss = compute_loss(model, x, torch.roll(x, -1, 1), ObjectiveConfig(name=objective), mask_id=63, seed=1)
        loss.backward()
        LossWindow().add(loss, 2)
    assert waits.seen == []
    assert loss.dtype == torch.float32


def test_the_recorder_sees_the_waits_it_looks_for():
    t = torch.tensor([0, 3, 0, 5])
    with HostWaits() as waits:
        bool(t.any())
        t[t > 0]
        t.nonzero()
    assert waits.seen == ["_local_scalar_dense", "index with a boolean mask", "nonzero"]


def test_the_loss_window_sums_on_the_losss_device_and_reads_once():
    window = LossWindow()
    for step in range(3):
        for micro in range(2):
            window.add(torch.tensor(float(step + micro), device="meta"), 2)  # meta: any host read raises
        window.end_step()
    assert window.total.device.type == "meta" and window.steps == 3
    cpu = LossWindow()
    for loss in (1.0, 2.0, 4.5):
        cpu.add(torch.tensor(loss))
        cpu.end_step()
    assert cpu.read() == pytest.approx(2.5) and cpu.steps == 0 and cpu.total is None


def test_the_ar_loss_of_a_bf16_model_is_computed_in_fp32():
    """DeepSpeed's bf16 mode casts the model itself (no autocast): its logits are bf16, and a bf16 loss
    moves in steps of 2^-7 ~ 0.008 near 1.5 nats."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64, attention="causal"))
    x = torch.randint(0, 63, (4, 16))
    y = torch.roll(x, -1, 1)
    model = model.to(torch.bfloat16)
    loss = compute_loss(model, x, y, ObjectiveConfig(name="ar"), mask_id=63, seed=0)
    assert loss.dtype == torch.float32
    logits = model(x)[..., :63].double()  # the same bf16 logits, scored in float64
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert abs(loss.item() - want.item()) < 1e-5  # fp32 rounding; a bf16 loss is off by up to ~4e-3
