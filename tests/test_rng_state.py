"""A checkpoint's RNG state on GPU machines, simulated on CPU: torch.cuda answers as a machine with
`visible` GPUs would, the current device being this rank's (DeepSpeed sets it to LOCAL_RANK). Each CUDA
generator's state is a tensor; setting the state of a device index that is not visible raises IndexError,
as torch's lazy CUDA initialisation does."""
import pytest
import torch

from training.checkpointing import layout as ckpt


class FakeCuda:
    def __init__(self, visible: int, current: int):
        self.visible, self.current = visible, current
        self.states = {i: torch.full((8,), 10 * visible + i, dtype=torch.uint8) for i in range(visible)}

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": self.states[self._index(device)].clone())
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [self.states[i].clone() for i in range(self.visible)])
        monkeypatch.setattr(cuda, "set_rng_state", self.set_rng_state)

        def set_all(states):  # torch.cuda.set_rng_state_all: one per index, whatever is visible
            for i, state in enumerate(states):
                self.set_rng_state(state, i)
        monkeypatch.setattr(cuda, "set_rng_state_all", set_all)

    def _index(self, device) -> int:
        index = torch.device(device).index if not isinstance(device, int) else device
        index = self.current if index is None else index
        if index >= self.visible:
            raise IndexError(f"device index {index} out of range for {self.visible} visible GPUs")
        return index

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()


@pytest.mark.parametrize("saved_on, resumed_on", [(8, 2), (8, 8), (2, 1)], ids=lambda n: f"{n}gpus")
def test_each_rank_saves_and_restores_its_own_gpus_rng_state_on_any_number_of_gpus(monkeypatch, tmp_path,
                                                                                  saved_on, resumed_on):
    rank = 1 if resumed_on > 1 else 0
    writer = FakeCuda(visible=saved_on, current=rank)
    writer.install(monkeypatch)
    ckpt.write_side_files(tmp_path, rank, {}, {}, {})
    saved = writer.states[rank].clone()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / f"rng_rank{rank}.pt") == []

    reader = FakeCuda(visible=resumed_on, current=rank)
    reader.install(monkeypatch)
    others = {i: s.clone() for i, s in reader.states.items() if i != rank}
    ckpt.restore_rng(tmp_path, rank)
    assert torch.equal(reader.states[rank], saved)  # this rank's generator continues where it was saved
    assert all(torch.equal(reader.states[i], s) for i, s in others.items())  # no other GPU's touched


def test_a_checkpoint_holding_every_gpus_state_restores_the_current_ones(monkeypatch, tmp_path):
    """Checkpoints written before hold a list (torch.cuda.get_rng_state_all) of all 8 visible GPUs."""
    FakeCuda(visible=1, current=0).install(monkeypatch)
    ckpt.write_side_files(tmp_path, 1, {}, {}, {})
    old = torch.load(tmp_path / "rng_rank1.pt", weights_only=True)
    old["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(8)]
    torch.save(old, tmp_path / "rng_rank1.pt")
    reader = FakeCuda(visible=2, current=1)
    reader.install(monkeypatch)
    ckpt.restore_rng(tmp_path, 1)
    assert torch.equal(reader.states[1], old["cuda"][1])
